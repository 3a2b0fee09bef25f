"""The federation: partition anomalib datamodules into clients, client and server steps, runners.

* :mod:`.partition` splits products among clients (``category``, ``iid``, ``dirichlet``,
  ``quantity``); :mod:`.datamodules` builds each client's anomalib datamodule.
* :mod:`.client` (client step) and :mod:`.server` (server step) are shared by every runner; the
  round loop, faults, metrics and checkpoints are in :mod:`.runner`.
* :mod:`.simulation` runs every client in this process; :mod:`anomalib_feddymem.flower` deploys
  the same steps as a Flower app.

Names are imported lazily so that ``import anomalib_feddymem.federation.partition`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "FederationConfig": "config",
    "load_config": "config",
    "ClientPartition": "partition",
    "PartitionError": "partition",
    "partition_indices": "partition",
    "FedDyMemClient": "client",
    "server_step": "server",
    "validate_upload": "server",
    "InvalidUpload": "server",
    "FederationError": "server",
    "run_federation": "runner",
    "FederationResult": "runner",
    "simulate": "simulation",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:  # noqa: ANN401 - PEP 562 lazy attribute
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
