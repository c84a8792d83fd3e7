"""Datasets of the largebatch project.

``shapes_train`` / ``shapes_val``: an embedded, deterministic synthetic detection + instance
segmentation dataset (see :mod:`largebatch.data.shapes`), with semantic and panoptic labels
(:mod:`largebatch.data.shapes_dense`). :func:`register_datasets` (``catalog.py``)
registers what a config names; :func:`train_set_size` counts its training images.

Names are resolved lazily, so that ``python -m largebatch.data.shapes`` runs without a runpy warning and
importing this package pulls in neither detectron2 nor the trainer.
"""
import importlib

_LAZY = {
    "register_datasets": "largebatch.data.catalog",
    "check_images": "largebatch.data.catalog",
    "train_set_size": "largebatch.data.catalog",
    "ResumableTrainLoader": "largebatch.data.resumable",
    "register_shapes": "largebatch.data.shapes",
    "prepare_shapes": "largebatch.data.shapes",
    "generate_shapes_split": "largebatch.data.shapes",
    "render_shapes_image": "largebatch.data.shapes",
    "default_shapes_root": "largebatch.data.shapes",
    "SHAPES_CLASSES": "largebatch.data.shapes",
    "SHAPES_SPLITS": "largebatch.data.shapes",
    "register_shapes_dense": "largebatch.data.shapes_dense",
    "SHAPES_DENSE_DATASETS": "largebatch.data.shapes_dense",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'largebatch.data' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
