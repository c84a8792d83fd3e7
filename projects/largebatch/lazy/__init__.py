"""largebatch in detectron2's LazyConfig (Python) configs.

    from largebatch.lazy import get_part_params, largebatch_node
    from largebatch.optim import AGVM, LAMB
    optimizer = L(AGVM)(optimizer=L(LAMB)(params=L(get_part_params)(weight_decay_norm=0.0), lr=0.004), interval=10)
    largebatch = largebatch_node()  # SyncBN groups, monitor, accumulation, LR scaling rule
    largebatch.sync_bn.enabled = True

``train_net.py --config-file X.py [key=value ...]`` trains it (``config.py``: loading and the run config;
``trainer.py``: LazyLargeBatchTrainer; ``params.py``: the part-aware param groups).
"""
import importlib

_LAZY = {
    "get_part_params": "largebatch.lazy.params",
    "largebatch_node": "largebatch.lazy.config",
    "load_lazy_config": "largebatch.lazy.config",
    "is_lazy_config": "largebatch.lazy.config",
    "LazyLargeBatchTrainer": "largebatch.lazy.trainer",
    "build_lazy_model": "largebatch.lazy.trainer",
    "build_lazy_optimizer": "largebatch.lazy.trainer",
    "lazy_test": "largebatch.lazy.trainer",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'largebatch.lazy' has no attribute {name!r}")
