"""The checkpoints this project ships, used whenever a command is given no checkpoint."""
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEGMENTER = str(HERE / "segmenter")
CLASSIFIER = str(HERE / "classifier")
