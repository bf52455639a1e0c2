"""One FederationSettings: validated knobs, and serve and demo read the same file the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from coordinator import demo as demo_cli
from coordinator import serve as serve_cli
from coordinator.federation_settings import (
    FederationSettings,
    FederationSettingsError,
    load_federation_settings,
)
from shared_model.schedule import ternary_fraction_at

FILE = """\
stage: 3
buffer_size: 4
steps_per_unit: 12
shared_sync_every: 4
lease_seconds: 120
max_in_flight: 3
outer_lr: 0.7
outer_momentum: 0.5
max_staleness: 5
checkpoint_every: 4
trim: 1
diversity_lr: 0.01
column_codec: sparse
shared_codec: ternary
score_every: 4
rescore_every_versions: 10
column_check_window: 32
"""


def single(command) -> typer.Typer:
    app = typer.Typer()
    app.command()(command)
    return app


def serve_argv(tmp_path: Path, *args: str) -> list[str]:
    init, secret = tmp_path / "stage2.safetensors", tmp_path / "superexec.secret"
    init.write_bytes(b"unused")
    secret.write_bytes(b"s" * 32)
    return [
        *("--superlink", "127.0.0.1:9", "--init", str(init), "--work-dir", str(tmp_path / "w")),
        *("--minutes", "1", "--insecure", "--superexec-secret-file", str(secret), *args),
    ]


def parsed_by_serve(monkeypatch, tmp_path: Path, *args: str) -> FederationSettings:
    seen = {}
    monkeypatch.setattr(serve_cli, "run_serve", lambda *a, **k: seen.setdefault("s", a[6]))
    done = CliRunner().invoke(single(serve_cli.serve), serve_argv(tmp_path, *args))
    assert done.exit_code == 0, done.output
    return seen["s"]


def parsed_by_demo(monkeypatch, *args: str) -> FederationSettings:
    seen = {}
    monkeypatch.setattr(demo_cli, "run_demo", lambda *a: seen.setdefault("s", a[4]))
    done = CliRunner().invoke(single(demo_cli.demo), list(args))
    assert done.exit_code == 0, done.output
    return seen["s"]


def test_serve_and_demo_parse_one_file_into_the_same_settings(monkeypatch, tmp_path):
    path = tmp_path / "federation.yaml"
    path.write_text(FILE)
    by_serve = parsed_by_serve(monkeypatch, tmp_path, "--federation-config", str(path))
    by_demo = parsed_by_demo(monkeypatch, "--federation-config", str(path))
    assert by_serve == by_demo == load_federation_settings(path)
    assert (by_serve.outer_lr, by_serve.trim, by_serve.column_codec) == (0.7, 1, "sparse")
    assert by_serve.shared_sync_every == 4  # in-unit shared syncs: parts of 4 of the 12 steps
    assert by_serve.column_check_window == 32
    # Flags win over the file, in both commands.
    flags = ("--federation-config", str(path), "--outer-lr", "0.3", "--max-staleness", "2")
    flags += ("--shared-sync-every", "6")
    by_serve = parsed_by_serve(monkeypatch, tmp_path, *flags)
    by_demo = parsed_by_demo(monkeypatch, *flags)
    assert by_serve == by_demo
    assert (by_serve.outer_lr, by_serve.max_staleness, by_serve.buffer_size) == (0.3, 2, 4)
    assert by_serve.shared_sync_every == 6


def test_command_defaults():
    # serve's defaults are the settings' own; the demo buffers one result per participant.
    assert load_federation_settings(None) == FederationSettings()
    assert (FederationSettings().outer_lr, FederationSettings().outer_momentum) == (1.5, 0.0)
    demo = load_federation_settings(None, {"outer_lr": None}, defaults={"buffer_size": 5})
    assert demo.buffer_size == 5 and demo.outer_lr == 1.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("outer_lr: 0.5\nbogus: 1\n", "unknown federation setting(s) bogus"),
        ("max_staleness: -1\n", "max_staleness = -1 is invalid: allowed a value >= 0"),
        ("outer_momentum: 1.5\n", "outer_momentum = 1.5 is invalid: allowed 0 <= value < 1"),
        ("checkpoint_every: ten\n", "checkpoint_every = 'ten' is invalid: allowed an integer"),
        ("update_norm_tolerance: inf\n", "write numbers unquoted, and infinity as .inf"),
        ("column_codec: zip\n", "allowed ternary or sparse"),
        ("buffer_size: 2\ntrim: 1\n", "trim = 1 is invalid"),
        ("- a list\n", "must be a mapping"),
        ("stage: 5\n", "stage = 5 is invalid: allowed 3 or 4"),
        ("shared_threshold: 2.5\n", "shared_threshold = 2.5 is invalid: allowed 0 < value < 2"),
        ("column_check_window: 1\n", "column_check_window = 1 is invalid: allowed a value >= 2"),
    ],
)
def test_bad_files_are_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(FederationSettingsError) as info:
        load_federation_settings(path)
    assert message in str(info.value)
    if "unknown" in message:
        assert "allowed: stage, steps_per_unit" in str(info.value)


def test_bad_keys_and_values_are_refused_by_both_commands(monkeypatch, tmp_path):
    def fail(*_a, **_k):
        raise AssertionError("started although the settings are bad")

    monkeypatch.setattr(serve_cli, "run_serve", fail)
    monkeypatch.setattr(demo_cli, "run_demo", fail)
    path = tmp_path / "bad.yaml"
    path.write_text("bogus_knob: 3\n")
    for extra, message in ((["--federation-config", str(path)], "bogus_knob"),
                           (["--trim", "-1"], "trim = -1 is invalid")):  # fmt: skip
        for argv in (extra, serve_argv(tmp_path, *extra)):
            command = demo_cli.demo if argv is extra else serve_cli.serve
            done = CliRunner().invoke(single(command), argv)
            said = " ".join(done.output.replace("│", " ").split())
            assert done.exit_code == 2 and message in said and "allowed" in said, said


def test_schedule_length_follows_the_stage_budget():
    """Token budget: its inner steps. Minutes only: the steps no longer in flight, plus
    what the recent answer rate answers in the time left, plus the unit each node will
    finish when the time is up; a unit's share of the schedule never goes back; until
    then the previous stage's rate, if known. Neither: units_hint x steps_per_unit."""
    import time

    from coordinator.coordinator_process import StageBudget
    from coordinator.db.leases import StageRate

    settings = FederationSettings(units_hint=50, steps_per_unit=20)
    assert StageBudget(tokens=1_000_001).schedule_steps(1000, settings) == 1001
    assert StageBudget().schedule_steps(1000, settings) == 1000
    half_gone = StageBudget(minutes=10, started=time.monotonic() - 300)
    for position, rate in [
        (0, None),  # nothing leased yet
        (150, StageRate(in_flight=50, finishing=20, per_s=None)),  # fewer than two answers
        (100, StageRate(in_flight=100, finishing=20, per_s=0.5)),  # nothing answered yet
        (100, StageRate(in_flight=60, finishing=20, per_s=0.5)),  # fewer answered than out
    ]:
        assert half_gone.schedule_steps(1000, settings)(position, rate) == 1000  # the fallback
    total = half_gone.schedule_steps(1000, settings)
    # 100 steps done, 0.5 a second lately: 150 more in the 300 s left, and the 20 steps
    # of the units the nodes are training then, which the end finishes.
    assert 268 <= total(150, StageRate(in_flight=50, finishing=20, per_s=0.5)) <= 270
    # The rate doubles: the schedule grows, but no unit lands earlier in it than the last.
    longer = total(200, StageRate(in_flight=50, finishing=20, per_s=1.0))
    assert 355 <= longer <= 362 and ternary_fraction_at(200, longer, (0.25, 0.5, 0.75, 1)) == 0.75
    # It falls: the schedule ends with the units that will be answered.
    assert total(230, StageRate(in_flight=50, finishing=20, per_s=0.05)) == 231
    over = StageBudget(minutes=1, started=time.monotonic() - 120)
    past = over.schedule_steps(1000, settings)(100, StageRate(0, 0, 1.0))
    assert past == 101  # past the budget
    # The previous stage's rate (steps a minute) over this stage's minutes is the fallback.
    primed = half_gone.schedule_steps(1000, settings, prior_steps_per_minute=18.0)
    assert primed(0) == primed(100, StageRate(in_flight=60, finishing=20, per_s=0.5)) == 180
    assert 268 <= primed(150, StageRate(in_flight=50, finishing=20, per_s=0.5)) <= 270
    # ... then the extrapolation for good: a batch of leases later is more in flight than
    # answered again, and the schedule does not fall back to 180
    assert primed(200, StageRate(in_flight=120, finishing=20, per_s=0.5)) > 200


def test_defence_flags_reach_the_settings_of_both_commands(monkeypatch, tmp_path):
    flags = ("--aggregator", "median", "--clip-factor", "2", "--max-update-ratio", "1.5",
             "--update-norm-tolerance", "3", "--column-loss-tolerance", "0.1",
             "--quarantine-after", "2")  # fmt: skip
    by_serve = parsed_by_serve(monkeypatch, tmp_path, *flags)
    by_demo = parsed_by_demo(monkeypatch, *flags)
    picked = (by_serve.aggregator, by_serve.clip_factor, by_serve.max_update_ratio,
              by_serve.update_norm_tolerance, by_serve.column_loss_tolerance,
              by_serve.quarantine_after)  # fmt: skip
    assert picked == ("median", 2.0, 1.5, 3.0, 0.1, 2)
    assert (by_demo.aggregator, by_demo.quarantine_after) == ("median", 2)
    with pytest.raises(FederationSettingsError, match="aggregator = 'krum' is invalid: allowed"):
        FederationSettings(aggregator="krum")
    with pytest.raises(FederationSettingsError, match="quarantine_after = 5 is invalid"):
        FederationSettings(quarantine_after=5, reputation_window=4)
