"""Embedded synthetic detection / instance-segmentation dataset: ``shapes_train`` and ``shapes_val``.

Every image is a 128x128 RGB picture with 1-4 filled shapes (circle, square, triangle) of random colour,
size (16-64 px) and rotation on a random background (a two-colour linear gradient plus mild pixel
noise). Shapes may overlap; ground truth is exact w.r.t. the drawn pixels:

* each annotation's polygon is exactly the polygon that was rasterised into the image (a circle is a
  24-gon), and stays the *full* polygon when the shape is partly occluded by a later one (COCO style);
* ``bbox`` is the tight box of that polygon (shapes are placed fully inside the image, so clipping to
  the image is a no-op), ``area`` its shoelace area;
* placements that would hide more than half of an earlier shape are re-sampled, and, as a last
  safeguard, a shape whose visible part (computed with rasterised PIL masks) is below
  ``MIN_VISIBLE_FRACTION`` of its own mask is dropped from the annotations.

The dataset is written once to a cache directory as COCO json + JPEG images (quality 95, no chroma subsampling)::

    <root>/train/instances_train.json      <root>/train/images/000000.jpg ...
    <root>/val/instances_val.json          <root>/val/images/000000.jpg ...

and registered with detectron2's :func:`register_coco_instances`, so detectron2's real COCO loader
and :class:`COCOEvaluator` are exercised. ``root`` defaults to
``os.path.join(os.environ.get("LARGEBATCH_DATASETS", "datasets"), "shapes")``.

Generation is deterministic: image ``i`` of a split is drawn from
``numpy.random.default_rng([seed, split_id, i])``, so the same parameters give byte-identical json and
JPEG files, independently of who generates them.

Concurrency: many processes (e.g. all ranks of a launch) may call :func:`register_shapes` at once
without a lock. Each writer builds a split in a private temp directory (``.tmp-<split>-<host>-<pid>-
<uuid>``) with the json, which is the completion marker, written last, then ``os.rename``\\ s the whole
directory onto ``<root>/<split>``. Renaming a directory onto an existing non-empty one fails, so the
first writer wins; losers validate the winner's marker and delete their temp directory. A stale split
(json ``info`` marker differs from the requested generator version / parameters) is first renamed
aside, then replaced the same way. Readers only ever see a complete split. Temp directories of dead
processes on this host (or older than a day) are removed on the next call.

Per-pixel semantic and panoptic labels of the same images (``<root>/<split>_dense``, written the same race-free
way by ``_install_atomically``) are :mod:`largebatch.data.shapes_dense`'s.

Command line (``--dense``: the dense labels too)::

    PYTHONPATH=projects python -m largebatch.data.shapes --root DIR [--force] [--dense]
"""
import argparse
import errno
import json
import math
import os
import shutil
import socket
import time
import uuid
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_SPLITS",
    "GENERATOR_VERSION",
    "PIXEL_BACKGROUND",
    "PIXEL_DROPPED",
    "default_shapes_root",
    "generate_shapes_split",
    "prepare_shapes",
    "register_shapes",
    "render_shapes_image",
]

SHAPES_CLASSES = ("circle", "square", "triangle")  # category ids 1, 2, 3
SHAPES_SPLITS = {"shapes_train": "train", "shapes_val": "val"}  # dataset name -> split directory
_SPLIT_IDS = {"train": 0, "val": 1}  # part of the per-image seed, so the splits are disjoint draws
GENERATOR_VERSION = 1  # bump whenever the drawing code changes: cached datasets are then regenerated

DEFAULT_NUM_IMAGES = {"train": 1024, "val": 128}
DEFAULT_IMAGE_SIZE = 128
DEFAULT_SEED = 0

