"""The skin segmenter: its model, data, metrics, colour baseline and CLIs
(``python -m models.segmenter.train`` and ``python -m models.segmenter.evaluate``)."""
from models.segmenter.model import DEFAULT_CHECKPOINT, Segmenter, SegmenterConfig, build_network

__all__ = ["DEFAULT_CHECKPOINT", "Segmenter", "SegmenterConfig", "build_network"]
