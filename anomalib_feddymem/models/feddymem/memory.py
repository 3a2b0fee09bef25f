"""Memory-bank maths of FedDyMem, shared by the model, the client and the server.

* :class:`DynamicMemory` is a client's local memory bank ``M_c`` with a count per item, updated
  after every local epoch by an exponential moving average of the embeddings assigned to it.
* :func:`memory_reduce` shrinks a bank by weighted averaging before upload.
* :func:`weighted_kmeans` is both the grouping step of memory-reduce and the server's aggregation.

All functions are plain tensor code (no Lightning), so the federation calls them directly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from anomalib.models.components import DynamicBufferMixin
from sklearn.cluster import KMeans
from torch import nn

from anomalib_feddymem.sampling import k_center_greedy

MEMORY_INIT_METHODS = ("coreset", "kmeans")


def squared_distances(queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances by matmul (exportable, no ``cdist``).

    Both sides are first centred on the items' mean: distances are unchanged, but the expansion
    ``|q|^2 - 2 q.m + |m|^2`` then cancels far less (CNN features sit far from the origin), so a
    patch equal to a memory item scores ~0 instead of float32 noise of the order of its norm.

    Args:
        queries: ``(N, d)`` embeddings.
        items: ``(M, d)`` memory items.

    Returns:
        ``(N, M)`` non-negative squared distances.
    """
    center = items.mean(dim=0, keepdim=True)
    queries, items = queries - center, items - center
    cross = queries @ items.T
    return (queries.pow(2).sum(-1, keepdim=True) - 2 * cross + items.pow(2).sum(-1)).clamp_min(0)


@torch.no_grad()
def nearest_k_items(queries: torch.Tensor, items: torch.Tensor, k: int, chunk_size: int = 4096) -> torch.Tensor:
    """``(N, k)`` indices of every query's ``k`` nearest items, nearest first, without autograd.

    Chunked so that the ``(chunk, M)`` distance matrix stays bounded for large memories. The
    metric loss uses it to find neighbours and then differentiates only the ``N x k`` distances
    it needs, instead of keeping an ``N x M`` matrix in the autograd graph.
    """
    k = min(k, items.shape[0])
    queries, items = queries.detach(), items.detach()
    if k == 1:
        return torch.cat([squared_distances(c, items).argmin(dim=1, keepdim=True) for c in torch.split(queries, chunk_size)])
    return torch.cat([
        squared_distances(c, items).topk(k, dim=1, largest=False).indices for c in torch.split(queries, chunk_size)
    ])


