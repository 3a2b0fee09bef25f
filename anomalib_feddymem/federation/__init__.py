"""The federation: partition anomalib datamodules into clients, client and server steps, runners.

* :mod:`.partition` splits products among clients (``category``, ``iid``, ``dirichlet``,
  ``quantity``); :mod:`.datamodules` builds each client's anomalib datamodule; :mod:`.build`
  builds the clients (products, partition, seeded models) for every runner.
* :mod:`.client` (client step) and :mod:`.server` (server step) are shared by every runner; the
  round loop, faults, metrics and checkpoints are in :mod:`.runner`.
* :mod:`.simulation` runs every client in this process; :mod:`anomalib_feddymem.flower` deploys
  the same steps as a Flower app.

Names are imported lazily so that ``import anomalib_feddymem.federation.partition`` stays light.
"""

from __future__ import annotations

from anomalib_feddymem._lazy import lazy_attributes

_LAZY = {
    "FederationConfig": ".config",
    "load_config": ".config",
    "ClientPartition": ".partition",
    "PartitionError": ".partition",
    "partition_indices": ".partition",
    "FedDyMemClient": ".client",
    "server_step": ".server",
    "validate_upload": ".server",
    "InvalidUploadError": ".server",
    "FederationError": ".server",
    "run_federation": ".runner",
    "FederationResult": ".runner",
    "build_clients": ".build",
    "simulate": ".simulation",
}

__all__ = sorted(_LAZY)  # noqa: PLE0605 - the lazily imported names

__getattr__ = lazy_attributes(__name__, _LAZY)
