"""OpenVINO against torch at OpenVINO's defaults: score and map errors, and ms per image.

Trains FedDyMem at its defaults on the first ``--train-images`` normal images of an MVTec-layout
folder (as a new user would, with anomalib's ``Engine``), exports it with ``Engine.export`` and
runs the IR on ``--test-images`` test images three ways, all in one run:

* ``default``: the exported IR compiled with no config, as ``OpenVINOInferencer`` does (on a
  bfloat16-capable CPU OpenVINO then picks bfloat16 for the nodes the IR does not mark precise);
* ``f32 hint``: the same IR compiled with ``INFERENCE_PRECISION_HINT=f32``;
* ``unmarked default``: the IR without FedDyMem's "precise" marks, compiled with no config
  (what anomalib's own export gives).

Usage::

    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/bench_openvino_precision.py --dataset ../shared/data/mvtec_bottle
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["main"]


def _subset(dataset: Path, work: Path, train_images: int) -> Path:
    """A folder that links the first ``train_images`` normal images and the whole test split."""
    root = work / "data"
    (root / "train" / "good").mkdir(parents=True)
    for path in sorted((dataset / "train" / "good").iterdir())[:train_images]:
        (root / "train" / "good" / path.name).symlink_to(path.resolve())
    (root / "test").symlink_to((dataset / "test").resolve())
    return root


def _test_batch(dataset: Path, count: int, size: int) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.v2.functional import resize, to_dtype, to_image

    paths = sorted(p for p in (dataset / "test").rglob("*") if p.suffix.lower() in {".png", ".jpg", ".bmp"})
    paths = paths[:: max(1, len(paths) // count)][:count]
    images = [to_dtype(to_image(Image.open(p).convert("RGB")), torch.float32, scale=True) for p in paths]
    return torch.stack([resize(image, [size, size], antialias=True) for image in images])


def _unmarked_copy(xml: Path, target: Path) -> Path:
    """The IR with the "precise" attributes removed (anomalib's plain export)."""
    text = xml.read_text(encoding="utf-8").replace('<attribute name="precise" version="0" />', "")
    target.write_text(text, encoding="utf-8")
    shutil.copy(xml.with_suffix(".bin"), target.with_suffix(".bin"))
    return target


def _run(compiled: object, images: np.ndarray) -> dict[str, np.ndarray]:
    return {output.get_any_name(): value for output, value in compiled(images).items()}  # type: ignore[operator]


def _ms_per_image(compiled: object, images: np.ndarray, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        for index in range(len(images)):
            start = time.perf_counter()
            compiled(images[index : index + 1])  # type: ignore[operator]
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    """Export FedDyMem to OpenVINO and print each IR's precision, score differences and speed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, required=True, help="an MVTec-layout folder")
    parser.add_argument("--train-images", type=int, default=40)
    parser.add_argument("--test-images", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not (args.dataset / "train" / "good").is_dir():
        print(f"skipped: {args.dataset} has no train/good folder (is the shared data present?)")
        return 0

    import openvino as ov
    from anomalib.data import Folder
    from anomalib.deploy import ExportType
    from anomalib.engine import Engine
    from anomalib_feddymem import FedDyMem

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        root = _subset(args.dataset, work, args.train_images)
        abnormal = next(p.name for p in sorted((root / "test").iterdir()) if p.is_dir() and p.name != "good")
        datamodule = Folder(name="subset", root=root, normal_dir="train/good", abnormal_dir=f"test/{abnormal}",
                            train_batch_size=8, eval_batch_size=8, num_workers=0)  # fmt: skip
        model = FedDyMem()
        engine = Engine(default_root_dir=work / "engine", logger=False, enable_progress_bar=False)
        engine.fit(model, datamodule=datamodule)
        xml = Path(engine.export(model, export_type=ExportType.OPENVINO, export_root=work / "export"))
        images = _test_batch(args.dataset, args.test_images, 256)
        model.eval()
        with torch.no_grad():
            reference = model(images)
        core = ov.Core()
        print(
            f"CPU: {core.get_property('CPU', 'FULL_DEVICE_NAME')}; "
            f"capabilities {core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES')}"
        )
        print(
            f"{len(images)} test images, {args.train_images} training images, memory {tuple(model.model.memory.shape)}"
        )
        print("| IR, compile config | inference precision | max abs score diff | max abs map diff | ms / image |")
        print("|---|---|---|---|---|")
        runs = (
            ("FedDyMem IR, no config (default)", xml, {}),
            ("FedDyMem IR, INFERENCE_PRECISION_HINT=f32", xml, {"INFERENCE_PRECISION_HINT": "f32"}),
            ("unmarked IR, no config", _unmarked_copy(xml, work / "unmarked.xml"), {}),
        )
        for label, path, config in runs:
            compiled = core.compile_model(path, "CPU", config)
            outputs = _run(compiled, images.numpy())
            score = np.abs(outputs["pred_score"].reshape(-1) - reference.pred_score.numpy().reshape(-1)).max()
            maps = np.abs(
                outputs["anomaly_map"].reshape(reference.anomaly_map.shape) - reference.anomaly_map.numpy()
            ).max()
            ms = _ms_per_image(compiled, images.numpy(), args.repeats)
            print(
                f"| {label} | {compiled.get_property('INFERENCE_PRECISION_HINT')} | "
                f"{score:.2e} | {maps:.2e} | {ms:.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
