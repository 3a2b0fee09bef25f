r"""Per-message overhead of a SuperNode's client build, in seconds.

Flower runs every ``train``/``evaluate`` message in a fresh ClientApp process, so the ClientApp
rebuilds its client each time (``flower.client_app.load_client``). This script times that build
for a site whose ``data-path`` is ``--data-path``, three ways, in one process:

* ``first message``: the node has not seen its data yet, so every image is opened and checked;
* ``later message``: the data's fingerprint is unchanged, so the images are not opened again;
* ``validate_backbone probe``: the extra backbone the client build no longer constructs (the
  layers are checked against the built extractor instead).

Usage::

    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/bench_node_overhead.py --data-path ../shared/data/mvtec_bottle
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Time the client build of a site-mode node, first and later messages, and the removed probe."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", type=Path, required=True, help="an MVTec-layout folder (a site's data)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.data_path.is_dir():
        print(f"skipped: {args.data_path} is not a folder (is the shared data present?)")
        return 0

    from anomalib_feddymem.flower.client_app import load_client
    from anomalib_feddymem.models.feddymem.torch_model import validate_backbone
    from flwr.app import Context, RecordDict

    load_client_timings: dict[str, list[float]] = {"first message": [], "later message": []}
    with tempfile.TemporaryDirectory() as output:
        run_config = {"num-clients": 1, "image-size": 128, "output": output}
        for _ in range(args.repeats):
            context = Context(run_id=1, node_id=7, node_config={"data-path": str(args.data_path)},
                              state=RecordDict(), run_config=run_config)  # fmt: skip
            for label in ("first message", "later message"):
                start = time.perf_counter()
                load_client(context)
                load_client_timings[label].append(time.perf_counter() - start)
    probe = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        validate_backbone("tf_efficientnet_lite0", ["blocks.2", "blocks.4"])
        probe.append(time.perf_counter() - start)
    images = sum(1 for p in args.data_path.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
    print(f"site {args.data_path} ({images} images), FedDyMem defaults, median of {args.repeats}")
    for label, values in load_client_timings.items():
        print(f"  client build, {label:13s}: {statistics.median(values):6.2f} s")
    print(f"  validate_backbone probe (no longer built per message): {statistics.median(probe):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
