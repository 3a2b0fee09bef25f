"""The five compared methods, each run on the same data, backbone, layers and image size.

Every ``run_*`` function returns a :class:`MethodRun`: per dataset the rank-based evaluation
(:func:`anomalib_feddymem.evaluation.evaluate`) of the model(s) that serve that dataset, what one
client uploads per round, and the training wall time.

How a dataset's row is formed (also written to ``results.md``):

* central methods train one model per dataset on that dataset's whole training set ("pooled":
  the datasets are different products, so pooling them into one model would test a
  multi-product model no client of the federation ever needs) and test it on the dataset's test set;
* federated and local methods run once over the union of the datasets, partitioned into
  ``N`` clients; a client holding any training image of a dataset is tested on that dataset's
  whole test set, and the row is the mean over those clients of their AUROCs (every client sees the
  same test images, so this is the test-size-weighted mean). Raw scores are not pooled across
  clients: different models' score scales are not comparable.
"""

from __future__ import annotations

import copy
import logging
import shutil
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from anomalib.pre_processing import PreProcessor
from lightning.pytorch import Trainer, seed_everything
from rich.console import Console
from torchvision.transforms.v2 import Compose, Normalize, Resize

from anomalib_feddymem.evaluation import EvaluationResult, evaluate
from anomalib_feddymem.federation.build import build_client, build_partition
from anomalib_feddymem.federation.datamodules import client_datamodules
from anomalib_feddymem.federation.messages import decode_memory, encode_memory, record_nbytes
from anomalib_feddymem.federation.partition import ClientPartition
from anomalib_feddymem.federation.runner import FederationResult, run_federation
from anomalib_feddymem.federation.transport import InProcessTransport
from anomalib_feddymem.models.components.sampling import FastKCenterGreedy
from anomalib_feddymem.models.fast_patchcore import FastPatchcore

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from anomalib.data import AnomalibDataModule

    from anomalib_feddymem.federation.client import FedDyMemClient
    from anomalib_feddymem.federation.config import FederationConfig

    from .config import BenchmarkConfig

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetScore",
    "FederatedFedDyMem",
    "MethodRun",
    "dataset_datamodules",
    "federate",
    "mean_result",
    "patchcore_pre_processor",
    "run_feddymem_central",
    "run_feddymem_federated",
    "run_patchcore_central",
    "run_patchcore_federated",
    "run_patchcore_local",
    "train_patchcore",
]


@dataclass
class DatasetScore:
    """One method on one dataset: the (mean) evaluation and the models that produced it."""

    result: EvaluationResult
    models: list[Any]
    """The models scored on this dataset (one for central methods, the holding clients' otherwise)."""


@dataclass
class MethodRun:
    """A method's outcome over every dataset."""

    method: str
    scores: dict[str, DatasetScore]
    fit_s: dict[str, float]
    """Training wall time per dataset row (a federation's total time is repeated in each row)."""
    upload_bytes: dict[int, float] = field(default_factory=dict)
    """Client id -> serialized bytes it uploads per round (mean over rounds); empty: no upload."""

    @property
    def upload_bytes_per_round(self) -> float:
        """Mean over clients of the bytes one client uploads per round (0 without communication)."""
        return float(statistics.fmean(self.upload_bytes.values())) if self.upload_bytes else 0.0


def patchcore_pre_processor(
    image_size: tuple[int, int] = (256, 256), mean: float = 0.5, std: float = 0.5
) -> PreProcessor:
    """Resize + normalise with EfficientNet-Lite's statistics (0.5/0.5), as FedDyMem's default does.

    Patchcore's own default normalises with ImageNet's statistics, which suit ResNets; the
    comparison gives both models the statistics of the shared backbone.
    """
    return PreProcessor(transform=Compose([Resize(image_size, antialias=True), Normalize([mean] * 3, [std] * 3)]))


# --------------------------------------------------------------------------------------- data
def dataset_datamodules(
    products: Mapping[str, Any],
    *,
    image_size: int,
    batch_size: int,
    seed: int,
) -> dict[str, Any]:
    """One datamodule per dataset holding its *whole* training set and its test set, resized.

    Built with the federation's own :func:`client_datamodules` (a one-client partition per
    dataset), so central methods and per-dataset tests read images exactly as the clients do.
    """
    modules = {}
    for name, product in products.items():
        product.setup()
        whole = ClientPartition(client_id=0, train={name: np.arange(len(product.train_data))})
        (module,) = client_datamodules(
            {name: product},
            [whole],
            image_size=image_size,
            train_batch_size=batch_size,
            eval_batch_size=batch_size,
            num_workers=0,
            seed=seed,
        )
        modules[name] = module
    return modules


