"""Creating and inspecting Flower runs through the SuperLink Control API.

A Flower run needs a FAB. Ours is built in memory from :data:`FAB_PYPROJECT` (a
``pyproject.toml`` and nothing else, ~0.5 KB): nothing in it is ever executed —
the SuperLink runs in ``--isolation process`` with the coordinator as the ServerApp
executor, and participants run our own worker — but Flower still records its hash,
``fab_id`` and version with every run. Building it in memory (``flwr.cli.build.
build_fab_from_files``) means no data file has to ship in the wheel and no network
or ``flwr new`` template is involved. The component references deliberately point
to a module that does not exist, so a stock ``flwr-serverapp``/``flwr-clientapp``
that is wrongly attached fails loudly with an import error instead of doing anything.

The Control API has no authentication in Flower OSS, so the SuperLink must stay on
loopback (DESIGN §5); only ``/v1/fleet`` is exposed through the TLS proxy.

One coordinator per SuperLink, and it owns exactly its own runs. Its FAB carries an owner
id (:func:`owner_id`, kept in the coordinator's work dir), so its runs have a FAB hash of
their own in ``ListRuns``. Before starting a run, :func:`claim_superlink` stops this
coordinator's own leftover runs (a crash left them running or pending) and refuses
(:class:`SuperLinkBusy`) while another Perspective coordinator's run is live or another
app's run is pending (the SuperLink would hand its task to us). Other runs are never
stopped.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.flower.driver import FlowerDriver, acquire_serverapp_task
from shared_model.files import write_text_atomic
from shared_model.flower_runtime import FlowerTransportError

FAB_ID = "perspective/perspective-control"
OWNER_FILE = "flower-owner"
FAB_PYPROJECT = b"""[project]
name = "perspective-control"
version = "1.0.0"
description = "Placeholder FAB: Perspective runs no code from a FAB (coordinator OWNER)"

[tool.flwr.app]
publisher = "perspective"

[tool.flwr.app.components]
serverapp = "perspective_no_fab_code:serverapp"
clientapp = "perspective_no_fab_code:clientapp"
"""


@dataclass(frozen=True)
class RunStatus:
    """Flower run status as reported by ``ListRuns``.

    Attributes:
        run_id: The run.
        status: ``pending`` | ``starting`` | ``running`` | ``finished``.
        sub_status: ``completed`` | ``failed`` | ``stopped`` once finished, else ``""``.
        details: Flower's explanation (e.g. "No heartbeat received from the task").
    """

    run_id: int
    status: str
    sub_status: str
    details: str

    @property
    def finished(self) -> bool:
        """Whether the run can no longer carry messages."""
        return self.status == "finished"


class SuperLinkBusy(Exception):
    """Another coordinator (or another app's pending run) holds the SuperLink."""


def owner_id(work_dir: Path) -> str:
    """This coordinator's owner id: random, made once, kept in ``work_dir/flower-owner``
    (a restart on the same work dir owns the runs it started before)."""
    path = Path(work_dir) / OWNER_FILE
    if not path.is_file():  # whole or absent: a crash here must not leave an empty owner
        write_text_atomic(path, secrets.token_hex(16) + "\n")
    return path.read_text().strip()


def build_fab(owner: str = "") -> tuple[bytes, str]:
    """Return ``(fab_bytes, sha256_hex)`` of our placeholder FAB for ``owner`` (the build
    is deterministic: the same owner always gives the same hash)."""
    from flwr.cli.build import build_fab_from_files

    text = FAB_PYPROJECT.replace(b"OWNER", owner.encode("ascii") or b"-")
    fab_bytes, _meta = build_fab_from_files({"pyproject.toml": text})
    return fab_bytes, hashlib.sha256(fab_bytes).hexdigest()


def _control_client(
    address: str, insecure: bool, root_certificates: bytes | None, retry_s: float | None = None
) -> Any:
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    from shared_model.flower_runtime import make_retry_invoker

    return ControlHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=None if insecure else root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="perspective-coordinator")],
        retry_invoker=make_retry_invoker() if retry_s is None else make_retry_invoker(retry_s),
    )


def start_run(
    address: str, *, owner: str = "", insecure: bool = True,
    root_certificates: bytes | None = None,
) -> int:  # fmt: skip
    """Create a new Flower run with ``owner``'s FAB (``StartRun``); returns its run id.

    Raises:
        FlowerTransportError: If the SuperLink does not return a run id.
    """
    from flwr.common.serde import fab_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab_bytes, fab_hash = build_fab(owner)
    client = _control_client(address, insecure, root_certificates)
    try:
        res = client.StartRun(StartRunRequest(fab=fab_to_proto(Fab(fab_hash, fab_bytes, {}))))
    finally:
        client.close()
    if not res.HasField("run_id"):
        raise FlowerTransportError(f"SuperLink at {address} did not start a run ({res.note})")
    return int(res.run_id)


def run_status(
    address: str, run_id: int, *, insecure: bool = True, root_certificates: bytes | None = None
) -> RunStatus:
    """Status of ``run_id`` via the Control API.

    Raises:
        FlowerTransportError: If the run is unknown.
    """
    from flwr.proto.control_pb2 import ListRunsRequest

    client = _control_client(address, insecure, root_certificates)
    try:
        res = client.ListRuns(ListRunsRequest(run_id=run_id))
    finally:
        client.close()
    if run_id not in res.run_dict:
        raise FlowerTransportError(f"SuperLink at {address} knows no run {run_id}")
    st = res.run_dict[run_id].status
    return RunStatus(run_id, st.status, st.sub_status, st.details)


