"""Partition one or several anomalib datamodules ("products") into federated clients.

A *product* is any anomalib image datamodule (a ``Folder`` per MVTec-layout folder, an
``MVTecAD`` category, ...). Its normal training images are split among the clients by a scheme:

* ``category``: one product per client (with more clients than products, each product is
  shared by the clients ``c`` with ``c % P == p``; with fewer, client ``c`` holds products
  ``p % N == c``);
* ``iid``: all training images pooled and dealt out uniformly at random;
* ``dirichlet``: per product, client shares drawn from ``Dir(alpha)``: small ``alpha`` gives each
  client a skewed mix of products, so products differ across and within clients (the paper's
  non-IID setting);
* ``quantity``: pooled images, client sizes drawn from ``Dir(alpha)`` (unequal sizes).

The split is a pure function of the product sizes, the scheme and the seed
(:func:`partition_indices`), so every runner (the in-process simulation, each Flower SuperNode)
computes the same partition independently. Each client also receives the *test* images of every
product it holds; :func:`anomalib_feddymem.federation.datamodules.client_datamodules` turns a
partition into anomalib datamodules.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

SCHEMES = ("category", "iid", "dirichlet", "quantity")
MAX_REDRAWS = 100

__all__ = [
    "SCHEMES",
    "ClientPartition",
    "PartitionError",
    "partition_indices",
    "partition_table",
    "save_partition_summary",
]


class PartitionError(ValueError):
    """A partition scheme cannot give every client training images, or got a bad option."""


@dataclass
class ClientPartition:
    """What one client holds: indices into each product's normal training samples.

    Attributes:
        client_id: 0-based client index.
        train: product name -> sorted indices of its training samples held by this client.
        num_test: product name -> number of test images (filled when datamodules are built).
    """

    client_id: int
    train: dict[str, np.ndarray]
    num_test: dict[str, int] = field(default_factory=dict)

    @property
    def test_products(self) -> list[str]:
        """Products the client holds at least one training image of."""
        return [name for name, idx in self.train.items() if len(idx) > 0]

    @property
    def num_train(self) -> int:
        """Total normal training images."""
        return int(sum(len(idx) for idx in self.train.values()))

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly description (indices as lists)."""
        return {
            "client": self.client_id,
            "train": {name: idx.tolist() for name, idx in self.train.items() if len(idx)},
            "test_products": self.test_products,
            "num_test": self.num_test,
        }


