"""Per-pixel semantic and panoptic labels of the embedded shapes dataset (:mod:`largebatch.data.shapes`), for
detectron2's SemanticSegmentor and PanopticFPN.

The detection split ``<root>/<split>`` is left exactly as it is; the labels of its images are written beside it::

    <root>/<split>_dense/sem_seg/000000.png         uint8 semantic labels, one per image (000000.jpg)
    <root>/<split>_dense/panoptic/000000.png        COCO panoptic PNG (RGB, segment id = R + 256 G + 256^2 B)
    <root>/<split>_dense/panoptic_<split>.json      COCO panoptic json (the completion marker: written last)
    <root>/<split>_dense/panoptic_stuff/000000.png  uint8 labels of PanopticFPN's semantic head

Labels are what was drawn: each pixel belongs to the shape drawn on it last (its rasterised polygon, as
``render_shapes_image(with_pixels=True)`` returns it). Shapes whose annotation the generator dropped (less than
``MIN_VISIBLE_FRACTION`` of them visible) show in the image without an annotation: their pixels are ignore / void.

* ``sem_seg``: 0 = "background" (a stuff class: no shape drawn), 1 circle, 2 square, 3 triangle (the detection
  category ids), 255 = ignore (a dropped shape).
* ``panoptic``: categories circle / square / triangle (ids 1-3, ``isthing`` 1) and "background" (id 4,
  ``isthing`` 0). One segment per annotated shape with visible pixels, its id ``k`` when it is the image's k-th
  annotation in the detection json (1-based), and one "background" segment (id 255) when the image has background
  pixels; id 0 = void (a dropped shape). ``segments_info``: id, category_id, iscrowd 0, area and bbox
  ``[x, y, w, h]`` of the visible pixels. Image ids and the ``images`` list are the detection json's.
* ``panoptic_stuff``: what detectron2's ``datasets/prepare_panoptic_fpn.py`` makes of the panoptic labels:
  0 = any thing, 1 = background (the stuff category's contiguous id), 255 = void.

Generation is deterministic (image ``i`` is re-rendered from the detection split's
``numpy.random.default_rng([seed, split_id, i])``) and race-free exactly like the detection split (shapes.py's
``_install_atomically``): written into a private temp folder, json last, renamed into place, first writer wins, a
stale folder of ours is replaced, a folder this generator did not write is refused and left alone.

Registered with detectron2's own functions by :func:`register_shapes_dense`:

* ``shapes_sem_seg_train`` / ``shapes_sem_seg_val``: :func:`load_sem_seg` (sem_seg labels), evaluator "sem_seg";
* ``shapes_panoptic_{train,val}_separated`` and ``_stuffonly``: :func:`register_coco_panoptic_separated`
  (instances from the detection json, semantic labels from ``panoptic_stuff``), metadata built as detectron2's
  COCO panoptic-separated metadata, so that COCOPanopticEvaluator and PanopticFPN work on them.
"""
import functools
import json
import os

import numpy as np
from PIL import Image

from .shapes import (
    _OWNER_FILE,
    _SPLIT_IDS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_IMAGES,
    DEFAULT_SEED,
    MAX_OBJECTS,
    SHAPES_CLASSES,
    SHAPES_SPLITS,
    _install_atomically,
    _marker,
    _split_paths,
    _write_owner_file,
    default_shapes_root,
    generate_shapes_split,
    render_shapes_image,
    write_json_last,
)

__all__ = [
    "DENSE_VERSION",
    "IGNORE_LABEL",
    "PANOPTIC_CATEGORIES",
    "SEM_SEG_CLASSES",
    "SHAPES_DENSE_DATASETS",
    "dense_labels",
    "dense_split_paths",
    "generate_shapes_dense_split",
    "prepare_shapes_dense",
    "register_shapes_dense",
]

DENSE_VERSION = 1  # bump whenever the label writing changes: cached dense labels are then regenerated

