"""Training: TrainConfig, the loop (trainer.py), checkpoints, distributed wrapping, FLOPs and MFU."""
from .config import TrainConfig
from .trainer import TrainError, train

__all__ = ["TrainConfig", "TrainError", "train"]
