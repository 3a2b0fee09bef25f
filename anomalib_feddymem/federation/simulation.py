"""In-process simulation, the embedded default: every client lives in this process.

``feddymem simulate --config federated/synthetic.yaml`` and :func:`simulate` build one persistent
:class:`~anomalib_feddymem.federation.client.FedDyMemClient` per client (:mod:`.build`) and run the
shared round loop over :class:`~.transport.InProcessTransport`, which passes the same Flower records a real
deployment sends.

Example:
    >>> from anomalib_feddymem.federation import FederationConfig, simulate
    >>> result = simulate(FederationConfig(clients=2, rounds=2, image_size=64))  # doctest: +SKIP
    >>> result.output / "metrics.csv"  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

from .build import build_clients
from .runner import FederationResult, run_federation
from .transport import InProcessTransport

if TYPE_CHECKING:
    from .config import FederationConfig

__all__ = ["simulate"]


def simulate(config: FederationConfig, *, resume: bool = False, console: Console | None = None) -> FederationResult:
    """Run the federation of ``config`` in this process (``resume`` continues from its checkpoint)."""
    console = console or Console()
    clients = build_clients(config)
    transport = InProcessTransport(clients, image_size=config.image_size, console=console)
    return run_federation(transport, config, resume=resume, console=console)
