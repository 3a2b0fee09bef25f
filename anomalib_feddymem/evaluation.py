"""Rank-based evaluation shared by the examples, the federation and the benchmark.

anomalib's ``AUROC`` goes through torchmetrics, which applies a sigmoid to scores outside
[0, 1]. In anomalib's default pipeline that never happens (its post-processor first normalises
scores into [0, 1] with a monotonic map, so its image AUROC equals the rank AUROC), but raw
distances given to such a metric directly would saturate into ties. The federation and the
benchmark score models outside Lightning's test loop, so everything we report is computed here,
with ``sklearn.metrics.roc_auc_score`` on the models' *raw* scores and maps (no
post-processing), and with the inference time measured on the same images.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F  # noqa: N812 - torch's and anomalib's convention

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["EvaluationResult", "Predictions", "evaluate", "evaluate_pooled", "predict", "rank_auroc"]


@dataclass
class Predictions:
    """Raw image scores, labels, and (when masks exist) anomaly maps and masks."""

    scores: np.ndarray
    labels: np.ndarray
    maps: np.ndarray | None
    masks: np.ndarray | None
    batch_ms_per_image: list[float]
    image_paths: list[str]


@dataclass
class EvaluationResult:
    """Rank-based image/pixel AUROC (``None`` when undefined) and median inference time."""

    image_auroc: float | None
    pixel_auroc: float | None
    infer_ms_per_image: float
    num_images: int

    def as_dict(self) -> dict[str, float | int | None]:
        """Plain dict for CSV rows."""
        return {
            "image_auroc": self.image_auroc,
            "pixel_auroc": self.pixel_auroc,
            "infer_ms_per_image": self.infer_ms_per_image,
            "num_images": self.num_images,
        }


def rank_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC from ranks of raw scores; ``None`` when only one class is present."""
    labels = np.asarray(labels).astype(bool).ravel()
    if labels.all() or not labels.any():
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64).ravel()))


@torch.no_grad()
def predict(model: torch.nn.Module, dataloader: Iterable, *, with_maps: bool = True) -> Predictions:
    """Run an anomalib model's torch network on a test dataloader and collect raw outputs.

    The model's own pre-processor transform is applied to images and masks exactly as in
    anomalib's test loop; the post-processor (normalisation, thresholds) is not.
    """
    model.eval()
    device = next(model.parameters()).device
    transform = getattr(getattr(model, "pre_processor", None), "transform", None)
    scores, labels, maps, masks, timings, paths = [], [], [], [], [], []
    has_masks = True
    for batch in dataloader:
        images, gt_mask = batch.image, batch.gt_mask
        if transform is not None:
            images, gt_mask = transform(images, gt_mask)
        start = time.perf_counter()
        output = model.model(images.to(device))
        timings.append((time.perf_counter() - start) * 1000 / images.shape[0])
        scores.append(output.pred_score.reshape(-1).float().cpu())
        labels.append(batch.gt_label.reshape(-1).cpu())
        paths.extend(str(p) for p in batch.image_path)
        if with_maps and output.anomaly_map is not None and gt_mask is not None:
            anomaly_map = output.anomaly_map.float().cpu()
            anomaly_map = anomaly_map.reshape(anomaly_map.shape[0], 1, *anomaly_map.shape[-2:])
            mask = gt_mask.reshape(gt_mask.shape[0], 1, *gt_mask.shape[-2:]).float().cpu()
            if mask.shape[-2:] != anomaly_map.shape[-2:]:
                mask = F.interpolate(mask, size=anomaly_map.shape[-2:], mode="nearest")
            maps.append(anomaly_map[:, 0].half())
            masks.append(mask[:, 0] > 0.5)
        else:
            has_masks = False
    if not scores:
        msg = "The test dataloader is empty: nothing to evaluate."
        raise ValueError(msg)
    return Predictions(
        scores=torch.cat(scores).numpy(),
        labels=torch.cat(labels).numpy(),
        maps=torch.cat(maps).float().numpy() if has_masks and maps else None,
        masks=torch.cat(masks).numpy() if has_masks and masks else None,
        batch_ms_per_image=timings,
        image_paths=paths,
    )


def evaluate(model: torch.nn.Module, dataloader: Iterable, *, pixel_metrics: bool = True) -> EvaluationResult:
    """Rank-based image and pixel AUROC of ``model`` on ``dataloader`` plus median ms per image.

    ``pixel_auroc`` is ``None`` (not zero) for datasets without masks or without any anomalous
    pixel; empty masks of individual images are fine.
    """
    return evaluate_pooled(model, [dataloader], pixel_metrics=pixel_metrics)


def evaluate_pooled(
    model: torch.nn.Module,
    dataloaders: Iterable[Iterable],
    *,
    pixel_metrics: bool = True,
) -> EvaluationResult:
    """Like :func:`evaluate`, over several test sets scored by the same model, pooled.

    Image AUROC pools every image's raw score; pixel AUROC pools only the test sets that have
    masks. This is how a client holding a product with masks and one without (e.g. headct) still
    gets a pixel AUROC on the former instead of none at all.
    """
    runs = [predict(model, loader, with_maps=pixel_metrics) for loader in dataloaders]
    if not runs:
        msg = "No test set to evaluate."
        raise ValueError(msg)
    masked = [run for run in runs if run.maps is not None and run.masks is not None]
    pixel = None
    if pixel_metrics and masked:
        pixel = rank_auroc(
            np.concatenate([run.maps.ravel() for run in masked]),
            np.concatenate([run.masks.ravel() for run in masked]),
        )
    return EvaluationResult(
        image_auroc=rank_auroc(
            np.concatenate([run.scores for run in runs]), np.concatenate([run.labels for run in runs])
        ),
        pixel_auroc=pixel,
        infer_ms_per_image=statistics.median([t for run in runs for t in run.batch_ms_per_image]),
        num_images=sum(len(run.scores) for run in runs),
    )
