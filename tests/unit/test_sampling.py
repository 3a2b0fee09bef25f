"""FastKCenterGreedy selects exactly anomalib's KCenterGreedy indices; FastPatchcore uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anomalib.models.components.sampling import KCenterGreedy
from anomalib_feddymem.models.components.sampling import FastKCenterGreedy, k_center_greedy


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - anomalib's projection draws from numpy's global state


def _clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.rand(40, dim, generator=generator) * 3
    labels = torch.randint(0, 40, (n,), generator=generator)
    return (centers[labels] + 0.2 * torch.randn(n, dim, generator=generator)).relu()


@pytest.mark.parametrize(
    ("n", "dim", "ratio", "seed", "kind"),
    [(3000, 64, 0.1, 0, "gaussian"), (4000, 152, 0.05, 1, "clustered"), (2500, 32, 0.2, 2, "clustered")],
)
def test_same_indices_as_anomalib(n: int, dim: int, ratio: float, seed: int, kind: str) -> None:
    """Same seed, same data (continuous, hence no distance ties): identical selection order."""
    generator = torch.Generator().manual_seed(100 + seed)
    data = torch.randn(n, dim, generator=generator) if kind == "gaussian" else _clustered(n, dim, seed)
    _seed(seed)
    expected = KCenterGreedy(data, ratio).select_coreset_idxs()
    _seed(seed)
    sampler = FastKCenterGreedy(data, ratio)
    assert sampler.select_coreset_idxs() == expected
    assert len(expected) == int(n * ratio)
    _seed(seed)
    assert torch.equal(FastKCenterGreedy(data, ratio).sample_coreset(), data[expected])


@pytest.mark.parametrize("shape", [(1500, 4, 8), (400, 3, 200)])
def test_same_indices_without_projection(shape: tuple[int, int, int]) -> None:
    """3-D embeddings skip the projection in anomalib; the fast sampler follows.

    It does so also when the flattened rows are wider than the principal-direction sample.
    """
    data = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    _seed(3)
    expected = KCenterGreedy(data, 0.1).select_coreset_idxs()
    _seed(3)
    assert FastKCenterGreedy(data, 0.1).select_coreset_idxs() == expected


def test_greedy_property_and_thread_count_restored() -> None:
    """Every pick is the point farthest from the previous picks; the caller's thread count survives."""
    features = _clustered(800, 16, 4)
    threads = torch.get_num_threads()
    picks = k_center_greedy(features, 30, first_index=7).tolist()
    assert torch.get_num_threads() == threads
    assert picks[0] == 7
    assert len(set(picks)) == 30
    for step in range(1, 30):
        distances = torch.cdist(features, features[picks[:step]]).min(dim=1).values
        assert distances[picks[step]] == pytest.approx(distances.max().item(), rel=1e-5)


@pytest.mark.parametrize(
    ("shape", "ratio", "match"),
    [((100, 8), 0.001, "coreset_size"), ((100, 8), 1.5, "coreset_size"), ((0, 8), 0.1, "embedding")],
)
def test_bad_input_is_rejected(shape: tuple[int, int], ratio: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FastKCenterGreedy(torch.zeros(shape), ratio)


def test_k_center_greedy_checks_arguments() -> None:
    with pytest.raises(ValueError, match="first_index"):
        k_center_greedy(torch.zeros(10, 2), 3, first_index=10)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        k_center_greedy(torch.zeros(10), 3, first_index=0)


def test_fast_patchcore_coreset_equals_anomalib() -> None:
    """FastPatchcore.fit builds exactly the memory bank anomalib's Patchcore would."""
    from anomalib.models import Patchcore
    from anomalib_feddymem.models.fast_patchcore import FastPatchcore

    fast = FastPatchcore(backbone="tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), pre_trained=False)
    stock = Patchcore(backbone="tf_efficientnet_lite0", layers=("blocks.2", "blocks.4"), pre_trained=False)
    stock.model.load_state_dict(fast.model.state_dict())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for model in (fast, stock):
        model.model.train()
        with torch.no_grad():
            model.model(fast.pre_processor.transform(images))
    assert torch.equal(fast.model.embedding_store[0], stock.model.embedding_store[0])
    _seed(0)
    fast.fit()
    _seed(0)
    stock.fit()
    assert fast.model.memory_bank.shape == (int(2 * 32 * 32 * 0.1), 152)  # resized to 256 px: 32x32 patches
    assert torch.equal(fast.model.memory_bank, stock.model.memory_bank)
    with pytest.raises(ValueError, match="Embedding store is empty"):
        fast.fit()


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_same_indices_with_duplicates_and_tied_distances(ratio: float) -> None:
    """Integer grid points, each repeated: both samplers take the first index on ties.

    The distances are exactly tied everywhere and, once every distinct point is a centre, a maximum
    of 0 is shared by all points.
    """
    generator = torch.Generator().manual_seed(7)
    grid = torch.randint(0, 4, (150, 1, 3), generator=generator).float()
    data = grid[torch.randint(0, 150, (600,), generator=generator)]  # 3-D: anomalib skips the projection
    _seed(11)
    expected = KCenterGreedy(data, ratio).select_coreset_idxs()
    _seed(11)
    assert FastKCenterGreedy(data, ratio).select_coreset_idxs() == expected


def test_same_indices_with_duplicate_rows_after_projection() -> None:
    """Repeated rows through anomalib's projection: more centres than distinct points."""
    generator = torch.Generator().manual_seed(8)
    data = torch.randn(200, 16, generator=generator)[torch.randint(0, 200, (1000,), generator=generator)]
    _seed(12)
    expected = KCenterGreedy(data, 0.3).select_coreset_idxs()
    _seed(12)
    assert FastKCenterGreedy(data, 0.3).select_coreset_idxs() == expected
