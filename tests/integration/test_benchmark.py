"""The benchmark against Patchcore: a tiny end-to-end run, its files, byte counts, config and CLI.

The end-to-end run uses two generated products at 64 px (``stripes`` with masks, ``checker``
with its ``ground_truth`` removed), two clients, one round, tiny memories and a random backbone;
every model runs with one thread (stable and fast on a shared CPU).
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from anomalib_feddymem.benchmark.config import METHODS, load_benchmark_config
from anomalib_feddymem.benchmark.report import COLUMNS, read_csv

DATASETS = ("stripes", "checker")
TINY = {
    "pre_trained": True,
    "embedding_dim": 32,
    "memory_ratio": 1.0,
    "memory_size": 64,
    "global_memory_size": 64,
    "reduce_ratio": 2,
    "upload_precision": "float32",
}


def _config(data_root: Path, output: Path, **changes: Any) -> Any:  # noqa: ANN401
    options = {
        "data_root": str(data_root),
        "datasets": list(DATASETS),
        "clients": 2,
        "rounds": 1,
        "image_size": 64,
        "batch_size": 4,
        "output": str(output),
        "timing_images": 3,
        "heatmap_images": 2,
        "accelerator": "cpu",
        "model": dict(TINY),
        **changes,
    }
    return load_benchmark_config(None, **options)


@pytest.fixture(scope="module")
def tiny_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:  # noqa: ANN401
    """The benchmark on ``stripes`` (masks) and ``checker`` without ``ground_truth``: 2 clients, 1 round."""
    from anomalib_feddymem.benchmark import run_benchmark
    from anomalib_feddymem.benchmark.timing import torch_threads

    root = tmp_path_factory.mktemp("bench")
    data = root / "data"
    for name in DATASETS:
        shutil.copytree(synthetic_root / name, data / name)
    shutil.rmtree(data / "checker" / "ground_truth")
    with torch_threads(1):
        return run_benchmark(_config(data, root / "out"))


@pytest.mark.slow
def test_results_csv_schema_and_one_row_per_method_and_dataset(tiny_run):
    rows = read_csv(tiny_run.output / "results.csv")
    assert tuple(rows[0]) == COLUMNS
    assert sorted((r["method"], r["dataset"]) for r in rows) == sorted((m, d) for m in METHODS for d in DATASETS)
    for row in rows:
        # ImageNet features separate the synthetic defects completely (every method, every dataset)
        assert float(row["image_auroc"]) >= 0.9, row
        assert float(row["fit_s"]) > 0
        assert float(row["infer_ms_per_image"]) > 0
        assert int(row["num_test_images"]) == 7  # 3 good + 2 blobs + 2 scratches


@pytest.mark.slow
def test_pixel_auroc_empty_not_zero_without_ground_truth(tiny_run):
    rows = read_csv(tiny_run.output / "results.csv")
    for row in rows:
        if row["dataset"] == "checker":
            assert row["pixel_auroc"] == ""
        else:
            assert float(row["pixel_auroc"]) >= 0.8, row
    assert "n/a" in (tiny_run.output / "results.md").read_text()


@pytest.mark.slow
def test_feddymem_upload_bytes_are_the_serialized_reduced_memories(tiny_run):
    from anomalib_feddymem.federation.messages import encode_memory, record_nbytes

    sent = []
    for client in tiny_run.federated.clients:
        items, weights = client.model.memory_upload()  # deterministic: what the client sent in round 1
        nbytes = record_nbytes(encode_memory(items.numpy(), weights.numpy()))
        raw = items.numel() * 4 + weights.numel() * 4
        assert items.shape == (32, 32)  # 64 items reduced 2x, 32 dimensions
        assert raw <= nbytes <= raw + 512  # the arrays plus their serialization headers
        sent.append(nbytes)
    assert [row["upload_bytes"] for row in tiny_run.federated.result.rows] == sent
    for row in read_csv(tiny_run.output / "results.csv"):
        if row["method"] == "feddymem_federated":
            assert float(row["upload_bytes_per_round"]) == pytest.approx(statistics.fmean(sent))


@pytest.mark.slow
def test_patchcore_federated_upload_bytes_are_the_coresets(tiny_run):
    from anomalib_feddymem.federation.messages import encode_memory, record_nbytes

    sent = []
    for model in tiny_run.local_patchcores.values():
        bank = model.model.memory_bank
        nbytes = record_nbytes(encode_memory(bank))
        assert bank.dtype.itemsize == 4
        assert bank.numel() * 4 <= nbytes <= bank.numel() * 4 + 512
        sent.append(nbytes)
    rows = read_csv(tiny_run.output / "results.csv")
    for row in rows:
        if row["method"] == "patchcore_federated":
            assert float(row["upload_bytes_per_round"]) == pytest.approx(statistics.fmean(sent))
        elif row["method"] != "feddymem_federated":
            assert float(row["upload_bytes_per_round"]) == pytest.approx(0, abs=0)
    fed = tiny_run.runs["feddymem_federated"].upload_bytes
    for cid, ratio in tiny_run.upload_ratios.items():
        assert ratio == pytest.approx(fed[cid] / sent[cid])
    assert "FedDyMem / patchcore_federated" in (tiny_run.output / "results.md").read_text()


@pytest.mark.slow
def test_openvino_timing_only_for_feddymem(tiny_run):
    for row in read_csv(tiny_run.output / "results.csv"):
        if row["method"].startswith("feddymem"):
            assert float(row["infer_ms_per_image_openvino"]) > 0
            assert float(row["backbone_ms_per_image"]) > 0
        else:
            assert row["infer_ms_per_image_openvino"] == ""
    assert list((tiny_run.output / "exports").rglob("*.xml"))


@pytest.mark.slow
def test_markdown_and_plots(tiny_run):
    text = (tiny_run.output / "results.md").read_text()
    for heading in ("## Results per method and dataset", "## Means over datasets", "## Comparisons"):
        assert heading in text
    for method in METHODS:
        assert f"| {method} |" in text
    for name in ("auroc_vs_upload.png", "heatmaps_stripes.png", "heatmaps_checker.png"):
        assert (tiny_run.output / name).stat().st_size > 10_000
    assert (tiny_run.output / "partition.csv").read_text().startswith("client,product,train_images,test_images")


@pytest.mark.slow
def test_ablations_table(tiny_run):
    from anomalib_feddymem.benchmark import run_ablations
    from anomalib_feddymem.benchmark.timing import torch_threads

    config = tiny_run.config.replace(
        ablation={"variants": ["no_dynamic_update", "reduce_ratio"], "reduce_ratios": [2, 4]}
    )
    with torch_threads(1):
        rows = run_ablations(config, done=tiny_run)
    assert [(r["ablation"], r["value"]) for r in rows] == [
        ("full", "defaults"),
        ("no_dynamic_update", "memory_momentum=0"),
        ("reduce_ratio", "2"),
        ("reduce_ratio", "4"),
    ]
    full, _, same, smaller = rows
    assert same == {**full, "ablation": "reduce_ratio", "value": "2"}  # the full model's setting: reused
    assert smaller["upload_bytes_per_round"] < full["upload_bytes_per_round"]
    assert [r["ablation"] for r in read_csv(tiny_run.output / "ablations.csv")] == [r["ablation"] for r in rows]


@pytest.mark.slow
def test_frontier_runs_every_budget_and_reuses_the_main_runs(tiny_run):
    from anomalib_feddymem.benchmark import run_benchmark
    from anomalib_feddymem.benchmark.runner import run_settings
    from anomalib_feddymem.benchmark.timing import torch_threads

    config = tiny_run.config.replace(
        methods=["feddymem_federated", "patchcore_federated"],
        output=str(tiny_run.output.parent / "frontier"),
        heatmap_images=0,
        openvino=False,
        frontier={"reduce_ratios": [2, 4], "coreset_ratios": [0.1, 0.5]},
    )
    with torch_threads(1):
        result = run_benchmark(config, frontier=True)
    rows = result.frontier_rows
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("feddymem_federated", "reduce_ratio=2"), ("feddymem_federated", "reduce_ratio=4"),
        ("patchcore_federated", "coreset_ratio=0.1"), ("patchcore_federated", "coreset_ratio=0.5"),
    ]  # fmt: skip
    federated, naive = result.runs["feddymem_federated"], result.runs["patchcore_federated"]
    assert rows[0]["upload_bytes_per_round"] == federated.upload_bytes_per_round  # the main run, reused
    assert rows[0]["total_upload_bytes"] == federated.upload_bytes_per_round * config.federation.rounds
    assert rows[2]["total_upload_bytes"] == naive.upload_bytes_per_round  # one upload
    assert rows[1]["total_upload_bytes"] < rows[0]["total_upload_bytes"] < rows[3]["total_upload_bytes"]
    assert rows[2]["total_upload_bytes"] < rows[3]["total_upload_bytes"]
    # one run per distinct setting: the main runs stand for reduce ratio 2 and coreset ratio 0.1
    assert result.runs_by_settings[run_settings("feddymem_federated", config)] is federated
    assert result.runs_by_settings[run_settings("patchcore_federated", config)] is naive
    assert len(result.runs_by_settings) == 4
    assert [r["setting"] for r in read_csv(result.output / "frontier.csv")] == [r["setting"] for r in rows]
    table = (result.output / "frontier.md").read_text()
    assert f"| {rows[0]['total_upload_bytes']:.0f} |" in table, "whole bytes, as the per-round column"
    assert (result.output / "auroc_vs_upload.png").stat().st_size > 1000


# ------------------------------------------------------------------------- config, CLI, missing data
def test_a_run_is_known_by_the_options_it_uses_not_by_how_they_were_written(tmp_path):
    from anomalib_feddymem.benchmark.runner import run_settings

    config = _config(tmp_path, tmp_path / "out", model={"reduce_ratio": 4.0})

    def keys(method: str, changes: list[dict[str, Any]]) -> set[tuple]:
        return {run_settings(method, config.replace(**change)) for change in changes}

    same = [
        {},
        {"model": {}},  # 4 is the class default
        {"model": {"reduce_ratio": 4.0, "upload_precision": "int4", "layers": ["blocks.2", "blocks.4"]}},
        {"model": {"reduce_ratio": 4}},  # an int from a YAML sweep, a float from the frontier
        {"output": str(tmp_path / "elsewhere")},  # where a run writes does not change it
    ]
    assert len(keys("feddymem_federated", same)) == 1
    different = [{"model": {"reduce_ratio": 6.0}}, {"alpha": 0.1}, {"model": {"upload_precision": "int8"}}]
    assert len(keys("feddymem_federated", different)) == len(different)
    assert run_settings("feddymem_federated", config) not in keys("feddymem_federated", different)

    naive_same = [
        {},
        {"patchcore": {"coreset_sampling_ratio": 0.1, "num_neighbors": 9}},
        {"patchcore": {"num_neighbors": 9}},  # 0.1 is Patchcore's default coreset ratio
        {"patchcore": {"coreset_sampling_ratio": 0.1, "num_neighbors": 9.0}},
        {"output": str(tmp_path / "frontier_coreset_0.1")},
        {"model": {"reduce_ratio": 4.0}},  # a FedDyMem option is not Patchcore's
    ]
    assert len(keys("patchcore_federated", naive_same)) == 1
    naive_different = [
        {"patchcore": {"coreset_sampling_ratio": 0.03, "num_neighbors": 9}},
        {"patchcore": {"coreset_sampling_ratio": 0.1, "num_neighbors": 3}},
        {"server_coreset_ratio": 0.5},
        {"alpha": 10.0},
        {"model": {"layers": ["blocks.3", "blocks.4"]}},  # the shared backbone options are Patchcore's too
    ]
    assert len(keys("patchcore_federated", naive_different)) == len(naive_different)
    assert run_settings("patchcore_federated", config) not in keys("patchcore_federated", naive_different)
    assert run_settings("patchcore_federated", config) != run_settings("feddymem_federated", config)
    with pytest.raises(ValueError, match="'patchcore_central' is not a federated method"):
        run_settings("patchcore_central", config)


def test_bad_options_name_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"methods: unknown \['patchcore_fast'\]"):
        load_benchmark_config(None, methods="feddymem_federated,patchcore_fast")
    with pytest.raises(ValueError, match=r"ablation.variants: unknown"):
        load_benchmark_config(None, ablation={"variants": ["no_memory"]})
    config = tmp_path / "bad.yaml"
    config.write_text("clients: 2\nround: 3\n")
    with pytest.raises(ValueError, match=f"{config}: unknown option\\(s\\) \\['round'\\]"):
        load_benchmark_config(config)


def test_benchmark_config_holds_a_federation_config_and_no_copy_of_its_fields():
    import dataclasses

    from anomalib_feddymem.benchmark.config import FEDERATION_KEYS, BenchmarkConfig
    from anomalib_feddymem.federation.config import FederationConfig

    own = {f.name for f in dataclasses.fields(BenchmarkConfig)}
    assert not own & set(FEDERATION_KEYS), own & set(FEDERATION_KEYS)
    config = load_benchmark_config(None, clients=2, model={"reduce_ratio": 4}, methods="patchcore_central")
    assert isinstance(config.federation, FederationConfig)
    assert (config.federation.clients, config.federation.model, config.methods) == (
        2,
        {"reduce_ratio": 4},
        ["patchcore_central"],
    )
    run = config.run_config(Path("somewhere"), datasets=["disc"])
    assert (run.output, run.datasets, run.clients, run.evaluation, run.min_clients) == (
        "somewhere",
        ["disc"],
        2,
        "none",
        1,
    )
    assert config.to_dict()["federation"]["clients"] == 2


def test_benchmark_yaml_with_top_level_federation_keys_still_loads(tmp_path):
    """Configs from before ``federation:``: their data/partition/model keys are read as federation keys."""
    old = tmp_path / "old.yaml"
    old.write_text("clients: 2\nrounds: 5\nmodel: {reduce_ratio: 4}\nmethods: [feddymem_federated]\n")
    new = tmp_path / "new.yaml"
    new.write_text("federation: {clients: 2, rounds: 5, model: {reduce_ratio: 4}}\nmethods: [feddymem_federated]\n")
    assert load_benchmark_config(old) == load_benchmark_config(new)
    assert load_benchmark_config(old, model={"memory_size": 9}).federation.model == {
        "reduce_ratio": 4,
        "memory_size": 9,
    }
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: {clients: 0}\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: clients must be an integer >= 1, got 0"):
        load_benchmark_config(bad)


def test_shipped_configs_load():
    from anomalib_feddymem.federation.config import shipped_configs

    configs = sorted((shipped_configs() / "benchmark").glob("*.yaml"))
    ablation_only = ["shared_data_ablations.yaml", "shared_data_sweeps.yaml"]
    assert [path.name for path in configs] == ["shared_data.yaml", *ablation_only, "synthetic.yaml"]
    for path in configs:
        config = load_benchmark_config(path)
        expected = ["feddymem_federated"] if path.name in ablation_only else list(METHODS)
        assert config.methods == expected, path
        patchcore = config.patchcore_options()
        assert patchcore["backbone"] == config.federation.model.get("backbone", "tf_efficientnet_lite0")
        assert list(patchcore["layers"]) == list(config.federation.model.get("layers", ("blocks.2", "blocks.4")))


def test_missing_data_root_skips_with_a_message(tmp_path, capsys):
    from anomalib_feddymem.cli import main

    code = main(["benchmark", "--data-root", str(tmp_path / "absent"), "--datasets", "a,b", "--output", str(tmp_path)])
    assert code == 0
    assert "Skipped the benchmark" in capsys.readouterr().out
    assert not (tmp_path / "results.csv").exists()


def test_timing_images_are_resized_to_the_exported_input_size() -> None:
    """Any datamodule given to the timing is resized: the OpenVINO models take exactly ``image_size``.

    That includes one whose images keep their stored size.
    """
    from types import SimpleNamespace

    import torch
    from anomalib_feddymem.benchmark.timing import timing_images

    batches = [SimpleNamespace(image=torch.rand(2, 3, 256, 256)) for _ in range(3)]
    module = SimpleNamespace(test_dataloader=lambda: iter(batches))
    images = timing_images(module, 5, image_size=128)
    assert images.shape == (5, 3, 128, 128)
    assert timing_images(module, 3).shape == (3, 3, 256, 256), "no size given: images as loaded"


def test_timed_runs_take_turns_on_every_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """``median_ms`` warms every run up once, then passes image i to every run before image i + 1.

    A fake clock that only the runs advance makes each run's milliseconds exact, so the medians
    are checked without timing anything.
    """
    from types import SimpleNamespace

    from anomalib_feddymem.benchmark import timing

    clock = [0.0]
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = []

    def run(name: str, milliseconds: list[float]) -> Any:  # noqa: ANN401
        durations = iter(milliseconds)

        def call(batch: torch.Tensor) -> None:
            calls.append((name, tuple(batch.shape), float(batch[0, 0])))
            clock[0] += next(durations) / 1000

        return call

    images = torch.arange(3.0).view(3, 1)
    runs = {
        "model": (run("model", [100, 5, 1, 9]), images),
        ("model", "backbone"): (run("bb", [100, 2, 2, 3]), images + 10),
    }
    ms = timing.median_ms(runs)
    assert [(name, value) for name, _, value in calls] == [
        ("model", 0.0), ("bb", 10.0),  # warm-up, untimed
        ("model", 0.0), ("bb", 10.0), ("model", 1.0), ("bb", 11.0), ("model", 2.0), ("bb", 12.0),
    ]  # fmt: skip
    assert all(shape == (1, 1) for _, shape, _ in calls), "one image at a time"
    assert ms == {"model": pytest.approx(5.0), ("model", "backbone"): pytest.approx(2.0)}


def test_timed_runs_refuse_different_image_counts() -> None:
    """Runs with different numbers of images (or none) cannot be compared: the error says so."""
    from anomalib_feddymem.benchmark.timing import median_ms

    def noop(_batch: torch.Tensor) -> None:
        return None

    with pytest.raises(ValueError, match="same, non-zero number of images"):
        median_ms({"a": (noop, torch.zeros(3, 1)), "b": (noop, torch.zeros(2, 1))})
    with pytest.raises(ValueError, match="same, non-zero number of images"):
        median_ms({"a": (noop, torch.zeros(0, 1))})


class _Scored(torch.nn.Module):
    """An anomalib-like model: ``model`` is the torch network the evaluation runs."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        self.model = torch.nn.Linear(2, 1)
        torch.nn.init.constant_(self.model.weight, weight)
        torch.nn.init.zeros_(self.model.bias)