def stop_run(
    address: str, run_id: int, *, insecure: bool = True, root_certificates: bytes | None = None
) -> None:
    """Mark ``run_id`` ``finished:stopped`` (used for stale pending runs)."""
    from flwr.proto.control_pb2 import StopRunRequest

    client = _control_client(address, insecure, root_certificates)
    try:
        client.StopRun(StopRunRequest(run_id=run_id))
    finally:
        client.close()


def live_runs(address: str, retry_s: float | None = None, **kw: Any) -> list[Any]:
    """The SuperLink's unfinished runs (Flower ``Run`` protos), newest first; connection
    errors are retried for ``retry_s`` (default: the usual retry time)."""
    from flwr.proto.control_pb2 import ListRunsRequest

    insecure, certs = kw.get("insecure", True), kw.get("root_certificates")
    client = _control_client(address, insecure, certs, retry_s)
    try:
        res = client.ListRuns(ListRunsRequest(limit=500))
    finally:
        client.close()
    return [run for run in res.run_dict.values() if run.status.status != "finished"]


def claim_superlink(address: str, owner: str, **kw: Any) -> list[int]:
    """Stop ``owner``'s own leftover runs; returns their ids.

    Raises:
        SuperLinkBusy: Another coordinator's run is live, or another app's run is pending
            (its ServerApp task would be handed to us). Nothing is stopped then.
    """
    ours = build_fab(owner)[1]
    live = live_runs(address, **kw)
    refuse_if_held(address, live, ours)
    stale = [run.run_id for run in live if run.fab_hash == ours]
    for run_id in stale:
        stop_run(address, run_id, **kw)
    return stale


def check_superlink(address: str, owner: str, **kw: Any) -> None:
    """Refuse early (before preparing anything) when another coordinator holds the
    SuperLink; a SuperLink not reachable yet is not an error here (serve waits for it).

    Raises:
        SuperLinkBusy: As :func:`claim_superlink`.
    """
    try:
        live = live_runs(address, retry_s=0.1, **kw)
    except Exception:  # noqa: BLE001 - down or restarting: open_driver checks again
        return
    refuse_if_held(address, live, build_fab(owner)[1])


def refuse_if_held(address: str, live: list[Any], ours: str) -> None:
    """Raise :class:`SuperLinkBusy` if a live run in ``live`` is not ours and in the way."""
    for run in live:
        if run.fab_id == FAB_ID and run.fab_hash != ours:
            raise SuperLinkBusy(
                f"another Perspective coordinator holds the SuperLink at {address}: its Flower "
                f"run {run.run_id} is {run.status.status} (since {run.pending_at}). One "
                "coordinator per SuperLink: stop that one first. If it crashed, Flower marks "
                "its run failed within about a minute; or end it with 'flwr stop "
                f"{run.run_id}'."
            )
        if run.fab_id != FAB_ID and run.status.status == "pending":
            raise SuperLinkBusy(
                f"run {run.run_id} of another app ({run.fab_id or 'unknown'}) is pending on the "
                f"SuperLink at {address}; its ServerApp task would be handed to this "
                f"coordinator. We never stop runs that are not ours: 'flwr stop {run.run_id}'."
            )


def open_driver(
    address: str,
    *,
    superexec_secret: bytes | None,
    owner: str = "",
    insecure: bool = True,
    root_certificates: bytes | None = None,
    timeout: float = 30.0,
    poll_interval: float = 0.05,
) -> FlowerDriver:
    """Claim the SuperLink for ``owner``, start a fresh run and attach a driver to it.

    Call again after a coordinator restart or when ``driver.run_lost`` is set: the old
    run is ``finished:failed`` (or stopped here, being ours) and cannot be resumed, but
    node ids survive when the SuperLink has a ``--database``.

    Args:
        address: ``host:port`` of the SuperLink (Control and Runtime APIs share it).
        superexec_secret: The SuperLink's ``--superexec-auth-secret-file`` contents.
        owner: This coordinator's :func:`owner_id` ("" for a throw-away coordinator).
        insecure: Plain HTTP when true.
        root_certificates: CA bytes (TLS).
        timeout: Seconds to wait for the run's ServerApp task.
        poll_interval: :meth:`FlowerDriver.wait_any` pull interval.
    """
    kw = {"insecure": insecure, "root_certificates": root_certificates}
    claim_superlink(address, owner, **kw)
    run_id = start_run(address, owner=owner, **kw)
    # A pending run ahead of ours appeared after the claim: only one of ours is stopped.
    token = acquire_serverapp_task(
        address,
        run_id,
        superexec_secret=superexec_secret,
        timeout=timeout,
        on_stale=lambda stale: _stop_if_ours(address, stale, owner, **kw),
        **kw,
    )
    return FlowerDriver(address, token, poll_interval=poll_interval, **kw)


def _stop_if_ours(address: str, run_id: int, owner: str, **kw: Any) -> None:
    """A stale pending run handed out before ours: stopped if it is ours, else refused."""
    from flwr.proto.control_pb2 import ListRunsRequest

    client = _control_client(address, kw.get("insecure", True), kw.get("root_certificates"))
    try:
        run = client.ListRuns(ListRunsRequest(run_id=run_id)).run_dict.get(run_id)
    finally:
        client.close()
    if run is None or run.fab_hash != build_fab(owner)[1]:
        raise FlowerTransportError(
            f"the SuperLink handed this coordinator the task of run {run_id}, which is not "
            "ours (it appeared while we started): it was not stopped; retrying"
        )
    stop_run(address, run_id, **kw)
