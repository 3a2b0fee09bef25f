"""Components the models share, laid out like ``anomalib.models.components``.

* :mod:`.sampling`: the exact, fast k-center greedy coreset sampler;
* :mod:`.weights`: offline ImageNet weights for timm backbones.

Nothing here imports a model; the models import from here.
"""
