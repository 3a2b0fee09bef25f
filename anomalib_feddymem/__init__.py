"""anomalib-feddymem: FedDyMem federated unsupervised anomaly detection for anomalib.

The package root stays free of heavy imports: a ``.pth`` hook imports it at every interpreter
start (see :mod:`anomalib_feddymem._autoload`), so ``torch`` and ``anomalib`` are only loaded when
one of the names below is first used.

Example:
    >>> from anomalib_feddymem import FedDyMem
    >>> model = FedDyMem(memory_size=512)
"""

from __future__ import annotations

from ._lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {
    "FastPatchcore": "anomalib_feddymem.models.fast_patchcore.lightning_model",
    "FedDyMem": "anomalib_feddymem.models.feddymem.lightning_model",
    "FedDyMemModel": "anomalib_feddymem.models.feddymem.torch_model",
    "register_offline_weights": "anomalib_feddymem.models.components.weights",
}

__all__ = ["FastPatchcore", "FedDyMem", "FedDyMemModel", "__version__", "register_offline_weights"]

__getattr__ = lazy_attributes(__name__, _LAZY)
