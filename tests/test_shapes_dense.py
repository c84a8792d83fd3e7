"""Tests of the semantic / panoptic labels of the embedded shapes dataset (largebatch.data.shapes_dense)."""
import io
import multiprocessing as mp
import os

import numpy as np
import pytest
from PIL import Image

from helpers import read_json, tree_bytes
from largebatch.data import shapes
from largebatch.data.shapes import ShapesRootError, generate_shapes_split, render_shapes_image
from largebatch.data.shapes_dense import (
    SHAPES_DENSE_DATASETS,
    dense_split_paths,
    generate_shapes_dense_split,
    register_shapes_dense,
)

BACKGROUND = 4  # the panoptic stuff category
DROPPING = 0.9  # MIN_VISIBLE_FRACTION that makes the generator drop annotations of drawn shapes


def _png(path):
    with Image.open(path) as im:
        return im.mode, np.asarray(im)


def _rgb2id(rgb):
    rgb = rgb.astype(np.uint32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _polygon_mask(annotation, size):
    return shapes._rasterize(np.asarray(annotation["segmentation"][0]).reshape(-1, 2), size)


@pytest.fixture(scope="module", params=["default", "dropping"])
def dense_val(request, tmp_path_factory):
    """A 24-image val split and its labels. With the default MIN_VISIBLE_FRACTION (0.4) no shape is ever dropped
    (the placement rule keeps every shape >= 50 % visible), so "dropping" generates with 0.9: some drawn shapes
    then lose their annotation and their pixels must be ignore / void."""
    root = tmp_path_factory.mktemp(f"dense_{request.param}")
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "dropping":
            patch.setattr(shapes, "MIN_VISIBLE_FRACTION", DROPPING)
        paths = generate_shapes_dense_split(root, "val", 24)
    return request.param, paths


def _labelled_images(paths):
    """Per image of the split: its detection json entry and annotations, its panoptic json entry, and the
    sem_seg, panoptic (ids) and panoptic_stuff labels."""
    coco, panoptic = read_json(paths["json_file"]), read_json(paths["panoptic_json"])
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    panoptic_by_image = {p["image_id"]: p for p in panoptic["annotations"]}
    for im in coco["images"]:
        pan = panoptic_by_image[im["id"]]
        assert pan["file_name"] == os.path.splitext(im["file_name"])[0] + ".png"
        labels = []
        for root in (paths["sem_seg_root"], paths["panoptic_root"], paths["panoptic_stuff_root"]):
            mode, arr = _png(os.path.join(root, pan["file_name"]))
            assert mode == ("RGB" if root == paths["panoptic_root"] else "L")
            assert arr.shape[:2] == (im["height"], im["width"])
            labels.append(arr)
        sem, rgb, stuff = labels
        yield im, by_image.get(im["id"], []), pan, sem, _rgb2id(rgb), stuff


@pytest.mark.parametrize("min_visible", [shapes.MIN_VISIBLE_FRACTION, DROPPING])
def test_with_pixels_keeps_the_detection_data(tmp_path, monkeypatch, min_visible):
    """with_pixels draws the same random numbers: the same image (the split's JPEG bytes) and objects; the map
    says which shape is on top, annotated (k) or dropped (-1)."""
    monkeypatch.setattr(shapes, "MIN_VISIBLE_FRACTION", min_visible)
    paths = generate_shapes_split(tmp_path, "val", 16)
    coco = read_json(paths["json_file"])
    dropped = 0
    for im in coco["images"]:
        i = im["id"] - 1
        rng, rng_pixels = np.random.default_rng([0, 1, i]), np.random.default_rng([0, 1, i])
        img, objects = render_shapes_image(rng)
        img_p, objects_p, pixels = render_shapes_image(rng_pixels, with_pixels=True)
        assert rng.bit_generator.state == rng_pixels.bit_generator.state
        assert img.tobytes() == img_p.tobytes()
        assert [o["category_id"] for o in objects] == [o["category_id"] for o in objects_p]
        assert all(np.array_equal(o["polygon"], p["polygon"]) for o, p in zip(objects, objects_p))
        buf = io.BytesIO()
        img_p.save(buf, format="JPEG", quality=95, subsampling=0)
        with open(os.path.join(paths["image_root"], im["file_name"]), "rb") as f:
            assert buf.getvalue() == f.read()
        annotations = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        assert [a["category_id"] for a in annotations] == [o["category_id"] for o in objects_p]

        assert pixels.shape == (im["height"], im["width"]) and pixels.dtype == np.int32
        assert set(np.unique(pixels)) <= set(range(-1, len(objects_p) + 1))
        on_top = np.zeros_like(pixels)  # the annotated shapes painted in drawing order
        for k, a in enumerate(annotations, 1):
            mask = _polygon_mask(a, im["width"])
            # on its polygon: itself, a later annotated shape or a later dropped one
            assert set(np.unique(pixels[mask])) <= {-1} | set(range(k, len(objects_p) + 1))
            on_top[mask] = k
        shown = pixels != -1  # elsewhere the map is exactly the annotated polygons painted in order
        assert np.array_equal(pixels[shown], on_top[shown])
        dropped += int((~shown).sum())
    if min_visible == DROPPING:
        assert dropped > 0


def test_sem_seg_matches_the_annotations(dense_val):
    """Each annotated shape's visible pixels carry its class, the rest is background (0) or a dropped shape (255)."""
    kind, paths = dense_val
    ignored = 0
    for im, annotations, _, sem, _, _ in _labelled_images(paths):
        assert sem.dtype == np.uint8 and set(np.unique(sem)) <= {0, 1, 2, 3, 255}
        covered = np.zeros(sem.shape, bool)
        for a in reversed(annotations):  # the last drawn is on top
            mask = _polygon_mask(a, im["width"])
            visible = mask & ~covered & (sem != 255)
            assert visible.any() and (sem[visible] == a["category_id"]).all()
            covered |= mask
        assert set(np.unique(sem[~covered])) <= {0, 255}
        ignored += int((sem == 255).sum())
    if kind == "dropping":
        assert ignored > 0


def test_sem_seg_marks_the_dropped_shapes(dense_val, monkeypatch):
    """255 exactly where render_shapes_image says a shape without annotation is on top."""
    kind, paths = dense_val
    if kind == "dropping":
        monkeypatch.setattr(shapes, "MIN_VISIBLE_FRACTION", DROPPING)
    for im, _, _, sem, _, _ in _labelled_images(paths):
        _, _, pixels = render_shapes_image(np.random.default_rng([0, 1, im["id"] - 1]), im["width"], with_pixels=True)
        assert np.array_equal(sem == 255, pixels == -1)


def test_panoptic_segments_match_the_png(dense_val):
    """The panoptic PNG decodes to exactly the segments of segments_info (area, bbox, category), one per annotated
    shape (id k: the image's k-th annotation) and one background segment, void (0) where sem_seg ignores."""
    _, paths = dense_val
    panoptic = read_json(paths["panoptic_json"])
    assert panoptic["categories"] == [
        {"id": 1, "name": "circle", "supercategory": "shape", "isthing": 1},
        {"id": 2, "name": "square", "supercategory": "shape", "isthing": 1},
        {"id": 3, "name": "triangle", "supercategory": "shape", "isthing": 1},
        {"id": 4, "name": "background", "supercategory": "background", "isthing": 0},
    ]
    assert panoptic["images"] == read_json(paths["json_file"])["images"]
    for im, annotations, pan, sem, ids, _ in _labelled_images(paths):
        segments = {s["id"]: s for s in pan["segments_info"]}
        assert len(segments) == len(pan["segments_info"])
        assert set(np.unique(ids)) - {0} == set(segments)
        assert np.array_equal(ids == 0, sem == 255)
        covered = np.zeros(sem.shape, bool)
        for k, a in reversed(list(enumerate(annotations, 1))):  # every annotated shape is visible here
            mask = _polygon_mask(a, im["width"])
            assert np.array_equal(ids == k, mask & ~covered & (sem != 255))
            assert segments[k]["category_id"] == a["category_id"]
            covered |= mask
        background = [s for s in segments.values() if s["category_id"] == BACKGROUND]
        assert len(background) == int((sem == 0).any()) and len(segments) == len(annotations) + len(background)
        for s in segments.values():
            m = ids == s["id"]
            ys, xs = np.nonzero(m)
            assert s["iscrowd"] == 0 and s["area"] == m.sum() > 0
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert (sem[m] == (0 if s["category_id"] == BACKGROUND else s["category_id"])).all()


def test_panoptic_stuff_is_the_semantic_labels_of_things_and_background(dense_val):
    """prepare_panoptic_fpn.py's format: every thing 0, the background 1, void 255."""
    _, paths = dense_val
    for _, _, _, sem, _, stuff in _labelled_images(paths):
        assert stuff.dtype == np.uint8
        assert np.array_equal(stuff, np.select([sem == 255, sem == 0], [255, 1], 0))


def test_deterministic_cached_and_regenerated(tmp_path):
    a = generate_shapes_dense_split(tmp_path / "a", "train", 6)
    detection = tree_bytes(tmp_path / "a" / "train")
    b = generate_shapes_dense_split(tmp_path / "b", "train", 6)
    ta, tb = tree_bytes(a["dense_root"]), tree_bytes(b["dense_root"])
    assert ta == tb and len(ta) == 3 * 6 + 2  # the PNGs, the json, the owner file
    assert detection == tree_bytes(tmp_path / "b" / "train")
    assert a == dense_split_paths(tmp_path / "a", "train")
    mtime = os.path.getmtime(a["panoptic_json"])
    assert generate_shapes_dense_split(tmp_path / "a", "train", 6) == a
    assert os.path.getmtime(a["panoptic_json"]) == mtime  # valid labels reused
    os.remove(os.path.join(a["panoptic_stuff_root"], "000003.png"))  # a missing file: regenerated
    generate_shapes_dense_split(tmp_path / "a", "train", 6)
    assert tree_bytes(a["dense_root"]) == ta
    generate_shapes_dense_split(tmp_path / "a", "train", 8)  # other parameters: both folders regenerated
    assert len(read_json(a["panoptic_json"])["annotations"]) == 8 == len(os.listdir(a["sem_seg_root"]))
    assert tree_bytes(tmp_path / "a" / "train_dense")["sem_seg/000005.png"] == ta["sem_seg/000005.png"]
    assert sorted(os.listdir(tmp_path / "a")) == ["train", "train_dense"]  # no temp / stale leftovers
    # generating the labels leaves the detection split exactly as generate_shapes_split writes it
    generate_shapes_split(tmp_path / "c", "train", 8)
    assert tree_bytes(tmp_path / "a" / "train") == tree_bytes(tmp_path / "c" / "train")


@pytest.mark.parametrize("foreign", ["folder", "file"])
def test_refuses_a_foreign_dense_folder(tmp_path, foreign):
    path = tmp_path / "val_dense"
    if foreign == "folder":
        path.mkdir()
        (path / "notes.txt").write_text("mine")
    else:
        path.write_text("mine")
    before = tree_bytes(path) if foreign == "folder" else path.read_bytes()
    with pytest.raises(ShapesRootError, match="val_dense exists and was not written by largebatch"):
        generate_shapes_dense_split(tmp_path, "val", 4)
    assert (tree_bytes(path) if foreign == "folder" else path.read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["val", "val_dense"]


def _worker(root, barrier, queue):
    try:
        barrier.wait(timeout=30)
        queue.put(("ok", generate_shapes_dense_split(root, "val", 12)))
    except BaseException as e:  # report instead of hanging the test
        queue.put(("error", repr(e)))


def test_concurrent_generation(tmp_path):
    """Writers racing for the same labels: the first wins, the others use its folder."""
    root = tmp_path / "shapes"
    generate_shapes_split(root, "val", 12)
    ctx = mp.get_context("spawn")  # not fork: a fork of the threaded test process can deadlock
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(root), barrier, queue)) for _ in range(3)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert all(status == "ok" for status, _ in results), results
    assert sorted(os.listdir(root)) == ["val", "val_dense"]
    reference = generate_shapes_dense_split(tmp_path / "ref", "val", 12)
    assert tree_bytes(results[0][1]["dense_root"]) == tree_bytes(reference["dense_root"])


