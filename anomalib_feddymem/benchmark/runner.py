"""``feddymem benchmark``: FedDyMem against Patchcore on the same data, with tables, plots and ablations.

:func:`run_benchmark` runs the methods of :mod:`.methods` on the same datasets, partition,
backbone, layers and image size, times every model on the same images (:mod:`.timing`) and writes
``results.csv``, ``results.md``, ``auroc_vs_upload.png`` and ``heatmaps_<dataset>.png``
(:mod:`.report`); with ``ablations`` it also runs :func:`run_ablations`, and with ``frontier``
:func:`run_frontier` (AUROC against total upload bytes at several budgets of each federated method).

Example:
    >>> from anomalib_feddymem.benchmark import load_benchmark_config, run_benchmark
    >>> result = run_benchmark(load_benchmark_config("benchmark/synthetic.yaml"))  # doctest: +SKIP
    >>> result.output / "results.csv"  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from anomalib_feddymem.data import generate_synthetic_dataset
from anomalib_feddymem.federation.build import build_partition
from anomalib_feddymem.federation.partition import save_partition_summary
from anomalib_feddymem.models.fast_patchcore import FastPatchcore

from . import report
from .methods import (
    FederatedFedDyMem,
    MethodRun,
    dataset_datamodules,
    run_feddymem_central,
    run_feddymem_federated,
    run_patchcore_central,
    run_patchcore_federated,
    run_patchcore_local,
)
from .timing import backbone_run, compile_openvino, median_ms, openvino_run, timing_images, torch_run

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import BenchmarkConfig

logger = logging.getLogger(__name__)

__all__ = ["BenchmarkResult", "resolve_datasets", "run_ablations", "run_benchmark", "run_frontier"]


@dataclass
class BenchmarkResult:
    """What a benchmark produced: the rows written to ``results.csv`` and the in-memory runs."""

    output: Path
    rows: list[dict[str, Any]]
    runs: dict[str, MethodRun]
    config: BenchmarkConfig | None = None
    """The config as run (concrete ``data_root``, only the datasets found)."""
    federated: FederatedFedDyMem | None = None
    local_patchcores: dict[int, Any] = field(default_factory=dict)
    upload_ratios: dict[int, float] = field(default_factory=dict)
    ablation_rows: list[dict[str, Any]] = field(default_factory=list)
    frontier_rows: list[dict[str, Any]] = field(default_factory=list)
    runs_by_settings: dict[tuple, MethodRun] = field(default_factory=dict)
    """Federated runs by :func:`run_settings`: a setting the frontier or an ablation asks for
    again is not run twice."""


def run_settings(method: str, config: BenchmarkConfig) -> tuple:
    """What decides a federated run's outcome: the method, alpha and every option of its model as used.

    ``feddymem_federated`` is known by FedDyMem's options, ``patchcore_federated`` by Patchcore's
    and the server's coreset ratio. Options left at their default and options set to that same
    default give the same key; the output folder is not part of it.
    """
    from anomalib_feddymem.federation.runner import init_defaults, model_options

    if method == "feddymem_federated":
        options = model_options(config.federation)
    elif method == "patchcore_federated":
        patchcore = {**init_defaults(FastPatchcore), **config.patchcore_options()}
        options = {**patchcore, "server_coreset_ratio": config.server_coreset_ratio}
    else:
        msg = f"run_settings: {method!r} is not a federated method (feddymem_federated, patchcore_federated)."
        raise ValueError(msg)
    settings = tuple((name, repr(_hashable(options[name]))) for name in sorted(options))
    return method, float(config.federation.alpha), settings


def _hashable(value: object) -> object:
    """``value`` as a key part: lists as tuples, numbers as floats (``4`` and ``4.0`` are one setting)."""
    if isinstance(value, list | tuple):
        return tuple(_hashable(item) for item in value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _reused_run(
    done: BenchmarkResult, method: str, config: BenchmarkConfig, name: str, run: Callable[[], MethodRun]
) -> MethodRun:
    """``run()``, or the run of ``done`` already made with the same :func:`run_settings`."""
    key = run_settings(method, config)
    if key in done.runs_by_settings:
        logger.info("%s: the same settings as a run already made; reusing it.", name)
    else:
        done.runs_by_settings[key] = run()
    return done.runs_by_settings[key]


def _federated_run(
    config: BenchmarkConfig, tests: dict[str, Any], done: BenchmarkResult, name: str, **changes: object
) -> MethodRun:
    """Federated FedDyMem with ``changes`` (``model``, ``alpha``), or the run already made with those settings."""

    def run() -> MethodRun:
        return run_feddymem_federated(config, tests, name=name, **changes)[0]

    changed = dataclasses.replace(config, federation=config.federation.replace(**changes))  # as run_config applies them
    return _reused_run(done, "feddymem_federated", changed, name, run)


def resolve_datasets(config: BenchmarkConfig) -> BenchmarkConfig | None:
    """The config with a concrete ``data_root`` and only the datasets present; ``None`` if none is.

    Without ``data_root`` the embedded synthetic products are generated under ``output/data``.
    """
    if config.federation.data_root is None:
        root = config.federation.output_dir / "data" / "synthetic"
        generate_synthetic_dataset(
            root,
            config.federation.datasets,
            image_size=config.federation.image_size,
            seed=config.federation.seed,
            **config.federation.synthetic,
        )
        return config.replace(data_root=str(root))
    root = Path(config.federation.data_root)
    if not root.is_dir():
        logger.warning("Skipping the benchmark: data root %s not found.", root)
        return None
    present = [name for name in config.federation.datasets if (root / name).is_dir()]
    missing = [name for name in config.federation.datasets if name not in present]
    if missing:
        logger.warning("Skipping dataset folder(s) not found under %s: %s.", root, ", ".join(missing))
    if not present:
        logger.warning("Skipping the benchmark: none of %s is a folder of %s.", config.federation.datasets, root)
        return None
    return config.replace(datasets=present)


def _time_models(
    config: BenchmarkConfig, runs: dict[str, MethodRun], tests: dict[str, Any]
) -> dict[tuple[str, str], dict]:
    """Torch (and for FedDyMem, OpenVINO and the backbone alone) median ms per image of every row's model.

    Per dataset, every model times the same images, all of them taking turns on each image.
    """
    compiled: dict[int, Any] = {}
    timings: dict[tuple[str, str], dict] = {}
    for dataset, module in tests.items():
        images = timing_images(module, config.timing_images, config.federation.image_size)
        timed = {}
        for method, run in runs.items():
            model = run.scores[dataset].models[0]
            timed[method, "infer_ms_per_image"] = torch_run(model, images)
            if not method.startswith("feddymem"):
                continue
            timed[method, "backbone_ms_per_image"] = backbone_run(model, images)
            if config.openvino:
                if id(model) not in compiled:
                    export_root = config.federation.output_dir / "exports" / method / dataset
                    compiled[id(model)] = compile_openvino(
                        model, export_root, config.federation.image_size, config.timing_threads
                    )
                timed[method, "infer_ms_per_image_openvino"] = openvino_run(compiled[id(model)], images)
        ms = median_ms(timed, config.timing_threads)
        for method in runs:
            timings[method, dataset] = {
                key: ms.get((method, key))
                for key in ("infer_ms_per_image", "infer_ms_per_image_openvino", "backbone_ms_per_image")
            }
    return timings


@torch.no_grad()
def _heatmaps(config: BenchmarkConfig, runs: dict[str, MethodRun], tests: dict[str, Any]) -> list[Path]:
    """``heatmaps_<dataset>.png``: anomalous test images first, each method's anomaly maps."""
    paths = []
    for dataset, module in tests.items():
        images, masks, labels = [], [], []
        for batch in module.test_dataloader():
            images.append(batch.image.float())
            labels.append(batch.gt_label.reshape(-1))
            masks.append(
                None if batch.gt_mask is None else batch.gt_mask.reshape(len(batch.image), *batch.image.shape[-2:])
            )
        image = torch.cat(images)
        order = torch.argsort(-torch.cat(labels).int(), stable=True)[: config.heatmap_images]
        mask = None if any(m is None for m in masks) else torch.cat(masks).float()[order].numpy()
        if mask is not None and mask.max() == 0:
            mask = None  # a dataset without ground_truth
        maps = {}
        for method, run in runs.items():
            model = run.scores[dataset].models[0].cpu().eval()
            batch = model.pre_processor.transform(image[order]) if model.pre_processor else image[order]
            anomaly_map = model.model(batch).anomaly_map
            maps[method] = anomaly_map.reshape(len(order), *anomaly_map.shape[-2:]).float().numpy()
        path = config.federation.output_dir / f"heatmaps_{dataset}.png"
        report.plot_heatmaps(image[order].numpy(), mask, maps, path, f"{dataset}: anomaly maps (raw scores)")
        paths.append(path)
    return paths


