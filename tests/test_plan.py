"""Planner: parameter counts, the seed errata numbers (DESIGN §8), memory, traffic, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from coordinator.commands import plan as plan_cmd
from coordinator.plan.compute import STAGES, PlanSettings, build_plan, stage_flops_per_token
from coordinator.plan.errata import BEGIN, END, errata_block
from coordinator.plan.hardware import GPUS, PlanError, gpu_spec
from coordinator.plan.memory import MemoryLayout, estimate_memory, fit_options
from coordinator.plan.params import count_params
from coordinator.plan.seed import (
    compare,
    round_sig,
    s44_memory_bytes,
    seed_plan,
    stage1_rate_check,
)
from coordinator.plan.traffic import CodecBits
from shared_model.config_loading import load_config

ROOT = Path(__file__).resolve().parents[1]
FULL = load_config("full")


@pytest.fixture(scope="module")
def full_plan():
    return build_plan(FULL)


def test_full_counts_reproduce_seed_figures():
    c = count_params(FULL)
    assert c.ffn == 3 * 4096 * 11008 == 135_266_304
    assert round_sig(c.expert, 4) == 135.3e6
    assert c.column == 60 * c.expert and round_sig(c.column, 3) == 8.12e9
    assert round_sig(c.experts_total, 3) == 1.04e12
    assert round_sig(c.shared, 3) == 6.83e9
    # DESIGN §8 decomposition: 2·V·d + 20·(attn + FFN) + 60·3·d², plus norms and decays.
    d = 4096
    core = 2 * 32768 * d + 20 * (41_943_040 + c.ffn) + 60 * 3 * d * d
    assert c.shared == core + (2 * 80 + 1) * d + 60 * d
    assert c.moe_active == c.shared + c.column + 60 * d * 128


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_counts_equal_real_model(preset):
    torch = pytest.importorskip("torch")
    model_mod = pytest.importorskip("shared_model.model")
    torch.set_num_threads(1)
    cfg = load_config(preset)
    c = count_params(cfg)
    dense = model_mod.PerspectiveModel(cfg, moe=False)
    moe = model_mod.PerspectiveModel(cfg, moe=True)
    assert dense.num_parameters() == c.dense_total
    assert moe.num_parameters() == c.moe_total
    assert moe.num_parameters("experts") == c.experts_total
    assert moe.num_parameters("shared") == c.shared + c.routers  # the model counts routers
    assert dense.num_parameters("embeddings") == c.embedding + c.lm_head


def test_pdr_chunk_constant_matches_model():
    pdr = pytest.importorskip("shared_model.pdr")
    from coordinator.plan.compute import PDR_MAX_CHUNK

    assert pdr.MAX_STABLE_CHUNK == PDR_MAX_CHUNK


def test_stage1_flops_and_hours(full_plan):
    s1 = full_plan.stage(1)
    assert s1.flops == pytest.approx(6 * count_params(FULL).shared * 1e12)
    assert round_sig(s1.flops, 2) == 4.1e22
    assert round(s1.flops / 3.2e21, 1) == 12.8
    assert round_sig(s1.gpu_hours, 2) == 91e3  # ~91k A100-hours at 40 % MFU
    need, possible = stage1_rate_check()
    assert round(need) == 329 and not possible


def test_totals_reproduce_design_8(full_plan):
    assert round_sig(full_plan.total_flops, 2) == 7.4e22
    assert round_sig(full_plan.total_gpu_hours, 3) == 164e3
    assert round_sig(full_plan.total_cost_usd, 2) == 490e3
    # per-use basis: the dense seed's tied FFNs run in all 80 layers.
    assert full_plan.stage(1).flops_per_use / full_plan.stage(1).flops > 2.2


def test_stage_flop_factors():
    c = count_params(FULL)
    p3, _ = stage_flops_per_token(FULL, c, STAGES[3])
    p4, _ = stage_flops_per_token(FULL, c, STAGES[4])
    p5, _ = stage_flops_per_token(FULL, c, STAGES[5])
    assert p3 == 6 * c.moe_active
    assert p4 == 8 * c.moe_active  # + teacher forward 2·N_active
    assert p5 == 4 * c.moe_active + 2 * c.routers  # only router grads


def test_seed_comparisons_flag_the_wrong_ones():
    flags = {c.figure.key: c.agrees for c in compare(seed_plan(FULL))}
    assert flags == {
        "expert_params": True,
        "column_params": True,
        "experts_total": True,
        "shared_params": True,
        "stage1_flops": False,
        "stage1_a100_hours": False,
        "total_a100_hours": False,
        "total_cost_usd": False,
        "s44_memory": False,
    }


def test_stage3_memory_layout(full_plan):
    c = count_params(FULL)
    # Seed §4.4 on its own terms: 4 columns × 8.12B × (2 B weights + 8 B AdamW m, v).
    assert s44_memory_bytes(full_plan) == 4 * c.column * 10
    assert round(s44_memory_bytes(full_plan) / 1e9, 1) == 324.6
    mem = full_plan.stage(3).memory
    assert mem.components["experts (trained)"] == 4 * c.column * 16
    assert mem.components["shared (trained)"] == c.shared * 16
    assert not mem.fits and mem.total > 600e9
    one = estimate_memory(FULL, c, 3, GPUS["a100"], MemoryLayout(experts_per_rank=1), 64)
    assert not one.fits  # even one whole column (130 GB) does not fit 80 GB
    sliced = MemoryLayout(
        experts_per_rank=1,
        expert_layers=20,
        optimizer_bits=8,
        master_fp32=False,
        participant_gpus=4,
    )
    assert estimate_memory(FULL, c, 3, GPUS["a100"], sliced, 64).fits
    fits = {f.description: f for f in fit_options(FULL, c, GPUS["a100"])}
    assert [f.max_expert_layers for f in fits.values()] == [0, 28, 43, 76]


def test_stage1_fsdp_shards_shared(full_plan):
    s1 = full_plan.stage(1).memory
    assert s1.components["shared (trained)"] == pytest.approx(count_params(FULL).shared * 16 / 64)
    assert s1.fits


def test_traffic_per_sync(full_plan):
    c, cb, h = count_params(FULL), CodecBits(), PlanSettings().local_steps
    t = full_plan.stage(3).traffic
    assert t.per_sync_up == pytest.approx(
        (4 * c.column * cb.delta_bits + c.shared * cb.shared_bits) / 8
    )
    assert t.initial_download == pytest.approx(
        (4 * c.column * cb.column_bits + c.shared * cb.shared_initial_bits) / 8
    )
    assert t.syncs == pytest.approx(2e11 / 128 / (h * 512 * 4096))
    assert full_plan.stage(1).traffic is None
    # A node fetches the shared layers and 4 of 128 columns: 157 GB in FP32 is 1.2 bits per
    # parameter of the whole model (issue 15's join target is 3; tiny, 8 columns: 14-18).
    assert t.join_bits_per_param == pytest.approx(8 * t.initial_download / c.moe_total)
    assert 1.1 < t.join_bits_per_param < 1.3


def test_column_bits_plan_stage_4_joins_only():
    """Stage 3's columns are FP latents: a node joins them in FP32 whatever --column-bits
    says; stage 4's experts join as trits once they are all ternary."""
    c = count_params(FULL)
    plan = build_plan(FULL, PlanSettings(codec=CodecBits(column_bits=1.74)))
    s3, s4 = plan.stage(3).traffic, plan.stage(4).traffic
    assert s3.initial_download == pytest.approx((4 * c.column * 32 + c.shared * 32) / 8)
    assert s4.initial_download == pytest.approx((4 * c.column * 1.74 + c.shared * 32) / 8)
    assert 0.25 < s4.join_bits_per_param < 0.27


