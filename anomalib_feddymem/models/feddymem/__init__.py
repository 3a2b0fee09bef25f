"""FedDyMem: federated dynamic memory for unsupervised image anomaly detection.

Reconstruction of Chen et al., "FedDyMem" (arXiv 2502.21012, 2025) from the paper's abstract; see
``DESIGN.md``. ``torch_model`` is the export surface, ``lightning_model`` the anomalib module,
``anomaly_map`` the patch scores to image maps (as Patchcore's), ``loss`` the metric loss and
``memory`` the memory bank maths shared with the federation.
"""

from .lightning_model import FedDyMem
from .torch_model import FedDyMemModel

__all__ = ["FedDyMem", "FedDyMemModel"]
