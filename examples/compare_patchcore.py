"""Centralised FedDyMem against anomalib's Patchcore on MVTec-layout dataset folders.

Both models use the same backbone and input: EfficientNet-Lite0 with its offline ImageNet weights,
layers ``blocks.2`` + ``blocks.4``, 256 px, normalisation mean = std = 0.5. FedDyMem is trained
centralised (one client, one round: ``Engine.fit`` of the ``FedDyMem`` module with its defaults);
Patchcore is anomalib's, with the exact fast coreset sampler (:class:`FastPatchcore`, ratio 0.1).
Every figure comes from :func:`anomalib_feddymem.evaluation.evaluate`: rank-based image and pixel
AUROC on raw scores, and median inference milliseconds per image on this machine's CPU.

Usage::

    MALLOC_MMAP_THRESHOLD_=131072 python examples/compare_patchcore.py --data-root ../shared/data \\
        --datasets mvtec_bottle,magnetic_tile,mpdd_metal_plate,headct --image-size 256 --output outputs/compare

Writes ``OUTPUT/compare.csv`` (one row per dataset and model) and ``OUTPUT/compare.md`` (side by side).
"""

from __future__ import annotations

import argparse
import ast
import csv
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "run_one"]

DATASETS = ("mvtec_bottle", "magnetic_tile", "mpdd_metal_plate", "headct")
MODELS = ("feddymem", "patchcore")


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (Python literals) to FedDyMem keyword arguments."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            msg = f"--feddymem expects key=value, got {pair!r}."
            raise SystemExit(msg)
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def build_model(kind: str, image_size: int, overrides: dict[str, Any]):  # noqa: ANN201
    """FedDyMem (defaults + overrides) or FastPatchcore, both pre-processing at ``image_size``."""
    if kind == "feddymem":
        from anomalib_feddymem import FedDyMem

        backbone = overrides.get("backbone", "tf_efficientnet_lite0")
        pre_processor = FedDyMem.configure_pre_processor(image_size=(image_size, image_size), backbone=backbone)
        return FedDyMem(pre_processor=pre_processor, **overrides)
    from anomalib_feddymem.benchmark.methods import patchcore_pre_processor
    from anomalib_feddymem.models.fast_patchcore import FastPatchcore

    return FastPatchcore(
        backbone="tf_efficientnet_lite0",
        layers=["blocks.2", "blocks.4"],
        pre_processor=patchcore_pre_processor((image_size, image_size)),
    )


def run_one(kind: str, dataset: Path, image_size: int, output: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Train one model on one dataset folder and evaluate it on the folder's test set."""
    import torch
    from anomalib.engine import Engine

    from anomalib_feddymem.data import folder_datamodule
    from anomalib_feddymem.evaluation import evaluate

    torch.manual_seed(0)
    datamodule = folder_datamodule(dataset, num_workers=0)
    datamodule.setup()
    model = build_model(kind, image_size, overrides)
    engine = Engine(
        default_root_dir=output / "runs" / dataset.name / kind,
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,  # both models fit at the end of the training epoch; no need to validate
    )
    start = time.perf_counter()
    engine.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    result = evaluate(model, datamodule.test_dataloader())
    return {
        "dataset": dataset.name,
        "model": "FedDyMem" if kind == "feddymem" else "Patchcore",
        "image_auroc": result.image_auroc,
        "pixel_auroc": result.pixel_auroc,
        "fit_seconds": round(fit_seconds, 1),
        "infer_ms_per_image": round(result.infer_ms_per_image, 1),
        "num_test_images": result.num_images,
        "settings": " ".join(f"{k}={v}" for k, v in sorted(overrides.items())) if kind == "feddymem" else "",
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_tables(rows: list[dict[str, Any]], output: Path) -> str:
    """Write ``compare.csv`` and ``compare.md``; return the markdown table."""
    output.mkdir(parents=True, exist_ok=True)
    with (output / "compare.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    by_key = {(row["dataset"], row["model"]): row for row in rows}
    lines = [
        "| dataset | image AUROC FedDyMem | image AUROC Patchcore | pixel AUROC FedDyMem | pixel AUROC Patchcore "
        "| fit s FedDyMem | fit s Patchcore | ms/image FedDyMem | ms/image Patchcore |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(row["dataset"] for row in rows):
        f, p = by_key.get((name, "FedDyMem"), {}), by_key.get((name, "Patchcore"), {})
        lines.append(
            f"| {name} | {_fmt(f.get('image_auroc'))} | {_fmt(p.get('image_auroc'))} | {_fmt(f.get('pixel_auroc'))} "
            f"| {_fmt(p.get('pixel_auroc'))} | {f.get('fit_seconds', 'n/a')} | {p.get('fit_seconds', 'n/a')} "
            f"| {f.get('infer_ms_per_image', 'n/a')} | {p.get('infer_ms_per_image', 'n/a')} |"
        )
    table = "\n".join(lines) + "\n"
    (output / "compare.md").write_text(
        "# Centralised FedDyMem vs anomalib Patchcore\n\nEfficientNet-Lite0 (offline ImageNet weights), blocks.2+blocks.4, "
        "256 px, mean = std = 0.5; rank-based AUROC on raw scores; CPU inference, median ms per image.\n\n" + table
    )
    return table


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding the dataset folders")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated dataset folder names")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--output", type=Path, default=Path("outputs/compare"))
    parser.add_argument("--models", default=",".join(MODELS), help="feddymem, patchcore or both")
    parser.add_argument("--feddymem", action="append", default=[], metavar="KEY=VALUE",
                        help="override a FedDyMem option (repeatable), e.g. --feddymem memory_size=4096")
    args = parser.parse_args(argv)

    if not args.data_root.is_dir():
        print(f"Data root {args.data_root} not found: skipping the comparison (nothing to compare on).")
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}.")
    overrides = _parse_overrides(args.feddymem)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # effective for subprocesses only
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    rows = []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        dataset = args.data_root / name
        if not dataset.is_dir():
            print(f"Dataset folder {dataset} not found: skipped.")
            continue
        for kind in models:
            row = run_one(kind, dataset, args.image_size, args.output, overrides)
            rows.append(row)
            print(
                f"{row['dataset']:>18} {row['model']:>9}: image AUROC {_fmt(row['image_auroc'])}  pixel AUROC "
                f"{_fmt(row['pixel_auroc'])}  fit {row['fit_seconds']} s  {row['infer_ms_per_image']} ms/image",
                flush=True,
            )
    if not rows:
        print("No dataset was found: nothing to report.")
        return 0
    print(write_tables(rows, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
