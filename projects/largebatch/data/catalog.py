"""The datasets a config names: registering the embedded ones and the user's COCO-format ones
(DATASETS.COCO_JSON), checking the names and the image files, and counting the training images."""
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from ..config import ConfigError, class_count_keys, config_value, describe_error, fail
from .shapes import SHAPES_SPLITS, ShapesRootError, default_shapes_root, register_shapes
from .shapes_dense import SHAPES_DENSE_DATASETS, register_shapes_dense

__all__ = ["check_images", "image_problem", "register_datasets", "train_set_size"]


def register_datasets(cfg) -> None:
    """Register the embedded shapes dataset when the config uses it (generated on first use; a folder that holds
    anything else is refused with a ConfigError, never replaced), its semantic / panoptic versions likewise
    (shapes_dense.py). The COCO names are detectron2's own (registered when detectron2.data is imported)."""
    names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
    detection = any(name in SHAPES_SPLITS for name in names)
    dense = any(name in SHAPES_DENSE_DATASETS for name in names)
    if detection or dense:
        root = cfg.DATASETS.SHAPES_ROOT or default_shapes_root()
        try:
            if detection:
                register_shapes(cfg.DATASETS.SHAPES_ROOT or None)
            if dense:
                register_shapes_dense(cfg.DATASETS.SHAPES_ROOT or None)
        except ShapesRootError as e:
            raise ConfigError(f"DATASETS.SHAPES_ROOT = {root!r} is not allowed: {e}") from None
        except OSError as e:  # a file where a folder of the path should be, no permission, a full disk
            file = _file_on_the_way(root)
            why = (f"{file!r} is a file, not a folder" if file else f"it cannot be written ({describe_error(e)})")
            raise ConfigError(f"DATASETS.SHAPES_ROOT = {root!r} is not allowed: {why}") from None
    for name, json_file, image_root in cfg.DATASETS.COCO_JSON:
        _register_coco_json(cfg, name, json_file, image_root, for_training=name in cfg.DATASETS.TRAIN)
    known = DatasetCatalog.list()
    for key in ("TRAIN", "TEST"):
        unknown = [name for name in cfg.DATASETS[key] if name not in known]
        if unknown:
            fail(f"DATASETS.{key}", tuple(cfg.DATASETS[key]), f"{unknown[0]!r} is not a registered dataset (known: "
                 f"shapes_train, shapes_val, {', '.join(SHAPES_DENSE_DATASETS)}, detectron2's builtin names "
                 "such as coco_2017_train)")
        for name in cfg.DATASETS[key]:  # classes known without reading the data (builtin and shapes metadata)
            for class_key, field in class_count_keys(cfg):
                classes = MetadataCatalog.get(name).get(field)
                if classes is not None and len(classes) > config_value(cfg, class_key):
                    fail(class_key, config_value(cfg, class_key),
                         f"{name!r} has {len(classes)} {field.replace('_', ' ')}: expected >= {len(classes)}")


def _file_on_the_way(path: str) -> Optional[str]:
    """The first component of ``path`` that exists as a file (so nothing can be made under it), or None."""
    path = os.path.abspath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        prefix = os.sep.join(parts[:i])
        if os.path.isfile(prefix):
            return prefix
        if not os.path.exists(prefix):
            return None
    return None


def _read_coco_json(json_file: str) -> dict:
    """The json file, or ValueError saying in words why it is not a COCO file."""
    try:
        with open(json_file) as f:
            coco = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    except UnicodeDecodeError:
        raise ValueError("not valid JSON (not UTF-8 text)") from None
    if not isinstance(coco, dict):
        raise ValueError(f"not a COCO file: a JSON {type(coco).__name__}, expected an object")
    for field in ("images", "categories"):
        if not isinstance(coco.get(field), list):
            raise ValueError(f'not a COCO file: no "{field}" list' if field not in coco else
                             f'not a COCO file: "{field}" is a {type(coco[field]).__name__}, expected a list')
    return coco


def _register_coco_json(cfg, name, json_file, image_root, for_training=False) -> None:
    """One DATASETS.COCO_JSON entry: checked (files, json, categories vs NUM_CLASSES, annotations when it is
    trained on), then registered with detectron2's register_coco_instances. Registering the same files again
    under the same name is a no-op."""
    key = "DATASETS.COCO_JSON"
    entry = (name, json_file, image_root)
    if name in DatasetCatalog.list():
        metadata = MetadataCatalog.get(name)
        if metadata.get("json_file") == json_file and metadata.get("image_root") == image_root:
            return
        fail(key, entry, f"{name!r} is already a registered dataset (detectron2's or another entry's): pick a new name")
    if not os.path.isfile(json_file):
        fail(key, entry, f"{json_file!r} is not a file")
    if not os.path.isdir(image_root):
        fail(key, entry, f"{image_root!r} is not a folder")
    try:
        coco = _read_coco_json(json_file)
    except OSError as e:
        fail(key, entry, f"{json_file!r} cannot be read ({describe_error(e)})")
    except ValueError as e:
        fail(key, entry, f"{json_file!r} is {e}")
    categories, images = len(coco["categories"]), len(coco["images"])
    if not images:
        fail(key, entry, f"{json_file!r} lists no images")
    missing = [im.get("file_name") for im in coco["images"]
               if not os.path.isfile(os.path.join(image_root, str(im.get("file_name"))))]
    if missing:
        fail(key, entry, f"{len(missing)} of its {images} images are not files under {image_root!r} "
                         f"(first: {missing[0]!r})")
    if for_training and not _has_trainable_annotations(coco):
        fail(key, entry, f"{json_file!r} has no annotations (no non-crowd object in any of its {images} images): "
                         "nothing to train on; it can serve DATASETS.TEST only if it has them")
    class_key = class_count_keys(cfg)[0][0]  # a COCO json's categories are things
    num_classes = config_value(cfg, class_key)
    if categories > num_classes:
        fail(class_key, num_classes,
             f"{name!r} (DATASETS.COCO_JSON) has {categories} categories: expected >= {categories}")
    register_coco_instances(name, {}, json_file, image_root)


