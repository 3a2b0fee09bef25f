"""Models of anomalib-feddymem, laid out like ``anomalib.models.image``."""
