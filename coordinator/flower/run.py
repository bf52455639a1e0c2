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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from coordinator.flower.driver import FlowerDriver, acquire_serverapp_task
from shared_model.flower_runtime import FlowerTransportError

FAB_PYPROJECT = b"""[project]
name = "perspective-control"
version = "1.0.0"
description = "Placeholder FAB: Perspective runs no code from a FAB (see coordinator/flower/run.py)"

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


def build_fab() -> tuple[bytes, str]:
    """Return ``(fab_bytes, sha256_hex)`` of our placeholder FAB."""
    from flwr.cli.build import build_fab_from_files

    fab_bytes, _meta = build_fab_from_files({"pyproject.toml": FAB_PYPROJECT})
    return fab_bytes, hashlib.sha256(fab_bytes).hexdigest()


def _control_client(address: str, insecure: bool, root_certificates: bytes | None) -> Any:
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    from shared_model.flower_runtime import make_retry_invoker

    return ControlHttpClient.from_server_address(
        server_address=address,
        insecure=insecure,
        root_certificates=None if insecure else root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="perspective-coordinator")],
        retry_invoker=make_retry_invoker(),
    )


def start_run(
    address: str, *, insecure: bool = True, root_certificates: bytes | None = None
) -> int:
    """Create a new Flower run with our FAB (``StartRun``); returns its run id.

    Raises:
        FlowerTransportError: If the SuperLink does not return a run id.
    """
    from flwr.common.serde import fab_to_proto
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.fab import Fab

    fab_bytes, fab_hash = build_fab()
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


def open_driver(
    address: str,
    *,
    superexec_secret: bytes | None,
    insecure: bool = True,
    root_certificates: bytes | None = None,
    timeout: float = 30.0,
    poll_interval: float = 0.05,
) -> FlowerDriver:
    """Start a fresh run on the SuperLink at ``address`` and attach a driver to it.

    Call again after a coordinator restart or when ``driver.run_lost`` is set: the old
    run is ``finished:failed`` and cannot be resumed, but node ids survive when the
    SuperLink has a ``--database``.

    Args:
        address: ``host:port`` of the SuperLink (Control and Runtime APIs share it).
        superexec_secret: The SuperLink's ``--superexec-auth-secret-file`` contents.
        insecure: Plain HTTP when true.
        root_certificates: CA bytes (TLS).
        timeout: Seconds to wait for the run's ServerApp task.
        poll_interval: :meth:`FlowerDriver.wait_any` pull interval.
    """
    kw = {"insecure": insecure, "root_certificates": root_certificates}
    run_id = start_run(address, **kw)
    token = acquire_serverapp_task(
        address,
        run_id,
        superexec_secret=superexec_secret,
        timeout=timeout,
        on_stale=lambda stale: stop_run(address, stale, **kw),
        **kw,
    )
    return FlowerDriver(address, token, poll_interval=poll_interval, **kw)
