"""Speed of one training step's metric loss, measured: neighbour search without autograd vs full top-k.

``MemoryMetricLoss`` finds each embedding's ``K + J`` nearest memory items without autograd and
differentiates only those ``N x (K + J)`` distances. The straightforward form (the one this
package used before) differentiates a top-k over the whole ``N x M`` distance matrix, which
autograd keeps alive until the backward pass. Both give the same value and gradient
(``tests/unit/test_loss.py``); this script prints the forward + backward time of each, median of
``--repeats``, for a batch of ``--patches`` embeddings against memories of ``--sizes`` items, and
the size of the ``N x M`` float32 matrix the full form keeps for autograd.

Usage::

    .venv/bin/python benchmarks/bench_metric_loss.py --patches 8192 --sizes 4096,32768 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["main"]


def _median_seconds(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def main(argv: list[str] | None = None) -> int:
    """Time both forms of the loss for every memory size and print one line per size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=8192, help="embeddings per batch (8 images at 256 px)")
    parser.add_argument("--sizes", default="4096,32768", help="comma-separated memory sizes")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension d")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from anomalib_feddymem.models.feddymem.loss import MemoryMetricLoss
    from anomalib_feddymem.models.feddymem.memory import squared_distances
    from torch.nn import functional as F  # noqa: N812

    torch.set_num_threads(args.threads)
    criterion = MemoryMetricLoss()
    r2, margin, k, j = criterion.radius**2, criterion.margin, criterion.num_nearest, criterion.num_hard_negatives

    def full_topk(embeddings: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        nearest = squared_distances(embeddings, memory).topk(k + j, dim=1, largest=False).values
        return F.relu(nearest[:, :k] - r2).mean() + F.relu(r2 - nearest[:, k:] + margin).mean()

    generator = torch.Generator().manual_seed(0)
    print(f"{args.patches} embeddings x d={args.dim}, K={k}, J={j}, {args.threads} thread(s), median of {args.repeats}")
    for size in [int(s) for s in args.sizes.split(",") if s.strip()]:
        memory = torch.randn(size, args.dim, generator=generator)
        base = torch.randn(args.patches, args.dim, generator=generator)
        seconds = {}
        for name, loss in (("full top-k", full_topk), ("MemoryMetricLoss", criterion)):
            embeddings = base.clone().requires_grad_(requires_grad=True)

            def step(
                loss: Callable = loss,
                embeddings: torch.Tensor = embeddings,
                memory: torch.Tensor = memory,
            ) -> None:
                embeddings.grad = None
                loss(embeddings, memory).backward()

            seconds[name] = _median_seconds(step, args.repeats)
        held_mib = args.patches * size * 4 / 2**20
        print(
            f"  M={size:>6}: full top-k {seconds['full top-k'] * 1000:8.1f} ms (keeps a {held_mib:.0f} MiB matrix), "
            f"MemoryMetricLoss {seconds['MemoryMetricLoss'] * 1000:8.1f} ms, "
            f"speed-up {seconds['full top-k'] / seconds['MemoryMetricLoss']:.2f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