def test_a_node_joining_stage_4_late_also_fetches_the_teacher(full_plan):
    """Past stage 4's boundary a joining node fetches the teacher besides its join: the
    teacher checkpoint's shared layers and its columns, bf16 parts whatever the experts'
    join costs (test_federated_downlink.py: such a node's "teacher" bytes)."""
    c = count_params(FULL)
    s3, s4 = full_plan.stage(3).traffic, full_plan.stage(4).traffic
    assert s3.teacher_download == 0
    assert s4.teacher_download == 2 * (4 * c.column + c.shared)
    trits = build_plan(FULL, PlanSettings(codec=CodecBits(column_bits=1.74))).stage(4)
    assert trits.traffic.teacher_download == s4.teacher_download


def test_participant_host_ram(full_plan):
    """A full-size volunteer with 4 columns, as built: FP32 replica, local copies and
    residual, bf16 corrections, and stage 4's bf16 teacher (the code's side of these figures:
    test_eager_updates.py::test_the_planner_counts_what_a_node_keeps_between_units)."""
    c = count_params(FULL)
    shared, held = c.shared + c.routers, 4 * c.column
    s3, s4 = full_plan.stage(3).participant_host, full_plan.stage(4).participant_host
    assert s3.replica == 4 * (shared + held) and s3.local_columns == 4 * held
    assert s3.residual == 4 * shared and s3.corrections == 2 * (held + 2 * shared)
    assert s3.teacher == 0 and s4.teacher == s4.replica / 2  # bf16: TEACHER_DTYPE
    assert 400e9 < s3.total < 410e9 and s4.total == s3.total + s4.teacher
    assert full_plan.stage(1).participant_host is None


