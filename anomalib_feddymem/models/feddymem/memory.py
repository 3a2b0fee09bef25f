"""Memory-bank maths of FedDyMem, shared by the model, the client and the server.

* :class:`DynamicMemory` is a client's local memory bank ``M_c`` with a count per item, updated
  after every local epoch by an exponential moving average of the embeddings assigned to it.
* :func:`memory_reduce` shrinks a bank before upload (k-center items, or the abstract's weighted averages).
* :func:`aggregate_memories` is the server's step: the union of the uploads, grouped when it
  exceeds the global memory's size.
* :func:`group_items` is the grouping of both: greedy k-center groups (:func:`kcenter_grouping`),
  represented by their k-center point (``"coreset"``, the default, which keeps every item a real
  patch) or by their weighted mean (``"kcenter"``), or weighted k-means (:func:`weighted_kmeans`,
  ``"kmeans"``, the abstract's weighted averages).

All functions are plain tensor code (no Lightning), so the federation calls them directly.
"""

from __future__ import annotations

import math

import torch
from anomalib.models.components import DynamicBufferMixin
from torch import nn

from anomalib_feddymem.models.components.sampling import k_center_greedy

MEMORY_INIT_METHODS = ("coreset", "kmeans")
#: Wire precisions of uploaded items (see :mod:`anomalib_feddymem.federation.messages`).
UPLOAD_PRECISIONS = ("float32", "float16", "int8", "int4")
#: How memory-reduce and the server group items: k-center groups kept as their centre point
#: (``"coreset"``) or as their weighted mean (``"kcenter"``), or weighted k-means (``"kmeans"``).
GROUPING_METHODS = ("coreset", "kcenter", "kmeans")


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
        return nearest_items(queries, items, chunk_size)[:, None]
    return torch.cat([
        squared_distances(c, items).topk(k, dim=1, largest=False).indices for c in torch.split(queries, chunk_size)
    ])