MIN_SHAPE_SIZE = 16  # longest side of a shape's box, px
MAX_SHAPE_SIZE = 64
MAX_OBJECTS = 4
MIN_VISIBLE_FRACTION = 0.4  # annotations of shapes less visible than this are dropped
PIXEL_BACKGROUND = 0  # render_shapes_image(with_pixels=True): no shape drawn here
PIXEL_DROPPED = -1  # ... the top shape here was drawn but its annotation dropped (k > 0: the k-th object)
_PLACEMENT_MIN_VISIBLE = 0.5  # placements hiding more of an earlier shape are re-sampled
_PLACEMENT_TRIES = 10
_CIRCLE_VERTICES = 24
_MIN_COLOR_DISTANCE = 90.0  # RGB euclidean distance of a shape's colour to background and overlapped shapes
_NOISE_STD = 6.0
_ORPHAN_MAX_AGE_S = 24 * 3600
_HOSTNAME = socket.gethostname().replace("-", "_") or "host"


def default_shapes_root():
    """``$LARGEBATCH_DATASETS/shapes`` (``LARGEBATCH_DATASETS`` defaults to ``datasets``)."""
    return os.path.join(os.environ.get("LARGEBATCH_DATASETS", "datasets"), "shapes")


# ----------------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------------
def _unit_polygon(cls_name, rng):
    """Vertices (N, 2) of a shape centred at the origin, before scaling."""
    if cls_name == "circle":
        t = np.arange(_CIRCLE_VERTICES) * (2 * math.pi / _CIRCLE_VERTICES)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1)
    elif cls_name == "square":  # squares and mildly elongated rectangles, rotated by at most 30 degrees
        aspect = rng.uniform(0.7, 1.0)
        pts = np.array([[-1.0, -aspect], [1.0, -aspect], [1.0, aspect], [-1.0, aspect]])
        if rng.random() < 0.5:
            pts = pts[:, ::-1].copy()
        pts = pts @ _rotation(rng.uniform(-math.pi / 6, math.pi / 6)).T
    elif cls_name == "triangle":  # equilateral, any rotation
        t = np.arange(3) * (2 * math.pi / 3)
        pts = np.stack([np.cos(t), np.sin(t)], axis=1) @ _rotation(rng.uniform(0, 2 * math.pi)).T
    else:
        raise ValueError(cls_name)
    return pts


def _rotation(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s], [s, c]])


def _sample_polygon(cls_name, rng, image_size):
    pts = _unit_polygon(cls_name, rng)
    pts = pts - pts.min(axis=0)
    size = math.exp(rng.uniform(math.log(MIN_SHAPE_SIZE), math.log(MAX_SHAPE_SIZE)))  # log-uniform
    pts = pts * (size / pts.max())
    extent = pts.max(axis=0)
    # keep a 1 px margin: the shape lies fully inside the image, so its box needs no clipping
    offset = np.array([rng.uniform(1.0, image_size - 1.0 - extent[0]), rng.uniform(1.0, image_size - 1.0 - extent[1])])
    pts = np.round(pts + offset, 2)
    return np.clip(pts, 0.0, float(image_size))


def _rasterize(poly, image_size):
    mask = Image.new("L", (image_size, image_size), 0)
    ImageDraw.Draw(mask).polygon([tuple(p) for p in poly.tolist()], fill=1)
    return np.asarray(mask, dtype=bool)


def _visible_fractions(masks):
    """For masks in drawing order (later ones on top): fraction of each mask not covered by later ones."""
    fractions = []
    covered = np.zeros_like(masks[0]) if masks else None
    for m in reversed(masks):
        total = int(m.sum())
        fractions.append(float((m & ~covered).sum()) / total if total else 0.0)
        covered = covered | m
    return fractions[::-1]


def _polygon_area(poly):
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _random_color(rng, avoid):
    """A random RGB colour at least _MIN_COLOR_DISTANCE away from every colour in ``avoid``."""
    for _ in range(100):
        c = rng.integers(0, 256, size=3)
        if all(np.linalg.norm(c - np.asarray(a, dtype=np.float64)) >= _MIN_COLOR_DISTANCE for a in avoid):
            return c
    return c  # practically unreachable; a low-contrast shape is still a valid sample


_GRIDS = {}