# ----------------------------------------------------------------------------------------------------
# detectron2: registration, loaders, evaluators
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def clean_registry():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    yield DatasetCatalog, MetadataCatalog
    for name in list(SHAPES_DENSE_DATASETS) + list(shapes.SHAPES_SPLITS):  # nothing pointing into a deleted tmp dir
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def dropping_root(tmp_path_factory):
    """A root whose splits (4 train / 16 val images) have dropped shapes, i.e. void pixels."""
    root = tmp_path_factory.mktemp("dense_registered")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shapes, "MIN_VISIBLE_FRACTION", DROPPING)
        register_shapes_dense(root, num_train=4, num_val=16)  # generates; the registration is redone per test
    return root


def test_register_and_load(tmp_path, dropping_root, clean_registry):
    DatasetCatalog, MetadataCatalog = clean_registry
    paths = register_shapes_dense(dropping_root, num_train=4, num_val=16)
    assert set(SHAPES_DENSE_DATASETS) <= set(DatasetCatalog.list())
    loader = DatasetCatalog.data["shapes_sem_seg_val"]
    assert register_shapes_dense(dropping_root, num_train=4, num_val=16) == paths  # idempotent: a no-op
    assert DatasetCatalog.data["shapes_sem_seg_val"] is loader
    p = paths["val"]
    coco = read_json(p["json_file"])
    panoptic = {a["image_id"]: a for a in read_json(p["panoptic_json"])["annotations"]}

    meta = MetadataCatalog.get("shapes_sem_seg_val")
    assert meta.stuff_classes == ["background", "circle", "square", "triangle"] and meta.ignore_label == 255
    assert meta.evaluator_type == "sem_seg" and meta.sem_seg_root == p["sem_seg_root"]
    records = DatasetCatalog.get("shapes_sem_seg_val")
    assert len(records) == 16
    for d in records:
        assert os.path.dirname(d["file_name"]) == p["image_root"]
        assert d["sem_seg_file_name"] == os.path.join(
            p["sem_seg_root"], os.path.basename(d["file_name"])[:-4] + ".png")

    meta = MetadataCatalog.get("shapes_panoptic_val_separated")
    assert meta.evaluator_type == "coco_panoptic_seg" and meta.ignore_label == 255
    assert meta.thing_classes == list(shapes.SHAPES_CLASSES)
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
    assert meta.stuff_classes == ["things", "background"]
    assert meta.stuff_dataset_id_to_contiguous_id == {0: 0, 4: 1}
    assert (meta.panoptic_json, meta.panoptic_root, meta.json_file) == (
        p["panoptic_json"], p["panoptic_root"], p["json_file"])
    records = DatasetCatalog.get("shapes_panoptic_val_separated")
    assert len(records) == 16
    for d in records:
        name = os.path.basename(d["file_name"])[:-4] + ".png"
        assert d["sem_seg_file_name"] == os.path.join(p["panoptic_stuff_root"], name)
        assert panoptic[d["image_id"]]["file_name"] == name
        annotations = [a for a in coco["annotations"] if a["image_id"] == d["image_id"]]
        assert [a["category_id"] for a in d["annotations"]] == [a["category_id"] - 1 for a in annotations]
        things = [s for s in panoptic[d["image_id"]]["segments_info"] if s["category_id"] != BACKGROUND]
        assert [s["category_id"] - 1 for s in things] == [a["category_id"] for a in d["annotations"]]
    stuffonly = DatasetCatalog.get("shapes_panoptic_val_stuffonly")
    assert [d["sem_seg_file_name"] for d in stuffonly] == [d["sem_seg_file_name"] for d in records]
    assert MetadataCatalog.get("shapes_panoptic_val_stuffonly").evaluator_type == "sem_seg"
    assert len(DatasetCatalog.get("shapes_panoptic_train_separated")) == 4

    # detectron2's mapper reads the labels: a 0/1/255 semantic map beside the instances
    from detectron2.data import DatasetMapper

    mapper = DatasetMapper(is_train=True, augmentations=[], image_format="BGR", use_instance_mask=True)
    sample = mapper(records[0])
    assert sample["sem_seg"].shape == sample["image"].shape[1:]
    assert set(sample["sem_seg"].unique().tolist()) <= {0, 1, 255}
    assert len(sample["instances"]) == len(records[0]["annotations"])

    # another root: the names are re-pointed (last call wins)
    paths_b = register_shapes_dense(tmp_path, num_train=2, num_val=3)
    assert MetadataCatalog.get("shapes_panoptic_val_separated").panoptic_json == paths_b["val"]["panoptic_json"]
    assert MetadataCatalog.get("shapes_sem_seg_val").sem_seg_root == paths_b["val"]["sem_seg_root"]
    assert len(DatasetCatalog.get("shapes_sem_seg_val")) == 3
    assert len(DatasetCatalog.get("shapes_panoptic_val_stuffonly")) == 3


