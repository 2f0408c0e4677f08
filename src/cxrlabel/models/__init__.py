"""Models: the backbone/head factory, checkpoints, thresholds, runnable models (single,
ensemble, ONNX) and the run folder."""

from cxrlabel.models.factory import create_model

__all__ = ["create_model"]
