"""Exact, fast k-center greedy coreset selection (the sampler of PatchCore).

anomalib's :class:`~anomalib.models.components.sampling.KCenterGreedy` recomputes the distance of
*every* point to every new centre: ``N x D`` work per selected index, for every index of the
coreset (``benchmarks/bench_coreset.py`` measures it). Almost all of that work is wasted: late in
the greedy only points near the new centre can get closer to it.

:class:`FastKCenterGreedy` selects **exactly the same indices** as anomalib's sampler for the same
random state, because it

* builds the same :class:`~anomalib.models.components.SparseRandomProjection` (same random calls,
  in the same order) and draws the first index with the same ``torch.randint`` call;
* computes every distance it keeps with anomalib's own arithmetic (the element-wise
  ``features - center`` and the row-wise ``torch.linalg.norm(..., dim=1)`` in the same dtype; each
  row is reduced on its own, so gathering rows first does not change the bits) and keeps the
  minimum like ``torch.minimum``, so the kept minimum distances are bit-for-bit anomalib's;
* picks the largest minimum distance and, among equal ones, the smallest index, like ``torch.max``;
  a picked point's distance is set to 0 like anomalib's ``scatter_``;
* skips only points whose minimum distance provably cannot change. With ``P`` an orthonormal
  projection onto the 16 principal directions of the points, ``|P x - P c| <= |x - c|``; a point is
  skipped when this lower bound exceeds ``(1 + 1e-4) min_d(x) + 2e-5 (|x - m| + |c - m|)``
  (``m`` the mean). The slack covers the float32 rounding of the projected coordinates (~1e-7
  ``|x - m|``) and of anomalib's norm (~1e-6 relative) by orders of magnitude, so anomalib's float
  distance of a skipped point is strictly above its kept minimum and ``torch.minimum`` would have
  kept the old value.

The points are ordered by a k-d tree on the projected coordinates and cut into blocks of 64
points with their bounding boxes. For a new centre, blocks whose box is farther than the block's
largest threshold are skipped whole (the box distance bounds every member's projected distance);
in the other blocks each point's projected bound is tested; only the survivors get the exact
distance (a few hundred rows, gathered from a tree-ordered copy of the features, so from a few
contiguous stretches). The farthest point comes from per-block maxima, updated only for the blocks
that changed. All temporaries of the loop live in preallocated buffers. Only the amount of work
changes: late iterations touch a few blocks instead of ``N`` points. Exactness is tested against
anomalib on continuous data and on data with duplicate points and exactly tied distances.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Generator

__all__ = ["FastKCenterGreedy", "k_center_greedy"]

# A point is skipped only when a lower bound of its distance to the new centre exceeds
# (1 + _RELATIVE) * min_d + _ABSOLUTE * (|x - mean| + |c - mean|). float32 norms of a few hundred
# terms are off by ~1e-6 relative and the stored projected coordinates by ~1e-7 |x - mean|, so
# a skipped point's float distance is strictly above its kept minimum in anomalib's computation too.
_RELATIVE = 1e-4
_ABSOLUTE = 2e-5
# Number of principal directions of the lower bounds; points per leaf block of the tree.
_PROJECTED_DIM = 16
_BLOCK = 64
_CHUNK = 65536
_ROWS = 4096  # rows per exact-distance chunk


def _row_norms(features: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """Anomalib's distance expression, row by row.

    Bitwise equal to its full-matrix call: each row is reduced on its own, whatever the number of
    rows, as the tests check through the indices.
    """
    return torch.linalg.norm(features - center, ord=2, dim=1)


def _gathered_row_norms(
    features: torch.Tensor, points: torch.Tensor, center: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """``_row_norms(features[points], center)``, chunked through the preallocated ``rows`` buffer.

    The same element-wise subtraction and row reduction, hence the same bits.
    """
    count = points.numel()
    if count <= rows.shape[0]:
        chunk = torch.index_select(features, 0, points, out=rows[:count])
        return torch.linalg.norm(chunk.sub_(center), ord=2, dim=1)
    distances = features.new_empty(count)
    for start in range(0, count, rows.shape[0]):
        stop = min(start + rows.shape[0], count)
        chunk = torch.index_select(features, 0, points[start:stop], out=rows[: stop - start])
        distances[start:stop] = torch.linalg.norm(chunk.sub_(center), ord=2, dim=1)
    return distances


@contextmanager
def _single_thread() -> Generator[None, None, None]:
    """One intra-op thread for the loop's thousands of small ops.

    OpenMP fork/join costs more than it saves at these sizes (3x slower on a shared 2-core CPU);
    row norms are bitwise the same on any thread count since each row is reduced by one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def k_center_greedy(features: torch.Tensor, coreset_size: int, first_index: int) -> torch.Tensor:
    """Exact greedy k-center selection on already projected ``features``, with pruned updates.

    Args:
        features: ``(N, D)`` points (anomalib's projected embedding).
        coreset_size: Number of indices to select (the first one included).
        first_index: The random starting index.

    Returns:
        ``(coreset_size,)`` int64 tensor of selected indices, in selection order.
    """
    if features.ndim != 2:
        msg = f"features must be (N, D), got shape {tuple(features.shape)}."
        raise ValueError(msg)
    n = features.shape[0]
    if not 0 < coreset_size <= n or not 0 <= first_index < n:
        msg = f"need 0 < coreset_size <= N and 0 <= first_index < N; got {coreset_size}, {first_index}, N={n}."
        raise ValueError(msg)
    with _single_thread():
        return _k_center_greedy(features.contiguous(), coreset_size, first_index)


