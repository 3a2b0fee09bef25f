"""The in-process transport: clients called in this process, with the records Flower would carry.

The simulation and the benchmark run the shared round loop over it; a real deployment runs the same
loop over Flower's grid (:mod:`anomalib_feddymem.flower.server_app`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from rich.console import Console

from .checkpoint import Checkpointer
from .client import FedDyMemClient, handle_evaluate, handle_train
from .runner import ClientFailure

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from flwr.app import RecordDict

logger = logging.getLogger(__name__)

__all__ = ["InProcessTransport"]


class InProcessTransport:
    """Clients called in this process; an exception in one client is that client's failure only."""

    def __init__(self, clients: list[FedDyMemClient], *, image_size: int, console: Console | None = None) -> None:
        self.clients = {client.client_id: client for client in clients}
        self.client_ids = sorted(self.clients)
        self.image_size = image_size
        self.console = console or Console()

    def _call(
        self,
        kind: str,
        round_number: int,
        instructions: Mapping[int, RecordDict],
        handler: Callable[[FedDyMemClient, RecordDict], RecordDict],
    ) -> dict:
        replies: dict[int, RecordDict | ClientFailure] = {}
        for index, cid in enumerate(sorted(instructions), start=1):
            client = self.clients[cid]
            self.console.print(
                f"[cyan]round {round_number}[/] · client {cid} ({index}/{len(instructions)}) · {kind} "
                f"({client.num_train} train / {client.num_test} test images)"
            )
            try:
                replies[cid] = handler(client, instructions[cid])
            except Exception as error:
                logger.exception("Client %d failed in %s of round %d.", cid, kind, round_number)
                replies[cid] = ClientFailure(f"{type(error).__name__}: {error}")
        return replies

    def train(self, round_number: int, instructions: Mapping[int, RecordDict]) -> dict:
        """Local training of every client."""
        return self._call("train", round_number, instructions, handle_train)

    def evaluate(self, round_number: int, instructions: Mapping[int, RecordDict]) -> dict:
        """Evaluation of every client on its own test images."""
        return self._call("evaluate", round_number, instructions, handle_evaluate)

    def client_states(self) -> dict[int, dict[str, Any]]:
        """Each client's state, checkpointed with the server's."""
        return {cid: client.state_dict() for cid, client in self.clients.items()}

    def restore(self, folder: Path) -> None:
        """Load each client's own state from a checkpoint folder."""
        for cid, client in self.clients.items():
            client.load_state_dict(Checkpointer.load_client(folder, cid))

    def export(self, export_root: Path) -> dict[int, Path]:
        """OpenVINO IR of every client's final model under ``export_root/client_<id>``."""
        return {
            cid: client.export_openvino(export_root / f"client_{cid}", self.image_size)
            for cid, client in self.clients.items()
        }
