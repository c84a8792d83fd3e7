"""Tests of the embedded synthetic shapes dataset (largebatch.data.shapes)."""
import multiprocessing as mp
import os

import numpy as np
import pytest
from PIL import Image

from helpers import read_json, tree_bytes
from largebatch.data import shapes
from largebatch.data.shapes import SHAPES_CLASSES, generate_shapes_split, prepare_shapes, register_shapes


def _poly_area(seg):
    x, y = np.asarray(seg[0::2]), np.asarray(seg[1::2])
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory):
    """The dataset with its default sizes (1024 train / 128 val images)."""
    root = tmp_path_factory.mktemp("shapes_default")
    return root, prepare_shapes(root)


def test_default_dataset_is_valid_coco(default_dataset):
    from pycocotools.coco import COCO

    root, paths = default_dataset
    assert sorted(os.listdir(root)) == ["train", "val"]  # no temp leftovers
    for name, num in (("shapes_train", 1024), ("shapes_val", 128)):
        p = paths[name]
        coco = COCO(p["json_file"])
        assert len(coco.getImgIds()) == num
        cats = coco.loadCats(coco.getCatIds())
        assert [c["name"] for c in sorted(cats, key=lambda c: c["id"])] == list(SHAPES_CLASSES)
        assert sorted(c["id"] for c in cats) == list(range(1, len(SHAPES_CLASSES) + 1))
        anns = coco.loadAnns(coco.getAnnIds())
        assert len(anns) >= num  # 1-4 objects per image, very few skipped
        assert len({a["id"] for a in anns}) == len(anns)
        assert {a["category_id"] for a in anns} == set(range(1, len(SHAPES_CLASSES) + 1))
        per_image = {}
        for a in anns:
            per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
        assert max(per_image.values()) <= shapes.MAX_OBJECTS
        for a in anns:
            img = coco.imgs[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert a["iscrowd"] == 0
            assert 0 <= x and 0 <= y and x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
            seg = a["segmentation"]
            assert isinstance(seg, list) and len(seg) == 1 and len(seg[0]) >= 6
            xs, ys = seg[0][0::2], seg[0][1::2]
            # bbox is the tight box of the polygon
            assert x == pytest.approx(min(xs), abs=0.011) and y == pytest.approx(min(ys), abs=0.011)
            assert x + w == pytest.approx(max(xs), abs=0.021) and y + h == pytest.approx(max(ys), abs=0.021)
            assert shapes.MIN_SHAPE_SIZE - 0.5 <= max(w, h) <= shapes.MAX_SHAPE_SIZE + 0.5
            assert a["area"] == pytest.approx(_poly_area(seg[0]), rel=1e-3, abs=0.05)
        # the rasterised ground-truth masks agree with the stated areas
        for a in anns[:200]:
            assert coco.annToMask(a).sum() == pytest.approx(a["area"], rel=0.25, abs=8)
        assert coco.dataset["info"]["largebatch_shapes"]["num_images"] == num
        for img in list(coco.imgs.values())[:50]:
            with Image.open(os.path.join(p["image_root"], img["file_name"])) as im:
                assert im.size == (img["width"], img["height"]) and im.mode == "RGB"


def test_annotations_match_pixels(default_dataset):
    """Inside each annotated (visible) mask the image colour differs from the surrounding background."""
    from pycocotools.coco import COCO

    _, paths = default_dataset
    coco = COCO(paths["shapes_val"]["json_file"])
    contrasts = []
    for img_id in coco.getImgIds()[:40]:
        info = coco.imgs[img_id]
        im = np.asarray(Image.open(os.path.join(paths["shapes_val"]["image_root"], info["file_name"])), np.float32)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        union = np.zeros(im.shape[:2], bool)
        for a in anns:
            union |= coco.annToMask(a).astype(bool)
        if union.all():
            continue
        bg = im[~union].mean(0)
        for a in anns:
            m = coco.annToMask(a).astype(bool)
            contrasts.append(np.linalg.norm(np.median(im[m], 0) - bg))
    # shape colours are drawn >= 90 RGB units from both gradient end points
    assert np.median(contrasts) > 60


def test_deterministic(tmp_path):
    a = prepare_shapes(tmp_path / "a", num_train=24, num_val=8)
    b = prepare_shapes(tmp_path / "b", num_train=24, num_val=8)
    ta, tb = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert ta.keys() == tb.keys() and len(ta) == 24 + 8 + 2 + 2  # images, jsons, each split's owner file
    assert all(ta[k] == tb[k] for k in ta)
    assert a["shapes_val"]["json_file"] != b["shapes_val"]["json_file"]
    # per-image seeding: a longer split starts with the same images; another seed gives other images
    generate_shapes_split(tmp_path / "c", "train", 30)
    img23 = os.path.join("train", "images", "000023.jpg")
    assert tree_bytes(tmp_path / "c")[img23] == ta[img23]
    generate_shapes_split(tmp_path / "d", "train", 24, seed=1)
    img0 = os.path.join("train", "images", "000000.jpg")
    assert tree_bytes(tmp_path / "d")[img0] != ta[img0]


def test_regenerates_stale_or_broken(tmp_path):
    p = generate_shapes_split(tmp_path, "val", 8)
    mtime = os.path.getmtime(p["json_file"])
    assert generate_shapes_split(tmp_path, "val", 8) == p
    assert os.path.getmtime(p["json_file"]) == mtime  # valid cache reused
    generate_shapes_split(tmp_path, "val", 12)  # other parameters -> regenerated in place
    assert len(read_json(p["json_file"])["images"]) == 12
    with open(p["json_file"], "w") as f:  # truncated json
        f.write('{"images": [')
    generate_shapes_split(tmp_path, "val", 12)
    assert len(read_json(p["json_file"])["images"]) == 12
    os.remove(os.path.join(p["image_root"], "000005.jpg"))  # missing image
    generate_shapes_split(tmp_path, "val", 12)
    assert os.path.exists(os.path.join(p["image_root"], "000005.jpg"))
    info = read_json(p["json_file"])["info"]["largebatch_shapes"]
    forced = generate_shapes_split(tmp_path, "val", 12, force=True)["json_file"]
    info_force = read_json(forced)["info"]["largebatch_shapes"]
    assert info == info_force
    assert sorted(os.listdir(tmp_path)) == ["val"]


def _dead_pid():
    proc = mp.get_context("fork").Process(target=os._exit, args=(0,))
    proc.start()
    proc.join()
    return proc.pid


def test_removes_orphaned_temp_dirs(tmp_path):
    orphan = tmp_path / f".tmp-train-{shapes._HOSTNAME}-{_dead_pid()}-0123456789ab"
    (orphan / "images").mkdir(parents=True)
    alive = tmp_path / f".tmp-train-{shapes._HOSTNAME}-{os.getpid()}-0123456789ab"  # a live writer's: kept
    alive.mkdir()
    generate_shapes_split(tmp_path, "train", 4)
    assert sorted(os.listdir(tmp_path)) == sorted(["train", alive.name])


def _worker(root, barrier, queue, num_train, num_val):
    try:
        barrier.wait(timeout=30)
        queue.put(("ok", prepare_shapes(root, num_train=num_train, num_val=num_val)))
    except BaseException as e:  # report instead of hanging the test
        queue.put(("error", repr(e)))


def _run_concurrently(root, n_procs, num_train, num_val):
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(n_procs), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(root), barrier, queue, num_train, num_val)) for _ in range(n_procs)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return results


