"""The coordinator's REST API (``/api/v1``), dashboard (``/``) and Prometheus ``/metrics``.

Build the app with :func:`create_app` and serve it with uvicorn (see
:mod:`coordinator.serve_api`).
"""

from coordinator.api.app import create_app
from coordinator.api.settings import ApiSettings, ApiSettingsError

__all__ = ["ApiSettings", "ApiSettingsError", "create_app"]
