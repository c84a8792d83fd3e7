"""The datasets a config names: registering the embedded ones, and counting the training images."""
from typing import Optional

__all__ = ["register_datasets", "train_set_size"]


def register_datasets(cfg) -> None:
    """Register the embedded shapes dataset when the config uses it (generated on first use; a folder that holds
    anything else is refused with a ConfigError, never replaced). The COCO names are detectron2's own
    (registered when detectron2.data is imported)."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    if any(name.startswith("shapes_") for name in names):
        from ..config import ConfigError
        from .shapes import ShapesRootError, default_shapes_root, register_shapes

        try:
            register_shapes(cfg.DATASETS.SHAPES_ROOT or None)
        except ShapesRootError as e:
            root = cfg.DATASETS.SHAPES_ROOT or default_shapes_root()
            raise ConfigError(f"DATASETS.SHAPES_ROOT = {root!r} is not allowed: {e}") from None
    from detectron2.data import DatasetCatalog

    from ..config import fail

    known = DatasetCatalog.list()
    for key in ("TRAIN", "TEST"):
        unknown = [name for name in cfg.DATASETS[key] if name not in known]
        if unknown:
            fail(f"DATASETS.{key}", tuple(cfg.DATASETS[key]), f"{unknown[0]!r} is not a registered dataset (known: "
                 f"shapes_train, shapes_val, detectron2's builtin names such as coco_2017_train)")


def train_set_size(cfg) -> Optional[int]:
    """Number of training images: the summed lengths of DATASETS.TRAIN in DatasetCatalog (before detectron2's
    filtering of images without annotations), or None when one of them is not registered."""
    from detectron2.data import DatasetCatalog

    names = list(cfg.DATASETS.TRAIN)
    if not names or any(n not in DatasetCatalog.list() for n in names):
        return None
    return sum(len(DatasetCatalog.get(n)) for n in names)