@pytest.mark.slow
@pytest.mark.parametrize("preexisting", ["none", "stale"])
def test_concurrent_generation(tmp_path, preexisting):
    root = tmp_path / "shapes"
    if preexisting == "stale":
        prepare_shapes(root, num_train=10, num_val=5)
    results = _run_concurrently(root, 4, 96, 16)
    assert all(status == "ok" for status, _ in results), results
    paths = [r for _, r in results]
    assert all(p == paths[0] for p in paths)
    assert sorted(os.listdir(root)) == ["train", "val"]  # exactly one dataset, no temp / stale leftovers
    for name, num in (("shapes_train", 96), ("shapes_val", 16)):
        coco = read_json(paths[0][name]["json_file"])
        assert len(coco["images"]) == num
        assert sorted(os.listdir(paths[0][name]["image_root"])) == sorted(im["file_name"] for im in coco["images"])
    # the survivor is exactly what a single process generates
    ref = tmp_path / "ref"
    prepare_shapes(ref, num_train=96, num_val=16)
    assert tree_bytes(root) == tree_bytes(ref)


@pytest.fixture
def clean_registry():
    from detectron2.data import DatasetCatalog, MetadataCatalog

    yield DatasetCatalog, MetadataCatalog
    for name in shapes.SHAPES_SPLITS:  # leave no registration pointing into a deleted tmp dir
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


