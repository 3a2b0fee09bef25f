"""Federate FedDyMem over three MVTec-layout folders in this process, one site per folder.

Usage::

    python examples/federate_three_folders.py ../shared/data mvtec_bottle,mpdd_metal_plate,headct
"""

from __future__ import annotations

import sys

from anomalib_feddymem.federation import FederationConfig, simulate


def main(data_root: str, datasets: str) -> None:
    """Three clients, one product each (``category`` partition), three rounds; prints the last round."""
    config = FederationConfig(
        data_root=data_root, datasets=datasets.split(","), clients=3, partition="category", rounds=3,
        image_size=128, output="results/federate_three_folders",
    )  # fmt: skip
    result = simulate(config)
    for row in result.rows:
        if row["round"] == config.rounds:
            print(f"client {row['client']}: image AUROC {row['image_auroc']:.3f}, uploaded {row['upload_bytes']} B")
    print(f"Global memory: {tuple(result.global_memory.shape)}; metrics in {result.output / 'metrics.csv'}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
