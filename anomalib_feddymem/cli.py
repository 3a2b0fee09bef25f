r"""``feddymem``: the command line of anomalib-feddymem.

One small function per subcommand (``add_<name>_parser`` builds its arguments, ``run_<name>``
runs it) registered in :data:`SUBCOMMANDS`, so a new subcommand is one pair of functions.

Examples:
    feddymem simulate --config anomalib_feddymem/configs/federated/synthetic.yaml
    feddymem simulate --data-root ../shared/data --datasets mvtec_bottle,headct --clients 3 \\
        --partition dirichlet --alpha 0.5 --rounds 3 --local-epochs 1 --seed 0 --output outputs/fed
    feddymem simulate --config anomalib_feddymem/configs/federated/synthetic.yaml --resume
    feddymem partition --data-root ../shared/data --datasets mvtec_bottle,headct --clients 4
    feddymem demo --output outputs/demo
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

logger = logging.getLogger("anomalib_feddymem")

DEMO_CONFIG = "federated/demo.yaml"
DEMO_REAL_CONFIG = "federated/demo_real.yaml"
REAL_DATASETS = ("mvtec_bottle", "magnetic_tile", "mpdd_metal_plate", "headct")


def _setup_logging(verbose: bool) -> None:
    """Rich logging for our messages; Lightning's per-fit chatter and library warnings quietened."""
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)], force=True)
    if not verbose:
        import lightning.pytorch  # noqa: F401 - it sets its loggers' levels on import; override after

        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "timm", "anomalib"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