SEM_SEG_CLASSES = ("background",) + SHAPES_CLASSES  # sem_seg labels 0, 1, 2, 3
IGNORE_LABEL = 255  # sem_seg and panoptic_stuff: pixels of dropped shapes
BACKGROUND_CATEGORY_ID = len(SHAPES_CLASSES) + 1  # the panoptic stuff category (the things keep their ids 1-3)
BACKGROUND_SEGMENT_ID = 255  # panoptic id of the background segment (thing segments: 1..#annotations)
assert MAX_OBJECTS < BACKGROUND_SEGMENT_ID
PANOPTIC_CATEGORIES = [
    {"id": k + 1, "name": name, "supercategory": "shape", "isthing": 1} for k, name in enumerate(SHAPES_CLASSES)
] + [{"id": BACKGROUND_CATEGORY_ID, "name": "background", "supercategory": "background", "isthing": 0}]

SHAPES_SEM_SEG_SPLITS = {"shapes_sem_seg_train": "train", "shapes_sem_seg_val": "val"}
# base names for register_coco_panoptic_separated, which registers <base>_separated and <base>_stuffonly
_PANOPTIC_BASES = {"shapes_panoptic_train": "train", "shapes_panoptic_val": "val"}
#: dataset name -> split of every name register_shapes_dense registers
SHAPES_DENSE_DATASETS = {
    **SHAPES_SEM_SEG_SPLITS,
    **{f"{base}_{kind}": split for base, split in _PANOPTIC_BASES.items() for kind in ("separated", "stuffonly")},
}

_LABEL_DIRS = ("sem_seg", "panoptic", "panoptic_stuff")


def _sem_seg_metadata():
    """Metadata of shapes_sem_seg_*: the 4 classes of the sem_seg labels (SemSegEvaluator, SemanticSegmentor)."""
    return {"stuff_classes": list(SEM_SEG_CLASSES), "ignore_label": IGNORE_LABEL, "evaluator_type": "sem_seg"}


def _panoptic_separated_metadata():
    """Metadata of shapes_panoptic_*_separated / _stuffonly, built as detectron2's builtin COCO panoptic-separated
    metadata is: the things' dataset ids -> contiguous ids (instances, COCOPanopticEvaluator), and the semantic
    head's classes, contiguous id 0 "things" (dataset id 0, prepare_panoptic_fpn.py's convention) and 1 the
    background (dataset id 4). ignore_label and evaluator_type are set by register_coco_panoptic_separated."""
    return {
        "thing_classes": list(SHAPES_CLASSES),
        "thing_dataset_id_to_contiguous_id": {k + 1: k for k in range(len(SHAPES_CLASSES))},
        "stuff_classes": ["things", "background"],
        "stuff_dataset_id_to_contiguous_id": {0: 0, BACKGROUND_CATEGORY_ID: 1},
    }


def dense_split_paths(root, split):
    """Where the files of one split are: the detection split's json_file / image_root, and the dense labels'
    dense_root, sem_seg_root, panoptic_root, panoptic_json and panoptic_stuff_root."""
    root = os.fspath(root)
    dense_root = os.path.join(root, f"{split}_dense")
    return {
        **_split_paths(root, split),
        "dense_root": dense_root,
        "sem_seg_root": os.path.join(dense_root, "sem_seg"),
        "panoptic_root": os.path.join(dense_root, "panoptic"),
        "panoptic_json": os.path.join(dense_root, f"panoptic_{split}.json"),
        "panoptic_stuff_root": os.path.join(dense_root, "panoptic_stuff"),
    }


# ----------------------------------------------------------------------------------------------------
# labels of one image
# ----------------------------------------------------------------------------------------------------
def dense_labels(objects, pixels):
    """The labels of one image from ``render_shapes_image(..., with_pixels=True)``'s objects and pixel map.

    Returns ``(sem_seg, panoptic, panoptic_stuff, segments_info)``: sem_seg and panoptic_stuff (H, W) uint8 as in
    the module docstring, panoptic the (H, W) uint32 segment ids (0 void), segments_info the COCO panoptic segments
    (things in annotation order, then the background).
    """
    n = len(objects)
    # one lookup index per pixel: 0 a dropped shape, 1 background, k + 1 the k-th annotated object
    index = pixels + 1
    categories = [o["category_id"] for o in objects]
    sem_seg = np.array([IGNORE_LABEL, 0] + categories, dtype=np.uint8)[index]
    panoptic_stuff = np.array([IGNORE_LABEL, 1] + [0] * n, dtype=np.uint8)[index]
    segment_ids = [0, BACKGROUND_SEGMENT_ID] + list(range(1, n + 1))
    panoptic = np.array(segment_ids, dtype=np.uint32)[index]

    counts = np.bincount(index.ravel(), minlength=n + 2)
    segments_info = []
    for j, category_id in list(zip(range(2, n + 2), categories)) + [(1, BACKGROUND_CATEGORY_ID)]:
        if not counts[j]:  # nothing of it visible: no segment
            continue
        mask = index == j
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        x, y = int(cols[0]), int(rows[0])
        segments_info.append(
            {
                "id": segment_ids[j],
                "category_id": category_id,
                "iscrowd": 0,
                "area": int(counts[j]),
                "bbox": [x, y, int(cols[-1]) - x + 1, int(rows[-1]) - y + 1],
            }
        )
    return sem_seg, panoptic, panoptic_stuff, segments_info