def _unit_grid(image_size):
    """Cached pixel-coordinate grids (x, y), float32, centred and scaled to [-0.5, 0.5]."""
    if image_size not in _GRIDS:
        v = np.arange(image_size, dtype=np.float32) / np.float32(max(image_size - 1, 1)) - np.float32(0.5)
        shape = (image_size, image_size)
        _GRIDS[image_size] = (np.broadcast_to(v[None, :], shape), np.broadcast_to(v[:, None], shape))
    return _GRIDS[image_size]


def _to_uint8(arr):
    """Round float32 pixel values (half up) and saturate to uint8."""
    arr = arr + np.float32(0.5)
    np.clip(arr, 0.0, 255.0, out=arr)
    return arr.astype(np.uint8)


def render_shapes_image(rng, image_size=DEFAULT_IMAGE_SIZE, with_pixels=False):
    """Draw one image. Returns ``(PIL.Image RGB, [dict(category_id, polygon (N,2) float array)])``, the objects
    in drawing order (later ones on top).

    With ``with_pixels`` also the per-pixel map of which drawn shape covers each pixel last, an (H, W) int32
    array: ``PIXEL_BACKGROUND`` (0) where no shape was drawn, ``k`` (1-based) where ``objects[k - 1]`` is on top,
    ``PIXEL_DROPPED`` (-1) where the top shape is one the ``MIN_VISIBLE_FRACTION`` safeguard dropped (its pixels
    show a shape that has no annotation). A shape's pixels are its rasterised polygon (``_rasterize``), which is
    exactly what was drawn. The map is built from the masks the drawing computes anyway, so the same random
    numbers are consumed and the image and objects are the same with or without it.
    """
    # background: linear gradient between two random colours along a random direction
    c0 = rng.integers(0, 256, size=3).astype(np.float32)
    c1 = rng.integers(0, 256, size=3).astype(np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    xx, yy = _unit_grid(image_size)
    t = xx * np.float32(math.cos(ang)) + yy * np.float32(math.sin(ang))
    t -= t.min()
    t /= max(float(t.max()), 1e-6)
    bg = c0 + t[..., None] * (c1 - c0)
    img = Image.fromarray(_to_uint8(bg), "RGB")
    draw = ImageDraw.Draw(img)

    objects, masks, colors = [], [], []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        cls = int(rng.integers(len(SHAPES_CLASSES)))
        for _try in range(_PLACEMENT_TRIES):
            poly = _sample_polygon(SHAPES_CLASSES[cls], rng, image_size)
            mask = _rasterize(poly, image_size)
            if not mask.any():
                continue
            if all(f >= _PLACEMENT_MIN_VISIBLE for f in _visible_fractions(masks + [mask])[:-1]):
                break
        else:
            continue  # no placement keeps the earlier shapes visible enough: skip this object
        overlapped = [colors[j] for j, m in enumerate(masks) if (m & mask).any()]
        color = _random_color(rng, [c0, c1] + overlapped)
        draw.polygon([tuple(p) for p in poly.tolist()], fill=tuple(int(v) for v in color))
        objects.append({"category_id": cls + 1, "polygon": poly})
        masks.append(mask)
        colors.append(color)

    # mild pixel noise over everything (shapes are not perfectly flat)
    noise = rng.standard_normal((image_size, image_size, 3), dtype=np.float32) * np.float32(_NOISE_STD)
    arr = np.asarray(img, dtype=np.float32) + noise
    img = Image.fromarray(_to_uint8(arr), "RGB")

    # final safeguard: shapes mostly hidden by later ones get no annotation
    kept = [f >= MIN_VISIBLE_FRACTION for f in _visible_fractions(masks)] if masks else []
    annotated = [o for o, keep in zip(objects, kept) if keep]
    if not with_pixels:
        return img, annotated
    pixels = np.full((image_size, image_size), PIXEL_BACKGROUND, dtype=np.int32)
    index = 0  # of the annotated object
    for mask, keep in zip(masks, kept):  # drawing order: a later shape overwrites an earlier one
        if keep:
            index += 1
        pixels[mask] = index if keep else PIXEL_DROPPED
    return img, annotated, pixels


# ----------------------------------------------------------------------------------------------------
# writing a split
# ----------------------------------------------------------------------------------------------------
def _marker(split, num_images, image_size, seed):
    return {
        "generator": "largebatch.data.shapes",
        "generator_version": GENERATOR_VERSION,
        "split": split,
        "num_images": int(num_images),
        "image_size": int(image_size),
        "seed": int(seed),
        "classes": list(SHAPES_CLASSES),
    }


def _split_paths(root, split):
    split_dir = os.path.join(root, split)
    return {
        "json_file": os.path.join(split_dir, f"instances_{split}.json"),
        "image_root": os.path.join(split_dir, "images"),
    }


def _write_split(out_dir, split, num_images, image_size, seed):
    """Write images then the json (last) of one split into ``out_dir`` (an empty directory)."""
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir)
    _write_owner_file(out_dir, _marker(split, num_images, image_size, seed))
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([int(seed), _SPLIT_IDS[split], i])
        img, objects = render_shapes_image(rng, image_size)
        file_name = f"{i:06d}.jpg"
        # JPEG q95 without chroma subsampling: ~8 KB/image, 20x faster to encode than PNG of the noisy
        # pixels, and edges stay within ~1 px of the polygons
        img.save(os.path.join(image_dir, file_name), format="JPEG", quality=95, subsampling=0)
        image_id = i + 1
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        for obj in objects:
            poly = obj["polygon"]
            x0, y0 = poly.min(axis=0)
            x1, y1 = poly.max(axis=0)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj["category_id"],
                    "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                    "area": round(_polygon_area(poly), 2),
                    "iscrowd": 0,
                    "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]],
                }
            )
    coco = {
        "info": {
            "description": f"largebatch synthetic shapes, split {split}",
            "version": str(GENERATOR_VERSION),
            "largebatch_shapes": _marker(split, num_images, image_size, seed),
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(SHAPES_CLASSES)],
    }
    write_json_last(os.path.join(out_dir, f"instances_{split}.json"), coco)


