"""Attach this package's models to ``anomalib.models`` and register offline backbone weights.

Called by the import hook in :mod:`anomalib_feddymem._autoload` right after ``anomalib.models``
finishes importing, and again (idempotently) by each model module itself, so that whichever is
imported first, all end up connected.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import ModuleType

logger = logging.getLogger(__name__)

#: Model class name -> the module that defines it (and attaches it when imported).
MODELS = {
    "FedDyMem": "anomalib_feddymem.models.feddymem.lightning_model",
    "FastPatchcore": "anomalib_feddymem.models.fast_patchcore.lightning_model",
}


def attach_model(model_class: type) -> None:
    """Expose ``model_class`` as ``anomalib.models.<name>`` (what ``get_model`` looks up)."""
    models = sys.modules.get("anomalib.models")
    if models is None:
        return
    setattr(models, model_class.__name__, model_class)
    exported = getattr(models, "__all__", None)
    if isinstance(exported, list) and model_class.__name__ not in exported:
        exported.append(model_class.__name__)


def on_anomalib_models_loaded(models: ModuleType) -> None:
    """Register the offline weights, then import and attach every model of :data:`MODELS`.

    A model module that is itself being imported (it imports ``anomalib.models`` first) is left
    alone here: it attaches itself when it finishes.
    """
    from anomalib_feddymem.models.components.weights import register_offline_weights

    try:
        register_offline_weights()
    except Exception:  # a broken cache must not break `import anomalib.models`
        logger.exception("Could not register offline ImageNet weights with timm.")
    from importlib import import_module

    for name, module in MODELS.items():
        if module not in sys.modules:
            attach_model(getattr(import_module(module), name))
    del models
