"""The volunteer's limits and status on the participant side, with real components.

* bandwidth: a real :class:`BlobServer` on 127.0.0.1 and the runtime's own blob clients;
  a capped transfer must take at least what the cap implies (minus the one-second burst);
* TLS: the runtime reaches a TLS blob service with the enrolment CA, refuses another CA;
  the worker command refuses an unreadable CA file before it starts;
* threads/device: a real ``perspective participant worker`` process records the torch
  threads in effect in its trainer thread and its device in ``progress.json``;
* status: progress written by the real writer, read and rendered as
  ``perspective participant status`` prints it, with day rollover of the counters.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from coordinator.blob_server import BlobServer, TlsConfig
from coordinator.security import make_tls
from participant.daemon import DaemonConfig, ParticipantDaemon
from participant.hardware import detect
from participant.limits import Limits, LimitsError
from participant.progress import ProgressWriter, read_progress
from participant.runtime import ParticipantRuntime, WorkerConfigError, load_ca_file
from participant.status import read_status, render_status
from shared_model.blobs import BlobStore, BlobUnavailable, issue_token
from shared_model.config_loading import load_config
from shared_model.processes import free_port
from shared_model.wire.perspective.v1 import control_pb2

KEY = b"participant-limits-test-key-0123"
SIZE = 2_000_000
MBPS = 8.0  # 1 MB/s, so 1 MB of burst


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


def _runtime(cfg, path: Path, **kw) -> ParticipantRuntime:
    return ParticipantRuntime(cfg, path, **kw)


def _timed_transfers(runtime: ParticipantRuntime, server: BlobServer) -> tuple[float, float]:
    """Seconds for a 2 MB download (cache miss) and a 2 MB upload through the runtime."""
    served = server.store.put_bytes(os.urandom(SIZE))
    token = issue_token(KEY, "node-1", [served], upload_quota=4 * SIZE)
    with runtime.open_blob_client(server.address, token) as client:
        t0 = time.monotonic()
        assert len(client.get(served).read_bytes()) == SIZE
        t1 = time.monotonic()
        client.put(os.urandom(SIZE))
        return t1 - t0, time.monotonic() - t1


@pytest.mark.integration
def test_bandwidth_cap_throttles_downloads_and_uploads(cfg, tmp_path: Path) -> None:
    capped = _runtime(cfg, tmp_path / "capped", bandwidth_mbps=MBPS)
    free = _runtime(cfg, tmp_path / "free")
    try:
        with BlobServer(BlobStore(tmp_path / "server"), KEY) as server:
            down_free, up_free = _timed_transfers(free, server)
            down_cap, up_cap = _timed_transfers(capped, server)
    finally:
        capped.shutdown()
        free.shutdown()
    rate = MBPS * 1e6 / 8
    print(
        f"\n2 MB down/up: uncapped {down_free:.3f}/{up_free:.3f} s, "
        f"capped at {MBPS:g} Mbit/s {down_cap:.3f}/{up_cap:.3f} s"
    )
    # One bucket for both directions: 4 MB through a 1 MB burst + 1 MB/s needs >= 3 s.
    assert down_cap >= (SIZE - rate) / rate * 0.98
    assert down_cap + up_cap >= (2 * SIZE - rate) / rate * 0.98


@pytest.mark.integration
def test_tls_blob_service_with_the_enrolment_ca(cfg, tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls", ["127.0.0.1"])
    other = make_tls(tmp_path / "other", ["127.0.0.1"])
    store = BlobStore(tmp_path / "server")
    cid = store.put_bytes(os.urandom(300_000))
    token = issue_token(KEY, "node-1", [cid])
    good = _runtime(cfg, tmp_path / "good", tls_root_cert=load_ca_file(tls.ca_cert))
    wrong = _runtime(cfg, tmp_path / "wrong", tls_root_cert=load_ca_file(other.ca_cert))
    try:
        with BlobServer(store, KEY, tls=TlsConfig.from_files(tls.cert, tls.key)) as server:
            with good.open_blob_client(server.address, token) as client:
                assert client.get_bytes(cid) == store.get(cid)
            with wrong.open_blob_client(server.address, token) as client:
                client.max_retries, client.backoff_s = 1, 0.01
                with pytest.raises(BlobUnavailable):
                    client.get_bytes(cid)
    finally:
        good.shutdown()
        wrong.shutdown()
    with pytest.raises(WorkerConfigError, match="cannot read the CA file"):
        load_ca_file(tmp_path / "missing.crt")
    with pytest.raises(WorkerConfigError, match="no PEM certificate"):
        load_ca_file(tls.key)


def test_worker_refuses_bad_ca_file_and_device(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "shared_model.cli", "participant", "worker"]
    argv += ["--runtime-address", "127.0.0.1:1", "--state-dir", str(tmp_path / "s")]
    bad_ca = subprocess.run(
        [*argv, "--ca-file", str(tmp_path / "nope.crt")], capture_output=True, text=True
    )
    assert bad_ca.returncode == 2 and "cannot read the CA file" in bad_ca.stderr
    bad_dev = subprocess.run([*argv, "--device", "tpu"], capture_output=True, text=True)
    assert bad_dev.returncode == 2 and "unknown device" in bad_dev.stderr


def test_daemon_passes_ca_bandwidth_and_device_to_the_worker(tmp_path: Path) -> None:
    limits = Limits(threads=2, bandwidth_mbps=8, device="cpu")
    cfg = DaemonConfig(
        tmp_path / "p", "127.0.0.1:1", root_certificates=tmp_path / "ca.crt", limits=limits
    )
    argv = ParticipantDaemon(cfg)._worker_argv()
    pairs = dict(zip(argv[5::2], argv[6::2], strict=False))
    assert pairs["--ca-file"] == str(tmp_path / "ca.crt")
    assert (pairs["--bandwidth-mbps"], pairs["--device"], pairs["--threads"]) == ("8", "cpu", "2")
    with pytest.raises(LimitsError, match="device"):
        Limits(device="tpu")


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_worker_process_uses_the_thread_limit_and_device(tmp_path: Path) -> None:
    state = tmp_path / "state"
    argv = [sys.executable, "-m", "shared_model.cli", "participant", "worker"]
    argv += ["--runtime-address", f"127.0.0.1:{free_port()}", "--state-dir", str(state)]
    proc = subprocess.Popen(
        [*argv, "--threads", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 90
        while (progress := read_progress(state)) is None or progress.get("threads") is None:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "worker never wrote progress.json"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert progress["threads"] == 2  # torch.get_num_threads() inside the trainer thread
    assert progress["device"] == detect(state).device


class FakeClock:
    """Injected time source (the writer's dependency, not something we ship)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_progress_is_rendered_by_status(tmp_path: Path) -> None:
    daemon_dir = tmp_path / "participant"
    limits = Limits(threads=1, max_columns=3, bandwidth_mbps=8, cache_cap_mb=500)
    ParticipantDaemon(DaemonConfig(daemon_dir, "127.0.0.1:1", limits=limits)).write_status()
    clock = FakeClock()
    writer = ProgressWriter(daemon_dir / "state", clock=clock, min_interval_s=1.0)
    writer.set_worker(1, "cpu")
    writer.set_credit(123_456)
    writer.start_unit("u-123", 3, 20, lr=3e-3, expert_lr=7.5e-4)
    writer.add_bytes(down=35_000_000)
    writer.on_progress("train", 0, 20, 0)
    for step in range(1, 10):
        clock.t += 0.5
        writer.add_bytes(up=1_200_000 // 9)
        writer.on_progress("train", step, 20, step * 915)
    writer.flush()
    lines = render_status(read_status(daemon_dir, sample_s=0.0))
    text = "\n".join(lines)
    print("\n" + text)
    # 9 steps in 4.5 s -> 0.5 s/step, 11 left -> 5.5 s; 8,235 tokens / 4.5 s = 1,830 tok/s
    assert "unit u-123 (stage 3)  [#########-----------] 45% 9/20 steps" in text
    assert "ETA 6 s, 1,830 tok/s" in text or "ETA 5 s, 1,830 tok/s" in text
    assert "lr 3.00e-03 (experts 7.50e-04)" in text
    assert "today:     up 1.2 MB, down 35.0 MB, 0 units" in text
    assert "credit:    123,456 tokens" in text
    assert "worker:    cpu, 1 torch threads" in text
    assert "bandwidth 8 Mbit/s" in text and "columns 3" in text and "cache 500 MB" in text


def test_throttled_writes_and_day_rollover(tmp_path: Path) -> None:
    day = [dt.date(2024, 3, 1)]
    clock = FakeClock()

    def writer() -> ProgressWriter:
        return ProgressWriter(tmp_path, today=lambda: day[0], clock=clock, min_interval_s=1.0)

    w = writer()
    w.start_unit("u-1", 4, 10, lr=1e-3, expert_lr=1e-3)
    w.add_bytes(up=100)  # < 1 s after the last write: kept in memory only
    assert read_progress(tmp_path)["today"]["bytes_up"] == 0
    clock.t += 1.5
    w.add_bytes(down=50)
    assert read_progress(tmp_path)["today"] == {
        "day": "2024-03-01", "bytes_up": 100, "bytes_down": 50, "units_done": 0,
    }  # fmt: skip
    w.finish_unit(ok=True)
    again = writer()  # a restarted worker continues today's counters
    again.add_bytes(up=1)
    again.flush()
    assert read_progress(tmp_path)["today"]["units_done"] == 1
    assert read_progress(tmp_path)["today"]["bytes_up"] == 101
    day[0] = dt.date(2024, 3, 2)
    again.add_bytes(down=7)
    again.flush()
    assert read_progress(tmp_path)["today"] == {
        "day": "2024-03-02", "bytes_up": 0, "bytes_down": 7, "units_done": 0,
    }  # fmt: skip
    restarted_next_day = writer()
    restarted_next_day.finish_unit(ok=False, error="boom")
    data = read_progress(tmp_path)
    assert data["today"]["units_done"] == 0 and data["last_unit"]["error"] == "boom"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_runtime_trains_a_real_unit_over_the_blob_service(tmp_path: Path) -> None:
    """Coordinator lease -> runtime (real blob service, capped) -> result the loop accepts."""
    from coordinator.db import participants as db_participants
    from shared_model.data import prepare_corpus
    from tests.test_federation_intake import NODE, make_loop, published_by

    corpus = prepare_corpus("stdlib", load_config("tiny").model.vocab_size, max_bytes=3_000_000)
    loop, _ = make_loop(tmp_path, corpus)
    with loop.factory.begin() as s:
        cap = db_participants.Capability(max_columns=2)
        p = db_participants.touch_participant(s, node_id=NODE, capability=cap)
        unit = loop.units.lease(s, p, loop.state)
        req = loop.units.request(unit, loop.state, NODE)
    req.credit_tokens = 4242
    state = tmp_path / "participant" / "state"
    cap = 100_000  # far below what one unit downloads: the cache must be evicted
    runtime = ParticipantRuntime(
        loop.state.cfg, state, device="cpu", bandwidth_mbps=400, cache_cap_bytes=cap
    )
    try:
        with BlobServer(loop.state.store, b"k" * 32, published=published_by(loop)) as server:
            req.blob_address = server.address
            first = control_pb2.ControlReply.FromString(
                runtime.handle("train.unit", req.SerializeToString())
            )
            collect = control_pb2.ControlRequest(collect=True, credit_tokens=4300)
            reply = control_pb2.ControlReply.FromString(
                runtime.handle("query.collect", collect.SerializeToString())
            )
    finally:
        runtime.shutdown()
    assert not reply.failed_units, reply.failure_reasons
    (result,) = [*first.results, *reply.results]
    assert loop.receive(NODE, result).accepted
    assert reply.capability.device == "cpu" and reply.capability.ram_bytes > 0
    progress = read_progress(state)
    uploaded = sum(d.delta.size for d in result.column_deltas) + result.shared_update.blob.size
    assert progress["today"]["bytes_up"] == uploaded > 0
    assert progress["today"]["bytes_down"] == first.bytes_down + reply.bytes_down > 0
    assert progress["today"]["units_done"] == 1 and progress["unit"] is None
    assert progress["last_unit"]["unit_id"] == req.unit.unit_id
    assert progress["last_unit"]["tokens_per_s"] > 0  # from the trainer's per-step callback
    assert progress["credit_tokens"] == 4300 and progress["threads"] == 1
    # The cache cap is enforced after the unit: only the unit's shards may stay above it.
    on_disk = sum(p.stat().st_size for p in (state / "cache").rglob("*") if p.is_file())
    kept = sum(runtime.cache.stat(s).size for s in req.unit.shard_ids if runtime.cache.has(s))
    assert on_disk <= cap + kept < progress["today"]["bytes_down"]