def nearest_items(queries: torch.Tensor, items: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Index of the nearest item for every query, computed in chunks to bound memory."""
    return nearest_k_items(queries, items, 1, chunk_size)[:, 0]


def _group_means(
    points: np.ndarray,
    weights: np.ndarray,
    labels: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and total weight of every group (empty groups are dropped)."""
    totals = np.bincount(labels, weights=weights, minlength=k)
    sums = np.zeros((k, points.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, points * weights[:, None])
    keep = totals > 0
    return (sums[keep] / totals[keep, None]), totals[keep]


def weighted_kmeans(
    points: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    init: torch.Tensor | None = None,
    max_iter: int = 100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means whose centroids are exactly the weighted means of their groups.

    scikit-learn's ``KMeans`` does the clustering (seeded, ``sample_weight``, warm start from
    ``init``); the centroids are then recomputed from the final labels so that every output item
    is ``sum(w_i m_i) / sum(w_i)`` over its group and its weight is ``sum(w_i)``: the weighted
    mean and the total weight of the input are preserved exactly.

    Args:
        points: ``(N, d)`` items.
        weights: ``(N,)`` non-negative weights (counts); zero-weight items are ignored.
        k: Number of clusters; if there are at most ``k`` weighted items they are returned as is.
        seed: Random seed (k-means++ seeding when ``init`` is not usable).
        init: Optional ``(k, d)`` warm start, e.g. the previous global memory.
        max_iter: Lloyd iterations.

    Returns:
        ``(centroids, cluster_weights)``, float32, at most ``k`` rows (empty clusters dropped).
    """
    if k < 1:
        msg = f"k must be at least 1, got {k}."
        raise ValueError(msg)
    if points.ndim != 2 or weights.ndim != 1 or points.shape[0] != weights.shape[0]:
        msg = f"points must be (N, d) and weights (N,), got {tuple(points.shape)} and {tuple(weights.shape)}."
        raise ValueError(msg)
    x = points.detach().cpu().double().numpy()
    w = weights.detach().cpu().double().numpy()
    if not (np.isfinite(x).all() and np.isfinite(w).all()) or (w < 0).any():
        msg = "weighted_kmeans needs finite points and finite, non-negative weights."
        raise ValueError(msg)
    keep = w > 0
    x, w = x[keep], w[keep]
    if x.shape[0] == 0:
        msg = "weighted_kmeans got no item with positive weight."
        raise ValueError(msg)
    if x.shape[0] <= k:
        return torch.from_numpy(x).float(), torch.from_numpy(w).float()
    start: str | np.ndarray = "k-means++"
    if init is not None and init.shape == (k, x.shape[1]):
        start = init.detach().cpu().double().numpy()
    kmeans = KMeans(n_clusters=k, init=start, n_init=1, max_iter=max_iter, random_state=seed, tol=1e-6)
    labels = kmeans.fit_predict(x, sample_weight=w)
    centroids, totals = _group_means(x, w, labels, k)
    return torch.from_numpy(centroids).float(), torch.from_numpy(totals).float()


def memory_reduce(
    items: torch.Tensor,
    counts: torch.Tensor,
    ratio: float,
    *,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink a memory bank by ``ratio`` by weighted averaging (FedDyMem's memory-reduce).

    Items are grouped by weighted k-means with ``ceil(K / ratio)`` groups; each group becomes one
    item ``sum(w_i m_i) / sum(w_i)`` with weight ``sum(w_i)``, ``w`` being the item counts.

    Returns:
        ``(reduced_items, reduced_weights)``.
    """
    if ratio < 1:
        msg = f"memory-reduce ratio must be >= 1, got {ratio}."
        raise ValueError(msg)
    target = max(1, math.ceil(items.shape[0] / ratio))
    return weighted_kmeans(items, counts, target, seed=seed)


class DynamicMemory(DynamicBufferMixin, nn.Module):
    """A client's local memory bank: ``K`` items of dimension ``d`` with a count per item.

    During a local epoch the embeddings of the normal training patches are assigned to their
    nearest item (:meth:`accumulate`); after the epoch, :meth:`update` moves each hit item towards
    the mean of its assigned embeddings (EMA with ``momentum``) and sets its count to the number of
    embeddings it received, so counts always describe the client's current data.

    Buffers, so that the memory is saved in Lightning checkpoints with the model; anomalib's
    ``DynamicBufferMixin`` resizes them when a checkpoint of another size is loaded.
    """

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        if not 0 <= momentum <= 1:
            msg = f"memory momentum must be in [0, 1], got {momentum}."
            raise ValueError(msg)
        self.momentum = momentum
        self.register_buffer("items", torch.empty(0))
        self.register_buffer("counts", torch.empty(0))
        self.register_buffer("_sums", torch.empty(0), persistent=False)
        self.register_buffer("_hits", torch.empty(0), persistent=False)
        self.items: torch.Tensor
        self.counts: torch.Tensor

    @property
    def is_empty(self) -> bool:
        """Whether the memory has not been initialised yet."""
        return self.items.numel() == 0

    def initialize(
        self,
        embeddings: torch.Tensor,
        size: int,
        *,
        seed: int = 0,
        method: str = "coreset",
        max_points: int = 131072,
    ) -> None:
        """Initialise from a client's own embeddings, on a seeded subsample of ``max_points``.

        ``"coreset"`` (default) keeps the k-center greedy coreset of the embeddings (PatchCore's
        sampler, :func:`~anomalib_feddymem.sampling.k_center_greedy`): every normal patch lies
        close to some item, rare normal textures included. ``"kmeans"`` keeps k-means centroids,
        which average rare patches away: on headct (256 px, untrained generator) image AUROC was
        0.802 / 0.808 with k-means and 0.829 / 0.825 with the coreset at 2048 / 4096 items
        (``benchmarks/bench_memory_init.py``), and the coreset took 4-15x less time.
        """
        if method not in MEMORY_INIT_METHODS:
            msg = f"memory init method must be one of {MEMORY_INIT_METHODS}, got {method!r}."
            raise ValueError(msg)
        generator = torch.Generator().manual_seed(seed)
        embeddings = embeddings.detach().float()
        if embeddings.shape[0] > max_points:
            embeddings = embeddings[torch.randperm(embeddings.shape[0], generator=generator)[:max_points]]
        size = min(size, embeddings.shape[0])
        if method == "coreset":
            first = int(torch.randint(embeddings.shape[0], (1,), generator=generator))
            items = embeddings[k_center_greedy(embeddings.contiguous(), size, first)]
        else:
            first = embeddings[torch.randperm(embeddings.shape[0], generator=generator)[:size]]
            items, _ = weighted_kmeans(
                embeddings, torch.ones(embeddings.shape[0]), size, seed=seed, init=first, max_iter=20
            )
        counts = torch.bincount(nearest_items(embeddings, items), minlength=items.shape[0]).float()
        self.set(items, counts)

    def set(self, items: torch.Tensor, counts: torch.Tensor) -> None:
        """Replace the memory (e.g. when restoring a client)."""
        device = self.items.device
        self.items = items.detach().float().to(device)
        self.counts = counts.detach().float().to(device)
        self._reset_accumulators()

    def _reset_accumulators(self) -> None:
        self._sums = torch.zeros_like(self.items)
        self._hits = torch.zeros_like(self.counts)

    @torch.no_grad()
    def accumulate(self, embeddings: torch.Tensor, assignment: torch.Tensor | None = None) -> None:
        """Assign ``(N, d)`` embeddings to their nearest items and add them to the epoch's sums.

        ``assignment`` (nearest item per embedding) may be passed when the caller already searched
        this memory, e.g. the metric loss of centralised training, to avoid a second search.
        """
        if self._sums.shape != self.items.shape:
            self._reset_accumulators()
        embeddings = embeddings.detach().float()
        if assignment is None:
            assignment = nearest_items(embeddings, self.items)
        elif assignment.shape != embeddings.shape[:1]:
            msg = f"assignment must have shape ({embeddings.shape[0]},), got {tuple(assignment.shape)}."
            raise ValueError(msg)
        self._sums.index_add_(0, assignment, embeddings)
        self._hits += torch.bincount(assignment, minlength=self.items.shape[0]).float()

    @property
    def has_pending_update(self) -> bool:
        """Whether embeddings were accumulated since the last :meth:`update`."""
        return self._hits.numel() > 0 and bool(self._hits.sum() > 0)

    @torch.no_grad()
    def update(self) -> None:
        """EMA-move every hit item towards the mean of its embeddings; counts := hits."""
        if not self.has_pending_update:
            return
        hit = self._hits > 0
        means = self._sums[hit] / self._hits[hit, None]
        self.items[hit] = (1 - self.momentum) * self.items[hit] + self.momentum * means
        self.counts = self._hits.clone()
        self._reset_accumulators()


def aggregate_memories(
    uploads: list[tuple[torch.Tensor, torch.Tensor]],
    size: int,
    *,
    seed: int = 0,
    previous: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Server aggregation: weighted k-means over the union of the uploaded reduced memories.

    Args:
        uploads: One ``(items, weights)`` pair per client.
        size: Size of the global memory ``G`` (capped by the number of uploaded items).
        seed: k-means seed.
        previous: Previous global memory, used as warm start when its size matches.

    Returns:
        ``(global_memory, weights)``.
    """
    if not uploads:
        msg = "aggregate_memories needs at least one upload."
        raise ValueError(msg)
    items = torch.cat([upload[0].float() for upload in uploads])
    weights = torch.cat([upload[1].float() for upload in uploads])
    return weighted_kmeans(items, weights, size, seed=seed, init=previous)
