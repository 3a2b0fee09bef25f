"""FastPatchcore: anomalib's Patchcore with the exact fast coreset sampler (same model, same checkpoints)."""

from .lightning_model import FastPatchcore

__all__ = ["FastPatchcore"]