def test_coordinator_host_at_1000_and_100000_participants(full_plan):
    """The full model's coordinator, as built: what one process would hold and move."""
    c, cb = count_params(FULL), CodecBits()
    hs = PlanSettings().host
    for number in (3, 4):
        stage = full_plan.stage(number)
        small, big = stage.hosts
        assert (small.participants, big.participants) == (1_000, 100_000)
        assert (small.buffer_size, big.buffer_size) == (250, 25_000)
        # Masters + (max_staleness + 1) published copies of every column, in FP32: ~41.6 TB.
        assert small.ram_columns == 4 * c.experts_total * (2 + hs.max_staleness)
        assert small.ram_columns > 40e12
        # The shared buffer grows with the fleet: 683 TB of pseudo-gradients at 100k.
        assert big.ram_shared == 4 * c.shared * (3 + 25_000)
        assert big.results_per_s == pytest.approx(100 * small.results_per_s)
        assert big.ingress_bps == pytest.approx(big.results_per_s * stage.traffic.per_sync_up)
        assert small.join_bytes == pytest.approx(1_000 * stage.traffic.initial_download)
        # A checkpoint is the whole model in FP32; stage 4 also keeps the teacher's.
        checkpoint = 4 * (c.experts_total + c.shared)
        per_version = (c.shared * cb.shared_bits + c.n_experts * c.column * cb.delta_bits) / 8
        keep = 3 if number == 4 else 2
        assert small.disk_checkpoints == checkpoint * keep
        assert small.disk_versions == pytest.approx(per_version * hs.checkpoint_every)
    assert full_plan.stage(1).hosts == []


def test_overrides_and_other_gpus():
    base = build_plan(FULL)
    h100 = build_plan(FULL, PlanSettings(gpu=gpu_spec("h100"), tokens={3: 4e11}))
    assert h100.stage(1).gpu_hours == pytest.approx(base.stage(1).gpu_hours * 312 / 989)
    assert h100.stage(3).flops == pytest.approx(2 * base.stage(3).flops)


@pytest.mark.parametrize(
    "settings",
    [
        PlanSettings(mfu=-0.4),
        PlanSettings(mfu=1.5),
        PlanSettings(gpus=0),
        PlanSettings(tokens={2: 1e9}),
        PlanSettings(flops_basis="magic"),
        PlanSettings(layout=MemoryLayout(experts_per_rank=500)),
    ],
)
def test_bad_settings_raise(settings):
    with pytest.raises(PlanError):
        build_plan(FULL, settings)


def test_unknown_gpu():
    with pytest.raises(PlanError, match="unknown GPU 'tpu'"):
        gpu_spec("tpu")


def test_errata_doc_matches_planner():
    text = (ROOT / "docs" / "seed-errata.md").read_text()
    block = text[text.index(BEGIN) : text.index(END) + len(END)] + "\n"
    assert block == errata_block(FULL), "regenerate: perspective plan --preset full --format errata"
    for figure in ("4.1e22", "329 TFLOP/s", "91", "7.4e22", "164k", "$490k", "324.6 GB"):
        assert figure in text


# --- CLI --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root (keeps ``plan`` a sub-command)."""

    plan_cmd.register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, ["plan", *args])


def test_cli_params_table(cli):
    r = cli("--preset", "full", "--params")
    assert r.exit_code == 0, r.output
    assert "135.3M" in r.output and "6.833B" in r.output and "8.116B" in r.output


def test_cli_json(cli):
    r = cli("--preset", "full", "--format", "json", "--gpu", "h100", "--mfu", "0.5")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["settings"]["gpu"]["name"] == "h100"
    assert [s["stage"]["number"] for s in data["stages"]] == [1, 3, 4, 5]
    seed = {s["key"]: s for s in data["seed"]}
    assert round_sig(seed["stage1_flops"]["computed"], 2) == 4.1e22
    assert 1.1 < data["stages"][1]["traffic"]["join_bits_per_param"] < 1.3
    assert data["stages"][2]["traffic"]["teacher_download"] > 75e9  # stage 4, late joins
    assert 400e9 < data["stages"][1]["participant_host"]["total"] < 410e9
    hosts = data["stages"][1]["coordinator_host"]
    assert [h["participants"] for h in hosts] == [1_000, 100_000]
    assert all(h["ram"] > 40e12 and h["disk"] > 0 for h in hosts)


def test_cli_markdown_small(cli):
    r = cli("--preset", "small", "--format", "markdown", "--tokens", "3=1e9")
    assert r.exit_code == 0, r.output
    assert "### Compute per stage" in r.output and "Seed figures" not in r.output
    assert "### Participant host RAM per federated stage" in r.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mfu", "-0.4"], "mfu"),
        (["--gpu", "tpu"], "unknown GPU"),
        (["--format", "xml"], "--format"),
        (["--tokens", "3:5"], "STAGE=COUNT"),
        (["--preset", "huge"], "unknown preset"),
        (["--fleets", "1000,lots"], "--fleets"),
        (["--fleets", "0"], "fleet size = 0"),
    ],
)
def test_cli_bad_args(cli, args, message):
    r = cli(*args)
    assert r.exit_code == 2
    assert message in r.output