def _preamble(config: BenchmarkConfig, command: str | None) -> str:
    fed = config.federation
    model = ", ".join(f"{k}={v}" for k, v in sorted(fed.model.items())) or "defaults"
    pc = ", ".join(f"{k}={v}" for k, v in sorted(config.patchcore_options().items()))
    return f"""
Command: `{command or "run_benchmark(config)"}`

Data: `{fed.data_root}` datasets {", ".join(fed.datasets)}; {fed.clients} clients, partition
{fed.partition} (alpha {fed.alpha}), {fed.rounds} round(s) of {fed.local_epochs} local epoch(s),
seed {fed.seed}, {fed.image_size} px for every method. FedDyMem options: {model}. Patchcore
(anomalib's, exact fast coreset): {pc}; patchcore_federated server keeps a coreset of
{config.server_coreset_ratio:g} of the union of the clients' coresets.

How rows are formed: central methods train one model per dataset on that dataset's whole training
set (the datasets are different products: a pooled multi-product model is not what any client
needs) and test it on the dataset's test set. Federated and local methods run once over the union of
the datasets partitioned into clients; a dataset's row is the mean AUROC of the clients that hold
training images of it, each tested on the dataset's whole test set (equal test sizes, so this is
the test-size-weighted mean; raw scores of different models are not pooled). patchcore_federated
scores with the server's coreset, the same model on every client.

AUROCs are rank-based on raw scores (`sklearn.metrics.roc_auc_score`, no sigmoid); pixel AUROC is
n/a for datasets without ground_truth. upload_bytes_per_round: serialized bytes (Flower
`ArrayRecord`, as sent) one client uploads per round, mean over clients and rounds; 0 for methods
without communication. fit_s: training wall time on this machine (for a federated or local method
the whole run, all clients sequentially, repeated in each of its rows). infer_ms_per_image: median
ms per image, batch 1, full anomalib forward (pre-processing, network, post-processing) on the CPU
with {config.timing_threads} thread(s), on the same {config.timing_images} test images of the dataset for every
method, in one process, all models of a dataset taking turns on each image;
_openvino: the same for the FedDyMem model exported with anomalib's `to_openvino`, compiled at
OpenVINO's defaults; backbone_ms_per_image: FedDyMem's backbone forward alone on the same images.
"""