def write_json_last(json_file, data):
    """Write a split's json, its completion marker, compact and whole (a temporary name, then renamed): the last
    file of a split that the writer writes."""
    tmp_json = json_file + ".tmp"
    with open(tmp_json, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp_json, json_file)


def _is_valid_split(split_dir, split, marker):
    """True iff ``split_dir`` holds a complete split generated with exactly ``marker``."""
    json_file = os.path.join(split_dir, f"instances_{split}.json")
    try:
        with open(json_file) as f:
            coco = json.load(f)
        if coco.get("info", {}).get("largebatch_shapes") != marker:
            return False
        if len(coco["images"]) != marker["num_images"]:
            return False
        present = set(os.listdir(os.path.join(split_dir, "images")))
        return all(im["file_name"] in present for im in coco["images"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


class ShapesRootError(ValueError):
    """The shapes folder holds files that largebatch did not write: they are left alone and nothing is generated."""


_OWNER_FILE = ".largebatch-shapes"


def _write_owner_file(out_dir, marker):
    """The file that says "written by this generator" (first, so it says so even if the rest gets damaged)."""
    with open(os.path.join(out_dir, _OWNER_FILE), "w") as f:
        json.dump(marker, f)


def _written_by_shapes(split_dir, split):
    """Whether ``split_dir`` is a split this generator wrote (any version or size), so it may be replaced: it holds
    the generator's owner file, or (splits written before that file existed) its json carries the marker."""
    if os.path.isfile(os.path.join(split_dir, _OWNER_FILE)):
        return True
    try:
        with open(os.path.join(split_dir, f"instances_{split}.json")) as f:
            marker = json.load(f).get("info", {}).get("largebatch_shapes", {})
        return marker.get("generator") == "largebatch.data.shapes"
    except (OSError, ValueError, AttributeError):
        return False


def _check_replaceable(path, written_by_us):
    """Refuse to replace a folder that this generator did not write (``written_by_us(path)`` false; an empty one
    is fine)."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
        return
    if not written_by_us(path):
        raise ShapesRootError(
            f"{path} exists and was not written by largebatch's shapes generator: it is left as it is; "
            "point DATASETS.SHAPES_ROOT (or $LARGEBATCH_DATASETS) at a new or empty folder"
        )


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cleanup_orphans(root):
    """Remove temp / stale directories left behind by dead writers (this host) or older than a day."""
    try:
        entries = os.listdir(root)
    except OSError:
        return
    now = time.time()
    for name in entries:
        if not (name.startswith(".tmp-") or name.startswith(".stale-")):
            continue
        path = os.path.join(root, name)
        parts = name.split("-")  # .tmp-<split>-<host>-<pid>-<uuid>
        orphan = False
        try:
            if len(parts) == 5 and parts[2] == _HOSTNAME and not _pid_alive(int(parts[3])):
                orphan = True
            elif now - os.path.getmtime(path) > _ORPHAN_MAX_AGE_S:
                orphan = True
        except (OSError, ValueError):
            continue
        if orphan:
            shutil.rmtree(path, ignore_errors=True)


def _private_name(kind, split):
    return f".{kind}-{split}-{_HOSTNAME}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def generate_shapes_split(
    root, split, num_images=None, *, image_size=DEFAULT_IMAGE_SIZE, seed=DEFAULT_SEED, force=False
):
    """Make sure ``<root>/<split>`` holds the requested split; generate it (race-free) if not.

    Args:
        root: cache directory; created if missing.
        split: "train" or "val".
        num_images: defaults to 1024 for train and 128 for val.
        force: regenerate even when a valid split exists (it is replaced atomically).

    Returns:
        dict(json_file=..., image_root=...).
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}, expected one of {sorted(_SPLIT_IDS)}")
    if num_images is None:
        num_images = DEFAULT_NUM_IMAGES[split]
    marker = _marker(split, num_images, image_size, seed)
    _install_atomically(
        root,
        split,
        write=lambda out_dir: _write_split(out_dir, split, num_images, image_size, seed),
        is_valid=lambda path: _is_valid_split(path, split, marker),
        written_by_us=lambda path: _written_by_shapes(path, split),
        force=force,
    )
    return _split_paths(os.fspath(root), split)


def _install_atomically(root, name, *, write, is_valid, written_by_us, force=False):
    """Make sure ``<root>/<name>`` is a complete folder (``is_valid(path)``), generating it race-free if not.

    ``write(out_dir)`` fills an empty private temp folder ``<root>/.tmp-<name>-<host>-<pid>-<uuid>``, its
    completion marker last, and the folder is then ``os.rename``\\ d onto ``<root>/<name>``: renaming onto a
    non-empty folder fails, so the first writer wins and the others use its result once ``is_valid`` accepts it.
    A folder that is not valid (stale parameters, damaged) is moved aside and replaced only if
    ``written_by_us(path)`` says this generator wrote it; anything else raises :class:`ShapesRootError` and is
    neither moved nor deleted. ``force``: replace even a valid folder. Temp folders of dead writers are removed.
    ``name`` must not contain "-" (it is part of the temp folders' names, which are split on "-").
    """
    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, name)
    if not force and is_valid(final):
        return
    _check_replaceable(final, written_by_us)  # nothing of the user's is ever moved or deleted

    _cleanup_orphans(root)
    tmp = os.path.join(root, _private_name("tmp", name))
    try:
        os.makedirs(tmp)
        write(tmp)
        replace_valid = force  # with force, one existing valid folder (possibly a concurrent winner's) is replaced
        while True:
            try:
                os.rename(tmp, final)  # atomic; fails if ``final`` exists and is non-empty
                return
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                    raise
            if not replace_valid and is_valid(final):
                return  # another writer won (or the folder was valid already): use its result
            # ``final`` is a stale folder of ours (or force): move it aside, then retry the rename
            _check_replaceable(final, written_by_us)
            aside = os.path.join(root, _private_name("stale", name))
            try:
                os.rename(final, aside)
            except FileNotFoundError:
                continue  # someone else moved it already
            replace_valid = False
            if is_valid(aside) and not force:
                # raced with a writer that installed a valid folder after our check: put it back
                try:
                    os.rename(aside, final)
                except OSError:
                    pass
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed into place


