"""``perspective demo``: the whole network on one machine, end to end.

1. prepares the corpus (``--data``; default the offline standard library's ``.py`` files)
   and tokenizer;
2. trains the dense seed centrally for a short while (stage 1) and clones its FFNs into
   experts (stage 2) — the seed's order, which the prototype showed matters;
3. starts a local SuperLink, the coordinator (SQLite, blob service) and N participants
   (SuperNode + worker each) as child processes on 127.0.0.1;
4. runs federated stage 3 then stage 4, with a live view of participants, versions,
   validation loss and traffic; Ctrl-C stops cleanly (no orphan processes);
5. prints a summary and where the database and checkpoints are.
"""

from __future__ import annotations

import signal
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

import typer

from coordinator import federation_options as fo
from coordinator.demo_view import DemoView
from coordinator.federation_settings import FederationSettings
from shared_model.files import write_json_atomic

DEMO_TRAIN = {"small": ["train.batch_size=4", "train.seq_len=128"]}
#: The demo's own federation defaults per preset (a file or a flag overrides them). A
#: ``tiny`` unit of 10 steps trains ~1 s, shorter than what each result costs the
#: coordinator (held-out check, aggregation, publishing) on the same 2 cores: units of 20
#: steps trained 1.3-1.7x the tokens in the same minutes and ended lower (§5.1,
#: "Utilisation"). A ``small`` unit of 10 steps already trains ~15 s.
DEMO_FEDERATION = {"tiny": {"steps_per_unit": 20}}
DEMO_HELP = "Run the local federated network: central seed, then federated stages 3 and 4."


def demo(
    preset: str = typer.Option("tiny", help="Model preset: tiny (quick) or small."),
    participants: int = typer.Option(
        3, min=1, max=32, help="Number of local participants (each ~300 MB of RAM)."
    ),
    minutes: float = typer.Option(4.0, min=0.5, help="Total wall-clock budget."),
    work_dir: Path | None = typer.Option(None, help="Where DB, blobs and logs go."),
    federation_config: fo.FederationConfig = None,
    buffer_size: int | None = typer.Option(
        None, help="Results per outer step / version [default: --participants]."
    ),
    steps_per_unit: fo.StepsPerUnit = None,
    shared_sync_every: fo.SharedSyncEvery = None,
    unit_seconds: fo.UnitSeconds = None,
    max_steps_per_unit: fo.MaxStepsPerUnit = None,
    max_in_flight: fo.MaxInFlight = None,
    lease_seconds: fo.LeaseSeconds = None,
    score_every: fo.ScoreEvery = None,
    rescore_every_versions: fo.RescoreEveryVersions = None,
    outer_lr: fo.OuterLr = None,
    outer_momentum: fo.OuterMomentum = None,
    max_staleness: fo.MaxStaleness = None,
    checkpoint_every: fo.CheckpointEvery = None,
    trim: fo.Trim = None,
    aggregator: fo.Aggregator = None,
    clip_factor: fo.ClipFactor = None,
    max_update_ratio: fo.MaxUpdateRatio = None,
    update_norm_tolerance: fo.UpdateNormTolerance = None,
    column_loss_tolerance: fo.ColumnLossTolerance = None,
    quarantine_after: fo.QuarantineAfter = None,
    diversity_lr: fo.DiversityLr = None,
    column_codec: fo.ColumnCodec = None,
    ternary_column_codec: fo.TernaryColumnCodec = None,
    shared_codec: fo.SharedCodec = None,
    data: fo.Data = "stdlib",
) -> None:
    """Run the local federated network (central seed, federated stages 3 and 4)."""
    # One outer step per result of each participant, unless the file or a flag says otherwise.
    defaults = {"buffer_size": participants, **DEMO_FEDERATION.get(preset, {})}
    settings = fo.settings_from_cli(federation_config, locals(), defaults=defaults)
    run_demo(preset, participants, minutes, work_dir, settings, data)


def _refuse_used_work_dir(work: Path) -> None:
    """A demo trains a new seed: in a directory that holds an earlier demo's network the
    coordinator would resume that network's state (its database, checkpoint, Flower
    state and participants) and silently drop the new seed, and the summary would mix
    the two runs. Refused, so nothing of the earlier run is overwritten."""
    used = [p for p in ("coordinator", "network") if (work / p).exists()]
    if used:
        raise typer.BadParameter(
            f"{work} already holds an earlier demo's network ({', '.join(used)}/); a demo "
            "starts a new one. Pass a new or empty --work-dir, or remove that one "
            f"(rm -r {work}).",
            param_hint="--work-dir",
        )