def _principal_coordinates(features: torch.Tensor, dim: int, sample: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 coordinates ``(N, dim)`` on orthonormal principal directions, and norms ``|x - mean|``.

    Any orthonormal projection shortens distances, so ``|P x - P c| <= |x - c|``: cheap lower bounds
    of the true distances, made tight by the principal directions. A local generator leaves the
    global random state (which anomalib's sampler reads) untouched.
    """
    n, d = features.shape
    generator = torch.Generator().manual_seed(0)
    sample = sample if d <= 512 else 2048  # wide (unprojected 3-D) embeddings: a smaller sample
    rows = features[torch.randperm(n, generator=generator)[:sample]].double()
    mean = rows.mean(dim=0)
    rows -= mean
    if d <= rows.shape[0]:
        _, vectors = torch.linalg.eigh(rows.T @ rows)
    else:  # more dimensions than sampled rows: eigenvectors of the Gram matrix, mapped back
        _, vectors = torch.linalg.eigh(rows @ rows.T)
        vectors = rows.T @ vectors
        vectors /= vectors.norm(dim=0).clamp_min(1e-300)
    basis = vectors[:, -dim:].flip(1)  # (D, dim), largest variance first
    basis, _ = torch.linalg.qr(basis)  # exactly orthonormal columns (a zero-variance column too)
    coordinates = torch.empty(n, basis.shape[1], dtype=torch.float64)
    norms = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, _CHUNK):
        chunk = features[start : start + _CHUNK].double() - mean
        coordinates[start : start + _CHUNK] = chunk @ basis
        norms[start : start + _CHUNK] = torch.linalg.norm(chunk, dim=1)
    return coordinates, norms


def _tree_order(coordinates: torch.Tensor, block: int, blocks: int) -> torch.Tensor:
    """A permutation of the points that puts nearby points in the same blocks of ``block`` positions.

    A k-d tree over the principal coordinates: every node splits its blocks in two halves at the
    median of its widest coordinate, down to single blocks. The padding (fewer than ``block``
    positions) ends up in the last block.
    """
    order = torch.empty(coordinates.shape[0], dtype=torch.long)
    stack = [(0, blocks, torch.arange(coordinates.shape[0]))]
    while stack:
        first, last, points = stack.pop()
        if last - first == 1:
            order[first * block : first * block + len(points)] = points
            continue
        values = coordinates.index_select(0, points)
        axis = int((values.amax(dim=0) - values.amin(dim=0)).argmax())
        points = points[torch.argsort(values[:, axis], stable=True)]
        middle = first + (last - first) // 2
        split = (middle - first) * block  # always < len(points): only the last block is padded
        stack.append((first, middle, points[:split]))
        stack.append((middle, last, points[split:]))
    return order


def _k_center_greedy(features: torch.Tensor, coreset_size: int, first_index: int) -> torch.Tensor:
    """The greedy loop with two-level pruning (see the module docstring).

    State is kept in tree order, in ``blocks`` blocks of ``_BLOCK`` positions (padding positions
    hold ``-1`` distances and ``-inf`` thresholds and never qualify; selected points get ``0`` and
    ``-inf``). For a new centre ``c``:

    1. blocks whose bounding box (in principal coordinates) is farther from ``c`` than the block's
       largest threshold are skipped;
    2. in the remaining blocks, points whose projected distance is at least their threshold
       ``(1 + rel) min_d + abs |x - mean|`` (plus ``abs |c - mean|``) are skipped;
    3. the others get anomalib's exact distance and ``torch.minimum``-style updates.

    The farthest point is the largest block maximum; among equal maxima the smallest point index,
    like ``torch.max``.
    """
    n = features.shape[0]
    block = _BLOCK
    blocks = -(-n // block)
    size = blocks * block
    coordinates, centred_norms = _principal_coordinates(features, min(_PROJECTED_DIM, features.shape[1]))
    dim = coordinates.shape[1]
    order = _tree_order(coordinates, block, blocks)
    position = torch.empty(n, dtype=torch.long)
    position[order] = torch.arange(n)

    # Per position (tree order); padding positions get point 0's data but -1 distances/thresholds.
    padded = torch.cat([order, order.new_zeros(size - n)])
    projected = coordinates.index_select(0, padded).to(features.dtype)  # (size, dim)
    absolute = (_ABSOLUTE * centred_norms).index_select(0, padded).to(features.dtype)
    # Block bounding boxes and the largest absolute slack of each block (padding repeats point 0,
    # which is harmless: boxes only grow).
    by_block = coordinates.index_select(0, padded).view(blocks, block, dim)
    box_low = by_block.amin(dim=1).T.contiguous().to(features.dtype)  # (dim, blocks)
    box_high = by_block.amax(dim=1).T.contiguous().to(features.dtype)
    block_absolute = absolute.view(blocks, block).amax(dim=1)
    del by_block

    # The points themselves in tree order: a new centre's candidates lie in a few nearby blocks, so
    # gathering their rows reads a few contiguous stretches of memory.
    ordered = features.index_select(0, order)
    min_distances = features.new_full((size,), -1.0)
    min_distances[:n] = _row_norms(features, features[first_index]).index_select(0, order)  # anomalib's values
    threshold = features.new_full((size,), float("-inf"))
    threshold[:n] = min_distances[:n] * (1.0 + _RELATIVE) + absolute[:n]
    block_max = min_distances.view(blocks, block).amax(dim=1)
    distances_by_block = min_distances.view(blocks, block)
    thresholds_by_block = threshold.view(blocks, block)
    # (blocks, dim, block): the squared coordinate gaps are summed across rows of a block's points at once
    projected_by_block = projected.view(blocks, block, dim).transpose(1, 2).contiguous()
    # Preallocated work buffers: the loop's temporaries would otherwise be fresh (page-faulting)
    # allocations every iteration.
    gap_low, gap_high = torch.empty_like(box_low), torch.empty_like(box_low)
    block_points = projected.new_empty((blocks, dim, block))
    block_bounds = features.new_empty((blocks, block))
    block_thresholds = features.new_empty((blocks, block))
    rows = features.new_empty((min(n, _ROWS), features.shape[1]))

    selected = torch.empty(coreset_size, dtype=torch.long)
    selected[0] = first_index
    spot = int(position[first_index])  # the latest centre's position; its distance is exactly 0
    threshold[spot] = float("-inf")
    for step in range(1, coreset_size):
        if step > 1:  # anomalib updates with the previous pick (the first centre's were set above)
            center = features[int(selected[step - 1])]
            center_projected = projected[spot]
            center_absolute = float(absolute[spot])
            # 1. blocks within reach: box distance below the block's largest threshold
            column = center_projected.view(dim, 1)
            torch.sub(box_low, column, out=gap_low)
            torch.sub(column, box_high, out=gap_high)
            torch.maximum(gap_low, gap_high, out=gap_low).clamp_min_(0.0)
            box_bound = gap_low.square_().sum(dim=0).sqrt_()
            reach = block_max * (1.0 + _RELATIVE) + block_absolute + center_absolute
            near = torch.nonzero(box_bound < reach).squeeze(1)
            if near.numel():
                # 2. points within reach: projected distance below the point's threshold
                count = near.numel()
                bounds, thresholds = block_bounds[:count], block_thresholds[:count]
                points = torch.index_select(projected_by_block, 0, near, out=block_points[:count])
                torch.sum(points.sub_(column).square_(), dim=1, out=bounds).sqrt_()
                torch.index_select(thresholds_by_block, 0, near, out=thresholds)
                hits = torch.nonzero(bounds < thresholds.add_(center_absolute))
                if hits.numel():
                    # 3. anomalib's exact distances and minimum
                    candidates = near.index_select(0, hits[:, 0]).mul_(block).add_(hits[:, 1])
                    distances = _gathered_row_norms(ordered, candidates, center, rows)
                    improved = distances < min_distances.index_select(0, candidates)
                    changed = candidates[improved]
                    if changed.numel():
                        distances = distances[improved]
                        min_distances.index_copy_(0, changed, distances)
                        updated = distances * (1.0 + _RELATIVE) + absolute.index_select(0, changed)
                        threshold.index_copy_(0, changed, updated)
                        touched = torch.unique_consecutive(changed // block)
                        block_max.index_copy_(0, touched, distances_by_block.index_select(0, touched).amax(dim=1))
        # The farthest point: largest block maximum; on equal maxima the smallest index, like torch.max.
        top = block_max.max()
        tied = torch.nonzero(block_max == top).squeeze(1)
        at_top = torch.nonzero(distances_by_block.index_select(0, tied) == top)
        spots = tied.index_select(0, at_top[:, 0]) * block + at_top[:, 1]
        spot = int(spots) if spots.numel() == 1 else int(spots[torch.argmin(order.index_select(0, spots))])
        selected[step] = order[spot]
        min_distances[spot] = 0.0  # anomalib's scatter_: a selected point never counts again
        threshold[spot] = float("-inf")
        block_max[spot // block] = distances_by_block[spot // block].amax()
    return selected


class FastKCenterGreedy:
    """Drop-in replacement of anomalib's ``KCenterGreedy``: same indices, far less work.

    Args:
        embedding: ``(N, D)`` embedding (PatchCore's patch features).
        sampling_ratio: Fraction of points to keep; ``int(N * ratio)`` must be positive.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> sampler = FastKCenterGreedy(torch.randn(2000, 64), sampling_ratio=0.05)
        >>> len(sampler.select_coreset_idxs())
        100
    """

    def __init__(self, embedding: torch.Tensor, sampling_ratio: float) -> None:
        if embedding.ndim < 2 or embedding.shape[0] == 0:
            msg = f"embedding must be (N>0, D), got shape {tuple(embedding.shape)}."
            raise ValueError(msg)
        n = embedding.shape[0]
        coreset_size = int(n * sampling_ratio)
        if coreset_size <= 0 or coreset_size > n:
            msg = (
                f"coreset_size must be in [1, N], got {coreset_size}. "
                f"Check sampling_ratio ({sampling_ratio}) and embedding size ({n})."
            )
            raise ValueError(msg)
        self.embedding = embedding
        self.coreset_size = coreset_size
        # Imported here: importing anomalib.models runs this package's registration hook, which
        # imports the models, which import this module; a top-level import would be circular.
        from anomalib.models.components.dimensionality_reduction import SparseRandomProjection

        self.model = SparseRandomProjection(eps=0.9)  # anomalib's choice, same random calls
        self.features: torch.Tensor

    def select_coreset_idxs(self) -> list[int]:
        """Indices of the coreset, in selection order (equal to anomalib's for the same RNG state)."""
        if self.embedding.ndim == 2:
            self.model.fit(self.embedding)
            self.features = self.model.transform(self.embedding)
        else:
            self.features = self.embedding.reshape(self.embedding.shape[0], -1)
        first = torch.randint(high=self.embedding.shape[0], size=(1,), device=self.features.device).squeeze()
        features = self.features.detach().cpu()
        return k_center_greedy(features, self.coreset_size, int(first)).tolist()

    def sample_coreset(self) -> torch.Tensor:
        """The selected rows of the (unprojected) embedding."""
        return self.embedding[self.select_coreset_idxs()]