def prepare_shapes(
    root=None, *, num_train=None, num_val=None, image_size=DEFAULT_IMAGE_SIZE, seed=DEFAULT_SEED, force=False
):
    """Generate (if missing/stale) both splits. Returns {"shapes_train": {json_file, image_root}, "shapes_val": ...}."""
    root = default_shapes_root() if root is None else os.fspath(root)
    counts = {"train": num_train, "val": num_val}
    return {
        name: generate_shapes_split(root, split, counts[split], image_size=image_size, seed=seed, force=force)
        for name, split in SHAPES_SPLITS.items()
    }


def register_shapes(
    root=None, *, num_train=None, num_val=None, image_size=DEFAULT_IMAGE_SIZE, seed=DEFAULT_SEED, force=False
):
    """Generate the shapes dataset if needed and register ``shapes_train`` / ``shapes_val`` with detectron2.

    Args:
        root: cache directory; default ``os.path.join(os.environ.get("LARGEBATCH_DATASETS", "datasets"), "shapes")``.
        num_train, num_val: image counts (defaults 1024 / 128). image_size: side of the square images (128).
        seed: base seed. force: regenerate even if a valid cached copy exists.

    Registration is idempotent: a name already registered with the same json file is left alone; a name
    registered with a *different* json file (e.g. another root) is removed from DatasetCatalog and
    MetadataCatalog and re-registered, so the last call wins.

    Returns:
        {"shapes_train": {"json_file": ..., "image_root": ...}, "shapes_val": {...}} (absolute paths).
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    paths = prepare_shapes(root, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed, force=force)
    paths = {n: {k: os.path.abspath(v) for k, v in p.items()} for n, p in paths.items()}
    for name, p in paths.items():
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == p["json_file"]:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        elif name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        register_coco_instances(name, {"thing_classes": list(SHAPES_CLASSES)}, p["json_file"], p["image_root"])
    return paths


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------
def _summary(paths):
    lines = []
    for name, p in paths.items():
        with open(p["json_file"]) as f:
            coco = json.load(f)
        counts = Counter(a["category_id"] for a in coco["annotations"])
        per_class = ", ".join(f"{c}={counts.get(k + 1, 0)}" for k, c in enumerate(SHAPES_CLASSES))
        lines.append(
            f"{name}: {len(coco['images'])} images, {len(coco['annotations'])} instances ({per_class}); "
            f"json={p['json_file']} images={p['image_root']}"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate the largebatch synthetic shapes dataset.")
    parser.add_argument(
        "--root", default=None, help="cache directory (default: $LARGEBATCH_DATASETS/shapes, else datasets/shapes)"
    )
    parser.add_argument("--force", action="store_true", help="regenerate even if a valid copy exists")
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_IMAGES["train"])
    parser.add_argument("--num-val", type=int, default=DEFAULT_NUM_IMAGES["val"])
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument(
        "--dense", action="store_true", help="also write the semantic / panoptic labels (largebatch.data.shapes_dense)"
    )
    args = parser.parse_args(argv)
    root = default_shapes_root() if args.root is None else args.root
    t0 = time.perf_counter()
    options = dict(num_train=args.num_train, num_val=args.num_val, image_size=args.image_size, seed=args.seed,
                   force=args.force)
    paths = prepare_shapes(root, **options)
    if args.dense:
        from .shapes_dense import prepare_shapes_dense  # imports this module: not at the top

        dense = prepare_shapes_dense(root, **options)
    dt = time.perf_counter() - t0
    print(_summary(paths))
    if args.dense:
        print("\n".join(f"{split}_dense: {p['dense_root']}" for split, p in dense.items()))
    print(f"done in {dt:.2f}s (root={os.path.abspath(root)})")


if __name__ == "__main__":
    main()