def test_register_shapes(tmp_path, clean_registry):
    DatasetCatalog, MetadataCatalog = clean_registry
    paths = register_shapes(tmp_path / "a", num_train=16, num_val=8)
    assert register_shapes(tmp_path / "a", num_train=16, num_val=8) == paths  # idempotent
    dicts = DatasetCatalog.get("shapes_val")
    assert len(dicts) == 8 and sum(len(d["annotations"]) for d in dicts) > 0
    for d in dicts:
        assert os.path.exists(d["file_name"]) and d["height"] == d["width"] == 128
        for a in d["annotations"]:
            assert 0 <= a["category_id"] < len(SHAPES_CLASSES)  # contiguous ids after detectron2's mapping
            assert a["segmentation"] and a["iscrowd"] == 0
    meta = MetadataCatalog.get("shapes_train")
    assert meta.thing_classes == list(SHAPES_CLASSES) and meta.evaluator_type == "coco"
    assert meta.json_file == paths["shapes_train"]["json_file"]
    assert len(DatasetCatalog.get("shapes_train")) == 16
    # another root: the names are re-pointed (last call wins)
    paths_b = register_shapes(tmp_path / "b", num_train=4, num_val=4)
    assert MetadataCatalog.get("shapes_val").json_file == paths_b["shapes_val"]["json_file"]
    assert len(DatasetCatalog.get("shapes_val")) == 4


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LARGEBATCH_DATASETS", str(tmp_path))
    assert shapes.default_shapes_root() == os.path.join(str(tmp_path), "shapes")
    monkeypatch.delenv("LARGEBATCH_DATASETS")
    assert shapes.default_shapes_root() == os.path.join("datasets", "shapes")


def test_coco_evaluator_on_ground_truth(tmp_path, clean_registry):
    """detectron2's COCOEvaluator scores the ground truth itself (boxes + masks) as AP 100."""
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import BitMasks, Boxes, BoxMode, Instances, PolygonMasks

    register_shapes(tmp_path, num_train=4, num_val=16)
    evaluator = COCOEvaluator(
        "shapes_val", tasks=("bbox", "segm"), distributed=False, output_dir=None, use_fast_impl=False
    )  # no compiled detectron2._C here
    evaluator.reset()
    for d in DatasetCatalog.get("shapes_val"):
        anns = d["annotations"]
        inst = Instances((d["height"], d["width"]))
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        polys = PolygonMasks([a["segmentation"] for a in anns])
        inst.pred_masks = BitMasks.from_polygon_masks(polys, d["height"], d["width"]).tensor
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    res = evaluator.evaluate()
    assert res["bbox"]["AP"] == pytest.approx(100.0, abs=0.5)
    assert res["segm"]["AP"] == pytest.approx(100.0, abs=0.5)
