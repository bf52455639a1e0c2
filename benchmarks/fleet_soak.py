"""A fleet of simulated participants against the real coordinator, on the wall clock.

The federation loop, scheduler (leases), intake (decoding, bounds, the held-out column
check, reputation), aggregation, publishing, blob store and database are the real ones, as
``serve`` runs them; only Flower is replaced, by :class:`FleetDriver`, which offers the
loop the same interface (``node_ids``, ``push``, ``pending``, ``wait_any``, ``close``) for
``--participants`` simulated nodes:

* each node "trains" a unit for ``--unit-seconds`` (± 50 %, per node) of wall time after
  the previous one; the result itself is real: a small pool of the participant's own
  :class:`~participant.unit_trainer.UnitTrainer` (one thread, one torch thread) trains the
  unit's steps on the coordinator's blob store when it falls due and uploads its update,
  so every result goes through the intake's checks like a volunteer's (each unit as a
  participant's first on its columns: the pool holds no node's local state or optimiser
  moments);
* churn: every node alternates online and offline sessions (exponential, mean
  ``--session-minutes`` online); ``--churn`` of the fleet is offline at any time. A node
  that goes offline loses its queue (a SuperNode that died): the loop sees its messages
  expire at their TTL (error code 3, as Flower reports it) and its leases run out.

Every ``--sample-seconds`` it records leases/s, results/s (accepted and refused), p50/p99
of lease latency (``FederationLoop.lease_request``: DB + unit construction), intake latency
(``_handle_reply`` of a unit's result), loop step time, coordinator RSS and DB size. A
*stall* is a sample window with nodes online and neither a lease nor a handled reply.

Output: ``benchmarks/results/fleet_soak[_<db>].json`` (``participants``, ``hours``,
``stalls``, ``rss_mb_start``, ``rss_mb_end``, ``lease_p99_ms``, the samples and trends)
and a PNG. Usage::

    python -m benchmarks.fleet_soak --participants 1000 --minutes 60 [--db postgres] [--init CKPT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import queue
import random
import statistics
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from coordinator.blob_uploads import UploadLedger
from coordinator.central.checkpoint import save_checkpoint
from coordinator.coordinator_process import Coordinator, StageBudget
from coordinator.federation_settings import FederationSettings
from coordinator.flower.driver import Reply
from participant.unit_trainer import BlobIO, UnitTrainer
from shared_model.config_loading import load_config
from shared_model.data import prepare_corpus
from shared_model.model import PerspectiveModel
from shared_model.wire.perspective.v1 import control_pb2, tensor_pb2

RESULTS = Path(__file__).resolve().parent / "results"
GONE = 3  # Flower's "unavailable / TTL expired"


@dataclass
class _Message:
    message_id: str
    kind: str
    payload: bytes
    due: float
    expires: float


@dataclass
class _SimNode:
    unit_seconds: float
    online: bool = True
    toggle_at: float = 0.0
    free_at: float = 0.0
    queue: list[_Message] = field(default_factory=list)
    session: int = 0  # bumped when it goes offline: results of an older session are lost


class FleetDriver:
    """Flower's place in the loop, taken by ``n`` simulated nodes on the wall clock.

    Args:
        cfg, store, train: as :class:`~benchmarks.federation_replay.ReplayDriver`.
        work_dir: the trainer pool's state lives here.
        n: number of nodes (node ids 1..n).
        unit_seconds: mean wall time a node spends on one unit.
        churn: fraction of the fleet offline at any time (0: nobody leaves).
        session_s: mean length of an online session.
        trainers: size of the pool of real unit trainers shared by the nodes.
    """

    def __init__(
        self, cfg, store, train, work_dir: Path, n: int, unit_seconds: float, churn: float,
        session_s: float, trainers: int = 1, seed: int = 0,
    ) -> None:  # fmt: skip
        self.rng = random.Random(seed)
        self.store, self.churn, self.session_s = store, churn, session_s
        self.uploads = UploadLedger.for_store(store)
        now = time.monotonic()
        self.nodes = {
            i: _SimNode(unit_seconds * self.rng.uniform(0.5, 1.5)) for i in range(1, n + 1)
        }
        for node in self.nodes.values():  # start in the steady state of the churn process
            node.online = self.rng.random() >= churn
            node.toggle_at = now + self._session(node.online)
        self._trainers = [UnitTrainer(cfg, train, work_dir / f"pool-{i}") for i in range(trainers)]
        self._todo: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        self._training: dict[str, int] = {}  # message id -> node id, in the pool
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._train_forever, args=(t,), daemon=True)
            for t in self._trainers
        ]
        for t in self._threads:
            t.start()
        self.trained = 0
        self.lost = 0  # results of nodes that went offline while training

    def _session(self, online: bool) -> float:
        if self.churn <= 0:
            return math.inf if online else 0.0
        mean = self.session_s if online else self.session_s * self.churn / (1 - self.churn)
        return self.rng.expovariate(1 / mean)

    # --- the FlowerDriver interface ---------------------------------------------------------

    def node_ids(self) -> list[int]:
        """The nodes online now (churn applied first)."""
        self._churn(time.monotonic())
        return [nid for nid, n in self.nodes.items() if n.online]

    def push(self, node_id: int, payload: bytes, kind: str, ttl: float) -> str:
        node, now = self.nodes[node_id], time.monotonic()
        mid = f"m{next(self._ids)}"
        if kind == "train.unit":
            node.free_at = max(now, node.free_at) + node.unit_seconds
            due = node.free_at
        else:  # a collect query is answered when the node's queue has run dry
            due = max(now, node.free_at)
        node.queue.append(_Message(mid, kind, payload, due, now + ttl))
        return mid

    @property
    def pending(self) -> dict[str, int]:
        """Message id -> node id of every message not answered yet."""
        out = {m.message_id: nid for nid, n in self.nodes.items() for m in n.queue}
        with self._lock:
            out.update(self._training)
        return out

    def wait_any(self, timeout: float) -> list[Reply]:
        """Hand due units to the trainer pool, expire what outlived its TTL, and return the
        replies ready within ``timeout``."""
        now = time.monotonic()
        replies = self._dispatch(now)
        deadline = now + timeout
        while not replies:
            try:
                replies.append(self._ready.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        while True:
            try:
                replies.append(self._ready.get_nowait())
            except queue.Empty:
                return replies

    def close(self, failed: bool = False, details: str = "") -> None:
        """Stop the trainer pool."""
        for _ in self._threads:
            self._todo.put(None)
        for t in self._threads:
            t.join(timeout=60)

    # --- the simulated fleet ----------------------------------------------------------------

    def _churn(self, now: float) -> None:
        for node in self.nodes.values():
            if now < node.toggle_at:
                continue
            node.online = not node.online
            node.toggle_at = now + self._session(node.online)
            if not node.online:  # the SuperNode died: its queue and work are gone
                node.session += 1
                node.free_at = now
            else:
                node.free_at = max(node.free_at, now)

    def _dispatch(self, now: float) -> list[Reply]:
        replies = []
        for nid, node in self.nodes.items():
            keep = []
            for m in node.queue:
                if m.expires <= now:
                    replies.append(Reply(m.message_id, nid, m.kind, None, GONE, "TTL expired", 0))
                elif node.online and m.due <= now and not keep:
                    self._start(nid, node, m, replies)
                else:
                    keep.append(m)
            node.queue = keep
        return replies

    def _start(self, nid: int, node: _SimNode, m: _Message, replies: list[Reply]) -> None:
        if m.kind != "train.unit":
            body = control_pb2.ControlReply()
            body.capability.max_columns = 8
            replies.append(
                Reply(m.message_id, nid, m.kind, body.SerializeToString(), None, None, 0)
            )
            return
        with self._lock:
            self._training[m.message_id] = nid
        self._todo.put((nid, node.session, m))

    def _train_forever(self, trainer: UnitTrainer) -> None:
        torch.set_num_threads(1)
        while (job := self._todo.get()) is not None:
            nid, session, m = job
            req = control_pb2.ControlRequest.FromString(m.payload)
            # Each unit as a participant holding nothing of its own yet (columns from the
            # published state, no error-feedback residual): one trainer serves many nodes,
            # and carrying its local columns over would pile up every node's training in
            # one copy (updates of 2.5 × the weights' norm, refused; no real node does so).
            trainer.local.columns.clear()
            trainer.local.residual.clear()
            trainer.model = None  # and no other node's AdamW moments: a fresh optimiser
            result = trainer.run(req, self._io(req))
            with self._lock:
                self._training.pop(m.message_id, None)
            node = self.nodes[nid]
            if node.session != session or not node.online:
                self.lost += 1  # went offline meanwhile: the message expires at its TTL
                node.queue.append(_Message(m.message_id, m.kind, b"", math.inf, m.expires))
                continue
            body = control_pb2.ControlReply(synced_version=trainer.replica.version or 0)
            body.results.append(result)
            body.capability.max_columns = 8
            self.trained += 1
            self._ready.put(Reply(m.message_id, nid, m.kind, body.SerializeToString(), None,
                                  None, 0.0))  # fmt: skip

    def _io(self, req: control_pb2.ControlRequest) -> BlobIO:
        def upload(data: bytes) -> tensor_pb2.BlobRef:
            content_id = self.store.put_bytes(data)
            self.uploads.record(content_id, req.unit.unit_id)  # as the blob service's Put
            return tensor_pb2.BlobRef(content_id=content_id, size=len(data))

        return BlobIO(fetch=lambda ref: self.store.get(ref.content_id), upload=upload)


class Probe:
    """Latencies of the loop's lease, intake and step, by wrapping the loop's own methods."""

    def __init__(self, loop) -> None:
        self.lease_ms: deque = deque()
        self.intake_ms: deque = deque()
        self.step_ms: deque = deque()
        self.replies = 0
        loop.lease_request = self._timed(loop.lease_request, self.lease_ms)
        loop.step = self._timed(loop.step, self.step_ms)
        handle = loop._handle_reply

        def handle_reply(reply):
            self.replies += 1
            if reply.ok and reply.kind == "train.unit":
                return self._timed(handle, self.intake_ms)(reply)
            return handle(reply)

        loop._handle_reply = handle_reply

    @staticmethod
    def _timed(fn, into: deque):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                into.append((time.perf_counter() - t0) * 1000)

        return timed

    def drain(self) -> dict[str, list[float]]:
        """The latencies recorded since the last call."""
        out = {}
        for name in ("lease_ms", "intake_ms", "step_ms"):
            q: deque = getattr(self, name)
            out[name] = [q.popleft() for _ in range(len(q))]
        return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _db_bytes(work: Path, db_url: str | None) -> int:
    if db_url is None:
        return sum(p.stat().st_size for p in work.glob("coordinator.db*"))
    import sqlalchemy

    engine = sqlalchemy.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(
                sqlalchemy.text("select pg_database_size(current_database())")
            ).scalar()
    finally:
        engine.dispose()


def _result_counts(coord) -> tuple[int, int]:
    import sqlalchemy

    with coord.loop.factory() as s:
        rows = s.execute(sqlalchemy.text("select state, count(*) from results group by state"))
        counts = dict(rows.all())
    return counts.get("accepted", 0), sum(counts.values()) - counts.get("accepted", 0)


class Sampler(threading.Thread):
    """Every ``every`` seconds: one sample of the fleet's and the coordinator's figures."""

    def __init__(
        self, coord, driver: FleetDriver, probe: Probe, every: float, db_url, stage_s: float
    ) -> None:
        super().__init__(daemon=True)
        self.stage_s = stage_s
        self.coord, self.driver, self.probe, self.every, self.db_url = (
            coord, driver, probe, every, db_url)  # fmt: skip
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self._proc = psutil.Process()

    def run(self) -> None:
        t0, last = time.monotonic(), (0, 0, 0)
        while not self.stop.wait(self.every):
            ended = time.monotonic() - t0 > self.stage_s
            lat = self.probe.drain()
            accepted, refused = _result_counts(self.coord)
            leases, replies = len(lat["lease_ms"]), self.probe.replies
            online = sum(n.online for n in self.driver.nodes.values())
            sample = {
                "t_s": round(time.monotonic() - t0, 1),
                "online": online,
                "leases_per_s": leases / self.every,
                "accepted_per_s": (accepted - last[0]) / self.every,
                "refused_per_s": (refused - last[1]) / self.every,
                "replies": replies - last[2],
                "lease_p50_ms": _pct(lat["lease_ms"], 0.5),
                "lease_p99_ms": _pct(lat["lease_ms"], 0.99),
                "intake_p50_ms": _pct(lat["intake_ms"], 0.5),
                "intake_p99_ms": _pct(lat["intake_ms"], 0.99),
                "step_p50_ms": _pct(lat["step_ms"], 0.5),
                "step_max_ms": max(lat["step_ms"], default=None),
                "rss_mb": self._proc.memory_info().rss / 2**20,
                "db_mb": _db_bytes(self.coord.work_dir, self.db_url) / 2**20,
                "version": self.coord.loop.state.version,
                "pending": len(self.driver.pending),
                # the stage's own time only (after it, the loop just collects what is in flight)
                "stall": online > 0 and leases == 0 and replies == last[2] and not ended,
            }
            self.samples.append(sample)
            last = (accepted, refused, replies)
            print(json.dumps(sample), flush=True)


def _trend_per_hour(samples: list[dict], key: str) -> float | None:
    """Least-squares slope of ``key`` over the samples after warm-up (the first third), per
    hour."""
    pts = [(s["t_s"], s[key]) for s in samples[len(samples) // 3 :] if s[key] is not None]
    if len(pts) < 3:
        return None
    mt = statistics.fmean(t for t, _ in pts)
    mv = statistics.fmean(v for _, v in pts)
    var = sum((t - mt) ** 2 for t, _ in pts)
    return 3600 * sum((t - mt) * (v - mv) for t, v in pts) / var if var else None


def summarise(args, samples: list[dict], driver: FleetDriver, coord, probe_all: dict) -> dict:
    """The figures the issue asks for, over the whole run (warm-up: the first third)."""
    steady = samples[len(samples) // 3 :] or samples
    accepted, refused = _result_counts(coord)
    lease = probe_all["lease_ms"]
    intake = probe_all["intake_ms"]
    return {
        "participants": args.participants,
        "hours": args.minutes / 60,
        "db": args.db,
        "churn": args.churn,
        "session_minutes": args.session_minutes,
        "unit_seconds": args.unit_seconds,
        "stalls": sum(s["stall"] for s in samples),
        "rss_mb_start": steady[0]["rss_mb"],
        "rss_mb_end": samples[-1]["rss_mb"],
        "rss_mb_per_hour_after_warmup": _trend_per_hour(samples, "rss_mb"),
        "db_mb_start": steady[0]["db_mb"],
        "db_mb_end": samples[-1]["db_mb"],
        "db_kb_per_result": 1024
        * (samples[-1]["db_mb"] - samples[0]["db_mb"])
        / max(1, accepted + refused),
        "lease_p50_ms": _pct(lease, 0.5),
        "lease_p99_ms": _pct(lease, 0.99),
        "intake_p50_ms": _pct(intake, 0.5),
        "intake_p99_ms": _pct(intake, 0.99),
        "step_p50_ms": _pct(probe_all["step_ms"], 0.5),
        "step_p99_ms": _pct(probe_all["step_ms"], 0.99),
        "leases_per_s": len(lease) / (60 * args.minutes),
        "results_accepted": accepted,
        "results_refused": refused,
        "results_lost_to_churn": driver.lost,
        "versions": coord.loop.state.version,
        "reject_reasons": _reject_reasons(coord),
    }


def _reject_reasons(coord) -> dict[str, int]:
    import sqlalchemy

    sql = "select reject_reason, count(*) from results where state != 'accepted' group by 1"
    with coord.loop.factory() as s:
        return {str(k): v for k, v in s.execute(sqlalchemy.text(sql)).all()}


def plot(samples: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    panels = [("leases_per_s", "accepted_per_s"), ("lease_p99_ms", "intake_p99_ms"),
              ("rss_mb",), ("db_mb",), ("online",)]  # fmt: skip
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), sharex=True)
    for ax, keys in zip(axes, panels, strict=True):
        for k in keys:
            ax.plot(t, [s[k] if s[k] is not None else float("nan") for s in samples], label=k)
        ax.legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel("minutes")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--participants", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--unit-seconds", type=float, default=300.0, help="mean wall time per unit")
    p.add_argument("--churn", type=float, default=0.3, help="fraction offline at any time")
    p.add_argument("--session-minutes", type=float, default=10.0, help="mean online session")
    p.add_argument("--trainers", type=int, default=1, help="real unit trainers (threads)")
    p.add_argument("--sample-seconds", type=float, default=10.0)
    p.add_argument("--buffer-size", type=int, default=0, help="0: results per unit period / 4")
    p.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument(
        "--init", type=Path, default=None,
        help="stage-2 checkpoint to start from (default: a random tiny model); the column "
        "check's tolerance is calibrated on trained seeds",
    )  # fmt: skip
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--name", default=None, help="result file name (default fleet_soak[_db])")
    return p.parse_args()


def settings_for(args) -> FederationSettings:
    """Units of 2 short steps (the wall time is simulated); the buffer sized so that a unit's
    base is a few versions old when its result comes back, as an operator would size it for
    this fleet (results per unit period ÷ 4)."""
    online = args.participants * (1 - args.churn)
    buffer = args.buffer_size or max(2, round(online / 4))
    return FederationSettings(
        stage=3, steps_per_unit=2, min_steps_per_unit=1, buffer_size=buffer,
        lease_seconds=max(60.0, 3 * args.unit_seconds), max_in_flight=1,
        eval_every=10**6, units_hint=10**6, checkpoint_every=50,
    )  # fmt: skip


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    cfg = load_config("tiny", overrides=["train.batch_size=4", "train.seq_len=32"])
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fleetsoak-"))
    corpus = prepare_corpus("stdlib", cfg.model.vocab_size, max_bytes=3_000_000)
    seed = args.init
    if seed is None:
        torch.manual_seed(0)
        seed = work / "stage2.safetensors"
        save_checkpoint(seed, PerspectiveModel(cfg, moe=True), cfg, stage=2, step=0)
    with _database(args.db) as db_url:
        coord = Coordinator(cfg, work / "coordinator", corpus, db_url=db_url)
        coord.start()
        try:
            run(args, cfg, corpus, seed, work, coord, db_url)
        finally:
            coord.shutdown()


def _database(kind: str):
    import contextlib

    if kind == "sqlite":
        return contextlib.nullcontext(None)
    from tests.postgres_server import postgres_server

    return postgres_server()


def run(args, cfg, corpus, seed: Path, work: Path, coord, db_url) -> None:
    settings = settings_for(args)
    coord.prepare(seed, settings)
    driver = FleetDriver(cfg, coord.store, corpus.dataset("train"), work / "pool",
                         args.participants, args.unit_seconds, args.churn,
                         60 * args.session_minutes, trainers=args.trainers)  # fmt: skip
    loop = coord.federated_stage(driver, StageBudget(minutes=args.minutes), settings)
    probe = Probe(loop)
    everything = {"lease_ms": [], "intake_ms": [], "step_ms": []}
    drain = probe.drain

    def keep_all():  # the sampler drains per window; the summary wants every value too
        out = drain()
        for k, v in out.items():
            everything[k].extend(v)
        return out

    probe.drain = keep_all
    sampler = Sampler(coord, driver, probe, args.sample_seconds, db_url, 60 * args.minutes)
    sampler.start()
    try:
        loop.run(lambda: False)
    finally:
        sampler.stop.set()
        sampler.join()
        driver.close()
    name = args.name or ("fleet_soak" if args.db == "sqlite" else f"fleet_soak_{args.db}")
    summary = summarise(args, sampler.samples, driver, coord, everything)
    knobs = ("buffer_size", "lease_seconds", "max_in_flight", "steps_per_unit")
    summary["settings"] = {k: getattr(settings, k) for k in knobs}
    summary["init"] = str(seed) if args.init else "random tiny model"
    summary["samples"] = sampler.samples
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(sampler.samples, RESULTS / f"{name}.png",
         f"{args.participants} participants, {args.churn:.0%} offline, {args.db}")  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
    main()
