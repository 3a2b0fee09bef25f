"""Per-round, per-client metrics of a federated run: ``metrics.csv`` and ``metrics.png``."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["COLUMNS", "plot_metrics", "round_table", "write_metrics_csv"]

COLUMNS = (
    "round",
    "client",
    "image_auroc",
    "pixel_auroc",
    "upload_bytes",
    "download_bytes",
    "status",
    "train_images",
    "test_images",
    "global_memory_items",
    "fit_seconds",
    "eval_seconds",
)


def _fmt(value: object) -> object:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def write_metrics_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` with :data:`COLUMNS` (undefined AUROCs as empty cells)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _fmt(row.get(key)) for key in COLUMNS})
    tmp.replace(path)
    return path


def round_table(rows: Sequence[dict[str, Any]], round_number: int) -> Any:  # noqa: ANN401 - rich Table
    """A rich table of one round's rows."""
    from rich.table import Table

    table = Table(title=f"Round {round_number}")
    for column in ("client", "status", "image_auroc", "pixel_auroc", "upload_bytes", "download_bytes", "train_images"):
        table.add_column(column, justify="right")
    for row in rows:
        if row["round"] == round_number:
            table.add_row(
                *(
                    str(_fmt(row.get(c))) or "-"
                    for c in (
                        "client",
                        "status",
                        "image_auroc",
                        "pixel_auroc",
                        "upload_bytes",
                        "download_bytes",
                        "train_images",
                    )
                )
            )
    return table


def plot_metrics(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """PNG with per-client image/pixel AUROC over rounds and total bytes up/down per round."""
    import matplotlib as mpl

    mpl.use("Agg")
    from matplotlib import pyplot as plt

    path = Path(path)
    clients = sorted({row["client"] for row in rows})
    rounds = sorted({row["round"] for row in rows})
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for client in clients:
        mine = sorted((r for r in rows if r["client"] == client), key=lambda r: r["round"])
        for key, style in (("image_auroc", "-o"), ("pixel_auroc", "--s")):
            values = [float("nan") if r.get(key) is None else r[key] for r in mine]
            left.plot([r["round"] for r in mine], values, style, label=f"client {client} {key.split('_')[0]}")
    left.set(xlabel="round", ylabel="AUROC (rank-based)", title="AUROC on own test images", xticks=rounds)
    left.legend(fontsize=7)
    for key, label in (("upload_bytes", "uploaded"), ("download_bytes", "downloaded")):
        totals = [sum(r.get(key) or 0 for r in rows if r["round"] == rnd) for rnd in rounds]
        right.plot(rounds, totals, "-o", label=label)
    right.set(xlabel="round", ylabel="bytes (all clients)", title="Communication per round", xticks=rounds)
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