@pytest.mark.parametrize("name", ["shapes_sem_seg_val", "shapes_panoptic_val_stuffonly"])
def test_sem_seg_evaluator_on_ground_truth(dropping_root, clean_registry, name):
    """detectron2's SemSegEvaluator scores the labels themselves as mIoU 100 (the ignored pixels left out)."""
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import SemSegEvaluator

    register_shapes_dense(dropping_root, num_train=4, num_val=16)
    num_classes = len(MetadataCatalog.get(name).stuff_classes)
    evaluator = SemSegEvaluator(name, distributed=False, output_dir=None)
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        gt = torch.from_numpy(_png(d["sem_seg_file_name"])[1].astype(np.int64))
        logits = torch.nn.functional.one_hot(torch.where(gt == 255, 0, gt), num_classes).permute(2, 0, 1).float()
        evaluator.process([{"file_name": d["file_name"]}], [{"sem_seg": logits}])
    res = evaluator.evaluate()["sem_seg"]
    assert res["mIoU"] == pytest.approx(100.0) and res["pACC"] == pytest.approx(100.0)


def test_panoptic_evaluator_on_ground_truth(dropping_root, clean_registry):
    """detectron2's COCOPanopticEvaluator scores the panoptic labels fed back as PanopticFPN's output (contiguous
    ids, isthing) as PQ 100."""
    pytest.importorskip("panopticapi")
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from largebatch.engine.trainer import PanopticEvaluator

    paths = register_shapes_dense(dropping_root, num_train=4, num_val=16)
    name = "shapes_panoptic_val_separated"
    meta = MetadataCatalog.get(name)
    panoptic = {a["image_id"]: a for a in read_json(paths["val"]["panoptic_json"])["annotations"]}
    evaluator = PanopticEvaluator(name, output_dir=None)  # detectron2's, its PQ workers spawned
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        pan = panoptic[d["image_id"]]
        ids = _rgb2id(_png(os.path.join(paths["val"]["panoptic_root"], pan["file_name"]))[1])
        segments = []
        for s in pan["segments_info"]:
            isthing = s["category_id"] in meta.thing_dataset_id_to_contiguous_id
            mapping = meta.thing_dataset_id_to_contiguous_id if isthing else meta.stuff_dataset_id_to_contiguous_id
            segments.append({"id": s["id"], "category_id": mapping[s["category_id"]], "isthing": isthing})
        output = {"panoptic_seg": (torch.from_numpy(ids.astype(np.int32)), segments)}
        evaluator.process([{"file_name": d["file_name"], "image_id": d["image_id"]}], [output])
    res = evaluator.evaluate()["panoptic_seg"]
    assert res["PQ"] == pytest.approx(100.0) and res["PQ_th"] == pytest.approx(100.0)
    assert res["PQ_st"] == pytest.approx(100.0)


