"""What travels between clients and server, as Flower records (no pickle on the wire).

A memory (an upload ``(items, weights)`` or the global memory ``G``) is an ``ArrayRecord`` of two
numpy arrays; byte counts are the sizes of their serialised buffers, exactly what Flower sends.
The in-process simulation goes through the same encoding, so its byte counts and data path are
those of a real deployment.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

__all__ = ["decode_memory", "encode_memory", "record_nbytes"]

ITEMS = "items"
WEIGHTS = "weights"


def _as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(value)


def encode_memory(items: torch.Tensor | np.ndarray, weights: torch.Tensor | np.ndarray | None = None) -> ArrayRecord:
    """``ArrayRecord`` with ``items`` ``(K, d)`` and, if given, ``weights`` ``(K,)`` (dtypes kept)."""
    arrays = {ITEMS: Array(_as_numpy(items))}
    if weights is not None:
        arrays[WEIGHTS] = Array(_as_numpy(weights))
    return ArrayRecord(array_dict=arrays)


def decode_memory(record: ArrayRecord) -> tuple[np.ndarray, np.ndarray | None]:
    """Inverse of :func:`encode_memory`; raises ``ValueError`` naming a missing entry."""
    if ITEMS not in record:
        msg = f"Memory record has no {ITEMS!r} array (keys: {list(record.keys())})."
        raise ValueError(msg)
    items = record[ITEMS].numpy()
    weights = record[WEIGHTS].numpy() if WEIGHTS in record else None
    return items, weights


def record_nbytes(record: ArrayRecord | None) -> int:
    """Serialised size in bytes of the arrays of ``record`` (0 for ``None``)."""
    if record is None:
        return 0
    return int(sum(len(array.data) for array in record.values()))
