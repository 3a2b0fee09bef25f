r"""How FedDyMem's local memory is initialised, measured: k-center coreset against k-means.

Isolates the memory from training: FedDyMem at its defaults with the *untrained* memory
generator (its initial orthogonal projection of the backbone features), the local memory
initialised from the training embeddings by each ``--methods`` entry at each ``--sizes`` entry, and
installed as the scoring memory ``G`` as is. Prints rank-based image and pixel AUROC on the test
set and the initialisation time, one line per variant.

Usage::

    MALLOC_MMAP_THRESHOLD_=131072 .venv/bin/python benchmarks/bench_memory_init.py \
        --dataset ../shared/data/magnetic_tile --sizes 2048,8192 --methods kmeans,coreset
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run every (method, size) variant on one dataset folder and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True, help="MVTec-layout dataset folder")
    parser.add_argument("--sizes", default="2048", help="comma-separated memory sizes")
    parser.add_argument("--methods", default="kmeans,coreset", help="comma-separated init methods")
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args(argv)
    if not args.dataset.is_dir():
        print(f"Dataset folder {args.dataset} not found: nothing to measure.")
        return 0

    import torch
    from anomalib_feddymem import FedDyMem
    from anomalib_feddymem.data import folder_datamodule
    from anomalib_feddymem.evaluation import evaluate

    torch.manual_seed(0)
    datamodule = folder_datamodule(args.dataset, num_workers=0)
    datamodule.setup()
    size = (args.image_size, args.image_size)
    model = FedDyMem(pre_processor=FedDyMem.configure_pre_processor(image_size=size)).eval()
    embeddings = model._embeddings_of(datamodule.train_dataloader())  # noqa: SLF001 - the model's own embedding pass
    print(f"{args.dataset.name}: {embeddings.shape[0]} training patches x {embeddings.shape[1]} (untrained generator)")
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        for memory_size in [int(s) for s in args.sizes.split(",") if s.strip()]:
            start = time.perf_counter()
            model.local_memory.initialize(embeddings, memory_size, seed=model.seed, method=method)
            seconds = time.perf_counter() - start
            model.model.set_memory(model.local_memory.items)
            result = evaluate(model, datamodule.test_dataloader())
            pixel = "n/a" if result.pixel_auroc is None else f"{result.pixel_auroc:.3f}"
            print(
                f"  {method:>8} {memory_size:>6} items: image AUROC {result.image_auroc:.3f}  pixel AUROC {pixel}  "
                f"init {seconds:.1f} s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
