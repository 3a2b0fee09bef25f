"""anomalib-feddymem: FedDyMem federated unsupervised anomaly detection for anomalib.

The package root stays free of heavy imports: a ``.pth`` hook imports it at every interpreter
start (see :mod:`anomalib_feddymem._autoload`), so ``torch`` and ``anomalib`` are only loaded when
one of the names below is first used.

Example:
    >>> from anomalib_feddymem import FedDyMem
    >>> model = FedDyMem(memory_size=512)
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "FedDyMem": "anomalib_feddymem.models.feddymem.lightning_model",
    "FedDyMemModel": "anomalib_feddymem.models.feddymem.torch_model",
    "register_offline_weights": "anomalib_feddymem.weights",
}

__all__ = ["FedDyMem", "FedDyMemModel", "__version__", "register_offline_weights"]


def __getattr__(name: str) -> object:  # PEP 562 lazy attribute (no `typing`: it costs start-up time)
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
