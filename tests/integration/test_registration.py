"""FedDyMem through anomalib's own entry points, as a user would call them.

``anomalib train --model FedDyMem`` (bare name), ``anomalib train --config anomalib_feddymem/configs/feddymem.yaml``,
``anomalib export --model FedDyMem ... --export_type openvino``, ``anomalib benchmark`` with a
``[Patchcore, FedDyMem]`` grid and ``anomalib.models.get_model`` all run in fresh interpreters of
this venv, where only the ``.pth`` import hook can have made FedDyMem known to anomalib. The hook
itself must cost (almost) nothing at interpreter start and import nothing heavy.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
import yaml

from conftest import folder_data_options, folder_init_args, only_checkpoint, python

if TYPE_CHECKING:
    from collections.abc import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = REPO_ROOT / "anomalib_feddymem" / "configs" / "feddymem.yaml"
BENCHMARK_CONFIG = REPO_ROOT / "anomalib_feddymem" / "configs" / "benchmark_patchcore.yaml"
#: Options that keep a CLI training run to seconds.
TINY_CLI_OPTIONS = [
    "--model.memory_size", "64", "--model.global_memory_size", "64", "--model.embedding_dim", "32",
    "--model.local_epochs", "1", "--trainer.max_epochs", "1",
]  # fmt: skip


# ------------------------------------------------------------------------------ interpreter start
def test_import_hook_imports_nothing_heavy_at_start_up() -> None:
    """The ``.pth`` hook is installed and loads no heavy package at interpreter start.

    Its start-up cost in seconds is a benchmark figure (``python -X importtime -c pass``), not a test.
    """
    result = python("import sys, json; print(json.dumps(sorted(sys.modules)))")
    loaded = set(json.loads(result.stdout))
    assert "anomalib_feddymem._autoload" in loaded, "the .pth hook is not installed in this venv"
    heavy = {name for name in loaded if name.split(".")[0] in {"torch", "anomalib", "timm", "lightning", "numpy"}}
    assert not heavy, f"start-up imported {sorted(heavy)}"


#: Modules on the import cycle anomalib.models -> hook -> our models -> components -> anomalib.models.
FIRST_IMPORTS = [
    "anomalib_feddymem.models.components.sampling",
    "anomalib_feddymem.models.components.sampling.k_center_greedy",
    "anomalib_feddymem.models.components.weights",
    "anomalib_feddymem.models.feddymem.anomaly_map",
    "anomalib_feddymem.models.feddymem.memory",
    "anomalib_feddymem.models.feddymem.torch_model",
    "anomalib_feddymem.models.fast_patchcore.lightning_model",
    "anomalib_feddymem.federation.build",
]


@pytest.mark.slow
def test_any_module_can_be_imported_first() -> None:
    """Importing a component first must not break the hook's import of the models (it once did)."""
    code = (
        "import {module}\n"
        "from anomalib.models import get_model\n"
        "assert get_model('FastPatchcore', pre_trained=False) and "
        "get_model('FedDyMem', pre_trained=False, memory_size=8)"
    )
    processes = {
        module: subprocess.Popen(
            [sys.executable, "-W", "ignore", "-c", code.format(module=module)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for module in FIRST_IMPORTS
    }
    failures = {}
    for module, process in processes.items():
        output, _ = process.communicate(timeout=600)
        if process.returncode != 0:
            failures[module] = output[-1500:]
    assert not failures, failures


@pytest.mark.slow
def test_get_model_finds_feddymem_without_importing_it() -> None:
    result = python(
        """
        from anomalib.models import FedDyMem, get_model
        options = {"pre_trained": False, "memory_size": 64, "embedding_dim": 16}
        models = [
            get_model("FedDyMem", **options),
            get_model("feddymem", **options),
            get_model({"class_path": "FedDyMem", "init_args": options}),
            get_model({"class_path": "anomalib.models.FedDyMem", "init_args": options}),
        ]
        for model in models:
            assert type(model) is FedDyMem, type(model)
            assert model.memory_size == 64 and model.model.embedding_dim == 16
        print("OK", FedDyMem.__module__)
        """
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "OK anomalib_feddymem.models.feddymem.lightning_model" in result.stdout


# ------------------------------------------------------------------------------------- anomalib CLI
@pytest.fixture(scope="module")
def cli_checkpoint(synthetic_folder: Path, tmp_path_factory: pytest.TempPathFactory, cli: Callable[..., Any]) -> Path:
    """Checkpoint of ``anomalib train --model FedDyMem`` (bare name) on a synthetic Folder."""
    root = tmp_path_factory.mktemp("cli_train")
    cli(
        ["anomalib", "train", "--model", "FedDyMem", "--data", "anomalib.data.Folder",
         *folder_data_options(synthetic_folder), *TINY_CLI_OPTIONS, "--default_root_dir", root / "results"],
        cwd=root,
    )  # fmt: skip
    return only_checkpoint(root / "results")


@pytest.mark.slow
def test_cli_train_with_bare_model_name(cli_checkpoint: Path) -> None:
    checkpoint = torch.load(cli_checkpoint, map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["memory_size"] == 64
    assert checkpoint["hyper_parameters"]["local_epochs"] == 1
    state = checkpoint["state_dict"]
    assert state["local_memory.items"].shape == (64, 32)
    assert 0 < state["model.memory"].shape[0] <= 64
    assert state["model.memory"].shape[1] == 32


@pytest.mark.slow
def test_cli_export_openvino_from_checkpoint(cli_checkpoint: Path, tmp_path: Path, cli: Callable[..., Any]) -> None:
    import openvino as ov
    from anomalib_feddymem import FedDyMem

    cli(
        ["anomalib", "export", "--model", "FedDyMem", "--export_type", "openvino",
         "--ckpt_path", cli_checkpoint, "--default_root_dir", tmp_path / "export"],
        cwd=tmp_path,
    )  # fmt: skip
    xml = tmp_path / "export" / "weights" / "openvino" / "model.xml"
    assert xml.is_file()
    assert xml.with_suffix(".bin").is_file()
    compiled = ov.Core().compile_model(xml, "CPU")  # OpenVINO's defaults, as `anomalib predict` compiles
    model = FedDyMem.load_from_checkpoint(cli_checkpoint, map_location="cpu").eval()
    for batch in (2, 1):
        images = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        outputs = {output.get_any_name(): value for output, value in compiled(images.numpy()).items()}
        with torch.no_grad():
            reference = model(images)
        np.testing.assert_allclose(outputs["pred_score"].reshape(-1), reference.pred_score.numpy(), atol=1e-3)
        np.testing.assert_allclose(outputs["anomaly_map"], reference.anomaly_map.numpy(), atol=5e-3)


@pytest.mark.slow
def test_cli_predict_writes_visualisations(
    cli_checkpoint: Path, synthetic_folder: Path, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    """``anomalib predict --model FedDyMem --ckpt_path CKPT --data DIR_OF_IMAGES`` through the real CLI.

    As for any anomalib model, the model options a checkpoint was trained with are passed again
    (here the tiny sizes; a model trained at the defaults needs none).
    """
    images = sorted((synthetic_folder / "test").rglob("*.png"))[:3]
    folder = tmp_path / "images"
    folder.mkdir()
    for path in images:
        (folder / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
    cli(
        ["anomalib", "predict", "--model", "FedDyMem", *TINY_CLI_OPTIONS[:6], "--ckpt_path", cli_checkpoint,
         "--data", folder, "--default_root_dir", tmp_path / "results"],
        cwd=tmp_path,
    )  # fmt: skip
    written = sorted(p.name for p in (tmp_path / "results").rglob("*.png"))
    assert written == sorted(p.name for p in folder.iterdir()), written


@pytest.mark.slow
def test_cli_train_with_config_file(synthetic_folder: Path, tmp_path: Path, cli: Callable[..., Any]) -> None:
    """``anomalib_feddymem/configs/feddymem.yaml`` as shipped (real-data path), with the data and sizes overridden."""
    cli(
        ["anomalib", "train", "--config", CONFIG, *folder_data_options(synthetic_folder), *TINY_CLI_OPTIONS,
         "--default_root_dir", tmp_path / "results"],
        cwd=REPO_ROOT,
    )  # fmt: skip
    checkpoint = torch.load(only_checkpoint(tmp_path / "results"), map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["memory_size"] == 64
    assert checkpoint["hyper_parameters"]["backbone"] == "tf_efficientnet_lite0"


def test_config_file_splits_the_test_images_the_same_way_every_run(synthetic_folder: Path) -> None:
    """The shipped config's threshold half and metric half do not depend on the global RNG's state.

    anomalib's ``random_split`` draws from the global generator when the datamodule has no seed,
    whose state at ``setup`` depends on what ran before it: the F1 threshold and every reported
    metric then move between two runs of the same command.
    """
    from anomalib.data import Folder

    options = yaml.safe_load(CONFIG.read_text())["data"]["init_args"]
    options.update(folder_init_args(synthetic_folder))
    splits = []
    with torch.random.fork_rng():  # the global seeds below stay inside this test
        for global_seed in (1, 2):
            torch.manual_seed(global_seed)
            datamodule = Folder(**options)
            datamodule.setup()
            splits.append((
                sorted(datamodule.val_data.samples.image_path),
                sorted(datamodule.test_data.samples.image_path),
            ))
    (validation, test), (validation_again, test_again) = splits
    assert validation, "the config's from_test split left no validation images"
    assert not set(validation) & set(test), "the threshold half and the metric half overlap"
    assert (validation, test) == (validation_again, test_again), "the split follows the global RNG"


def test_config_file_lists_the_model_defaults() -> None:
    """The shipped config documents every FedDyMem option with its current default."""
    from anomalib_feddymem import FedDyMem

    config = yaml.safe_load(CONFIG.read_text())
    assert config["model"]["class_path"] == "FedDyMem"
    parameters = inspect.signature(FedDyMem.__init__).parameters
    defaults = {name: p.default for name, p in parameters.items() if name != "self" and not name.endswith("processor")}
    defaults = {name: value for name, value in defaults.items() if name not in {"evaluator", "visualizer"}}
    listed = config["model"]["init_args"]
    assert set(listed) == set(defaults)
    for name, default in defaults.items():
        expected = list(default) if isinstance(default, tuple) else default
        assert listed[name] == expected, f"{name}: the config says {listed[name]!r}, the default is {expected!r}"


@pytest.mark.slow
def test_anomalib_benchmark_patchcore_vs_feddymem(tmp_path: Path, cli: Callable[..., Any]) -> None:
    """Anomalib's benchmark pipeline runs the shipped grid on a synthetic folder and writes both rows.

    The grid can only share init_args (see the config), so FedDyMem runs with its default sizes:
    the folder is kept smaller than the shared one (4 training images) to stay fast.
    """
    from anomalib_feddymem.data import generate_synthetic_dataset

    (synthetic_folder,) = generate_synthetic_dataset(
        tmp_path / "data", ["disc"], image_size=64, train_per_product=4, test_good_per_product=2, test_defect_per_type=1
    )
    config = yaml.safe_load(BENCHMARK_CONFIG.read_text())
    assert config["benchmark"]["model"]["class_path"]["grid"] == ["FastPatchcore", "FedDyMem"]
    data = config["benchmark"]["data"]["init_args"]
    data.update(folder_init_args(synthetic_folder))
    path = tmp_path / "benchmark.yaml"
    path.write_text(yaml.safe_dump(config))
    result = cli(["anomalib", "benchmark", "--config", path], cwd=tmp_path)
    output = result.stdout + result.stderr
    # anomalib's benchmark exits 0 even when a job fails: the table is what proves success.
    tables = sorted(tmp_path.glob("runs/benchmark/*/results.csv"))
    assert tables, f"no results.csv written:\n{output[-3000:]}"
    import pandas as pd

    results = pd.read_csv(tables[-1])
    assert sorted(results["model.class_path"]) == ["FastPatchcore", "FedDyMem"]
    assert set(results["model.init_args.backbone"]) == {"tf_efficientnet_lite0"}
    assert results["image_AUROC"].between(0, 1).all()
    assert results["pixel_AUROC"].between(0, 1).all()


@pytest.mark.slow
def test_print_config_shows_the_class_defaults(tmp_path: Path, cli: Callable[..., Any]) -> None:
    """``anomalib train --model FedDyMem --print_config`` resolves the bare name and prints every default."""
    from anomalib_feddymem import FedDyMem

    result = cli(["anomalib", "train", "--model", "FedDyMem", "--print_config"], cwd=tmp_path, timeout=300)
    printed = yaml.safe_load(result.stdout)["model"]
    assert printed["class_path"].endswith("FedDyMem")
    parameters = inspect.signature(FedDyMem.__init__).parameters
    for name in ("embedding_dim", "memory_ratio", "memory_size", "reduce_ratio", "reduce_method", "aggregation",
                 "upload_precision", "global_memory_size"):  # fmt: skip
        assert printed["init_args"][name] == parameters[name].default, name


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_from_any_directory(tmp_path: Path) -> None:
    """``pip install`` of the built wheel (not editable) into a fresh venv, run from an unrelated folder.

    The fresh venv gets only the wheel; its dependencies (torch, anomalib, ...) come from this
    venv's site-packages through a path line in a ``.pth`` file. A path line does not run that
    folder's own ``.pth`` files, so this checkout's editable install stays invisible: the package,
    its configs and its registration hook can only come from the wheel.
    """
    import sysconfig
    import zipfile

    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist),
         str(REPO_ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = dist.glob("anomalib_feddymem-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"anomalib_feddymem.pth", "anomalib_feddymem/configs/federated/demo.yaml",
            "anomalib_feddymem/configs/feddymem.yaml"} <= names  # fmt: skip

    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    fresh_python = venv / "bin" / "python"
    fresh_site = Path(subprocess.run(
        [fresh_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())  # fmt: skip
    (fresh_site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(  # this venv's pip, installing into the fresh venv's interpreter
        [sys.executable, "-m", "pip", "--python", str(fresh_python), "install", "--quiet", "--no-deps", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*command: str | Path) -> subprocess.CompletedProcess:
        result = subprocess.run([str(part) for part in command], cwd=elsewhere, capture_output=True, text=True,
                                timeout=600, check=False)  # fmt: skip
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        return result

    located = run(fresh_python, "-c", (
        "import anomalib_feddymem, sys\n"
        "from anomalib_feddymem.federation.config import load_config, shipped_configs\n"
        "print(anomalib_feddymem.__file__)\n"
        "print(shipped_configs())\n"
        "print(load_config('configs/federated/synthetic.yaml').rounds)\n"
    )).stdout.split()  # fmt: skip
    package, shipped, rounds = located[-3:]
    assert Path(package).is_relative_to(fresh_site), located
    assert Path(shipped).is_relative_to(fresh_site), located
    assert int(rounds) >= 1
    assert "--data-root" in run(venv / "bin" / "feddymem", "demo", "--help").stdout
    run(venv / "bin" / "feddymem", "simulate", "--config", "federated/synthetic.yaml", "--datasets", "disc,grain",
        "--clients", "2", "--rounds", "1", "--local-epochs", "1", "--image-size", "64", "--no-progress",
        "--output", elsewhere / "simulated")  # fmt: skip
    assert (elsewhere / "simulated" / "metrics.csv").is_file()
    anomalib_cli = "import sys; from anomalib.cli.cli import main; sys.argv[0] = 'anomalib'; main()"
    printed = run(fresh_python, "-c", anomalib_cli, "train", "--model", "FedDyMem", "--print_config").stdout
    assert "class_path: anomalib_feddymem.FedDyMem" in printed, printed[-2000:]
    folder = elsewhere / "simulated" / "data" / "synthetic" / "disc"  # generated by the simulation above
    run(fresh_python, "-c", anomalib_cli, "train", "--model", "FedDyMem", "--data", "anomalib.data.Folder",
        *folder_data_options(folder), *TINY_CLI_OPTIONS, "--default_root_dir", elsewhere / "trained")  # fmt: skip
    only_checkpoint(elsewhere / "trained")


@pytest.mark.slow
def test_anomalib_image_auroc_equals_the_rank_auroc_in_the_default_pipeline(
    synthetic_folder: Path, tmp_path: Path
) -> None:
    """Anomalib's post-processor normalises scores into [0, 1] before its evaluator sees them.

    It maps ``(s - threshold) / (max - min) + 0.5`` with validation's min, max and adaptive
    threshold, then clamps to [0, 1]: monotonic, so anomalib's AUROC is the rank AUROC of the raw
    scores except for ties the clamp creates where the threshold lies far from mid-range. Both are
    checked: anomalib's AUROC equals the rank AUROC of the raw scores put through that same map,
    and equals the raw scores' own AUROC when no score is clamped.
    """
    from anomalib.engine import Engine
    from anomalib_feddymem import FedDyMem
    from anomalib_feddymem.data import folder_datamodule
    from anomalib_feddymem.evaluation import evaluate, predict, rank_auroc

    datamodule = folder_datamodule(synthetic_folder, train_batch_size=4, eval_batch_size=4)  # validation = test
    model = FedDyMem(  # a random backbone, so that the AUROC is not a trivial 1.0
        pre_trained=False, memory_size=64, global_memory_size=64, visualizer=False,
        pre_processor=FedDyMem.configure_pre_processor(image_size=(64, 64)),
    )  # fmt: skip
    engine = Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu")
    engine.fit(model, datamodule=datamodule)
    (metrics,) = engine.test(model, datamodule=datamodule, verbose=False)
    rank = evaluate(model, datamodule.test_dataloader())
    assert rank.image_auroc is not None
    assert rank.image_auroc < 1.0
    raw = predict(model, datamodule.test_dataloader(), with_maps=False)
    post = model.post_processor
    mapped = (raw.scores - float(post.image_threshold)) / float(post.image_max - post.image_min) + 0.5
    assert metrics["image_AUROC"] == pytest.approx(rank_auroc(mapped.clip(0, 1), raw.labels), abs=1e-6)
    if mapped.min() >= 0 and mapped.max() <= 1:  # nothing clamped: the raw ranking itself
        assert metrics["image_AUROC"] == pytest.approx(rank.image_auroc, abs=1e-6)