@torch.no_grad()
def nearest_items(
    queries: torch.Tensor,
    items: torch.Tensor,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Index of the nearest item for every query, in chunks that reuse one distance buffer.

    The argmin of ``|q - m|^2`` is that of ``|m|^2 - 2 q.m`` (``|q|^2`` is the same for every
    item), so each chunk costs one fused ``addmm`` into a preallocated ``(chunk, M)`` buffer:
    no per-chunk allocation of distance matrices. Both sides are centred on the items' mean
    first, as in :func:`squared_distances`.

    Args:
        queries: ``(N, d)`` points.
        items: ``(M, d)`` candidates.
        chunk_size: Queries per chunk (bounds the buffer to ``chunk_size x M`` floats).

    Returns:
        ``(N,)`` int64 indices.
    """
    center = items.mean(dim=0, keepdim=True)
    items = (items - center).float()
    item_norms = items.pow(2).sum(-1)
    out = torch.empty(queries.shape[0], dtype=torch.long)
    buffer = torch.empty(min(chunk_size, queries.shape[0]), items.shape[0])
    for start in range(0, queries.shape[0], chunk_size):
        chunk = queries[start : start + chunk_size].float() - center
        scores = torch.addmm(item_norms, chunk, items.T, alpha=-2, out=buffer[: chunk.shape[0]])
        out[start : start + chunk.shape[0]] = scores.argmin(dim=1)
    return out


def _group_means(
    points: torch.Tensor,
    weights: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    chunk_size: int = 16384,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and total weight of every group (float64 sums); empty groups are dropped.

    Summed in chunks so that the float64 copy of the weighted points never exceeds one chunk.
    """
    weights = weights.double()
    totals = torch.bincount(labels, weights=weights, minlength=k)
    sums = torch.zeros(k, points.shape[1], dtype=torch.float64)
    for start in range(0, points.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        sums.index_add_(0, labels[rows], points[rows].double() * weights[rows, None])
    keep = totals > 0
    return (sums[keep] / totals[keep, None]).float(), totals[keep].float()


def _all_finite(values: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or infinity, without a boolean copy of a server-sized union.

    ``aminmax`` propagates NaN and returns an infinity as the minimum or the maximum.
    """
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def _checked_points(
    points: torch.Tensor, weights: torch.Tensor, k: int, caller: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 points and weights with zero-weight rows dropped; a ``ValueError`` names bad input."""
    if k < 1:
        msg = f"k must be at least 1, got {k}."
        raise ValueError(msg)
    if points.ndim != 2 or weights.ndim != 1 or points.shape[0] != weights.shape[0]:
        msg = f"points must be (N, d) and weights (N,), got {tuple(points.shape)} and {tuple(weights.shape)}."
        raise ValueError(msg)
    x, w = points.detach().cpu().float(), weights.detach().cpu().float()
    if not (_all_finite(x) and _all_finite(w)) or (w < 0).any():
        msg = f"{caller} needs finite points and finite, non-negative weights."
        raise ValueError(msg)
    keep = w > 0
    if not keep.any():
        msg = f"{caller} got no item with positive weight."
        raise ValueError(msg)
    if keep.all():  # the common case: no copy of a server-sized union
        return x.contiguous(), w
    return x[keep].contiguous(), w[keep]


def _subsample(n: int, limit: int, generator: torch.Generator) -> torch.Tensor | None:
    """Seeded indices of ``limit`` of ``n`` rows, or ``None`` when all ``n`` fit."""
    return torch.randperm(n, generator=generator)[:limit].sort().values if n > limit else None


def _kcenter_centres(x: torch.Tensor, k: int, generator: torch.Generator, max_points: int) -> torch.Tensor:
    """``k`` rows of ``x`` chosen by greedy k-center on a seeded subsample of ``max_points``."""
    pick = _subsample(x.shape[0], max(max_points, k), generator)
    pool = x if pick is None else x[pick]
    first = int(torch.randint(pool.shape[0], (1,), generator=generator))
    return pool[k_center_greedy(pool, k, first)]


def _farthest_first(x: torch.Tensor, min_sq: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy k-center from given squared distances to already chosen centres: up to ``k`` indices."""
    centred = x - x.mean(dim=0, keepdim=True)
    norms = centred.pow(2).sum(-1)
    min_sq = min_sq.clone()
    chosen = []
    for _ in range(k):
        index = int(min_sq.argmax())
        if not min_sq[index] > 0:
            break  # every point coincides with a centre
        chosen.append(index)
        row = centred[index]
        min_sq = torch.minimum(min_sq, (norms - 2 * torch.mv(centred, row) + norms[index]).clamp_min_(0))
        min_sq[index] = 0
    return torch.tensor(chosen, dtype=torch.long)


def kcenter_grouping(
    points: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    max_points: int = 32768,
    covered: torch.Tensor | None = None,
    average: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coverage-preserving grouping: k-center centres, every point to its nearest, weighted means.

    Greedy k-center picks the point farthest from all chosen ones first, so a rare patch far
    from the rest becomes a group of its own and survives the averaging, while near-duplicates
    share a group and merge. Each group becomes ``sum(w_i m_i) / sum(w_i)`` with weight
    ``sum(w_i)``: the weighted mean and the total weight of the input are preserved exactly.

    With ``covered`` (items another memory already holds, e.g. the global memory ``G``), the
    greedy starts from them: the ``k`` new centres go where ``covered`` represents the points
    worst, points nearer to a ``covered`` item than to every new centre are left out, and only the
    new groups are returned. This is how a client adds to ``G`` what it lacks instead of sending
    again what it holds.

    With ``average=False`` each group is represented by its centre itself (a real item, weighted
    by its group's total weight): the items are then the greedy k-center coreset of the input, so
    every input item lies within the coreset's covering radius of one of them. A weighted mean of a
    spread-out group lies between its members and covers its farthest ones worse than the centre
    does, which costs detection where normal patches vary a lot (the README's reduce ablation).

    Args:
        points: ``(N, d)`` items.
        weights: ``(N,)`` non-negative weights (counts); zero-weight items are ignored.
        k: Number of (new) groups; without ``covered``, at most ``k`` weighted items are returned as
            they are.
        seed: Seed of the first centre and of the subsample.
        max_points: Without ``covered``, centres are chosen among a seeded subsample of this many
            points (all points are still assigned and averaged).
        covered: Optional ``(M, d)`` items already held elsewhere.
        average: Represent each group by its weighted mean (``True``) or by its centre (``False``).

    Returns:
        ``(items, weights)``, float32, at most ``k`` rows.
    """
    x, w = _checked_points(points, weights, k, "kcenter_grouping")
    if covered is not None and covered.numel() > 0:
        held = covered.detach().cpu().float()
        if held.ndim != 2 or held.shape[1] != x.shape[1]:
            msg = f"covered must have shape (M, {x.shape[1]}), got {tuple(held.shape)}."
            raise ValueError(msg)
        nearest = nearest_items(x, held)
        min_sq = (x - held[nearest]).pow(2).sum(-1)
        centres = x[_farthest_first(x, min_sq, k)]
        labels = nearest_items(x, torch.cat([held, centres])) - held.shape[0]
        new = labels >= 0
        return _represent_groups(x[new], w[new], labels[new], centres, average)
    if x.shape[0] <= k:
        return x, w
    generator = torch.Generator().manual_seed(seed)
    centres = _kcenter_centres(x, k, generator, max_points)
    return _represent_groups(x, w, nearest_items(x, centres), centres, average)


def _represent_groups(
    points: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, average: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each non-empty group as its weighted mean or as its centre, with the group's total weight."""
    if average:
        return _group_means(points, weights, labels, centres.shape[0])
    totals = torch.bincount(labels, weights=weights.double(), minlength=centres.shape[0])
    keep = totals > 0
    return centres[keep].contiguous(), totals[keep].float()


def weighted_kmeans(
    points: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    init: torch.Tensor | None = None,
    max_iter: int = 10,
    tol: float = 1e-4,
    max_points: int = 32768,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means (Lloyd) whose centroids are exactly the weighted means of their groups.

    Seeded by greedy k-center (one centre per far-apart mode) unless ``init`` (e.g. the previous
    global memory) has the right shape. Lloyd iterations run on a seeded subsample of
    ``max_points`` points, so a server's cost per iteration does not grow with the number of
    clients; then every point is assigned once and each output item is ``sum(w_i m_i) /
    sum(w_i)`` over its group with weight ``sum(w_i)``: the weighted mean and the total weight of
    the input are preserved exactly.

    Args:
        points: ``(N, d)`` items.
        weights: ``(N,)`` non-negative weights (counts); zero-weight items are ignored.
        k: Number of clusters; if there are at most ``k`` weighted items they are returned as is.
        seed: Random seed (k-center seeding, subsample).
        init: Optional ``(k, d)`` warm start, e.g. the previous global memory.
        max_iter: Most Lloyd iterations.
        tol: Stop when centroids move less than ``tol`` times the points' mean squared spread.
        max_points: Points the iterations (and the seeding) run on.

    Returns:
        ``(centroids, cluster_weights)``, float32, at most ``k`` rows (empty clusters dropped).
    """
    x, w = _checked_points(points, weights, k, "weighted_kmeans")
    if x.shape[0] <= k:
        return x, w
    generator = torch.Generator().manual_seed(seed)
    if init is not None and tuple(init.shape) == (k, x.shape[1]):
        centres = init.detach().cpu().float().clone()
    else:
        centres = _kcenter_centres(x, k, generator, max_points)
    pick = _subsample(x.shape[0], max_points, generator)
    fit_x, fit_w = (x, w) if pick is None else (x[pick], w[pick])
    spread = float((fit_x - fit_x.mean(0)).pow(2).sum(1).mean()) or 1.0
    for _ in range(max_iter):
        labels = nearest_items(fit_x, centres)
        totals = torch.bincount(labels, weights=fit_w, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, labels, fit_x * fit_w[:, None])
        hit = totals > 0
        moved = centres.clone()
        moved[hit] = sums[hit] / totals[hit, None]
        shift = float((moved - centres).pow(2).sum(1).mean())
        centres = moved
        if shift <= tol * spread:
            break
    return _group_means(x, w, nearest_items(x, centres), k)


def group_items(
    points: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    method: str,
    *,
    seed: int = 0,
    init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group weighted items into at most ``k`` weighted averages with ``method`` (:data:`GROUPING_METHODS`).

    ``"coreset"`` and ``"kcenter"`` (:func:`kcenter_grouping`) keep rare items as groups of their
    own, represented by the group's k-center point or by its weighted mean; ``"kmeans"``
    (:func:`weighted_kmeans`, warm-started from ``init``) minimises the weighted squared error and
    so averages rare items into their neighbours.
    """
    if method not in GROUPING_METHODS:
        msg = f"grouping method must be one of {list(GROUPING_METHODS)}, got {method!r}."
        raise ValueError(msg)
    if method in {"coreset", "kcenter"}:
        return kcenter_grouping(points, weights, k, seed=seed, average=method == "kcenter")
    return weighted_kmeans(points, weights, k, seed=seed, init=init)


def memory_reduce(
    items: torch.Tensor,
    counts: torch.Tensor,
    ratio: float,
    *,
    seed: int = 0,
    method: str = "coreset",
    covered: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink a memory bank by ``ratio`` (FedDyMem's memory-reduce).

    Items are grouped (:func:`group_items`) into ``ceil(K / ratio)`` groups, each with weight
    ``sum(w_i)``, ``w`` being the item counts. The abstract's memory-reduce makes each group the
    weighted average ``sum(w_i m_i) / sum(w_i)`` (``"kcenter"``, ``"kmeans"``); ``"coreset"``
    keeps the group's k-center point instead. With ``covered`` (the current global memory; the
    k-center methods only) the groups are the ones that ``covered`` lacks (see
    :func:`kcenter_grouping`).

    Returns:
        ``(reduced_items, reduced_weights)``.
    """
    if ratio < 1:
        msg = f"memory-reduce ratio must be >= 1, got {ratio}."
        raise ValueError(msg)
    target = max(1, math.ceil(items.shape[0] / ratio))
    if covered is not None and method in {"coreset", "kcenter"}:
        return kcenter_grouping(items, counts, target, seed=seed, covered=covered, average=method == "kcenter")
    return group_items(items, counts, target, method, seed=seed)


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
        sampler, :func:`~anomalib_feddymem.models.components.sampling.k_center_greedy`): every normal patch lies
        close to some item, rare normal textures included. ``"kmeans"`` keeps k-means centroids,
        which average rare patches away (``benchmarks/bench_memory_init.py`` compares the two).
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
        self.reset_accumulators()

    def reset_accumulators(self) -> None:
        """Forget this epoch's accumulated sums and counts (a fresh epoch, or no dynamic update)."""
        self._sums = torch.zeros_like(self.items)
        self._hits = torch.zeros_like(self.counts)

    @torch.no_grad()
    def accumulate(self, embeddings: torch.Tensor, assignment: torch.Tensor | None = None) -> None:
        """Assign ``(N, d)`` embeddings to their nearest items and add them to the epoch's sums.

        ``assignment`` (nearest item per embedding) may be passed when the caller already searched
        this memory, e.g. the metric loss of centralised training, to avoid a second search.
        """
        if self._sums.shape != self.items.shape:
            self.reset_accumulators()
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
        self.reset_accumulators()


def aggregate_memories(
    uploads: list[tuple[torch.Tensor, torch.Tensor]],
    size: int,
    *,
    seed: int = 0,
    previous: torch.Tensor | None = None,
    previous_weights: torch.Tensor | None = None,
    method: str = "coreset",
    grow: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Server aggregation: the union of the uploaded reduced memories, grouped to at most ``size``.

    A union that fits in ``size`` items is kept whole (no item is averaged away); a larger one is
    grouped by ``method`` (:func:`group_items`; ``"kmeans"`` warm-starts from ``previous``). Both
    choose their centres on a bounded subsample and assign every item once, so the server's time
    grows linearly with the number of clients.

    Args:
        uploads: One ``(items, weights)`` pair per client.
        size: Largest size of the global memory ``G``.
        seed: Grouping seed.
        previous: Previous global memory: the k-means warm start when its size matches, and with
            ``grow`` part of the union.
        previous_weights: Weights of ``previous`` (ones when ``None``).
        method: One of :data:`GROUPING_METHODS`.
        grow: Keep ``previous`` in the union: ``G`` accumulates what clients add round by round.

    Returns:
        ``(global_memory, weights)``.
    """
    if not uploads:
        msg = "aggregate_memories needs at least one upload."
        raise ValueError(msg)
    parts = list(uploads)
    if grow and previous is not None and previous.numel() > 0:
        held = torch.ones(previous.shape[0]) if previous_weights is None else previous_weights
        parts.insert(0, (previous, held))
    items = torch.cat([part[0].float() for part in parts])
    weights = torch.cat([part[1].float() for part in parts])
    return group_items(items, weights, size, method, seed=seed, init=previous)
