"""Inference time per model in torch and, for exported models, OpenVINO: same images, same process.

Every model is timed on the *same* raw test images (resized to the benchmark's size, values in
[0, 1]), one image at a time, through its whole anomalib forward (pre-processor, network,
post-processor): exactly what the exported OpenVINO model computes, so the two figures compare.
All models of a dataset take turns on every image (:func:`median_ms`), and each figure is the
median over the images after one warm-up call.

Both runtimes use the same number of threads (``threads``, 1 by default): on a shared CPU,
multi-threaded timings mostly measure the other processes, so one thread is the stable measure.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from collections.abc import Generator, Hashable, Mapping

    from anomalib.data import AnomalibDataModule
    from anomalib.models.components import AnomalibModule
    from openvino import CompiledModel

__all__ = [
    "TimedRun",
    "backbone_run",
    "compile_openvino",
    "median_ms",
    "openvino_run",
    "timing_images",
    "torch_run",
    "torch_threads",
]

#: A callable timed on one image at a time and its ``(n, ...)`` inputs (see :func:`median_ms`).
TimedRun = tuple[Callable[[torch.Tensor], Any], torch.Tensor]


def timing_images(datamodule: AnomalibDataModule, count: int, image_size: int | None = None) -> torch.Tensor:
    """The first ``count`` test images of ``datamodule`` as one ``(n, 3, H, W)`` tensor.

    With ``image_size`` they are resized to it: the exported OpenVINO models take exactly that
    input, whatever size the datamodule yields.
    """
    images = []
    for batch in datamodule.test_dataloader():
        images.append(batch.image.float().cpu())
        if sum(len(i) for i in images) >= count:
            break
    if not images:
        msg = f"No test images in {getattr(datamodule, 'name', datamodule)} to time the models on."
        raise ValueError(msg)
    batch = torch.cat(images)[:count]
    if image_size is not None and tuple(batch.shape[-2:]) != (image_size, image_size):
        batch = torch.nn.functional.interpolate(batch, size=(image_size, image_size), mode="bilinear", antialias=True)
    return batch.contiguous()


def median_ms(runs: Mapping[Hashable, TimedRun], threads: int = 1) -> dict[Hashable, float]:
    """Median milliseconds per image of each run, the runs taking turns image by image.

    Each run is a callable and its ``(n, ...)`` inputs: the same ``n`` images, as that run takes
    them (raw, pre-processed). After one warm-up call of each, image ``i`` is passed to every run
    in turn before image ``i + 1``. Timed one run after another instead, the load of a shared
    CPU changes between them, and the ratios that the targets are stated in (a model against
    Patchcore, against its own backbone) drift with it; taking turns gives every run the same
    moments. Torch runs use ``threads`` intra-op threads, without autograd.

    Raises:
        ValueError: If a run has no inputs or another number of inputs than the first run.
    """
    counts = {name: len(inputs) for name, (_, inputs) in runs.items()}
    if not counts:
        return {}
    first = next(iter(counts.values()))
    if first == 0 or any(count != first for count in counts.values()):
        msg = f"Every timed run needs the same, non-zero number of images; got {counts}."
        raise ValueError(msg)
    timings: dict[Hashable, list[float]] = {name: [] for name in runs}
    with torch.no_grad(), torch_threads(threads):
        for run, inputs in runs.values():
            run(inputs[:1])
        for index in range(first):
            for name, (run, inputs) in runs.items():
                start = time.perf_counter()
                run(inputs[index : index + 1])
                timings[name].append((time.perf_counter() - start) * 1000)
    return {name: float(statistics.median(values)) for name, values in timings.items()}


@contextmanager
def torch_threads(threads: int) -> Generator[None, None, None]:
    """Run the block with ``threads`` intra-op threads, restoring the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def torch_run(module: torch.nn.Module, images: torch.Tensor) -> TimedRun:
    """An anomalib module's full forward on the CPU (pre-processing, network, post-processing)."""
    return module.cpu().eval(), images


def backbone_run(module: torch.nn.Module, images: torch.Tensor) -> TimedRun:
    """The backbone's forward pass alone, on the images pre-processed beforehand.

    What a memory-bank model cannot go below: the rest of its forward pass is the memory search
    and the anomaly map.
    """
    module = module.cpu().eval()
    with torch.no_grad():
        inputs = module.pre_processor.transform(images) if module.pre_processor else images
    return module.model.feature_extractor, inputs


def compile_openvino(
    module: AnomalibModule, export_root: str | Path, image_size: int, threads: int = 1
) -> CompiledModel:
    """Export ``module`` with anomalib's ``to_openvino`` and compile it for the CPU as users do.

    At OpenVINO's defaults (only the thread count is set): a FedDyMem IR keeps float32 by itself,
    while a plain anomalib IR runs in bfloat16 where the CPU has it.
    """
    import openvino as ov

    module = module.cpu().eval()
    xml = module.to_openvino(export_root=Path(export_root), input_size=(image_size, image_size))
    settings = {"INFERENCE_NUM_THREADS": threads}
    return ov.Core().compile_model(str(xml), "CPU", settings)


def openvino_run(compiled: CompiledModel, images: torch.Tensor) -> TimedRun:
    """A compiled OpenVINO model on the same raw images as the torch run."""
    return (lambda batch: compiled(np.ascontiguousarray(batch.numpy()))), images
