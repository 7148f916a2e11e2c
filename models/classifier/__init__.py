"""The acne classifier: its model and face verdict, patch data, metrics and CLIs
(``python -m models.classifier.prepare``, ``.train`` and ``.evaluate``)."""
from models.classifier.model import (
    ACNE,
    CLEAR,
    SEVERITIES,
    Classifier,
    ClassifierConfig,
    FaceScore,
    build_network,
)

__all__ = [
    "ACNE", "CLEAR", "SEVERITIES", "Classifier", "ClassifierConfig", "FaceScore", "build_network",
]
