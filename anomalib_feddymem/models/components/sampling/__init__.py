"""Coreset samplers, as ``anomalib.models.components.sampling`` keeps them."""

from .k_center_greedy import FastKCenterGreedy, k_center_greedy

__all__ = ["FastKCenterGreedy", "k_center_greedy"]