def run_benchmark(
    config: BenchmarkConfig, *, ablations: bool = False, frontier: bool = False, command: str | None = None
) -> BenchmarkResult | None:
    """Run every configured method, write the results and plots; ``None`` when no data was found."""
    resolved = resolve_datasets(config)
    if resolved is None:
        return None
    config = resolved
    output = config.federation.output_dir
    output.mkdir(parents=True, exist_ok=True)
    (output / "benchmark_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    partition_config = config.run_config(output / "runs" / "feddymem_federated")
    products, partitions, client_modules = build_partition(partition_config, save=False)
    save_partition_summary(
        partitions,
        output,
        scheme=config.federation.partition,
        alpha=config.federation.alpha,
        seed=config.federation.seed,
        print_table=False,
    )
    tests = dataset_datamodules(
        products,
        image_size=config.federation.image_size,
        batch_size=config.federation.batch_size,
        seed=config.federation.seed,
    )

    runs: dict[str, MethodRun] = {}
    result = BenchmarkResult(output=output, rows=[], runs=runs, config=config)
    for method in config.methods:
        logger.info("Benchmark: running %s on %s.", method, ", ".join(tests))
        if method == "feddymem_federated":
            runs[method], result.federated = run_feddymem_federated(config, tests)
            result.runs_by_settings[run_settings(method, config)] = runs[method]
        elif method == "feddymem_central":
            runs[method] = run_feddymem_central(config, tests)
        elif method == "patchcore_central":
            runs[method] = run_patchcore_central(config, tests)
        elif method in {"patchcore_local", "patchcore_federated"} and not result.local_patchcores:
            local, result.local_patchcores = run_patchcore_local(config, client_modules, partitions, tests)
            if "patchcore_local" in config.methods:
                runs["patchcore_local"] = local
            if "patchcore_federated" in config.methods:
                local_fit = next(iter(local.fit_s.values()))
                runs["patchcore_federated"], _ = run_patchcore_federated(
                    config, result.local_patchcores, local_fit, tests
                )
                result.runs_by_settings[run_settings("patchcore_federated", config)] = runs["patchcore_federated"]
    runs = {method: runs[method] for method in config.methods}  # table order
    result.runs = runs

    timings = _time_models(config, runs, tests)
    for method, run in runs.items():
        for dataset, score in run.scores.items():
            result.rows.append({
                "method": method,
                "dataset": dataset,
                "image_auroc": score.result.image_auroc,
                "pixel_auroc": score.result.pixel_auroc,
                "upload_bytes_per_round": run.upload_bytes_per_round,
                "fit_s": run.fit_s[dataset],
                **timings[method, dataset],
                "num_test_images": score.result.num_images,
                "num_models": len(score.models),
            })
    if "feddymem_federated" in runs and "patchcore_federated" in runs:
        fed, pc = runs["feddymem_federated"].upload_bytes, runs["patchcore_federated"].upload_bytes
        result.upload_ratios = {cid: fed[cid] / pc[cid] for cid in fed if pc.get(cid)}
    report.write_csv(result.rows, output / "results.csv")
    report.write_markdown(
        result.rows,
        output / "results.md",
        title="FedDyMem against Patchcore",
        preamble=_preamble(config, command),
        upload_ratios=result.upload_ratios,
    )
    if frontier:
        result.frontier_rows = run_frontier(config, tests, client_modules, partitions, result)
    report.plot_auroc_vs_upload(result.rows, output / "auroc_vs_upload.png", result.frontier_rows)
    if config.heatmap_images:
        _heatmaps(config, runs, tests)
    if ablations:
        result.ablation_rows = run_ablations(config, tests, done=result)
    return result


def _frontier_row(method: str, setting: str, run: MethodRun, rounds: int) -> dict[str, Any]:
    per_round = run.upload_bytes_per_round
    return {
        "method": method,
        "setting": setting,
        "image_auroc": report.mean_defined([s.result.image_auroc for s in run.scores.values()]),
        "pixel_auroc": report.mean_defined([s.result.pixel_auroc for s in run.scores.values()]),
        "upload_bytes_per_round": per_round,
        "rounds": rounds,
        "total_upload_bytes": per_round * rounds,
    }


def run_frontier(
    config: BenchmarkConfig,
    tests: dict[str, Any],
    client_modules: list[Any],
    partitions: list[Any],
    done: BenchmarkResult,
) -> list[dict[str, Any]]:
    """Quality against bytes (``frontier.{csv,md}``) at every upload budget of ``frontier``.

    FedDyMem runs at every ``frontier.reduce_ratios``, naive Patchcore at every ``frontier.coreset_ratios``.

    Total upload bytes are per client over the whole run (mean over clients): FedDyMem uploads
    every round, naive federated Patchcore uploads its coreset once. Settings the main benchmark
    already ran are reused.
    """
    fed = config.federation
    rows = []
    for ratio in config.frontier["reduce_ratios"]:
        model = {**fed.model, "reduce_ratio": float(ratio)}
        run = _federated_run(config, tests, done, f"frontier_reduce_{ratio}", model=model)
        rows.append(_frontier_row("feddymem_federated", f"reduce_ratio={ratio}", run, fed.rounds))
    for ratio in config.frontier["coreset_ratios"]:
        swept = config.replace(
            patchcore={**config.patchcore, "coreset_sampling_ratio": float(ratio)},
            output=str(fed.output_dir / "runs" / f"frontier_coreset_{ratio}"),
        )

        def naive(swept: BenchmarkConfig = swept, ratio: float = ratio) -> MethodRun:
            logger.info("Frontier: naive federated Patchcore at coreset ratio %s.", ratio)
            local, models = run_patchcore_local(swept, client_modules, partitions, tests)
            return run_patchcore_federated(swept, models, next(iter(local.fit_s.values())), tests)[0]

        run = _reused_run(done, "patchcore_federated", swept, f"frontier_coreset_{ratio}", naive)
        rows.append(_frontier_row("patchcore_federated", f"coreset_ratio={ratio}", run, 1))
    preamble = (
        f"Mean image / pixel AUROC over {', '.join(tests)} ({fed.clients} clients, {fed.partition} alpha "
        f"{fed.alpha}, {fed.image_size} px, seed {fed.seed}) against the bytes one client uploads over the "
        f"whole run (mean over clients): FedDyMem sends its reduced memory in each of its {fed.rounds} rounds, "
        "naive federated Patchcore its coreset once."
    )
    report.write_frontier(rows, fed.output_dir, preamble)
    return rows


def _ablation_changes(config: BenchmarkConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """``(ablation, value, federation changes)`` for every configured variant."""
    from anomalib_feddymem.federation.runner import model_option

    def model(**options: object) -> dict[str, Any]:
        return {"model": {**config.federation.model, **options}}

    variants: list[tuple[str, str, dict[str, Any]]] = []
    for name in config.ablation["variants"]:
        if name == "generator":  # the other setting than the run's (off by default)
            flipped = not bool(model_option(config.federation, "use_generator"))
            variants.append((name, f"use_generator={flipped}", model(use_generator=flipped)))
        elif name == "no_growth":
            variants.append((name, "grow_global_memory=False", model(grow_global_memory=False)))
        elif name == "averaged_reduce":  # the abstract's weighted averages over the same k-center groups
            options = {"reduce_method": "kcenter", "aggregation": "kcenter"}
            variants.append((name, "reduce and server send group means", model(**options)))
        elif name == "abstract_kmeans":
            options = {"reduce_method": "kmeans", "aggregation": "kmeans", "grow_global_memory": False}
            variants.append((name, "k-means reduce and server, no growth", model(**options)))
        elif name == "no_dynamic_update":
            variants.append((name, "memory_momentum=0", model(memory_momentum=0.0)))
        elif name == "reduce_ratio":
            variants += [(name, str(v), model(reduce_ratio=v)) for v in config.ablation["reduce_ratios"]]
        elif name == "global_memory_size":
            variants += [(name, str(v), model(global_memory_size=v)) for v in config.ablation["global_memory_sizes"]]
        elif name == "embedding_dim":
            variants += [(name, str(v), model(embedding_dim=v)) for v in config.ablation["embedding_dims"]]
        elif name == "upload_precision":
            variants += [(name, str(v), model(upload_precision=v)) for v in config.ablation["upload_precisions"]]
        elif name == "alpha":
            variants += [(name, str(v), {"alpha": float(v)}) for v in config.ablation["alphas"]]
    return variants


def _summary(ablation: str, value: str, run: MethodRun) -> dict[str, Any]:
    return {
        "ablation": ablation,
        "value": value,
        "image_auroc": report.mean_defined([s.result.image_auroc for s in run.scores.values()]),
        "pixel_auroc": report.mean_defined([s.result.pixel_auroc for s in run.scores.values()]),
        "upload_bytes_per_round": run.upload_bytes_per_round,
        "fit_s": next(iter(run.fit_s.values())),
    }


def run_ablations(
    config: BenchmarkConfig, tests: dict[str, Any] | None = None, *, done: BenchmarkResult | None = None
) -> list[dict[str, Any]]:
    """Federated FedDyMem with one component switched off or one option swept; ``ablations.{csv,md}``.

    A variant whose settings a run of ``done`` already had (the full model, a frontier budget)
    reuses that run: the same options give the same result.
    """
    fed = config.federation
    if tests is None:
        resolved = resolve_datasets(config)
        if resolved is None:
            return []
        config = resolved
        products, _, _ = build_partition(config.run_config(fed.output_dir / "runs" / "feddymem_federated"), save=False)
        tests = dataset_datamodules(
            products,
            image_size=fed.image_size,
            batch_size=fed.batch_size,
            seed=fed.seed,
        )
    done = done or BenchmarkResult(output=fed.output_dir, rows=[], runs={}, config=config)
    rows = [_summary("full", "defaults", _federated_run(config, tests, done, "feddymem_federated"))]
    for ablation, value, changes in _ablation_changes(config):
        name = re.sub(r"[^\w.-]+", "_", f"ablation_{ablation}_{value}")  # a folder name without spaces
        rows.append(_summary(ablation, value, _federated_run(config, tests, done, name, **changes)))
    preamble = (
        f"Federated FedDyMem on {', '.join(fed.datasets)} ({fed.data_root}), {fed.clients} clients, "
        f"{fed.partition} alpha {fed.alpha} unless swept, {fed.rounds} round(s), {fed.image_size} px, "
        f"seed {fed.seed}; FedDyMem options {fed.model or 'defaults'} unless changed. AUROCs: mean over "
        "datasets of the rank-based AUROC (per dataset: mean over the clients holding it). "
        "upload_bytes_per_round: serialized bytes per client per round."
    )
    report.write_ablations(rows, fed.output_dir, preamble)
    return rows