def _split_by_proportions(indices: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    """Split ``indices`` into ``len(proportions)`` consecutive parts of those relative sizes."""
    cuts = (np.cumsum(proportions)[:-1] * len(indices)).round().astype(int)
    return np.split(indices, cuts)


def _check_inputs(sizes: Mapping[str, int], num_clients: int, scheme: str, alpha: float) -> None:
    if scheme not in SCHEMES:
        msg = f"Unknown partition scheme {scheme!r}; choose one of {list(SCHEMES)}."
        raise PartitionError(msg)
    if num_clients < 1:
        msg = f"--clients must be >= 1, got {num_clients}."
        raise PartitionError(msg)
    if not sizes:
        msg = "Nothing to partition: no products (datasets) were given."
        raise PartitionError(msg)
    empty = [name for name, size in sizes.items() if size < 1]
    if empty:
        msg = f"Product(s) {empty} have no normal training images."
        raise PartitionError(msg)
    if scheme in {"dirichlet", "quantity"} and not alpha > 0:
        msg = f"--alpha must be > 0 for the {scheme!r} scheme, got {alpha}."
        raise PartitionError(msg)
    total = sum(sizes.values())
    if total < num_clients:
        msg = (
            f"Cannot give each of {num_clients} clients a training image: the products {dict(sizes)} hold only "
            f"{total} normal training images in all. Use fewer --clients."
        )
        raise PartitionError(msg)


def _category(sizes: Mapping[str, int], num_clients: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    names = list(sizes)
    parts: list[dict[str, np.ndarray]] = [{} for _ in range(num_clients)]
    for p, name in enumerate(names):
        holders = (
            [c for c in range(num_clients) if c % len(names) == p] if num_clients > len(names) else [p % num_clients]
        )
        if sizes[name] < len(holders):
            msg = (
                f"category partition: product {name!r} has {sizes[name]} training images but is shared by "
                f"{len(holders)} clients {holders}; some would get none. Use fewer --clients."
            )
            raise PartitionError(msg)
        shuffled = rng.permutation(sizes[name])
        for holder, chunk in zip(holders, np.array_split(shuffled, len(holders)), strict=True):
            parts[holder][name] = chunk
    return parts


def _pooled(sizes: Mapping[str, int]) -> list[tuple[str, int]]:
    """Every training image of every product as ``(product, index)``, in a fixed order."""
    return [(name, i) for name, size in sizes.items() for i in range(size)]


def _held(pool: list[tuple[str, int]], chunk: np.ndarray) -> dict[str, np.ndarray]:
    """The images of ``pool`` at positions ``chunk``, grouped by product."""
    held: dict[str, list[int]] = {}
    for j in chunk:
        name, i = pool[j]
        held.setdefault(name, []).append(i)
    return {name: np.asarray(idx) for name, idx in held.items()}


def _iid(sizes: Mapping[str, int], num_clients: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    pool = _pooled(sizes)
    return [_held(pool, chunk) for chunk in np.array_split(rng.permutation(len(pool)), num_clients)]


def _dirichlet(
    sizes: Mapping[str, int], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[dict[str, np.ndarray]]:
    parts: list[dict[str, np.ndarray]] = [{} for _ in range(num_clients)]
    for name, size in sizes.items():
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        for client, chunk in enumerate(_split_by_proportions(rng.permutation(size), proportions)):
            parts[client][name] = chunk
    return parts


def _quantity(
    sizes: Mapping[str, int], num_clients: int, alpha: float, rng: np.random.Generator
) -> list[dict[str, np.ndarray]]:
    pool = _pooled(sizes)
    proportions = rng.dirichlet(np.full(num_clients, alpha))
    return [_held(pool, chunk) for chunk in _split_by_proportions(rng.permutation(len(pool)), proportions)]


def partition_indices(
    sizes: Mapping[str, int],
    num_clients: int,
    scheme: str = "dirichlet",
    *,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[ClientPartition]:
    """Split each product's training samples among ``num_clients`` clients.

    Deterministic for a given ``(sizes, num_clients, scheme, alpha, seed)``. The random schemes
    redraw (up to 100 times, still deterministically) when a draw leaves a client without
    training images, and fail if none succeeds.

    Args:
        sizes: product name -> number of normal training samples (order matters).
        num_clients: Number of clients ``N``.
        scheme: ``category``, ``iid``, ``dirichlet`` or ``quantity``.
        alpha: Dirichlet concentration (``dirichlet``, ``quantity``); small = more skewed.
        seed: Random seed.

    Raises:
        PartitionError: unknown scheme, bad option, or a client would get no training image.

    Example:
        >>> parts = partition_indices({"a": 10, "b": 10}, 2, "category")
        >>> [p.num_train for p in parts]
        [10, 10]
    """
    _check_inputs(sizes, num_clients, scheme, alpha)
    rng = np.random.default_rng(seed)
    draws = 1 if scheme in {"category", "iid"} else MAX_REDRAWS  # only random sizes can be redrawn
    for _ in range(draws):
        if scheme == "category":
            parts = _category(sizes, num_clients, rng)
        elif scheme == "iid":
            parts = _iid(sizes, num_clients, rng)
        elif scheme == "dirichlet":
            parts = _dirichlet(sizes, num_clients, alpha, rng)
        else:
            parts = _quantity(sizes, num_clients, alpha, rng)
        if min(sum(len(idx) for idx in part.values()) for part in parts) > 0:
            break
    else:
        msg = (
            f"The {scheme!r} partition (alpha={alpha}, seed={seed}) leaves a client with no training images "
            f"after {draws} draw(s) over products {dict(sizes)}; raise --alpha, use fewer --clients or more data."
        )
        raise PartitionError(msg)
    return [
        ClientPartition(
            client_id=c,
            train={name: np.sort(part.get(name, np.empty(0, dtype=int))).astype(int) for name in sizes},
        )
        for c, part in enumerate(parts)
    ]


def partition_table(
    partitions: Sequence[ClientPartition], products: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Rows ``client, product, train_images, test_images`` of who holds what (non-empty only)."""
    rows = []
    for part in partitions:
        for name in products or list(part.train):
            n_train = len(part.train.get(name, ()))
            if n_train:
                rows.append({
                    "client": part.client_id,
                    "product": name,
                    "train_images": n_train,
                    "test_images": part.num_test.get(name, 0),
                })
    return rows


def save_partition_summary(
    partitions: Sequence[ClientPartition],
    output: str | Path,
    *,
    scheme: str,
    alpha: float,
    seed: int,
    print_table: bool = True,
) -> Path:
    """Write ``partition.csv`` (the table) and ``partition.json`` (with indices); print the table.

    Returns:
        Path of the CSV file.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rows = partition_table(partitions)
    csv_path = output / "partition.csv"
    with csv_path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["client", "product", "train_images", "test_images"])
        writer.writeheader()
        writer.writerows(rows)
    (output / "partition.json").write_text(
        json.dumps(
            {"scheme": scheme, "alpha": alpha, "seed": seed, "clients": [p.as_dict() for p in partitions]}, indent=1
        )
    )
    if print_table:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"Partition: {scheme} (alpha={alpha}, seed={seed})")
        for column in ("client", "product", "train_images", "test_images"):
            table.add_column(column, justify="right" if column != "product" else "left")
        for row in rows:
            table.add_row(*(str(row[k]) for k in ("client", "product", "train_images", "test_images")))
        Console().print(table)
    return csv_path
