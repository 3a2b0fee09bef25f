"""Memory-bank maths: weighted k-means, memory-reduce, server aggregation and the dynamic memory.

These functions are shared by the model, the clients and the server, so their invariants
(weighted means and total weights preserved, determinism, warm start) are pinned on small
hand-made point sets whose answers are known.
"""

from __future__ import annotations

import pytest
import torch
from anomalib_feddymem.models.feddymem.memory import (
    DynamicMemory,
    aggregate_memories,
    kcenter_grouping,
    memory_reduce,
    nearest_items,
    squared_distances,
    weighted_kmeans,
)

CENTERS = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])


def blobs(points_per_center: int = 20, noise: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated Gaussian blobs around :data:`CENTERS` and each point's blob index."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CENTERS)).repeat_interleave(points_per_center)
    points = CENTERS[labels] + noise * torch.randn(len(labels), 2, generator=generator)
    return points, labels


def weighted_mean(points: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (points.double() * weights.double()[:, None]).sum(0) / weights.double().sum()


def match_to_centers(centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest true center of every centroid."""
    return torch.cdist(centroids, CENTERS).argmin(dim=1)


# ------------------------------------------------------------------------------------- distances
def test_squared_distances_match_cdist() -> None:
    generator = torch.Generator().manual_seed(1)
    queries, items = torch.randn(7, 5, generator=generator), torch.randn(4, 5, generator=generator)
    expected = torch.cdist(queries.double(), items.double()).pow(2).float()
    torch.testing.assert_close(squared_distances(queries, items), expected, atol=1e-5, rtol=1e-5)
    assert (squared_distances(items, items) >= 0).all(), "rounding must never give negative distances"


def test_nearest_items_chunks_agree_with_unchunked() -> None:
    points, _ = blobs()
    assert torch.equal(nearest_items(points, CENTERS, chunk_size=7), torch.cdist(points, CENTERS).argmin(dim=1))


# ------------------------------------------------------------------------------- weighted k-means
def test_weighted_kmeans_recovers_separable_clusters() -> None:
    points, _ = blobs()
    centroids, weights = weighted_kmeans(points, torch.ones(len(points)), 3, seed=0)
    assert centroids.shape == (3, 2)
    assert sorted(match_to_centers(centroids).tolist()) == [0, 1, 2], "one centroid per blob"
    order = match_to_centers(centroids).argsort()
    torch.testing.assert_close(centroids[order], CENTERS, atol=0.1, rtol=0)
    torch.testing.assert_close(weights, torch.full((3,), 20.0))


def test_weighted_kmeans_centroid_is_weighted_mean_of_its_group() -> None:
    points = torch.tensor([[0.0], [1.0], [100.0]])
    weights = torch.tensor([1.0, 3.0, 2.0])
    centroids, totals = weighted_kmeans(points, weights, 2, seed=0)
    order = centroids[:, 0].argsort()
    torch.testing.assert_close(centroids[order], torch.tensor([[0.75], [100.0]]))
    torch.testing.assert_close(totals[order], torch.tensor([4.0, 2.0]))


def test_weighted_kmeans_is_deterministic_for_a_seed() -> None:
    generator = torch.Generator().manual_seed(3)
    points = torch.randn(200, 4, generator=generator)
    weights = torch.rand(200, generator=generator) + 0.1
    first = weighted_kmeans(points, weights, 10, seed=7)
    second = weighted_kmeans(points, weights, 10, seed=7)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])


def test_weighted_kmeans_warm_starts_from_init() -> None:
    """With ``init`` given, centroid ``i`` is the cluster grown from ``init[i]`` (order follows init)."""
    points, _ = blobs()
    for permutation in ([2, 0, 1], [1, 2, 0]):
        init = CENTERS[permutation] + 0.5
        centroids, _ = weighted_kmeans(points, torch.ones(len(points)), 3, seed=0, init=init)
        assert match_to_centers(centroids).tolist() == permutation


def test_weighted_kmeans_returns_few_points_as_they_are_and_drops_zero_weights() -> None:
    points = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    centroids, weights = weighted_kmeans(points, torch.tensor([2.0, 0.0, 1.0]), 8)
    assert torch.equal(centroids, points[[0, 2]])
    assert torch.equal(weights, torch.tensor([2.0, 1.0]))


@pytest.mark.parametrize(
    ("points", "weights", "k", "match"),
    [
        (torch.zeros(4, 2), torch.ones(4), 0, "k must be at least 1"),
        (torch.zeros(4, 2), torch.ones(3), 2, r"got \(4, 2\) and \(3,\)"),
        (torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), torch.ones(2), 1, "finite"),
        (torch.tensor([[0.0, 0.0], [float("inf"), 1.0]]), torch.ones(2), 1, "finite"),
        (torch.tensor([[0.0, -float("inf")], [1.0, 1.0]]), torch.ones(2), 1, "finite"),
        (torch.zeros(2, 2), torch.tensor([1.0, float("nan")]), 1, "finite"),
        (torch.zeros(2, 2), torch.tensor([float("inf"), 1.0]), 1, "finite"),
        (torch.zeros(0, 2), torch.zeros(0), 1, "no item with positive weight"),
        (torch.zeros(2, 2), torch.tensor([1.0, -1.0]), 1, "non-negative"),
        (torch.zeros(2, 2), torch.zeros(2), 1, "no item with positive weight"),
    ],
)
def test_weighted_kmeans_rejects_bad_input(points: torch.Tensor, weights: torch.Tensor, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_kmeans(points, weights, k)


# --------------------------------------------------------------------------------- memory-reduce
@pytest.mark.parametrize("method", ["kcenter", "kmeans"])
@pytest.mark.parametrize("ratio", [1.5, 4.0, 8.0])
def test_averaging_memory_reduce_preserves_weighted_mean_and_total_weight(ratio: float, method: str) -> None:
    generator = torch.Generator().manual_seed(0)
    items = torch.randn(64, 8, generator=generator) * 3
    counts = torch.randint(1, 50, (64,), generator=generator).float()
    reduced, weights = memory_reduce(items, counts, ratio, seed=0, method=method)
    assert reduced.shape[0] <= -(-64 // ratio)
    assert reduced.shape[1] == 8
    assert float(weights.sum()) == pytest.approx(float(counts.sum()))
    torch.testing.assert_close(weighted_mean(reduced, weights), weighted_mean(items, counts), atol=1e-5, rtol=1e-5)


def test_memory_reduce_ratio_one_keeps_the_bank() -> None:
    items = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    counts = torch.arange(1, 17).float()
    reduced, weights = memory_reduce(items, counts, 1.0)
    assert torch.equal(reduced, items)
    assert torch.equal(weights, counts)


def test_memory_reduce_merges_duplicates_by_weighted_average() -> None:
    """Two tight groups of items become two items: their count-weighted means."""
    items = torch.tensor([[0.0, 0.0], [0.2, 0.0], [10.0, 10.0], [10.0, 10.6]])
    counts = torch.tensor([3.0, 1.0, 1.0, 2.0])
    reduced, weights = memory_reduce(items, counts, 2.0, seed=0, method="kcenter")
    order = reduced[:, 0].argsort()
    torch.testing.assert_close(reduced[order], torch.tensor([[0.05, 0.0], [10.0, 10.4]]))
    torch.testing.assert_close(weights[order], torch.tensor([4.0, 3.0]))


def test_coreset_memory_reduce_keeps_real_items_weighted_by_their_groups() -> None:
    """The default reduce sends k-center items as they are, each with its group's total count.

    Hand-made: a tight group of three near the origin, a pair at (10, 10) and a rare item far away.
    Three groups: the rare item survives exactly (an average would have pulled it in), each sent item
    is one of the inputs, and the weights are the groups' total counts.
    """
    items = torch.tensor([[0.0, 0.0], [0.2, 0.0], [0.0, 0.2], [10.0, 10.0], [10.0, 10.4], [40.0, -30.0]])
    counts = torch.tensor([3.0, 1.0, 1.0, 2.0, 2.0, 1.0])
    reduced, weights = memory_reduce(items, counts, 2.0, seed=0)
    assert reduced.shape == (3, 2)
    assert all(bool((items == row).all(dim=1).any()) for row in reduced), "every sent item is a bank item"
    by_x = reduced[:, 0].argsort()
    assert torch.equal(reduced[by_x[2]], torch.tensor([40.0, -30.0]))
    torch.testing.assert_close(weights[by_x], torch.tensor([5.0, 4.0, 1.0]))


def test_coreset_reduce_from_covered_adds_only_what_the_global_memory_lacks() -> None:
    """With ``covered`` the new items go where ``G`` is farthest, and items ``G`` covers are not sent."""
    covered = torch.tensor([[0.0, 0.0]])
    items = torch.tensor([[0.1, 0.0], [0.0, 0.1], [20.0, 0.0], [20.5, 0.0], [0.0, -30.0]])
    reduced, weights = memory_reduce(items, torch.ones(5), 2.5, seed=0, covered=covered)
    assert {tuple(row.tolist()) for row in reduced} == {(0.0, -30.0), (20.5, 0.0)}
    assert float(weights.sum()) == pytest.approx(3.0)  # the two items near G's item are left to G


def test_memory_reduce_rejects_growing_ratio() -> None:
    with pytest.raises(ValueError, match="ratio must be >= 1"):
        memory_reduce(torch.zeros(4, 2), torch.ones(4), 0.5)


# ---------------------------------------------------------------------------- server aggregation
def test_aggregate_memories_clusters_the_union_of_uploads() -> None:
    points, labels = blobs()
    uploads = [(points[labels == 0], torch.full((20,), 2.0)), (points[labels != 0], torch.ones(40))]
    all_points = torch.cat([u[0] for u in uploads])
    all_weights = torch.cat([u[1] for u in uploads])
    memory, weights = aggregate_memories(uploads, 3, seed=0, method="kcenter")
    assert sorted(match_to_centers(memory).tolist()) == [0, 1, 2]
    assert float(weights.sum()) == pytest.approx(80.0)
    torch.testing.assert_close(weighted_mean(memory, weights), weighted_mean(all_points, all_weights))
    # the default keeps one uploaded item per group, weighted by the group's total
    memory, weights = aggregate_memories(uploads, 3, seed=0)
    assert sorted(match_to_centers(memory).tolist()) == [0, 1, 2]
    assert float(weights.sum()) == pytest.approx(80.0)
    assert all(bool((all_points == row).all(dim=1).any()) for row in memory)


def test_aggregate_memories_warm_starts_from_previous_global_memory() -> None:
    points, _ = blobs()
    previous = CENTERS[[1, 2, 0]]
    memory, _ = aggregate_memories([(points, torch.ones(len(points)))], 3, previous=previous, method="kmeans")
    assert match_to_centers(memory).tolist() == [1, 2, 0]


def test_aggregate_memories_caps_size_and_needs_uploads() -> None:
    memory, _ = aggregate_memories([(torch.randn(5, 2), torch.ones(5))], 100)
    assert memory.shape == (5, 2)
    with pytest.raises(ValueError, match="at least one upload"):
        aggregate_memories([], 4)


# -------------------------------------------------------------------------------- dynamic memory
def test_dynamic_memory_ema_update_and_counts() -> None:
    memory = DynamicMemory(momentum=0.5)
    memory.set(torch.tensor([[0.0, 0.0], [10.0, 10.0], [50.0, 50.0]]), torch.tensor([5.0, 5.0, 5.0]))
    memory.accumulate(torch.tensor([[1.0, 1.0], [1.0, 3.0]]))  # both nearest to item 0, mean (1, 2)
    memory.accumulate(torch.tensor([[9.0, 9.0]]))  # nearest to item 1
    assert memory.has_pending_update
    memory.update()
    torch.testing.assert_close(memory.items, torch.tensor([[0.5, 1.0], [9.5, 9.5], [50.0, 50.0]]))
    torch.testing.assert_close(memory.counts, torch.tensor([2.0, 1.0, 0.0]), msg="counts = hits of the epoch")
    assert not memory.has_pending_update


def test_dynamic_memory_update_without_embeddings_changes_nothing() -> None:
    memory = DynamicMemory(momentum=0.3)
    items, counts = torch.randn(4, 2), torch.ones(4)
    memory.set(items, counts)
    memory.update()
    assert torch.equal(memory.items, items)
    assert torch.equal(memory.counts, counts)


def test_dynamic_memory_momentum_one_jumps_to_the_mean() -> None:
    memory = DynamicMemory(momentum=1.0)
    memory.set(torch.tensor([[0.0], [100.0]]), torch.ones(2))
    memory.accumulate(torch.tensor([[2.0], [4.0], [90.0]]))
    memory.update()
    torch.testing.assert_close(memory.items, torch.tensor([[3.0], [90.0]]))


def test_dynamic_memory_initialize_from_embeddings() -> None:
    points, _ = blobs()
    memory = DynamicMemory()
    assert memory.is_empty
    memory.initialize(points, 3, seed=0)
    assert memory.items.shape == (3, 2)
    assert float(memory.counts.sum()) == len(points), "every embedding is counted once"  # noqa: RUF069 - integer counts
    assigned = nearest_items(points, memory.items)
    torch.testing.assert_close(memory.counts, torch.bincount(assigned, minlength=3).float())
    again = DynamicMemory()
    again.initialize(points, 3, seed=0)
    assert torch.equal(again.items, memory.items), "seeded initialisation is reproducible"
    memory.initialize(points[:2], 10, seed=0)
    assert memory.items.shape == (2, 2), "size is capped by the number of embeddings"


@pytest.mark.parametrize("method", ["coreset", "kmeans"])
def test_dynamic_memory_initialize_methods_count_every_embedding(method: str) -> None:
    points, _ = blobs()
    memory = DynamicMemory()
    memory.initialize(points, 5, seed=0, method=method)
    assert memory.items.shape == (5, 2)
    assert float(memory.counts.sum()) == len(points)  # noqa: RUF069 - a sum of integer counts, exact in float32


def test_coreset_initialisation_keeps_a_rare_normal_patch() -> None:
    """Why the coreset is the default: a lone normal pattern keeps an item of its own.

    That item is an exact training patch, so the pattern scores zero instead of being averaged into a
    cluster mean.
    """
    points, _ = blobs()
    rare = torch.tensor([[40.0, -40.0]])
    memory = DynamicMemory()
    memory.initialize(torch.cat([points, rare]), 4, seed=0, method="coreset")
    assert bool((memory.items == rare).all(dim=1).any())
    assert float(memory.counts[(memory.items == rare).all(dim=1)]) == 1.0  # noqa: RUF069 - an integer count


def test_dynamic_memory_rejects_unknown_init_method() -> None:
    with pytest.raises(ValueError, match="memory init method must be one of"):
        DynamicMemory().initialize(torch.randn(10, 2), 3, method="random")


def test_dynamic_memory_persists_items_and_counts_only() -> None:
    memory = DynamicMemory()
    memory.set(torch.randn(3, 2), torch.tensor([1.0, 2.0, 3.0]))
    memory.accumulate(torch.randn(5, 2))
    assert set(memory.state_dict()) == {"items", "counts"}


def test_dynamic_memory_rejects_bad_momentum() -> None:
    with pytest.raises(ValueError, match="momentum must be in"):
        DynamicMemory(momentum=1.5)


# ------------------------------------------------------------------------------ k-center grouping
def rare_item_points() -> tuple[torch.Tensor, torch.Tensor]:
    """Eleven heavy items on a line (0..10, weight 100) and one rare item far away (30, weight 1)."""
    points = torch.cat([torch.arange(11.0), torch.tensor([30.0])])[:, None]
    return points, torch.cat([torch.full((11,), 100.0), torch.ones(1)])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kcenter_grouping_keeps_a_rare_far_item_whatever_the_first_centre(seed: int) -> None:
    points, weights = rare_item_points()
    items, totals = kcenter_grouping(points, weights, 2, seed=seed)
    order = items[:, 0].argsort()
    torch.testing.assert_close(items[order], torch.tensor([[5.0], [30.0]]))  # the rare item survives exactly
    torch.testing.assert_close(totals[order], torch.tensor([1100.0, 1.0]))


def test_weighted_kmeans_from_a_poor_start_averages_the_rare_item_away() -> None:
    """What coverage-preserving grouping avoids: k-means' optimum merges the rare item into a heavy group."""
    points, weights = rare_item_points()
    items, _ = weighted_kmeans(points, weights, 2, init=torch.tensor([[2.0], [8.0]]))
    assert torch.cdist(torch.tensor([[30.0]]), items).min() > 20


def test_kcenter_grouping_covers_far_points_and_preserves_mass() -> None:
    generator = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(300, 3, generator=generator), torch.randn(5, 3, generator=generator) + 12])
    weights = torch.rand(305, generator=generator) + 0.5
    items, totals = kcenter_grouping(points, weights, 40, seed=0)
    assert items.shape == (40, 3)
    assert float(totals.sum()) == pytest.approx(float(weights.sum()), rel=1e-6)
    torch.testing.assert_close(weighted_mean(items, totals), weighted_mean(points, weights), atol=1e-5, rtol=1e-5)
    # five far points (weight ~1 each against 300 near the origin) keep items of their own nearby
    assert torch.cdist(points[-5:], items).min(dim=1).values.max() < 3, "the five far points stay covered"


def test_memory_reduce_default_is_kcenter_and_kmeans_is_an_option() -> None:
    points, weights = rare_item_points()
    kept, _ = memory_reduce(points, weights, 6.0)  # ceil(12 / 6) = 2 groups
    assert torch.cdist(torch.tensor([[30.0]]), kept).min() == 0
    averaged, _ = memory_reduce(points, weights, 6.0, method="kmeans")
    assert averaged.shape == (2, 1)
    with pytest.raises(ValueError, match="grouping method must be one of"):
        memory_reduce(points, weights, 2.0, method="mean")


def test_aggregate_memories_keeps_a_union_that_fits_whole() -> None:
    uploads = [
        (torch.tensor([[0.0, 1.0], [2.0, 3.0]]), torch.tensor([1.0, 2.0])),
        (torch.tensor([[4.0, 5.0]]), torch.ones(1)),
    ]
    memory, weights = aggregate_memories(uploads, 3)
    assert torch.equal(memory, torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]))
    assert torch.equal(weights, torch.tensor([1.0, 2.0, 1.0]))