class _TestSet:
    def __init__(self, name: str) -> None:
        self.name = name

    def test_dataloader(self) -> str:
        return self.name


def test_holders_with_equal_networks_are_scored_once_and_the_others_each(monkeypatch):
    from anomalib_feddymem.benchmark import methods
    from anomalib_feddymem.evaluation import EvaluationResult
    from anomalib_feddymem.federation.partition import ClientPartition

    calls: list[tuple[float, str]] = []

    def evaluate(model: _Scored, loader: str) -> EvaluationResult:
        calls.append((float(model.model.weight[0, 0]), loader))
        auroc = {1.0: 0.9, 2.0: 0.7}[float(model.model.weight[0, 0])]
        return EvaluationResult(image_auroc=auroc, pixel_auroc=None, infer_ms_per_image=1.0, num_images=4)

    monkeypatch.setattr(methods, "evaluate", evaluate)
    models = {0: _Scored(1.0), 1: _Scored(1.0), 2: _Scored(2.0)}
    held = np.arange(3)
    partitions = [ClientPartition(0, {"a": held, "b": held}), ClientPartition(1, {"a": held, "b": held[:0]}),
                  ClientPartition(2, {"a": held, "b": held})]  # fmt: skip
    tests = {name: _TestSet(name) for name in ("a", "b")}
    scores = methods._score_by_holders(models, partitions, tests)
    assert calls == [(1.0, "a"), (2.0, "a"), (1.0, "b"), (2.0, "b")]
    assert scores["a"].result.image_auroc == pytest.approx((0.9 + 0.9 + 0.7) / 3)  # still the mean over holders
    assert scores["b"].result.image_auroc == pytest.approx((0.9 + 0.7) / 2)
    assert len(scores["a"].models) == 3