def _id2rgb(ids):
    """Segment ids (H, W) -> the COCO panoptic RGB encoding (id = R + 256 G + 256^2 B), uint8 (H, W, 3)."""
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# writing a split's labels
# ----------------------------------------------------------------------------------------------------
def _dense_marker(split, num_images, image_size, seed):
    """What the labels depend on: their own version and the detection split's marker (its generator version)."""
    return {
        "generator": "largebatch.data.shapes_dense",
        "dense_version": DENSE_VERSION,
        "shapes": _marker(split, num_images, image_size, seed),
    }


def _write_dense(out_dir, split, num_images, image_size, seed):
    """Write the label PNGs then the panoptic json (last) of one split into ``out_dir`` (an empty directory)."""
    marker = _dense_marker(split, num_images, image_size, seed)
    _write_owner_file(out_dir, marker)
    dirs = {name: os.path.join(out_dir, name) for name in _LABEL_DIRS}
    for d in dirs.values():
        os.makedirs(d)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([int(seed), _SPLIT_IDS[split], i])  # the detection split's draws
        _, objects, pixels = render_shapes_image(rng, image_size, with_pixels=True)
        sem_seg, panoptic, panoptic_stuff, segments_info = dense_labels(objects, pixels)
        file_name = f"{i:06d}.png"
        Image.fromarray(sem_seg, "L").save(os.path.join(dirs["sem_seg"], file_name), format="PNG")
        Image.fromarray(_id2rgb(panoptic), "RGB").save(os.path.join(dirs["panoptic"], file_name), format="PNG")
        Image.fromarray(panoptic_stuff, "L").save(os.path.join(dirs["panoptic_stuff"], file_name), format="PNG")
        image_id = i + 1  # as in the detection json
        images.append({"id": image_id, "file_name": f"{i:06d}.jpg", "width": image_size, "height": image_size})
        annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments_info})
    coco = {
        "info": {
            "description": f"largebatch synthetic shapes, panoptic labels of split {split}",
            "version": str(DENSE_VERSION),
            "largebatch_shapes_dense": marker,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": PANOPTIC_CATEGORIES,
    }
    write_json_last(os.path.join(out_dir, f"panoptic_{split}.json"), coco)


def _is_valid_dense(dense_root, split, marker):
    """True iff ``dense_root`` holds the complete labels of a split generated with exactly ``marker``."""
    try:
        with open(os.path.join(dense_root, f"panoptic_{split}.json")) as f:
            coco = json.load(f)
        if coco.get("info", {}).get("largebatch_shapes_dense") != marker:
            return False
        if len(coco["annotations"]) != marker["shapes"]["num_images"]:
            return False
        expected = {a["file_name"] for a in coco["annotations"]}
        return all(expected <= set(os.listdir(os.path.join(dense_root, name))) for name in _LABEL_DIRS)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _written_by_dense(dense_root):
    """Whether this generator wrote ``dense_root`` (any version or size), so it may be replaced."""
    return os.path.isfile(os.path.join(dense_root, _OWNER_FILE))


def generate_shapes_dense_split(
    root, split, num_images=None, *, image_size=DEFAULT_IMAGE_SIZE, seed=DEFAULT_SEED, force=False
):
    """Make sure ``<root>/<split>`` (the images, see ``generate_shapes_split``) and ``<root>/<split>_dense`` (their
    labels) hold the requested split; generate what is missing or stale, race-free.

    Args:
        root: cache directory; created if missing.
        split: "train" or "val".
        num_images: defaults to 1024 for train and 128 for val.
        force: regenerate the labels even when valid ones exist (the detection split is regenerated only when it
            is missing or stale: it is the labels' input, not their output).

    Returns:
        ``dense_split_paths(root, split)``.
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}, expected one of {sorted(_SPLIT_IDS)}")
    if num_images is None:
        num_images = DEFAULT_NUM_IMAGES[split]
    root = os.fspath(root)
    generate_shapes_split(root, split, num_images, image_size=image_size, seed=seed)
    marker = _dense_marker(split, num_images, image_size, seed)
    _install_atomically(
        root,
        f"{split}_dense",
        write=lambda out_dir: _write_dense(out_dir, split, num_images, image_size, seed),
        is_valid=lambda path: _is_valid_dense(path, split, marker),
        written_by_us=_written_by_dense,
        force=force,
    )
    return dense_split_paths(root, split)


def prepare_shapes_dense(
    root=None, *, num_train=None, num_val=None, image_size=DEFAULT_IMAGE_SIZE, seed=DEFAULT_SEED, force=False
):
    """Generate (if missing/stale) both splits and their labels. Returns {"train": dense_split_paths, "val": ...}."""
    root = default_shapes_root() if root is None else os.fspath(root)
    counts = {"train": num_train, "val": num_val}
    return {
        split: generate_shapes_dense_split(root, split, counts[split], image_size=image_size, seed=seed, force=force)
        for split in SHAPES_SPLITS.values()
    }


# ----------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------
def _registered_with(name, files):
    """Whether ``name`` is registered with metadata naming exactly these files."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name not in DatasetCatalog.list():
        return False
    metadata = MetadataCatalog.get(name)
    return all(metadata.get(key) == value for key, value in files.items())


def _unregister(names):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


def register_shapes_dense(
    root=None, *, num_train=None, num_val=None, image_size=DEFAULT_IMAGE_SIZE, seed=DEFAULT_SEED, force=False
):
    """Generate the shapes images and their labels if needed and register the names of ``SHAPES_DENSE_DATASETS``
    with detectron2 (not ``shapes_train`` / ``shapes_val``: that is ``register_shapes``).

    Args: as :func:`largebatch.data.shapes.register_shapes` (``force`` regenerates the labels).

    Registration is idempotent as register_shapes': a name already registered with the same files is left alone; a
    name registered with other files (e.g. another root) is removed from DatasetCatalog and MetadataCatalog and
    re-registered, so the last call wins.

    Returns:
        {"train": dense_split_paths(...), "val": ...} (absolute paths).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import load_sem_seg, register_coco_panoptic_separated

    paths = prepare_shapes_dense(
        root, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed, force=force
    )
    paths = {split: {k: os.path.abspath(v) for k, v in p.items()} for split, p in paths.items()}
    for name, split in SHAPES_SEM_SEG_SPLITS.items():
        p = paths[split]
        files = {"image_root": p["image_root"], "sem_seg_root": p["sem_seg_root"]}
        if _registered_with(name, files):
            continue
        _unregister([name])
        loader = functools.partial(load_sem_seg, p["sem_seg_root"], p["image_root"], gt_ext="png", image_ext="jpg")
        DatasetCatalog.register(name, loader)
        MetadataCatalog.get(name).set(**files, **_sem_seg_metadata())
    for base, split in _PANOPTIC_BASES.items():
        p = paths[split]
        stuff_files = {"image_root": p["image_root"], "sem_seg_root": p["panoptic_stuff_root"]}
        files = {**stuff_files, "panoptic_root": p["panoptic_root"], "panoptic_json": p["panoptic_json"],
                 "json_file": p["json_file"]}
        names = (f"{base}_separated", f"{base}_stuffonly")
        if _registered_with(names[0], files) and _registered_with(names[1], stuff_files):
            continue
        _unregister(names)
        register_coco_panoptic_separated(
            base,
            _panoptic_separated_metadata(),
            p["image_root"],
            p["panoptic_root"],
            p["panoptic_json"],
            p["panoptic_stuff_root"],
            p["json_file"],
        )
    return paths
