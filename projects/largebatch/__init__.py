"""largebatch: large-batch training recipes (MegDet, LargeDet, CoolDet, AGVM) for detectron2.

The top-level names are loaded lazily so that ``largebatch.optim`` stays usable from plain PyTorch,
without importing detectron2.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "add_largebatch_config": "largebatch.config",
    "LargeBatchTrainer": "largebatch.engine.trainer",
    "launch": "largebatch.engine.launch",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'largebatch' has no attribute {name!r}")
