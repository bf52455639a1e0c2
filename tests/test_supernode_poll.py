"""The SuperNode's poll, shortened (participant.flower.supernode_main): Flower 1.42 sleeps
3 s whenever the SuperLink has nothing for a node, and 0.5 s between checks for a reply."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest
from flwr.supernode import start_client_internal as flower_loop
from typer.testing import CliRunner

from participant.flower.supernode import SuperNodeProcess
from participant.flower.supernode_main import PollError, shorten_poll
from shared_model.cli import build_app


@pytest.fixture
def restore_flower_time(monkeypatch):
    monkeypatch.setattr(flower_loop, "time", time)


def test_flowers_own_loop_sleeps_3_s_idle_and_half_a_second_for_replies() -> None:
    """What the launcher relies on: flwr 1.42's SuperNode loop sleeps through its module's
    ``time`` (a newer Flower that does not is refused, tested below)."""
    import inspect

    source = inspect.getsource(flower_loop)
    assert flower_loop.time is time
    assert source.count("time.sleep(3)") == 1 and source.count("time.sleep(0.5)") == 2


def test_every_sleep_of_the_loop_is_capped_at_the_interval(restore_flower_time) -> None:
    slept: list[float] = []
    shorten_poll(0.2, sleep=slept.append)
    flower_loop.time.sleep(3)  # idle: nothing pulled
    flower_loop.time.sleep(0.5)  # waiting for the worker's reply
    flower_loop.time.sleep(0.1)  # already shorter: unchanged
    assert slept == [0.2, 0.2, 0.1]
    assert flower_loop.time.monotonic is time.monotonic  # the rest of `time` is untouched
    assert time.sleep is not flower_loop.time.sleep  # only Flower's loop sees the cap


@pytest.mark.parametrize("seconds", [0.0, 0.01, 3.5, math.nan, math.inf])
def test_unusable_intervals_are_refused(seconds, restore_flower_time, tmp_path) -> None:
    with pytest.raises(PollError, match="allowed 0.05 to 3.0 s"):
        shorten_poll(seconds)
    assert flower_loop.time is time
    with pytest.raises(PollError):
        SuperNodeProcess(tmp_path, "127.0.0.1:9", poll_interval=seconds)


def test_a_flower_that_sleeps_otherwise_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(flower_loop, "time", object())
    with pytest.raises(PollError, match="run the plain flower-supernode"):
        shorten_poll(0.2)


def test_the_supernode_runs_through_the_launcher_only_when_asked(tmp_path) -> None:
    plain = SuperNodeProcess(tmp_path / "a", "127.0.0.1:9")
    assert plain.argv[0].endswith("flower-supernode") and "--poll-interval" not in plain.argv
    fast = SuperNodeProcess(tmp_path / "b", "127.0.0.1:9", poll_interval=0.5)
    assert fast.argv[:5] == [
        sys.executable, "-m", "participant.flower.supernode_main", "--poll-interval", "0.5"
    ]  # fmt: skip
    assert fast.argv[5:7] == ["--superlink", "127.0.0.1:9"]


def test_the_launcher_refuses_a_bad_interval_before_starting_flower() -> None:
    cmd = [sys.executable, "-m", "participant.flower.supernode_main", "--poll-interval", "9"]
    done = subprocess.run([*cmd, "--insecure"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "allowed 0.05 to 3.0 s" in done.stderr, done.stderr


@pytest.mark.parametrize("command", ["local", "run"])
def test_participant_commands_refuse_a_bad_poll_interval(command, tmp_path) -> None:
    args = ["participant", command, "--poll-interval", "0"]
    if command == "local":
        args += ["--superlink", "127.0.0.1:9", "--base-dir", str(tmp_path)]
    else:
        args += ["--state-dir", str(tmp_path)]
    result = CliRunner().invoke(build_app(["participant"]), args)
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.replace("│", " ").split())
    assert "--poll-interval" in said and "allowed 0.05 to 3.0 s" in said, said
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.integration
def test_a_laptop_network_asked_for_a_short_poll_runs_flowers_supernode_through_it(tmp_path):
    """``participant local --poll-interval`` (LocalNetwork's ``poll_interval``): the node is
    Flower's own SuperNode, started through the launcher, and it joins the SuperLink."""
    import psutil

    from coordinator.local_network import LocalNetwork
    from tests.conftest import wait_for

    with LocalNetwork(tmp_path / "net", n_participants=1, poll_interval=0.2) as net:
        polls = [
            argv[argv.index("--poll-interval") + 1]
            for proc in psutil.process_iter(["cmdline"])
            if "participant.flower.supernode_main" in (argv := proc.info["cmdline"] or [])
            and str(tmp_path) in " ".join(argv)
        ]
        assert polls == ["0.2"], polls
        driver = net.open_driver()
        try:
            wait_for(lambda: len(driver.node_ids()) == 1, 60, "the node on the SuperLink")
        finally:
            driver.close()