def _has_trainable_annotations(coco: dict) -> bool:
    """Whether detectron2's training loader finds an object to train on (it drops crowd objects and, by default,
    images without objects, and stops with "No valid data found" when nothing is left)."""
    annotations = coco.get("annotations")
    return isinstance(annotations, list) and any(isinstance(a, dict) and not a.get("iscrowd", 0) for a in annotations)


#: EXIF orientations that turn the image by 90 degrees: detectron2's read_image applies them, so width and height swap
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def image_problem(path: str, expected_size: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """What makes ``path`` unusable as a training image, or None. Cheap (a few hundred bytes read): the header must
    name an image format PIL reads (``Image.open`` reads nothing more), and a JPEG must hold its end marker near its
    end, a PNG its IEND chunk: a missing file, a file that is no image and a truncated copy are caught; damage inside
    the image data is not (that would take decoding every image). ``expected_size``: the (width, height) the
    annotations give, compared with the header's as detectron2 compares them when it reads the image (after the
    EXIF rotation it applies), where it would stop training with a SizeMismatchError."""
    try:
        with Image.open(path) as image:
            kind, size = image.format, image.size
            if image.getexif().get(0x0112) in _TRANSPOSING_ORIENTATIONS:
                size = size[::-1]
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 1024))  # the end, with room for padding some writers append
            tail = f.read()
    except FileNotFoundError:
        return "no such file"
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        return f"not an image ({describe_error(e, 80)})"
    if kind == "JPEG" and b"\xff\xd9" not in tail:
        return "truncated (no JPEG end marker)"
    if kind == "PNG" and b"IEND" not in tail:
        return "truncated (no PNG IEND chunk)"
    if expected_size is not None and tuple(size) != tuple(expected_size):
        return (f"{size[0]}x{size[1]} pixels where its annotations say {expected_size[0]}x{expected_size[1]} "
                "(width x height)")
    return None


def _annotated_size(record: dict) -> Optional[Tuple[int, int]]:
    """(width, height) of a dataset record, where it gives them (detectron2 checks them against the image)."""
    if "width" in record and "height" in record:
        return int(record["width"]), int(record["height"])
    return None


def check_images(cfg, keys=("TRAIN", "TEST")) -> None:
    """Every image of the datasets of DATASETS.<keys> (the embedded, COCO_JSON and detectron2's builtin ones):
    ``image_problem`` on each (its header against the annotated size too), in 16 threads (the files may sit on a
    network file system). The first dataset with a bad image is a ConfigError naming the key, how many are bad and
    the first. Off with DATASETS.CHECK_IMAGES False.

    Its cost: reading the dataset's annotations once more (detectron2's loader; for COCO train2017, about 20 s)
    and a few hundred bytes of every image (measured here: 1,152 shapes images in 0.1 s)."""
    if not cfg.DATASETS.CHECK_IMAGES:
        return
    for key in keys:
        for name in cfg.DATASETS[key]:
            try:
                records = DatasetCatalog.get(name)
            except Exception as e:  # noqa: BLE001 - a missing or broken annotation file, whatever the loader raises
                fail(f"DATASETS.{key}", tuple(cfg.DATASETS[key]),
                     f"{name!r} cannot be loaded ({describe_error(e, 160)})")
            files = [d["file_name"] for d in records]
            with ThreadPoolExecutor(max_workers=16) as pool:
                found = pool.map(image_problem, files, [_annotated_size(d) for d in records])
                problems = [(f, p) for f, p in zip(files, found) if p is not None]
            if problems:
                first, why = problems[0]
                fail(f"DATASETS.{key}", tuple(cfg.DATASETS[key]), f"{len(problems)} of the {len(files)} images of "
                     f"{name!r} cannot be used (first: {first!r}: {why}; DATASETS.CHECK_IMAGES False skips this check)")


def train_set_size(cfg) -> Optional[int]:
    """Number of training images: the summed lengths of DATASETS.TRAIN in DatasetCatalog (before detectron2's
    filtering of images without annotations), or None when one of them is not registered."""
    names = list(cfg.DATASETS.TRAIN)
    if not names or any(n not in DatasetCatalog.list() for n in names):
        return None
    return sum(len(DatasetCatalog.get(n)) for n in names)
