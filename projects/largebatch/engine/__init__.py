from .launch import launch
from .trainer import LargeBatchTrainer

__all__ = ["launch", "LargeBatchTrainer"]
