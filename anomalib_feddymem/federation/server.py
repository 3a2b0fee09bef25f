"""The server step: validate every upload, then aggregate the accepted ones into ``G``.

Shared by every runner (in-process simulation, Flower ServerApp). A bad upload is rejected with
a reason and the round goes on with the others; the aggregation itself is
:func:`~anomalib_feddymem.models.feddymem.memory.aggregate_memories` (the union of the uploads,
grouped by greedy k-center or seeded weighted k-means when it exceeds the global memory's size).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from anomalib_feddymem.models.feddymem.memory import aggregate_memories

if TYPE_CHECKING:
    from collections.abc import Mapping

logger = logging.getLogger(__name__)

__all__ = ["FederationError", "InvalidUploadError", "ServerResult", "server_step", "validate_upload"]


class InvalidUploadError(ValueError):
    """An upload that the server refuses (wrong dtype or shape, non-finite values, too large)."""


class FederationError(RuntimeError):
    """A round cannot complete (too few clients replied or were accepted)."""


@dataclass
class ServerResult:
    """Outcome of one server step."""

    global_memory: torch.Tensor
    weights: torch.Tensor
    accepted: list[int]
    rejected: dict[int, str] = field(default_factory=dict)


def validate_upload(
    items: np.ndarray,
    weights: np.ndarray | None,
    *,
    embedding_dim: int,
    max_items: int,
) -> None:
    """Raise :class:`InvalidUploadError` with a reason if an upload is not a sane reduced memory.

    Args:
        items: ``(K, d)`` float32 memory items.
        weights: ``(K,)`` float32 non-negative weights with a positive sum.
        embedding_dim: Expected ``d`` (the model's embedding dimension).
        max_items: Largest accepted ``K`` (a size cap against oversized or hostile uploads).
    """
    if not isinstance(items, np.ndarray) or not isinstance(weights, np.ndarray):
        msg = f"items and weights must be arrays, got {type(items).__name__} and {type(weights).__name__}"
        raise InvalidUploadError(msg)
    if items.dtype != np.float32 or weights.dtype != np.float32:
        msg = f"dtype must be float32, got items {items.dtype} and weights {weights.dtype}"
        raise InvalidUploadError(msg)
    if items.ndim != 2 or items.shape[1] != embedding_dim:
        msg = f"items must have shape (K, {embedding_dim}), got {items.shape}"
        raise InvalidUploadError(msg)
    if weights.shape != (items.shape[0],):
        msg = f"weights must have shape ({items.shape[0]},) to match items, got {weights.shape}"
        raise InvalidUploadError(msg)
    if items.shape[0] == 0:
        msg = "empty upload (K = 0)"
        raise InvalidUploadError(msg)
    if items.shape[0] > max_items:
        msg = f"too many items: {items.shape[0]} > max_upload_items={max_items}"
        raise InvalidUploadError(msg)
    if not (np.isfinite(items).all() and np.isfinite(weights).all()):
        msg = "NaN or infinite values"
        raise InvalidUploadError(msg)
    if (weights < 0).any() or not weights.sum() > 0:
        msg = "weights must be non-negative with a positive sum"
        raise InvalidUploadError(msg)


def server_step(
    uploads: Mapping[int, tuple[np.ndarray, np.ndarray | None]],
    *,
    size: int,
    embedding_dim: int,
    max_items: int,
    seed: int = 0,
    previous: torch.Tensor | None = None,
    min_clients: int = 1,
    method: str = "coreset",
    grow: bool = False,
    previous_weights: torch.Tensor | None = None,
) -> ServerResult:
    """Validate every client's upload and aggregate the accepted ones into the new ``G``.

    Args:
        uploads: client id -> ``(items, weights)`` as received (numpy); aggregated in id order.
        size: Size of the global memory (capped by the number of uploaded items).
        embedding_dim: Expected item dimension.
        max_items: Size cap of one upload.
        seed: k-means seed.
        previous: Previous global memory (warm start).
        min_clients: Fewest accepted uploads for the round to count.
        method: Grouping of a union larger than ``size`` (one of ``GROUPING_METHODS``).
        grow: Keep the previous global memory (with ``previous_weights``) in the union.
        previous_weights: Weights of ``previous``.

    Raises:
        FederationError: fewer than ``min_clients`` uploads were accepted.
    """
    accepted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    rejected: dict[int, str] = {}
    for client in sorted(uploads):  # a fixed order: k-means over the union is order-sensitive
        items, weights = uploads[client]
        try:
            validate_upload(items, weights, embedding_dim=embedding_dim, max_items=max_items)
        except InvalidUploadError as error:
            rejected[client] = str(error)
            logger.warning("Rejected the upload of client %s: %s.", client, error)
            continue
        accepted[client] = (torch.from_numpy(items.copy()), torch.from_numpy(weights.copy()))
    if len(accepted) < max(min_clients, 1):
        msg = (
            f"Only {len(accepted)} valid upload(s) (clients {sorted(accepted)}) but min_clients={min_clients}; "
            f"rejected: {rejected or 'none'}."
        )
        raise FederationError(msg)
    memory, weights = aggregate_memories(
        list(accepted.values()),
        size,
        seed=seed,
        previous=previous,
        previous_weights=previous_weights,
        method=method,
        grow=grow,
    )
    return ServerResult(global_memory=memory, weights=weights, accepted=list(accepted), rejected=rejected)
