"""PEP 562 lazy attributes for package ``__init__`` modules.

The package root is imported at every interpreter start by the ``.pth`` hook, and the
subpackages' heavy modules pull in torch and anomalib: names are resolved on first use instead.
"""

from __future__ import annotations

from importlib import import_module

TYPE_CHECKING = False  # `typing` and `collections.abc` would cost start-up time; names only for checkers
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping


def lazy_attributes(package: str, names: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` importing ``names[attr]`` (relative to ``package``) on first use."""

    def __getattr__(name: str) -> object:  # noqa: N807 - the PEP 562 hook's name
        if name in names:
            return getattr(import_module(names[name], package), name)
        msg = f"module {package!r} has no attribute {name!r}"
        raise AttributeError(msg)

    return __getattr__
