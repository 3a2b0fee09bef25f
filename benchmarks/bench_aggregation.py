r"""Seconds and peak memory of the server's aggregation for 4, 16 and 100 clients.

Every client uploads ``--items`` reduced memory items of dimension ``--dim`` (drawn around
``--modes`` random modes, like real uploads, which cluster by product and texture); the server
groups the union into a global memory of ``--size`` items with
:func:`~anomalib_feddymem.models.feddymem.memory.aggregate_memories`, once per ``--methods``.
Each measurement runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is
its own; the size of the uploads themselves is printed beside it. ``--reference`` also times
scikit-learn's ``KMeans`` (k-means++ seeding, the server's previous implementation) on the
smallest client count, for a ratio measured in the same run.

Usage::

    MALLOC_MMAP_THRESHOLD_=131072 .venv/bin/python benchmarks/bench_aggregation.py \
        --clients 4,16,100 --items 4096 --size 4096 --dim 152 --methods coreset,kcenter,kmeans --reference
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

__all__ = ["main"]


def _uploads(clients: int, items: int, dim: int, modes: int, seed: int):  # noqa: ANN202 - torch imported lazily
    import torch

    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(modes, dim, generator=generator) * 4
    uploads = []
    for _ in range(clients):
        which = torch.randint(modes, (items,), generator=generator)
        points = centres[which] + torch.randn(items, dim, generator=generator)
        weights = torch.randint(1, 50, (items,), generator=generator).float()
        uploads.append((points, weights))
    return uploads


def _measure(args: argparse.Namespace) -> dict:
    """One aggregation in this process: seconds, peak RSS, upload bytes."""
    import resource
    import time

    import torch

    torch.set_num_threads(args.threads)
    from anomalib_feddymem.models.feddymem.memory import aggregate_memories
    from sklearn.cluster import KMeans

    uploads = _uploads(args.clients_one, args.items, args.dim, args.modes, args.seed)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after imports and uploads
    start = time.perf_counter()
    if args.method == "sklearn":
        x = torch.cat([u[0] for u in uploads]).double().numpy()
        w = torch.cat([u[1] for u in uploads]).double().numpy()
        KMeans(n_clusters=args.size, n_init=1, max_iter=100, random_state=args.seed, tol=1e-6).fit(x, sample_weight=w)
        rows = args.size
    else:
        memory, _ = aggregate_memories(uploads, args.size, seed=args.seed, method=args.method)
        rows = memory.shape[0]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    upload_mb = sum(u[0].numel() * 4 + u[1].numel() * 4 for u in uploads) / 2**20
    return {
        "clients": args.clients_one,
        "method": args.method,
        "seconds": seconds,
        "peak_mb": peak / 1024,
        "growth_mb": (peak - base) / 1024,  # beyond the uploads already held
        "upload_mb": upload_mb,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    """Run every (clients, method) in its own process and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="4,16,100", help="comma-separated client counts")
    parser.add_argument("--items", type=int, default=4096, help="uploaded items per client")
    parser.add_argument("--size", type=int, default=4096, help="global memory size")
    parser.add_argument("--dim", type=int, default=152, help="item dimension")
    parser.add_argument("--modes", type=int, default=256, help="modes the synthetic uploads cluster around")
    parser.add_argument("--methods", default="coreset,kcenter,kmeans", help="grouping methods of aggregate_memories")
    parser.add_argument("--reference", action="store_true", help="also time scikit-learn KMeans at the smallest count")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.clients_one is not None:  # a child: one measurement, printed as JSON
        print(json.dumps(_measure(args)))
        return 0

    counts = [int(c) for c in args.clients.split(",")]
    jobs = [(count, method) for count in counts for method in args.methods.split(",")]
    if args.reference:
        jobs.insert(0, (min(counts), "sklearn"))
    print(f"{args.items} items x {args.dim} dims per client into {args.size}; torch threads {args.threads}")
    print(f"{'clients':>7} {'method':>8} {'seconds':>8} {'peak MB':>8} {'growth MB':>9} {'uploads MB':>10}")
    for count, method in jobs:
        child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
        child += ["--clients-one", str(count), "--method", method]
        done = subprocess.run(child, capture_output=True, text=True, check=False)  # noqa: S603 - our own script
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return done.returncode
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{row['clients']:>7} {row['method']:>8} {row['seconds']:>8.2f} {row['peak_mb']:>8.0f} "
            f"{row['growth_mb']:>9.0f} {row['upload_mb']:>10.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
