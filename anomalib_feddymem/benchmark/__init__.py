"""The benchmark of FedDyMem against Patchcore: ``feddymem benchmark`` (issue: benchmark against PatchCore).

* :mod:`.config`: :class:`BenchmarkConfig` (YAML in ``anomalib_feddymem/configs/benchmark/``);
* :mod:`.methods`: the five methods (federated/central FedDyMem, central/local/federated Patchcore);
* :mod:`.timing`: torch and OpenVINO inference time on the same images;
* :mod:`.report`: ``results.csv``, ``results.md``, ablation tables and plots;
* :mod:`.runner`: :func:`run_benchmark` and :func:`run_ablations`.

Names are imported lazily so that ``import anomalib_feddymem.benchmark.config`` stays light.
"""

from __future__ import annotations

from anomalib_feddymem._lazy import lazy_attributes

_LAZY = {
    "ABLATIONS": ".config",
    "METHODS": ".config",
    "BenchmarkConfig": ".config",
    "load_benchmark_config": ".config",
    "BenchmarkResult": ".runner",
    "run_ablations": ".runner",
    "run_benchmark": ".runner",
}

__all__ = sorted(_LAZY)  # noqa: PLE0605 - the lazily imported names

__getattr__ = lazy_attributes(__name__, _LAZY)
