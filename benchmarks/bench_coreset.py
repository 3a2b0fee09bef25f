r"""Time anomalib's KCenterGreedy against FastKCenterGreedy on realistic PatchCore embeddings.

The embedding is the one Patchcore stores when it trains (EfficientNet-Lite0, blocks.2+blocks.4,
256 px: 1024 patches x 152 features per image) of the images of ``--dataset``; without a dataset
it is a synthetic, clustered stand-in of the same shape. The fast sampler runs the whole coreset;
anomalib's runs only ``--stock-iterations`` iterations (its cost per iteration is constant, N x D),
and its full time is extrapolated, clearly labelled. The first ``--stock-iterations`` indices of
both must be identical (greedy selection is sequential, so they are a prefix of the coreset).

Usage::

    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/bench_coreset.py \
        --dataset ../shared/data/mvtec_bottle --ratio 0.1 --stock-iterations 100
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["embedding_of", "main", "synthetic_embedding"]


def synthetic_embedding(num_points: int, dim: int = 152, clusters: int = 500, seed: int = 0) -> torch.Tensor:
    """Clustered non-negative features (a stand-in for CNN patch features)."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.rand(clusters, dim, generator=generator) * 2
    labels = torch.randint(0, clusters, (num_points,), generator=generator)
    noise = torch.randn(num_points, dim, generator=generator) * 0.3 * torch.rand(num_points, 1, generator=generator)
    return (centers[labels] + noise).relu()


@torch.no_grad()
def embedding_of(dataset: Path, max_images: int | None) -> torch.Tensor:
    """Patchcore's training embedding of the ``train/good`` images of an MVTec-layout folder."""
    from anomalib_feddymem.benchmark.methods import patchcore_pre_processor
    from anomalib_feddymem.data import folder_datamodule
    from anomalib_feddymem.models.fast_patchcore import FastPatchcore

    datamodule = folder_datamodule(dataset, num_workers=0)
    datamodule.setup()
    model = FastPatchcore(
        backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"], pre_processor=patchcore_pre_processor()
    )
    model.model.train()
    transform = model.pre_processor.transform
    seen = 0
    for batch in datamodule.train_dataloader():
        images = transform(batch.image)
        if max_images is not None:
            images = images[: max_images - seen]
        model.model(images)
        seen += images.shape[0]
        if max_images is not None and seen >= max_images:
            break
    return torch.vstack(model.model.embedding_store)


def _seed(seed: int) -> None:
    """Both samplers draw from torch's and numpy's global generators (projection + first index)."""
    torch.manual_seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - anomalib's projection uses the global numpy state


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    from anomalib.models.components.sampling import KCenterGreedy
    from anomalib_feddymem.models.components.sampling import FastKCenterGreedy

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, help="MVTec-layout folder (default: synthetic data)")
    parser.add_argument("--max-images", type=int, default=None, help="use at most this many training images")
    parser.add_argument("--num-points", type=int, default=200_000, help="synthetic data only")
    parser.add_argument("--ratio", type=float, default=0.1, help="coreset sampling ratio (Patchcore's default)")
    parser.add_argument("--stock-iterations", type=int, default=100, help="iterations timed for anomalib's sampler")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.dataset is not None:
        if not args.dataset.is_dir():
            print(f"Dataset folder {args.dataset} not found: nothing to benchmark.", file=sys.stderr)
            return 2
        embedding = embedding_of(args.dataset, args.max_images)
        source = f"Patchcore embedding of {args.dataset}"
    else:
        embedding = synthetic_embedding(args.num_points)
        source = "synthetic clustered embedding"
    n = embedding.shape[0]
    print(
        f"{source}: {n} patches x {embedding.shape[1]} features, ratio {args.ratio}, "
        f"torch threads {torch.get_num_threads()}"
    )

    _seed(args.seed)
    start = time.perf_counter()
    fast = FastKCenterGreedy(embedding, args.ratio)
    fast_indices = fast.select_coreset_idxs()
    fast_seconds = time.perf_counter() - start
    coreset_size = len(fast_indices)
    print(f"projected dimension {fast.features.shape[1]}, coreset size {coreset_size}")

    iterations = max(2, min(args.stock_iterations, coreset_size))
    _seed(args.seed)
    start = time.perf_counter()
    stock = KCenterGreedy(embedding, args.ratio)
    stock.coreset_size = iterations  # a prefix of the full greedy sequence
    stock_indices = stock.select_coreset_idxs()
    stock_seconds = time.perf_counter() - start

    _seed(args.seed)  # setup cost shared by both (projection), to extrapolate the loop only
    start = time.perf_counter()
    projector = KCenterGreedy(embedding, args.ratio).model
    projector.fit(embedding)
    projector.transform(embedding)
    setup_seconds = time.perf_counter() - start
    per_iteration = (stock_seconds - setup_seconds) / (iterations - 1)
    stock_full = setup_seconds + per_iteration * (coreset_size - 1)

    identical = stock_indices == fast_indices[:iterations]
    print(
        f"anomalib KCenterGreedy: {stock_seconds:.1f} s for {iterations} iterations "
        f"({per_iteration * 1000:.0f} ms/iteration, projection {setup_seconds:.1f} s)"
    )
    print(f"anomalib KCenterGreedy, EXTRAPOLATED to {coreset_size} iterations: {stock_full:.0f} s")
    print(f"FastKCenterGreedy, measured, full coreset: {fast_seconds:.1f} s")
    print(f"speed-up (extrapolated / measured): {stock_full / fast_seconds:.1f}x")
    print(f"identical first {iterations} indices: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
