"""The datasets a config names: registering the embedded ones, and counting the training images."""
from typing import Optional

__all__ = ["register_datasets", "train_set_size"]


def register_datasets(cfg) -> None:
    """Register the embedded shapes dataset when the config uses it (generated on first use). The COCO names
    are detectron2's own (registered when detectron2.data is imported)."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(name.startswith("shapes_") for name in names):
        from .shapes import register_shapes

        register_shapes(cfg.DATASETS.SHAPES_ROOT or None)


def train_set_size(cfg) -> Optional[int]:
    """Number of training images: the summed lengths of DATASETS.TRAIN in DatasetCatalog (before detectron2's
    filtering of images without annotations), or None when one of them is not registered."""
    from detectron2.data import DatasetCatalog

    names = list(cfg.DATASETS.TRAIN)
    if not names or any(n not in DatasetCatalog.list() for n in names):
        return None
    return sum(len(DatasetCatalog.get(n)) for n in names)
