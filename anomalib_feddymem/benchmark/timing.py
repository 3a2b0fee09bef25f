"""Inference time per model in torch and, for exported models, OpenVINO: same images, same process.

Every model is timed on the *same* raw test images (resized to the benchmark's size, values in
[0, 1]), one image at a time, through its whole anomalib forward (pre-processor, network,
post-processor): exactly what the exported OpenVINO model computes, so the two figures compare.
The figure is the median over the images after one warm-up call.

Both runtimes use the same number of threads (``threads``, 1 by default): on a shared CPU,
multi-threaded timings mostly measure the other processes, so one thread is the stable measure.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from collections.abc import Callable, Generator

    from anomalib.data import AnomalibDataModule
    from anomalib.models.components import AnomalibModule
    from openvino import CompiledModel

__all__ = [
    "backbone_ms_per_image",
    "compile_openvino",
    "median_ms",
    "openvino_ms_per_image",
    "timing_images",
    "torch_ms_per_image",
    "torch_threads",
]


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


def median_ms(run: Callable[[torch.Tensor], Any], images: torch.Tensor) -> float:
    """Median milliseconds of ``run`` over the images, one at a time, after one warm-up call."""
    run(images[:1])
    timings = []
    for image in images:
        start = time.perf_counter()
        run(image[None])
        timings.append((time.perf_counter() - start) * 1000)
    return float(statistics.median(timings))


@contextmanager
def torch_threads(threads: int) -> Generator[None, None, None]:
    """Run the block with ``threads`` intra-op threads, restoring the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def torch_ms_per_image(module: torch.nn.Module, images: torch.Tensor, threads: int = 1) -> float:
    """Median ms per image of an anomalib module's full forward on the CPU with ``threads`` threads."""
    module = module.cpu().eval()
    with torch_threads(threads):
        return median_ms(module, images)


@torch.no_grad()
def backbone_ms_per_image(module: torch.nn.Module, images: torch.Tensor, threads: int = 1) -> float:
    """Median ms per image of the backbone's forward pass alone (on pre-processed images).

    What a memory-bank model cannot go below: the rest of its forward pass is the memory search
    and the anomaly map.
    """
    module = module.cpu().eval()
    inputs = module.pre_processor.transform(images) if module.pre_processor else images
    with torch_threads(threads):
        return median_ms(module.model.feature_extractor, inputs)


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


def openvino_ms_per_image(compiled: CompiledModel, images: torch.Tensor) -> float:
    """Median ms per image of a compiled OpenVINO model on the same images as the torch timing."""
    return median_ms(lambda batch: compiled(np.ascontiguousarray(batch.numpy())), images)