def test_weighted_kmeans_on_a_subsample_is_seeded_and_assigns_every_point() -> None:
    generator = torch.Generator().manual_seed(5)
    points = torch.randn(2000, 4, generator=generator)
    weights = torch.rand(2000, generator=generator) + 0.1
    first = weighted_kmeans(points, weights, 16, seed=3, max_points=256)
    second = weighted_kmeans(points, weights, 16, seed=3, max_points=256)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])
    assert float(first[1].sum()) == pytest.approx(float(weights.sum()), rel=1e-6)  # all 2000 points are in a group


def test_kcenter_grouping_with_covered_items_adds_only_what_they_lack() -> None:
    """Two blobs; G already holds the first: the new groups all come from the second."""
    generator = torch.Generator().manual_seed(1)
    near = torch.randn(50, 2, generator=generator) * 0.1
    far = torch.randn(30, 2, generator=generator) * 0.1 + torch.tensor([10.0, 0.0])
    points, weights = torch.cat([near, far]), torch.ones(80)
    held = torch.tensor([[0.0, 0.0]])
    items, totals = kcenter_grouping(points, weights, 3, covered=held)
    assert items.shape == (3, 2)
    assert (items[:, 0] > 9).all(), "every new item lies in the blob G lacks"
    assert float(totals.sum()) == pytest.approx(30.0), "points G already covers are left out"
    # a point G holds exactly is never sent again
    same, _ = kcenter_grouping(held, torch.ones(1), 4, covered=held)
    assert same.shape == (0, 2)
    with pytest.raises(ValueError, match=r"covered must have shape \(M, 2\)"):
        kcenter_grouping(points, weights, 3, covered=torch.zeros(2, 3))


def test_growing_aggregation_keeps_the_previous_global_memory() -> None:
    previous, previous_weights = torch.tensor([[0.0, 0.0]]), torch.tensor([5.0])
    upload = (torch.tensor([[3.0, 4.0]]), torch.tensor([2.0]))
    grown, weights = aggregate_memories([upload], 10, previous=previous, previous_weights=previous_weights, grow=True)
    assert torch.equal(grown, torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    assert torch.equal(weights, torch.tensor([5.0, 2.0]))
    rebuilt, _ = aggregate_memories([upload], 10, previous=previous, grow=False)
    assert torch.equal(rebuilt, upload[0])
