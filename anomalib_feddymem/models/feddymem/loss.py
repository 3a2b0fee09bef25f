"""Metric loss of FedDyMem: compact normal features around memory items.

For every normal patch embedding ``z`` and memory ``M`` (squared distances ``d``, sorted):

* attraction: ``mean relu(d_k - r^2)`` over the ``K`` nearest items (pulls ``z`` inside radius r),
* repulsion:  ``mean relu(r^2 - d_j + alpha)`` over the next ``J`` items (hard negatives stay at
  least ``alpha`` beyond the radius), which keeps the embedding from collapsing.

This is CFA's loss (Lee et al. 2022); FedDyMem uses it against the *global* memory so that every
client maps its normal data into one shared normal space.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's and anomalib's convention

from .memory import nearest_k_items


class MemoryMetricLoss(nn.Module):
    """Attraction to the K nearest memory items, repulsion from the next J.

    Args:
        num_nearest: ``K``, items each embedding is attracted to.
        num_hard_negatives: ``J``, following items it is pushed away from (0 disables repulsion).
        radius: ``r``, the radius within which attraction stops.
        margin: ``alpha``, how far beyond ``r`` the hard negatives must stay.

    Example:
        >>> loss = MemoryMetricLoss(num_nearest=1, num_hard_negatives=1, radius=0.0, margin=1.0)
        >>> loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
        tensor(0.2500)
    """

    def __init__(
        self,
        num_nearest: int = 3,
        num_hard_negatives: int = 3,
        radius: float = 1e-5,
        margin: float = 0.1,
    ) -> None:
        super().__init__()
        if num_nearest < 1 or num_hard_negatives < 0:
            msg = f"num_nearest must be >= 1 and num_hard_negatives >= 0, got {num_nearest}, {num_hard_negatives}."
            raise ValueError(msg)
        self.num_nearest = num_nearest
        self.num_hard_negatives = num_hard_negatives
        self.radius = radius
        self.margin = margin

    def num_neighbors(self, memory_size: int) -> int:
        """``K + J`` capped by the memory size: how many nearest items the loss looks at."""
        k = min(self.num_nearest, memory_size)
        return k + min(self.num_hard_negatives, memory_size - k)

    def forward(
        self, embeddings: torch.Tensor, memory: torch.Tensor, neighbors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Loss for ``(N, d)`` embeddings against ``(M, d)`` memory items.

        The ``K + J`` nearest items are found without autograd (:func:`nearest_k_items`, or the
        precomputed ``(N, K + J)`` ``neighbors``); only their ``N x (K + J)`` distances are
        differentiated. The gradient is the one of a top-k over the full distance matrix, at a
        fraction of the time and memory when the bank is large.
        """
        if embeddings.ndim != 2 or memory.ndim != 2 or embeddings.shape[1] != memory.shape[1]:
            shapes = f"{tuple(embeddings.shape)} and {tuple(memory.shape)}"
            msg = f"embeddings (N, d) and memory (M, d) must share d, got {shapes}."
            raise ValueError(msg)
        k = min(self.num_nearest, memory.shape[0])
        j = self.num_neighbors(memory.shape[0]) - k
        if neighbors is None:
            neighbors = nearest_k_items(embeddings, memory, k + j)
        elif neighbors.shape != (embeddings.shape[0], k + j):
            msg = f"neighbors must have shape ({embeddings.shape[0]}, {k + j}), got {tuple(neighbors.shape)}."
            raise ValueError(msg)
        nearest = (embeddings.unsqueeze(1) - memory[neighbors]).pow(2).sum(dim=-1)
        r2 = self.radius**2
        loss = F.relu(nearest[:, :k] - r2).mean()
        if j > 0:
            loss = loss + F.relu(r2 - nearest[:, k:] + self.margin).mean()
        return loss
