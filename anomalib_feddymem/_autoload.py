"""Make FedDyMem visible to anomalib without slowing down Python start-up.

anomalib 2.7 has no plugin mechanism: ``anomalib train --model FedDyMem`` resolves the bare name
through ``AnomalibModule.__subclasses__()`` (the class must be imported before the CLI parses) and
``get_model({"class_path": "FedDyMem"})`` through ``getattr(anomalib.models, ...)``.

``anomalib_feddymem.pth`` (installed into site-packages) imports this module at interpreter start.
It only places a finder on ``sys.meta_path``; uses the standard library modules that are already
loaded at start-up, and imports nothing else. When, and only when, some code imports
``anomalib.models``, the finder lets the real loader run and then calls
:func:`anomalib_feddymem.registration.on_anomalib_models_loaded`, which attaches ``FedDyMem`` to
``anomalib.models`` and registers the offline ImageNet weights with timm.
"""

from __future__ import annotations

import sys
from importlib.machinery import PathFinder

_TARGET = "anomalib.models"


class _RegisteringLoader:
    """Wrap the real loader of ``anomalib.models``; run our registration after it executes."""

    def __init__(self, loader: object) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> object:  # delegate everything else
        return getattr(self._loader, name)

    def create_module(self, spec: object) -> object:
        return self._loader.create_module(spec)

    def exec_module(self, module: object) -> None:
        self._loader.exec_module(module)
        from anomalib_feddymem.registration import on_anomalib_models_loaded

        on_anomalib_models_loaded(module)


class AnomalibModelsFinder:
    """``sys.meta_path`` finder that only reacts to ``anomalib.models``."""

    @classmethod
    def find_spec(cls, fullname: str, path: object = None, target: object = None) -> object:
        if fullname != _TARGET:
            return None
        spec = PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent)."""
    if not any(finder is AnomalibModelsFinder for finder in sys.meta_path):
        sys.meta_path.insert(0, AnomalibModelsFinder)


install()