def mean_result(results: Sequence[EvaluationResult]) -> EvaluationResult:
    """Mean AUROCs over clients scored on the same test images (``None`` stays ``None``)."""

    def mean(values: list[float | None]) -> float | None:
        defined = [v for v in values if v is not None]
        return float(statistics.fmean(defined)) if defined else None

    return EvaluationResult(
        image_auroc=mean([r.image_auroc for r in results]),
        pixel_auroc=mean([r.pixel_auroc for r in results]),
        infer_ms_per_image=float(statistics.median(r.infer_ms_per_image for r in results)),
        num_images=results[0].num_images,
    )


def _holders(partitions: Sequence[ClientPartition], dataset: str) -> list[int]:
    """Clients holding at least one training image of ``dataset``."""
    return [part.client_id for part in partitions if dataset in part.test_products]


def _same_network(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two anomalib models' torch networks hold equal tensors, so that they score alike.

    :func:`evaluate` runs only the torch network (``model.model``) and the pre-processor, which
    every client of a benchmark builds from one config.
    """
    first, second = a.model.state_dict(), b.model.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def _score_by_holders(
    models: Mapping[int, Any], partitions: Sequence[ClientPartition], tests: Mapping[str, Any]
) -> dict[str, DatasetScore]:
    """Every dataset scored by the clients that hold it (mean of their AUROCs).

    Holders whose networks are equal (federated FedDyMem's clients all hold the final ``G``)
    are scored once: their results are the same, and the test set is the benchmark's slowest part.
    """
    scores = {}
    for name, module in tests.items():
        holders = _holders(partitions, name)
        scored: list[tuple[Any, EvaluationResult]] = []
        results = []
        for cid in holders:
            result = next((done for model, done in scored if _same_network(model, models[cid])), None)
            if result is None:
                result = evaluate(models[cid].cpu(), module.test_dataloader())
                scored.append((models[cid], result))
            results.append(result)
        scores[name] = DatasetScore(mean_result(results), [models[cid] for cid in holders])
    return scores


# ------------------------------------------------------------------------------------ FedDyMem
@dataclass
class FederatedFedDyMem:
    """A finished in-process FedDyMem federation and what the benchmark needs of it."""

    result: FederationResult
    clients: list[FedDyMemClient]
    partitions: list[ClientPartition]
    products: dict[str, Any]
    fit_s: float

    def upload_bytes(self) -> dict[int, float]:
        """Client id -> mean serialized upload bytes per round, from the runner's own byte counts."""
        per_client: dict[int, list[int]] = {}
        for row in self.result.rows:
            if row.get("upload_bytes"):
                per_client.setdefault(int(row["client"]), []).append(int(row["upload_bytes"]))
        return {cid: float(statistics.fmean(values)) for cid, values in sorted(per_client.items())}


def federate(config: FederationConfig, console: Console | None = None) -> FederatedFedDyMem:
    """Run a fresh in-process federation (as ``simulate``) and keep its clients for scoring.

    A previous run's checkpoints in ``config.output`` are removed: a benchmark always starts afresh.
    """
    shutil.rmtree(config.output_dir / "checkpoints", ignore_errors=True)
    console = console or Console(quiet=True)
    products, partitions, datamodules = build_partition(config)
    clients = [build_client(config, cid, datamodule) for cid, datamodule in enumerate(datamodules)]
    transport = InProcessTransport(clients, image_size=config.image_size, console=console)
    start = time.perf_counter()
    result = run_federation(transport, config, console=console)
    for client in clients:  # the benchmark scores them itself (config.evaluation): hand them the final G
        client.install_memory(result.global_memory, config.rounds)
    return FederatedFedDyMem(result, clients, partitions, products, time.perf_counter() - start)


def run_feddymem_federated(
    config: BenchmarkConfig,
    tests: Mapping[str, Any],
    *,
    name: str = "feddymem_federated",
    **changes: object,
) -> tuple[MethodRun, FederatedFedDyMem]:
    """FedDyMem over ``N`` non-IID clients; each dataset scored by the clients holding it."""
    run = federate(config.run_config(config.federation.output_dir / "runs" / name, **changes))
    models = {client.client_id: client.model for client in run.clients}
    scores = _score_by_holders(models, run.partitions, tests)
    fit = dict.fromkeys(tests, run.fit_s)
    return MethodRun(name, scores, fit, run.upload_bytes()), run


def run_feddymem_central(config: BenchmarkConfig, tests: Mapping[str, Any]) -> MethodRun:
    """FedDyMem on each dataset's pooled training data: a one-client federation of ``R`` rounds."""
    scores, fit = {}, {}
    for dataset, module in tests.items():
        output = config.federation.output_dir / "runs" / "feddymem_central" / dataset
        run = federate(config.run_config(output, datasets=[dataset], clients=1, partition="iid"))
        model = run.clients[0].model.cpu()
        scores[dataset] = DatasetScore(evaluate(model, module.test_dataloader()), [model])
        fit[dataset] = run.fit_s
    return MethodRun("feddymem_central", scores, fit)


# ----------------------------------------------------------------------------------- Patchcore
def train_patchcore(
    config: BenchmarkConfig, datamodule: AnomalibDataModule, work_dir: Path
) -> tuple[FastPatchcore, float]:
    """Anomalib's Patchcore (fast exact coreset) fitted on ``datamodule``; returns it and its seconds."""
    seed_everything(config.federation.seed, verbose=False)
    size = (config.federation.image_size, config.federation.image_size)
    model = FastPatchcore(
        pre_processor=patchcore_pre_processor(size), evaluator=False, visualizer=False, **config.patchcore_options()
    )
    trainer = Trainer(
        **{**model.trainer_arguments, "devices": 1},
        accelerator=config.federation.accelerator,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=work_dir,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - start
    return model.cpu().eval(), seconds


def run_patchcore_central(config: BenchmarkConfig, tests: Mapping[str, Any]) -> MethodRun:
    """One Patchcore per dataset on its pooled training data."""
    scores, fit = {}, {}
    for dataset, module in tests.items():
        model, fit[dataset] = train_patchcore(
            config, module, config.federation.output_dir / "runs" / "patchcore_central" / dataset
        )
        scores[dataset] = DatasetScore(evaluate(model, module.test_dataloader()), [model])
    return MethodRun("patchcore_central", scores, fit)


def run_patchcore_local(
    config: BenchmarkConfig,
    client_modules: Sequence[Any],
    partitions: Sequence[ClientPartition],
    tests: Mapping[str, Any],
) -> tuple[MethodRun, dict[int, FastPatchcore]]:
    """Each client's own Patchcore on its own data, tested on its own products' test images."""
    models, seconds = {}, 0.0
    for part, module in zip(partitions, client_modules, strict=True):
        work_dir = config.federation.output_dir / "runs" / "patchcore_local" / f"client_{part.client_id}"
        models[part.client_id], fit = train_patchcore(config, module, work_dir)
        seconds += fit
    scores = _score_by_holders(models, partitions, tests)
    return MethodRun("patchcore_local", scores, dict.fromkeys(tests, seconds)), models


def run_patchcore_federated(
    config: BenchmarkConfig,
    local_models: Mapping[int, FastPatchcore],
    local_fit_s: float,
    tests: Mapping[str, Any],
) -> tuple[MethodRun, FastPatchcore]:
    """The naive federated baseline: clients upload their coresets, the server keeps a coreset of the union.

    The clients' local Patchcores (of :func:`run_patchcore_local`: the client-side work is the
    same) upload their memory banks as Flower ``ArrayRecord``s (bytes counted as for FedDyMem);
    the server's k-center greedy coreset of the union is sent back and every client scores with it.
    """
    uploads = {cid: encode_memory(model.model.memory_bank.float()) for cid, model in sorted(local_models.items())}
    upload_bytes = {cid: float(record_nbytes(record)) for cid, record in uploads.items()}
    start = time.perf_counter()
    union = torch.cat([torch.from_numpy(decode_memory(record)[0]) for record in uploads.values()])
    torch.manual_seed(config.federation.seed)
    global_bank = FastKCenterGreedy(union, config.server_coreset_ratio).sample_coreset()
    server_s = time.perf_counter() - start
    model = copy.deepcopy(next(iter(local_models.values())))
    model.model.memory_bank = global_bank.contiguous()
    logger.info("patchcore_federated: server coreset %d of %d uploaded patches.", len(global_bank), len(union))
    scores = {name: DatasetScore(evaluate(model, module.test_dataloader()), [model]) for name, module in tests.items()}
    fit = dict.fromkeys(tests, local_fit_s + server_s)
    return MethodRun("patchcore_federated", scores, fit, upload_bytes), model