def run_demo(
    preset: str,
    participants: int,
    minutes: float,
    work_dir: Path | None,
    settings: FederationSettings,
    data: str = "stdlib",
) -> None:
    """Seed centrally, then run stages 3 and 4 with ``settings`` (their ``stage`` is set here)
    on the corpus ``data`` (:func:`~coordinator.coordinator_process.stage_corpus`)."""
    import torch

    from coordinator.coordinator_process import (
        Coordinator,
        default_columns_per_participant,
        stage_corpus,
    )
    from coordinator.local_network import LocalNetwork
    from shared_model.config_loading import load_config
    from shared_model.data import DataError
    from shared_model.tokenizer import TokenizerError

    # Laptop-sized units: with the presets' own batches a `small` unit takes minutes on a CPU.
    cfg = load_config(preset, overrides=DEMO_TRAIN.get(preset))
    work = Path(work_dir or tempfile.mkdtemp(prefix="perspective-demo-"))
    _refuse_used_work_dir(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus = stage_corpus(data, cfg, work)
    except (DataError, TokenizerError) as exc:
        raise typer.BadParameter(f"--data: {exc}") from exc
    view = DemoView(cfg, participants)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    seed_minutes = 0.2 * minutes
    r1, r2 = _seed_centrally(cfg, work, corpus, seed_minutes, view)
    network = LocalNetwork(
        work / "network",
        participants,
        preset=preset,
        max_columns=default_columns_per_participant(cfg.moe.n_experts, participants),
    )
    coord = Coordinator(cfg, work / "coordinator", corpus)
    summary = None
    try:
        view.say("starting SuperLink, coordinator and participants ...")
        network.start()
        torch.set_num_threads(network.cores_left())  # the cores are the participants' now
        view.say(f"coordinator: {torch.get_num_threads()} torch thread(s) beside the participants")
        coord.start()
        view.say(f"dashboard: {coord.start_api()}/")
        coord.prepare(r2.checkpoint, settings)
        fed_minutes = (minutes - seed_minutes) / 2
        _federated_stages(coord, network, settings, fed_minutes, view, stop)
        summary = view.summary(r1, work)
        write_json_atomic(work / "summary.json", summary)
    finally:
        view.close()
        coord.shutdown()
        network.shutdown()
    view.print_summary(summary, work)


def _seed_centrally(cfg, work: Path, corpus, minutes: float, view: DemoView):
    """Stage 1 for ``minutes`` and stage 2 (FFNs cloned into experts): their results."""
    from coordinator.central.trainer import train_stage

    view.say(f"stage 1 (dense seed, central) for {minutes:.1f} min ...")
    r1 = train_stage(cfg, 1, work / "central", minutes=minutes, data=corpus)
    view.say(
        f"stage 1: val loss {r1.val_loss:.3f} (its own check, other sequences than the table's);"
        " stage 2: cloning FFNs into experts"
    )
    return r1, train_stage(cfg, 2, work / "central", init=r1.checkpoint, data=corpus)


def _federated_stages(coord, network, settings, minutes: float, view, stop) -> None:
    """Stages 3 and 4 over the local network, ``minutes`` each, until ``stop`` is set."""
    from coordinator.coordinator_process import StageBudget
    from coordinator.flower.run import owner_id
    from coordinator.serve import run_attached

    owner = owner_id(coord.work_dir)
    for stage in (3, 4):
        if stop.is_set():
            break
        loop = coord.federated_stage(
            None, StageBudget(minutes=minutes), replace(settings, stage=stage)
        )
        # Where the stage starts, on the same validation set as every version: stage 3's
        # is the seed's; stage 4's shows what its first ternary phase costs the model.
        start_loss = loop.evaluate()
        if stage == 3:
            view.seed_val_loss = start_loss
        traffic = coord.traffic()
        view.start_stage(stage, loop)
        # Our Flower run stopped (`flwr stop`) or the SuperLink hiccuped: a new run.
        run_attached(loop, lambda: network.open_driver(owner), stop, tick=view.refresh)
        view.end_stage(stage, loop, traffic=_since(coord.traffic(), traffic))


def register(app: typer.Typer) -> None:
    """Add ``demo``."""
    app.command("demo", help=DEMO_HELP)(demo)


def _since(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in now.items()}
