"""MemoryMetricLoss on hand-made points: attraction, repulsion, radius and margin.

Origin ``z = (0, 0)`` against items at squared distances 1, 4 and 9 makes every term computable
by hand: attraction ``mean relu(d_k - r^2)`` over the K nearest, repulsion
``mean relu(r^2 - d_j + alpha)`` over the next J.
"""

from __future__ import annotations

import pytest
import torch
from anomalib_feddymem.models.feddymem.loss import MemoryMetricLoss

ORIGIN = torch.zeros(1, 2)
#: Squared distances 1, 4 and 9 from the origin (deliberately not sorted).
ITEMS = torch.tensor([[0.0, 3.0], [1.0, 0.0], [0.0, 2.0]])


def loss(k: int, j: int, radius: float, margin: float, z: torch.Tensor = ORIGIN, items: torch.Tensor = ITEMS) -> float:
    return float(MemoryMetricLoss(num_nearest=k, num_hard_negatives=j, radius=radius, margin=margin)(z, items))


@pytest.mark.parametrize(
    ("k", "radius", "expected"),
    [
        (1, 0.0, 1.0),  # nearest item only
        (2, 0.0, 2.5),  # mean of 1 and 4
        (3, 0.0, 14 / 3),  # mean of 1, 4 and 9
        (2, 1.0, 1.5),  # r^2 = 1: relu(1 - 1) = 0, relu(4 - 1) = 3
        (2, 3.0, 0.0),  # r^2 = 9: both items inside the radius
    ],
)
def test_attraction_only(k: int, radius: float, expected: float) -> None:
    assert loss(k, 0, radius, margin=0.5) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("j", "radius", "margin", "expected"),
    [
        (1, 0.0, 5.0, 1.0 + 1.0),  # attraction 1 + relu(0 - 4 + 5)
        (1, 0.0, 3.0, 1.0),  # hard negative beyond the margin: no repulsion
        (2, 0.0, 6.0, 1.0 + (2.0 + 0.0) / 2),  # relu(6 - 4) and relu(6 - 9), averaged
        (1, 1.0, 4.0, 0.0 + 1.0),  # r^2 = 1: attraction 0, relu(1 - 4 + 4)
    ],
)
def test_attraction_and_repulsion(j: int, radius: float, margin: float, expected: float) -> None:
    assert loss(1, j, radius, margin) == pytest.approx(expected)


def test_loss_is_a_mean_over_embeddings() -> None:
    z = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # the second sits on an item: zero attraction
    assert loss(1, 0, 0.0, 0.0, z=z) == pytest.approx(0.5)


def test_k_and_j_are_capped_by_the_memory_size() -> None:
    one_item = torch.tensor([[2.0, 0.0]])
    assert loss(3, 3, 0.0, 10.0, items=one_item) == pytest.approx(4.0), "no negatives left: attraction only"
    assert loss(2, 5, 0.0, 10.0) == pytest.approx(2.5 + 1.0), "J = 3 - K = 1 negative at distance 9"


def test_gradient_attracts_to_nearest_and_repels_hard_negative() -> None:
    z = torch.tensor([[0.4, 0.0]], requires_grad=True)
    items = torch.tensor([[0.0, 0.0], [1.0, 0.0]])  # nearest at 0.16, hard negative at 0.36
    MemoryMetricLoss(num_nearest=1, num_hard_negatives=0, radius=0.0)(z, items).backward()
    assert z.grad[0, 0] > 0, "descending the gradient moves z towards the nearest item (x -> 0)"
    z.grad = None
    MemoryMetricLoss(num_nearest=1, num_hard_negatives=1, radius=0.0, margin=1.0)(z, items).backward()
    # d/dx of attraction x^2 is 0.8; of repulsion 1 - (x - 1)^2 it is -2 (x - 1) = 1.2: descending the
    # gradient moves z away from the hard negative at x = 1 as well as towards the nearest item.
    torch.testing.assert_close(z.grad, torch.tensor([[0.8 + 1.2, 0.0]]))


def test_gradient_step_reduces_the_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(32, 4, generator=generator, requires_grad=True)
    items = torch.randn(16, 4, generator=generator)
    criterion = MemoryMetricLoss(num_nearest=3, num_hard_negatives=3, radius=0.1, margin=0.1)
    before = criterion(z, items)
    before.backward()
    with torch.no_grad():
        after = criterion(z - 0.05 * z.grad, items)
    assert after < before


@pytest.mark.parametrize(("k", "j"), [(0, 1), (1, -1)])
def test_rejects_bad_counts(k: int, j: int) -> None:
    with pytest.raises(ValueError, match="num_nearest must be >= 1 and num_hard_negatives >= 0"):
        MemoryMetricLoss(num_nearest=k, num_hard_negatives=j)


def test_neighbour_search_without_autograd_gives_the_full_topk_loss_and_gradient() -> None:
    """The loss differentiates only the K + J found distances: same value and gradient as a full top-k."""
    generator = torch.Generator().manual_seed(1)
    items = torch.randn(50, 8, generator=generator)
    z = torch.randn(40, 8, generator=generator, requires_grad=True)
    reference_z = z.detach().clone().requires_grad_(requires_grad=True)
    criterion = MemoryMetricLoss(num_nearest=3, num_hard_negatives=3, radius=0.5, margin=0.1)
    value = criterion(z, items)
    value.backward()
    nearest = torch.cdist(reference_z, items).pow(2).topk(6, dim=1, largest=False).values
    reference = torch.relu(nearest[:, :3] - 0.25).mean() + torch.relu(0.25 - nearest[:, 3:] + 0.1).mean()
    reference.backward()
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(z.grad, reference_z.grad)


def test_precomputed_neighbours_must_match_k_plus_j() -> None:
    criterion = MemoryMetricLoss(num_nearest=1, num_hard_negatives=1)
    with pytest.raises(ValueError, match=r"neighbors must have shape \(1, 2\)"):
        criterion(ORIGIN, ITEMS, torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="must share d"):
        criterion(ORIGIN, torch.zeros(3, 5))


def test_loss_benchmark_script_prints_both_forms(capsys) -> None:
    import runpy
    from pathlib import Path

    script = runpy.run_path(str(Path(__file__).parents[2] / "benchmarks" / "bench_metric_loss.py"))
    assert script["main"](["--patches", "64", "--sizes", "32,128", "--repeats", "1", "--threads", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "speed-up" in line]
    assert len(lines) == 2
    assert "M=    32" in lines[0]
    assert "M=   128" in lines[1]
