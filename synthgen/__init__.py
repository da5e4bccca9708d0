"""synthgen: synthetic medical-image datasets from a YAML recipe."""

__version__ = "0.1.0"
