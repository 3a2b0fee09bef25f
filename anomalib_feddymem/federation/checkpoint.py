"""Round checkpoints: written atomically, so a killed run always leaves the last round intact.

Layout under ``OUTPUT/checkpoints``: ``round_003/server.pt`` (round, global memory, metric rows,
config identity), ``round_003/client_<id>.pt`` (each in-process client's own state), and
``latest`` naming the newest complete round folder. A round folder is written under a temporary
name and renamed when complete; ``latest`` is replaced atomically afterwards.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "Checkpointer", "ServerState"]


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not belong to this configuration."""


@dataclass
class ServerState:
    """What the server needs to continue a run after round ``round``."""

    round: int = 0
    global_memory: torch.Tensor | None = None
    global_weights: torch.Tensor | None = None
    memory_rounds: dict[int, int] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    identity: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict for ``torch.save`` (tensors and builtins only: loadable with ``weights_only``)."""
        return {
            "round": self.round,
            "global_memory": self.global_memory,
            "global_weights": self.global_weights,
            "memory_rounds": dict(self.memory_rounds),
            "rows": list(self.rows),
            "identity": self.identity,
        }


class Checkpointer:
    """Save and load round checkpoints of one run folder."""

    def __init__(self, output: str | Path, keep: int = 2) -> None:
        self.root = Path(output) / "checkpoints"
        self.keep = keep

    @property
    def latest_file(self) -> Path:
        """The pointer to the newest complete round folder."""
        return self.root / "latest"

    def round_dir(self, round_number: int) -> Path:
        """Folder of one round's checkpoint."""
        return self.root / f"round_{round_number:03d}"

    @staticmethod
    def round_of(folder: Path) -> int:
        """The round number of a round folder (:meth:`round_dir`)."""
        return int(folder.name.removeprefix("round_"))

    def exists(self) -> bool:
        """Whether a complete checkpoint is present."""
        return self.latest_file.is_file()

    def save(self, state: ServerState, client_states: dict[int, dict[str, Any]]) -> Path:
        """Write the round's checkpoint atomically and prune old ones; returns its folder."""
        final = self.round_dir(state.round)
        tmp = self.root / f".tmp_round_{state.round:03d}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state.as_dict(), tmp / "server.pt")
        for client_id, client_state in client_states.items():
            torch.save(client_state, tmp / f"client_{client_id}.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        pointer = self.root / f".latest.{os.getpid()}"
        pointer.write_text(final.name)
        pointer.replace(self.latest_file)
        for old in sorted(self.root.glob("round_*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load(self) -> tuple[ServerState, Path]:
        """The newest complete checkpoint and its folder."""
        if not self.exists():
            msg = f"No checkpoint to resume from in {self.root} (no 'latest' file)."
            raise CheckpointError(msg)
        folder = self.root / self.latest_file.read_text().strip()
        server_file = folder / "server.pt"
        if not server_file.is_file():
            msg = f"Checkpoint {folder} is incomplete: {server_file} is missing."
            raise CheckpointError(msg)
        data = torch.load(server_file, map_location="cpu", weights_only=True)
        state = ServerState(
            round=int(data["round"]),
            global_memory=data["global_memory"],
            global_weights=data["global_weights"],
            memory_rounds={int(k): int(v) for k, v in data["memory_rounds"].items()},
            rows=list(data["rows"]),
            identity=dict(data["identity"]),
        )
        return state, folder

    @staticmethod
    def load_client(folder: Path, client_id: int) -> dict[str, Any]:
        """One client's state from a round folder."""
        path = folder / f"client_{client_id}.pt"
        if not path.is_file():
            msg = f"Checkpoint {folder} has no state for client {client_id} ({path})."
            raise CheckpointError(msg)
        return torch.load(path, map_location="cpu", weights_only=True)