def test_register_datasets_from_a_config(tmp_path, monkeypatch, make_config, clean_registry):
    """register_datasets registers the dense names a config uses (under DATASETS.SHAPES_ROOT), refuses a foreign
    folder where the labels go, and names them among the known datasets."""
    from largebatch.config import ConfigError
    from largebatch.data import register_datasets

    DatasetCatalog, _ = clean_registry
    monkeypatch.setitem(shapes.DEFAULT_NUM_IMAGES, "train", 4)  # the counts register_datasets generates
    monkeypatch.setitem(shapes.DEFAULT_NUM_IMAGES, "val", 3)
    cfg = make_config("DATASETS.TRAIN", ("shapes_panoptic_train_separated",), "DATASETS.TEST", ("shapes_sem_seg_val",),
                      "DATASETS.SHAPES_ROOT", str(tmp_path / "ok"), config=None)
    register_datasets(cfg)
    assert len(DatasetCatalog.get("shapes_panoptic_train_separated")) == 4
    assert len(DatasetCatalog.get("shapes_sem_seg_val")) == 3
    assert "shapes_train" not in DatasetCatalog.list()  # only what the config names

    (tmp_path / "foreign" / "train_dense").mkdir(parents=True)
    (tmp_path / "foreign" / "train_dense" / "notes.txt").write_text("mine")
    cfg.DATASETS.SHAPES_ROOT = str(tmp_path / "foreign")
    with pytest.raises(ConfigError, match="DATASETS.SHAPES_ROOT = .* is not allowed: .*train_dense exists"):
        register_datasets(cfg)
    assert os.listdir(tmp_path / "foreign" / "train_dense") == ["notes.txt"]

    cfg.DATASETS.SHAPES_ROOT = str(tmp_path / "ok")
    cfg.DATASETS.TEST = ("shapes_sem_seg_vall",)
    with pytest.raises(ConfigError, match="'shapes_sem_seg_vall' is not a registered dataset .*shapes_sem_seg_val"):
        register_datasets(cfg)