def _model_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value parsed as YAML (``memory_size=512``, ``pre_trained=false``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        msg = f"expected KEY=VALUE, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return key.strip(), yaml.safe_load(value)


def _add_federation_flags(parser: argparse.ArgumentParser) -> None:
    """The flags shared by ``simulate`` and ``partition`` (every one overrides the config file)."""
    parser.add_argument("--config", type=Path, help="YAML config (keys of FederationConfig).")
    parser.add_argument("--data-root", help="Folder of MVTec-layout datasets (default: embedded synthetic data).")
    parser.add_argument("--datasets", help="Comma-separated dataset folders of --data-root (or synthetic products).")
    parser.add_argument("--clients", type=int, help="Number of clients.")
    parser.add_argument("--partition", choices=["category", "iid", "dirichlet", "quantity"], help="Partition scheme.")
    parser.add_argument("--alpha", type=float, help="Dirichlet concentration (dirichlet/quantity).")
    parser.add_argument("--seed", type=int, help="Seed of partition, models, training and aggregation.")
    parser.add_argument("--output", help="Output folder.")
    parser.add_argument("--image-size", type=int, help="Square image size.")


#: ``FederationConfig`` keys that ``simulate`` and ``benchmark`` take as flags (unset flags are ``None``).
FEDERATION_FLAGS = (
    "data_root",
    "datasets",
    "clients",
    "partition",
    "alpha",
    "rounds",
    "local_epochs",
    "seed",
    "output",
    "image_size",
    "min_clients",
    "batch_size",
)


def _federation_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The federation flags the user set (the others stay ``None``: the config file's value holds)."""
    return {key: getattr(args, key, None) for key in FEDERATION_FLAGS}


def _config_from_args(args: argparse.Namespace) -> Any:  # noqa: ANN401 - FederationConfig
    from anomalib_feddymem.federation.config import load_config

    overrides = _federation_overrides(args)
    if getattr(args, "export_openvino", False):
        overrides["export_openvino"] = True
    if getattr(args, "no_progress", False):
        overrides["progress"] = False
    overrides["model"] = dict(getattr(args, "model", None) or [])
    return load_config(args.config, **overrides)


# ------------------------------------------------------------------------------------ simulate
def add_simulate_parser(subparsers: argparse._SubParsersAction) -> None:
    """``feddymem simulate``: the in-process federation."""
    parser = subparsers.add_parser("simulate", help="Run a federation in this process (embedded default).")
    _add_federation_flags(parser)
    parser.add_argument("--rounds", type=int, help="Communication rounds.")
    parser.add_argument("--local-epochs", type=int, help="Local epochs per round.")
    parser.add_argument("--min-clients", type=int, help="Fewest valid uploads that complete a round.")
    parser.add_argument("--batch-size", type=int, help="Train/eval batch size.")
    parser.add_argument(
        "--model",
        action="append",
        type=_model_option,
        metavar="KEY=VALUE",
        help="A FedDyMem option, e.g. --model memory_size=512 (repeatable).",
    )
    parser.add_argument("--resume", action="store_true", help="Continue the run in --output from its checkpoint.")
    parser.add_argument("--export-openvino", action="store_true", help="Export every client's final model.")
    parser.add_argument("--no-progress", action="store_true", help="No Lightning progress bars.")


def run_simulate(args: argparse.Namespace) -> int:
    """Run :func:`~anomalib_feddymem.federation.simulation.simulate` with the config and flags."""
    from anomalib_feddymem.federation.simulation import simulate

    config = _config_from_args(args)
    result = simulate(config, resume=args.resume)
    logger.info("Done: %s (metrics.csv, metrics.png, checkpoints/).", result.output)
    return 0


# ----------------------------------------------------------------------------------- partition
def add_partition_parser(subparsers: argparse._SubParsersAction) -> None:
    """``feddymem partition``: print and save who holds what, without training."""
    parser = subparsers.add_parser("partition", help="Show (and save) the partition of a config.")
    _add_federation_flags(parser)


def run_partition(args: argparse.Namespace) -> int:
    """Build the partition of the config and flags; the table is printed and saved to --output."""
    from anomalib_feddymem.federation.build import build_partition

    config = _config_from_args(args)
    build_partition(config, save=True)
    logger.info("Saved %s and %s.", config.output_dir / "partition.csv", config.output_dir / "partition.json")
    return 0


# ---------------------------------------------------------------------------------------- demo
def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    """``feddymem demo``: a small federation on the embedded data, or on ``--data-root``."""
    parser = subparsers.add_parser("demo", help="A small federation (synthetic data, or --data-root folders).")
    parser.add_argument("--output", default="outputs/demo", help="Output folder (a previous demo there is replaced).")
    parser.add_argument("--data-root", help="Run on these MVTec-layout folders instead (skipped when absent).")
    parser.add_argument("--datasets", default=",".join(REAL_DATASETS), help="Folders of --data-root to use.")


def run_demo(args: argparse.Namespace) -> int:
    """Run ``anomalib_feddymem/configs/federated/demo.yaml`` (or ``demo_real.yaml`` with ``--data-root``) afresh."""
    import shutil

    from anomalib_feddymem.federation.config import load_config
    from anomalib_feddymem.federation.simulation import simulate

    if args.data_root:
        root = Path(args.data_root)
        present = [name for name in args.datasets.split(",") if (root / name).is_dir()]
        if not present:
            print(f"Skipping the real-data demo: no dataset folder of {args.datasets} under {root}.")
            return 0
        config = load_config(DEMO_REAL_CONFIG, data_root=str(root), datasets=present, output=args.output)
    else:
        config = load_config(DEMO_CONFIG, output=args.output)
    shutil.rmtree(config.output_dir / "checkpoints", ignore_errors=True)  # a demo always starts afresh
    result = simulate(config)
    _print_summary(result.rows)
    logger.info("Demo outputs in %s: metrics.csv, metrics.png, partition.csv, checkpoints/.", result.output)
    return 0


def _print_summary(rows: Sequence[dict[str, Any]]) -> None:
    """Mean AUROCs and total bytes per round."""
    import math

    from rich.console import Console
    from rich.table import Table

    table = Table(title="FedDyMem federation: per round (mean over clients)")
    for column in ("round", "image AUROC", "pixel AUROC", "uploaded bytes", "downloaded bytes"):
        table.add_column(column, justify="right")

    def mean(values: list[Any]) -> str:
        values = [v for v in values if v is not None and not math.isnan(v)]
        return f"{sum(values) / len(values):.3f}" if values else "-"

    for rnd in sorted({row["round"] for row in rows}):
        mine = [row for row in rows if row["round"] == rnd]
        table.add_row(
            str(rnd),
            mean([r["image_auroc"] for r in mine]),
            mean([r["pixel_auroc"] for r in mine]),
            str(sum(r["upload_bytes"] for r in mine)),
            str(sum(r["download_bytes"] for r in mine)),
        )
    Console().print(table)


SUBCOMMANDS: dict[str, tuple[Callable[[Any], None], Callable[[argparse.Namespace], int]]] = {
    "simulate": (add_simulate_parser, run_simulate),
    "partition": (add_partition_parser, run_partition),
    "demo": (add_demo_parser, run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``feddymem`` parser with one subparser per entry of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(prog="feddymem", description="Federated FedDyMem anomaly detection.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show Lightning/library logs and warnings.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser, _ in SUBCOMMANDS.values():
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``feddymem`` console script; user errors exit 2 with a one-line message."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from anomalib_feddymem.federation.checkpoint import CheckpointError
    from anomalib_feddymem.federation.server import FederationError

    try:
        return SUBCOMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError, CheckpointError, FederationError) as error:
        if args.verbose:
            raise
        print(f"feddymem {args.command}: error: {error}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------- benchmark
def add_benchmark_parser(subparsers: argparse._SubParsersAction) -> None:
    """``feddymem benchmark``: FedDyMem against Patchcore (see :mod:`anomalib_feddymem.benchmark`)."""
    parser = subparsers.add_parser("benchmark", help="FedDyMem vs Patchcore: tables, plots, ablations.")
    _add_federation_flags(parser)
    parser.add_argument("--rounds", type=int, help="Communication rounds of FedDyMem.")
    parser.add_argument("--local-epochs", type=int, help="Local epochs per round.")
    parser.add_argument("--batch-size", type=int, help="Train/eval batch size.")
    parser.add_argument("--methods", help="Comma-separated subset of the compared methods.")
    parser.add_argument(
        "--model",
        action="append",
        type=_model_option,
        metavar="KEY=VALUE",
        help="A FedDyMem option, e.g. --model reduce_ratio=16 (repeatable).",
    )
    parser.add_argument("--ablations", action="store_true", help="Also run the ablations (ablations.csv/md).")
    parser.add_argument(
        "--frontier",
        action="store_true",
        help="Also run every federated method at several upload budgets (frontier.csv/md).",
    )
    parser.add_argument("--no-openvino", action="store_true", help="Skip the OpenVINO export and timing.")


def run_benchmark_command(args: argparse.Namespace) -> int:
    """Build the benchmark config from ``--config`` and flags and run it."""
    from anomalib_feddymem.benchmark import load_benchmark_config, run_benchmark

    overrides = {**_federation_overrides(args), "methods": args.methods}
    overrides["openvino"] = False if args.no_openvino else None
    overrides["model"] = dict(args.model or [])
    config = load_benchmark_config(args.config, **overrides)
    result = run_benchmark(
        config, ablations=args.ablations, frontier=args.frontier, command=" ".join(["feddymem", *sys.argv[1:]])
    )
    if result is None:
        print("Skipped the benchmark: no dataset folder found (see the warning above).")
        return 0
    print((result.output / "results.md").read_text())
    logger.info("Benchmark outputs in %s: results.csv, results.md, auroc_vs_upload.png, heatmaps_*.png.", result.output)
    return 0


SUBCOMMANDS["benchmark"] = (add_benchmark_parser, run_benchmark_command)


if __name__ == "__main__":
    sys.exit(main())
