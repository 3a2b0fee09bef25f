"""FastPatchcore: anomalib's Patchcore with the exact fast k-center greedy coreset.

:class:`FastPatchcore` *is* anomalib's :class:`~anomalib.models.Patchcore`: the same options and
defaults, backbone, feature pooling, memory bank, scoring, anomaly maps, checkpoints and export.
Only the coreset subsampling of :meth:`FastPatchcore.fit` runs
:class:`~anomalib_feddymem.models.components.sampling.FastKCenterGreedy`, which selects exactly the indices of
anomalib's ``KCenterGreedy`` (same seed, same start, same order) in a fraction of the time. A
checkpoint of either model therefore loads into the other.

It is registered like FedDyMem: ``anomalib train --model FastPatchcore``,
``get_model("FastPatchcore")`` and ``anomalib benchmark`` grids find it without any import.

Example:
    >>> from anomalib.models import get_model
    >>> options = {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"]}
    >>> model = get_model("FastPatchcore", **options)  # doctest: +SKIP
"""

from __future__ import annotations

import logging

import torch
from anomalib.models import Patchcore
from anomalib.models.components import AnomalibModule

from anomalib_feddymem.models.components.sampling import FastKCenterGreedy
from anomalib_feddymem.registration import attach_model

__all__ = ["FastPatchcore"]

logger = logging.getLogger(__name__)


class FastPatchcore(Patchcore, AnomalibModule):
    """anomalib's Patchcore whose k-center greedy coreset runs :class:`FastKCenterGreedy`.

    Every argument, default and behaviour is ``Patchcore``'s (its ``__init__`` is inherited, so
    the anomalib CLI lists exactly Patchcore's options). ``AnomalibModule`` is named as a direct
    base as well, which leaves the method resolution order unchanged (it already follows
    ``Patchcore``) but puts the class among ``AnomalibModule.__subclasses__()``, where anomalib's
    ``get_model("...")`` looks names up.

    Example:
        >>> model = FastPatchcore(backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"])  # doctest: +SKIP
        >>> Engine().fit(model, datamodule=datamodule)  # doctest: +SKIP
    """

    def fit(self) -> None:
        """Anomalib's ``PatchcoreModel.subsample_embedding`` with the fast exact sampler."""
        store = self.model.embedding_store
        if len(store) == 0:
            msg = "Embedding store is empty: FastPatchcore saw no training images. Cannot perform coreset selection."
            raise ValueError(msg)
        embedding = torch.vstack(store)
        store.clear()
        size = int(len(embedding) * self.coreset_sampling_ratio)
        logger.info("Fast k-center greedy coreset: %d of %d patches.", size, len(embedding))
        self.model.memory_bank = FastKCenterGreedy(embedding, self.coreset_sampling_ratio).sample_coreset()


attach_model(FastPatchcore)
