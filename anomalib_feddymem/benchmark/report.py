"""Benchmark outputs: ``results.csv``, ``results.md`` (table, means, comparisons), ``ablations.*`` and plots.

Undefined metrics (pixel AUROC of a dataset without ``ground_truth``, OpenVINO time of a model
that is not exported) are empty cells and ``n/a`` in the tables, never zero.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import ModuleType

__all__ = [
    "ABLATION_COLUMNS",
    "COLUMNS",
    "FRONTIER_COLUMNS",
    "comparisons",
    "mean_defined",
    "method_means",
    "plot_auroc_vs_upload",
    "plot_heatmaps",
    "read_csv",
    "write_ablations",
    "write_csv",
    "write_frontier",
    "write_markdown",
    "write_table",
]

COLUMNS = (
    "method",
    "dataset",
    "image_auroc",
    "pixel_auroc",
    "upload_bytes_per_round",
    "fit_s",
    "infer_ms_per_image",
    "infer_ms_per_image_openvino",
    "backbone_ms_per_image",
    "num_test_images",
    "num_models",
)
#: The columns averaged over datasets (the measurements of COLUMNS).
MEAN_COLUMNS = COLUMNS[2:9]
ABLATION_COLUMNS = ("ablation", "value", "image_auroc", "pixel_auroc", "upload_bytes_per_round", "fit_s")
FRONTIER_COLUMNS = (
    "method", "setting", "image_auroc", "pixel_auroc", "upload_bytes_per_round", "rounds", "total_upload_bytes"
)  # fmt: skip


def _cell(value: object) -> object:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _fmt(value: object, digits: int = 3) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path, columns: Sequence[str] = COLUMNS) -> Path:
    """Rows with ``columns`` (undefined values as empty cells)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _cell(row.get(key)) for key in columns})
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV written by :func:`write_csv` (strings; empty = undefined)."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def mean_defined(values: Sequence[Any]) -> float | None:
    """Mean of the defined values (``None``, empty cells and NaN skipped); ``None`` if there are none."""
    defined = [float(v) for v in values if v not in {None, ""} and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(defined) if defined else None


def method_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per method: means over datasets (AUROCs over the datasets where they are defined)."""
    means = {}
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        means[method] = {key: mean_defined([row.get(key) for row in mine]) for key in MEAN_COLUMNS}
    return means


def comparisons(
    rows: Sequence[Mapping[str, Any]], upload_ratios: Mapping[int, float] | None = None
) -> list[tuple[str, str]]:
    """Federated FedDyMem next to the alternatives a user would pick, as ``(comparison, measured)``.

    Only measurements: what counts as good enough is the README's business, not the library's.
    """
    means = method_means(rows)
    fed, central_fed, central, local = (
        means.get(m, {}) for m in ("feddymem_federated", "feddymem_central", "patchcore_central", "patchcore_local")
    )
    lines = []

    def versus(label: str, key: str, ours: Mapping[str, Any], theirs: Mapping[str, Any]) -> None:
        mine, other = ours.get(key), theirs.get(key)
        if mine is not None and other is not None:
            lines.append((label, f"{_fmt(mine)} vs {_fmt(other)} ({_pt(mine - other)})"))

    versus("mean image AUROC: feddymem_federated vs patchcore_central", "image_auroc", fed, central)
    versus("mean pixel AUROC: feddymem_federated vs patchcore_central", "pixel_auroc", fed, central)
    versus("mean image AUROC: feddymem_federated vs patchcore_local", "image_auroc", fed, local)
    versus("mean image AUROC: feddymem_central vs patchcore_central", "image_auroc", central_fed, central)
    versus("mean pixel AUROC: feddymem_central vs patchcore_central", "pixel_auroc", central_fed, central)
    if upload_ratios:
        values = upload_ratios.values()
        measured = f"worst client {100 * max(values):.2f}%, mean {100 * statistics.fmean(values):.2f}%"
        lines.append(("upload per client per round / the same client's patchcore_federated upload", measured))
    for method in ("feddymem_federated", "feddymem_central"):
        ms, backbone, patchcore = (means.get(method, {}).get("infer_ms_per_image"),
                                   means.get(method, {}).get("backbone_ms_per_image"),
                                   central.get("infer_ms_per_image"))  # fmt: skip
        if ms and patchcore:
            lines.append((
                f"torch ms per image: {method} / patchcore_central",
                f"{_fmt(ms, 1)} / {_fmt(patchcore, 1)} = {ms / patchcore:.2f}x",
            ))
        if ms and backbone:
            lines.append((
                f"torch ms per image: {method} / its backbone alone",
                f"{_fmt(ms, 1)} / {_fmt(backbone, 1)} = {ms / backbone:.2f}x",
            ))
    return lines


def _pt(diff: float | None) -> str:
    return "n/a" if diff is None else f"{100 * diff:+.1f} pt"


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key in columns:
            value = row.get(key)
            if key in {"image_auroc", "pixel_auroc"}:
                cells.append(_fmt(_float(value)))
            elif key in {"fit_s", "infer_ms_per_image", "infer_ms_per_image_openvino", "backbone_ms_per_image"}:
                cells.append(_fmt(_float(value), 1))
            elif key in {"upload_bytes_per_round", "total_upload_bytes"}:
                cells.append(_fmt(_float(value), 0))
            else:
                cells.append(_fmt(value))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _float(value: object) -> float | None:
    return None if value in {None, ""} else float(value)


def write_markdown(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    *,
    title: str,
    preamble: str,
    upload_ratios: Mapping[int, float] | None = None,
    notes: str = "",
) -> Path:
    """``results.md``: settings, the per-row table, per-method means and the comparisons."""
    means = method_means(rows)
    mean_rows = [{"method": method, **values} for method, values in means.items()]
    lines = [f"# {title}", "", preamble.strip(), "", "## Results per method and dataset", ""]
    lines += _table(rows, COLUMNS[:9])
    lines += ["", "## Means over datasets", ""]
    lines += _table(mean_rows, ("method", *MEAN_COLUMNS))
    if upload_ratios:
        lines += [
            "",
            "## Upload per client per round: FedDyMem / patchcore_federated",
            "",
            "| client | ratio |",
            "|---|---|",
        ]
        lines += [f"| {cid} | {100 * ratio:.2f}% |" for cid, ratio in sorted(upload_ratios.items())]
    lines += ["", "## Comparisons", "", "| comparison | measured |", "|---|---|"]
    lines += [f"| {comparison} | {measured} |" for comparison, measured in comparisons(rows, upload_ratios)]
    if notes:
        lines += ["", notes.strip()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_table(
    rows: Sequence[Mapping[str, Any]], output: Path, name: str, title: str, preamble: str, columns: Sequence[str]
) -> tuple[Path, Path]:
    """``<name>.csv`` and ``<name>.md`` (a titled table of ``columns``) in ``output``."""
    csv_path = write_csv(rows, output / f"{name}.csv", columns)
    lines = [f"# {title}", "", preamble.strip(), "", *_table(rows, columns)]
    md_path = output / f"{name}.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def write_ablations(rows: Sequence[Mapping[str, Any]], output: Path, preamble: str) -> tuple[Path, Path]:
    """``ablations.csv`` and ``ablations.md`` (mean AUROCs over datasets and bytes per variant)."""
    return write_table(rows, output, "ablations", "FedDyMem ablations", preamble, ABLATION_COLUMNS)


def write_frontier(rows: Sequence[Mapping[str, Any]], output: Path, preamble: str) -> tuple[Path, Path]:
    """``frontier.csv`` and ``frontier.md``: mean AUROCs against total upload bytes per budget."""
    return write_table(rows, output, "frontier", "Quality against upload bytes", preamble, FRONTIER_COLUMNS)


# ---------------------------------------------------------------------------------------- plots
def _pyplot() -> ModuleType:
    import matplotlib as mpl

    mpl.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def plot_auroc_vs_upload(
    rows: Sequence[Mapping[str, Any]], path: Path, frontier: Sequence[Mapping[str, Any]] = ()
) -> Path:
    """Mean image AUROC against upload bytes per client.

    With ``frontier``: one curve per federated method over the run's total bytes; else one point
    per method (bytes per round).
    """
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    if frontier:
        for method in dict.fromkeys(row["method"] for row in frontier):
            mine = sorted((r for r in frontier if r["method"] == method), key=lambda r: r["total_upload_bytes"])
            axis.plot(
                [r["total_upload_bytes"] for r in mine], [r["image_auroc"] for r in mine], marker="o", label=method
            )
            for row in mine:
                axis.annotate(row["setting"], (row["total_upload_bytes"], row["image_auroc"]),
                              textcoords="offset points", xytext=(4, 4), fontsize=7)  # fmt: skip
        central = method_means(rows).get("patchcore_central", {}).get("image_auroc")
        if central is not None:
            axis.axhline(central, linestyle="--", color="grey", label="patchcore_central (no upload)")
        axis.set_xscale("log")
        axis.set(xlabel="total upload bytes per client (whole run)", ylabel="mean image AUROC",
                 title="Quality against communication")  # fmt: skip
    else:
        for method, values in method_means(rows).items():
            x, y = values["upload_bytes_per_round"] or 0.0, values["image_auroc"]
            if y is None:
                continue
            axis.scatter([x], [y], s=60, label=method)
            axis.annotate(method, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        axis.set_xscale("symlog", linthresh=1e3)
        axis.set(xlabel="upload bytes per client per round (0 = no communication)", ylabel="mean image AUROC",
                 title="Accuracy against communication")  # fmt: skip
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_heatmaps(
    images: np.ndarray,
    masks: np.ndarray | None,
    maps: Mapping[str, np.ndarray],
    path: Path,
    title: str,
) -> Path:
    """A grid: one row per test image; columns image, mask, then each method's anomaly map.

    Each method's maps share one colour scale (its min..max over the shown images), so rows of
    a column compare; columns do not (raw score scales differ between methods).
    """
    plt = _pyplot()
    count = len(images)
    columns = 2 + len(maps)
    figure, axes = plt.subplots(count, columns, figsize=(2.2 * columns, 2.2 * count), squeeze=False)
    for row in range(count):
        axes[row, 0].imshow(np.clip(images[row].transpose(1, 2, 0), 0, 1))
        if masks is not None:
            axes[row, 1].imshow(masks[row], cmap="gray", vmin=0, vmax=1)
        else:
            axes[row, 1].text(0.5, 0.5, "no mask", ha="center", va="center")
        for col, (method, values) in enumerate(maps.items(), start=2):
            axes[row, col].imshow(values[row], cmap="jet", vmin=float(values.min()), vmax=float(values.max()))
            if row == 0:
                axes[row, col].set_title(method, fontsize=8)
    axes[0, 0].set_title("image", fontsize=8)
    axes[0, 1].set_title("ground truth", fontsize=8)
    for axis in axes.ravel():
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
