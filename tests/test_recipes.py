"""Every YAML under configs/ loads, resolves and trains one iteration; the COCO recipes match their papers.

The recipes are discovered with a glob, so a new file is covered without touching this test:

* ``test_config_loads_and_resolves`` (every file, Base-*.yaml included): load_config validates it,
  prepare_solver resolves it at the recipe's own scale (8 images per worker, COCO train2017's 117266 annotated
  images) into a sane schedule, the SyncBN groups divide the workers, and a second prepare_solver is a no-op.
  COCO recipes must cite their paper's table and reported AP in the top comment.
* ``test_recipe_trains_one_iteration`` (every file but Base-*.yaml, which the recipes inherit): the recipe shrunk
  to CPU size (the embedded shapes data, 2 images of 128 px, the small ResNet-FPN backbone, smaller RoI sampling)
  but with its own optimizer, AGVM, schedule, SyncBN and mask settings, built by LargeBatchTrainer and run for one
  iteration with its hooks: finite losses, every trained part of the detector moved.
* ``test_*_matches_paper``: resolved hyper-parameters recomputed here from the papers' rules.
"""
import glob
import math
import os

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.events import EventStorage

from helpers import REPO, make_config
from largebatch.engine.trainer import LargeBatchTrainer
from largebatch.norm import GroupSyncBatchNorm, bn_size
from largebatch.optim import AGVM, LAMB, LARS, PMDLAMB
from largebatch.optim.groups import ModulePartition
from largebatch.solver import prepare_solver

CONFIG_DIR = os.path.join(REPO, "configs")
ALL_CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True))
RECIPES = [p for p in ALL_CONFIGS if not os.path.basename(p).startswith("Base-")]
COCO_TRAIN_IMAGES = 117266  # COCO train2017 images with annotations (detectron2 counts 118287 before filtering)
IMAGES_PER_GPU = 8  # what every COCO recipe assumes
OPTIMIZER_CLASSES = {
    "SGD": torch.optim.SGD, "ADAMW": torch.optim.AdamW, "LARS": LARS, "LAMB": LAMB, "PMDLAMB": PMDLAMB,
}
# one intra-op thread for the whole module (conftest.py): the recipes' CPU-sized models are tiny
pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(path):
    return os.path.relpath(path, CONFIG_DIR)


def _resolved_at_scale(rel_or_path):
    """The recipe resolved as it runs on COCO: IMS_PER_BATCH / 8 workers, 117266 training images."""
    cfg = make_config(config=os.path.join(CONFIG_DIR, rel_or_path))  # an absolute path stays as it is
    world_size = max(1, cfg.SOLVER.IMS_PER_BATCH // IMAGES_PER_GPU)
    return prepare_solver(cfg, world_size, COCO_TRAIN_IMAGES), world_size


def _iterations(epochs, batch):
    return int(round(epochs * COCO_TRAIN_IMAGES / batch))


# ---------------------------------------------------------------------------------------------------------------
# every file: loads, validates, resolves
# ---------------------------------------------------------------------------------------------------------------
def test_recipes_are_found():
    assert len(RECIPES) >= 20, RECIPES
    for sub in ("COCO-Detection", "COCO-InstanceSegmentation", "COCO-PanopticSegmentation",
                "ADE20K-SemanticSegmentation", "shapes"):
        assert any(_rel(p).startswith(sub + os.sep) for p in RECIPES), sub


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=_rel)
def test_config_loads_and_resolves(path):
    cfg, world_size = _resolved_at_scale(path)
    s = cfg.SOLVER
    assert s.SCHEDULE_UNIT == "iter" and s.LR_SCALING.RULE == "none" and s.SCHEDULE_MULT == 1.0
    assert isinstance(s.MAX_ITER, int) and s.MAX_ITER > 0
    assert all(isinstance(x, int) and 0 < x < s.MAX_ITER for x in s.STEPS), (s.STEPS, s.MAX_ITER)
    assert 0 <= s.WARMUP_ITERS < s.MAX_ITER
    assert s.BASE_LR > 0 and math.isfinite(s.BASE_LR)
    if s.LR_SCHEDULER_NAME == "WarmupCosineRestartsLR":
        assert 0 < s.RESTARTS.CYCLE_ITERS < s.MAX_ITER
    sync = cfg.MODEL.SYNC_BN
    if sync.ENABLED and not os.path.basename(path).startswith("Base-"):
        # the recipe's GPU count splits into SyncBN groups (else the error comes at start-up on the cluster)
        assert sync.GROUP_SIZE == 0 or world_size % sync.GROUP_SIZE == 0, (sync.GROUP_SIZE, world_size)
    again = prepare_solver(cfg, world_size, COCO_TRAIN_IMAGES)
    assert again.dump() == cfg.dump()  # resolved means resolved

    if _rel(path).startswith(("COCO-", "ADE20K-")) and not os.path.basename(path).startswith("Base-"):
        with open(path) as f:
            header = "".join(line for line in f if line.startswith("#"))
        metric = {"SemanticSegmentor": "mIoU", "PanopticFPN": "PQ"}.get(cfg.MODEL.META_ARCHITECTURE, "AP")
        assert "Table" in header and metric in header, f"cite the paper's table and reported {metric} at the top"
        assert cfg.MODEL.WEIGHTS == "", "pretrained weights are the user's to set"
        assert cfg.SOLVER.ACCUMULATE_STEPS == 1 and cfg.SOLVER.IMS_PER_BATCH % IMAGES_PER_GPU == 0


# ---------------------------------------------------------------------------------------------------------------
# every recipe: one training iteration on the shapes data, CPU-sized
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes_root():
    """Register the shapes datasets once for the module (detection, semantic and panoptic; generated on first use,
    then cached)."""
    root = os.path.join(os.environ.get("LARGEBATCH_DATASETS", os.path.join(REPO, "datasets")), "shapes")
    names = [n for pair in SHAPES_DATASETS.values() for n in pair]
    make_config("DATASETS.TRAIN", tuple(names), "DATASETS.TEST", (), "DATASETS.SHAPES_ROOT", root, config=None,
                register=True)
    return root


#: per meta-architecture: the shapes datasets it trains and evaluates on, the classes of its classifiers (key ->
#: count), the losses one iteration reports, and the detector parts whose parameters train (written out here, not
#: taken from the code under test)
SHAPES_DATASETS = {
    "GeneralizedRCNN": ("shapes_train", "shapes_val"),
    "RetinaNet": ("shapes_train", "shapes_val"),
    "SemanticSegmentor": ("shapes_sem_seg_train", "shapes_sem_seg_val"),
    "PanopticFPN": ("shapes_panoptic_train_separated", "shapes_panoptic_val_separated"),
}
CLASSES = {
    "GeneralizedRCNN": {"MODEL.ROI_HEADS.NUM_CLASSES": 3},
    "RetinaNet": {"MODEL.RETINANET.NUM_CLASSES": 3},
    "SemanticSegmentor": {"MODEL.SEM_SEG_HEAD.NUM_CLASSES": 4},  # background + 3 shapes
    "PanopticFPN": {"MODEL.ROI_HEADS.NUM_CLASSES": 3, "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 2},  # things + background
}
RCNN_LOSSES = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
LOSSES = {
    "GeneralizedRCNN": RCNN_LOSSES,
    "RetinaNet": {"loss_cls", "loss_box_reg"},
    "SemanticSegmentor": set(),  # its one loss: detectron2 logs only total_loss then
    "PanopticFPN": RCNN_LOSSES | {"loss_mask", "loss_sem_seg"},
}
PARTS = {
    "GeneralizedRCNN": {"backbone", "fpn", "rpn", "box_head"},
    "RetinaNet": {"backbone", "fpn", "head"},
    "SemanticSegmentor": {"backbone", "fpn", "sem_seg_head"},
    "PanopticFPN": {"backbone", "fpn", "rpn", "box_head", "mask_head", "sem_seg_head"},
}
PIPELINES = [os.path.join(CONFIG_DIR, "shapes", f"{name}.yaml")
             for name in ("retinanet", "semantic_fpn", "panoptic_fpn")]


def _cpu_sized(path, shapes_root, output_dir, *extra):
    """The recipe on 2 shapes images with the small backbone; optimizer, AGVM, schedule, SyncBN, mask kept; the
    datasets and class counts of its meta-architecture."""
    arch = make_config(config=path).MODEL.META_ARCHITECTURE
    train, test = SHAPES_DATASETS[arch]
    backbone = "build_small_retinanet_resnet_fpn_backbone" if arch == "RetinaNet" else "build_small_resnet_fpn_backbone"
    opts = [
        "DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{test}',)",
        "DATASETS.SHAPES_ROOT", shapes_root, "DATALOADER.NUM_WORKERS", "0",
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
        *[str(x) for item in CLASSES[arch].items() for x in item],
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.ACCUMULATE_STEPS", "1",
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128",
        "MODEL.BACKBONE.NAME", backbone,
        "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
        "MODEL.FPN.OUT_CHANNELS", "32",
        # fewer proposals and RoIs, narrower heads: the R-CNN heads dominate the CPU time otherwise
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "300", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
        "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.RETINANET.NUM_CONVS", "1", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
        "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(output_dir), "SEED", "0", *extra,
    ]
    cfg = make_config(*opts, config=path)
    if cfg.SOLVER.AGVM.ENABLED:
        # measure the variance and update mu on this one iteration, instead of at the end of the warm-up
        cfg.SOLVER.AGVM.START_ITER = 0
    return cfg


def _train_one_iteration(trainer):
    """Iteration 0 with the trainer's hooks; not train(), whose after_train would evaluate on shapes_val."""
    trainer.iter = trainer.start_iter = 0
    with EventStorage(0) as storage:
        trainer.storage = storage
        trainer._trainer.storage = storage
        trainer.before_train()
        trainer.before_step()
        trainer.run_step()
        trainer.after_step()
    return storage


def _check_one_iteration(cfg):
    """LargeBatchTrainer built from ``cfg`` as configured (optimizer, AGVM, SyncBN, mask head), one iteration with
    its hooks: the meta-architecture's losses, finite; every part of the detector moved; AGVM's mu logged."""
    resolved = prepare_solver(cfg, 1, len(DatasetCatalog.get(cfg.DATASETS.TRAIN[0])))
    torch.manual_seed(0)
    trainer = LargeBatchTrainer(resolved)
    assert trainer.cfg.dump() == resolved.dump()  # the trainer's own prepare_solver changes nothing more
    arch = cfg.MODEL.META_ARCHITECTURE

    model, optimizer = trainer._trainer.model, trainer._trainer.optimizer  # detectron2 0.6 has no .model
    base = optimizer.optimizer if isinstance(optimizer, AGVM) else optimizer
    assert isinstance(optimizer, AGVM) == cfg.SOLVER.AGVM.ENABLED
    assert type(base) is OPTIMIZER_CLASSES[cfg.SOLVER.OPTIMIZER.upper()]
    if cfg.SOLVER.OPTIMIZER.upper() == "PMDLAMB":
        g = base.param_groups[0]
        assert (g["cycle"], g["scale"]) == (cfg.SOLVER.PMDLAMB.CYCLE, cfg.SOLVER.PMDLAMB.SCALE)
    if cfg.SOLVER.OPTIMIZER.upper() == "LARS":
        assert base.param_groups[0]["trust_coefficient"] == cfg.SOLVER.LARS.TRUST_COEFFICIENT
    sync_layers = [m for m in model.modules() if isinstance(m, GroupSyncBatchNorm)]
    assert bool(sync_layers) == cfg.MODEL.SYNC_BN.ENABLED
    assert all(m.group_size == cfg.MODEL.SYNC_BN.GROUP_SIZE for m in sync_layers)
    if hasattr(model, "roi_heads"):
        assert hasattr(model.roi_heads, "mask_head") == cfg.MODEL.MASK_ON

    partition = ModulePartition(cfg.MODEL.MODULE_PARTITION)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    storage = _train_one_iteration(trainer)

    losses = {k: v[0] for k, v in storage.latest().items() if k.startswith("loss") or k == "total_loss"}
    mask = cfg.MODEL.MASK_ON and arch == "GeneralizedRCNN"
    assert set(losses) == LOSSES[arch] | ({"loss_mask"} if mask else set()) | {"total_loss"}, losses
    assert all(math.isfinite(v) for v in losses.values()), losses
    wanted = PARTS[arch] | ({"mask_head"} if mask else set())
    if cfg.SOLVER.AGVM.ENABLED:  # a mu for every part (the anchor's is 1)
        logged = {k.split("/")[1] for k in storage.latest() if k.startswith("agvm_mu/")}
        assert logged == wanted, logged

    moved, parts = set(), set()
    for name, p in model.named_parameters():
        if name in before:
            parts.add(partition(name))
            if not torch.equal(before[name], p.detach()):
                moved.add(partition(name))
            assert torch.isfinite(p).all(), name
    assert parts == wanted and moved == parts, (sorted(parts), sorted(moved))


@pytest.mark.parametrize("path", RECIPES, ids=_rel)
def test_recipe_trains_one_iteration(path, shapes_root, tmp_path):
    _check_one_iteration(_cpu_sized(path, shapes_root, tmp_path))


@pytest.mark.parametrize("agvm", [False, True], ids=["plain", "agvm"])
@pytest.mark.parametrize("optimizer", ["SGD", "ADAMW", "LARS", "LAMB", "PMDLAMB"])
@pytest.mark.parametrize("path", PIPELINES, ids=_rel)
def test_every_pipeline_trains_with_every_optimizer(path, optimizer, agvm, shapes_root, tmp_path):
    """RetinaNet, Semantic FPN and Panoptic FPN with each optimizer, with and without AGVM, SyncBN and gradient
    accumulation over 2 micro-batches."""
    cfg = _cpu_sized(path, shapes_root, tmp_path, "SOLVER.OPTIMIZER", optimizer, "SOLVER.AGVM.ENABLED", str(agvm),
                     "SOLVER.LR_SCALING.RULE", "none", "SOLVER.BASE_LR", "0.001")
    cfg.SOLVER.ACCUMULATE_STEPS = 2
    _check_one_iteration(cfg)


# ---------------------------------------------------------------------------------------------------------------
# resolved hyper-parameters against the papers (values recomputed here from the papers' rules)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [16, 64, 256])
@pytest.mark.parametrize("policy", ["", "_long"])
def test_megdet_matches_paper(batch, policy):
    """MegDet Sec. 4: LR 0.02 at batch 16, linearly scaled; normal policy x0.1 at epochs 8, 10, end 11; long
    x0.1 at 11, 14, x0.5 at 17, end 18; warm-up from the batch-16 LR; BN size 16 (batch 16) or 32 (Table 3)."""
    cfg, world_size = _resolved_at_scale(f"COCO-Detection/megdet_R_50_FPN_b{batch}{policy}.yaml")
    s = cfg.SOLVER
    assert s.OPTIMIZER == "SGD" and s.MOMENTUM == 0.9 and s.WEIGHT_DECAY == 1e-4
    assert s.IMS_PER_BATCH == batch
    assert s.BASE_LR == pytest.approx(0.02 * batch / 16)  # 0.32 at batch 256
    assert s.BASE_LR * s.WARMUP_FACTOR == pytest.approx(0.02) and s.WARMUP_METHOD == "linear"
    steps, end = ((11, 14, 17), 18) if policy else ((8, 10), 11)
    assert s.MAX_ITER == _iterations(end, batch)
    assert tuple(s.STEPS) == tuple(_iterations(e, batch) for e in steps)
    assert list(s.STEP_GAMMAS) == ([0.1, 0.1, 0.5] if policy else []) and s.GAMMA == 0.1
    assert cfg.MODEL.SYNC_BN.ENABLED
    assert bn_size(cfg.MODEL.SYNC_BN.GROUP_SIZE, world_size, IMAGES_PER_GPU) == (16 if batch == 16 else 32)


def test_megdet_b256_lr_is_0_32():
    cfg, _ = _resolved_at_scale("COCO-Detection/megdet_R_50_FPN_b256.yaml")
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.32)


@pytest.mark.parametrize(
    "name, batch, mult",
    [("pmdlamb_R_50_FPN_b256", 256, 1.0), ("pmdlamb_R_50_FPN_b512", 512, 1.0),
     ("pmdlamb_R_50_FPN_b512_1.4x", 512, 1.4), ("pmdlamb_R_50_FPN_b1056", 1056, 1.0),
     ("pmdlamb_R_50_FPN_b1056_1.4x", 1056, 1.4), ("lamb_R_50_FPN_b256", 256, 1.0),
     ("lamb_R_50_FPN_b512", 512, 1.0), ("lamb_R_50_FPN_b1056", 1056, 1.0)],
)
def test_largedet_matches_paper(name, batch, mult):
    """LargeDet Sec. 4.1: PMD-LAMB alpha 0.012, T 200, weight decay 5e-4, betas (0.9, 0.999); LR by LSR from 0.02
    at 16; 90000 iterations at batch 16 with x0.1 at 60000 / 80000, reduced proportionally (x1.4 for "1.4x");
    SyncBN with BN size 32 and no frozen BN (G2). The LAMB baseline: the same with T = infinity (Table 3)."""
    cfg, world_size = _resolved_at_scale(f"COCO-Detection/largedet_{name}.yaml")
    s = cfg.SOLVER
    assert s.OPTIMIZER == "PMDLAMB" and s.IMS_PER_BATCH == batch
    assert s.PMDLAMB.SCALE == 0.012 and s.WEIGHT_DECAY == 5e-4 and tuple(s.PMDLAMB.BETAS) == (0.9, 0.999)
    if name.startswith("lamb"):
        horizon = s.MAX_ITER  # xi = cos(pi/2 * t/T) stays 1 over the whole run
        assert math.cos(math.pi / 2 * horizon / s.PMDLAMB.CYCLE) > 1 - 1e-9
    else:
        assert s.PMDLAMB.CYCLE == 200
    assert s.BASE_LR == pytest.approx(0.02 * batch / 16)
    scaled = [int(round(x * 16 / batch)) for x in (90000, 60000, 80000)]
    expected = [int(round(x * mult)) for x in scaled]
    assert [s.MAX_ITER, *s.STEPS] == expected
    sync = cfg.MODEL.SYNC_BN
    assert sync.ENABLED and sync.CONVERT_FROZEN
    assert bn_size(sync.GROUP_SIZE, world_size, IMAGES_PER_GPU) == 32


@pytest.mark.parametrize("rel, iters, steps", [
    ("COCO-Detection/largedet_pmdlamb_R_50_FPN_b320_fast.yaml", 3360, (2400, 3200)),
    ("COCO-InstanceSegmentation/largedet_pmdlamb_mask_rcnn_R_50_FPN_b320_fast.yaml", 4120, (3000, 4000)),
])
def test_largedet_fast_training_matches_table4(rel, iters, steps):
    cfg, _ = _resolved_at_scale(rel)
    s = cfg.SOLVER
    assert s.IMS_PER_BATCH == 320 and s.BASE_LR == pytest.approx(0.4)  # "0.4 according to the LSR"
    assert s.MAX_ITER == iters and tuple(s.STEPS) == steps
    assert (s.OPTIMIZER, s.PMDLAMB.SCALE, s.PMDLAMB.CYCLE) == ("PMDLAMB", 0.012, 200)


def _agvm_lr(base_lr_at_16, batch):
    """AGVM Sec. 4: linear scaling up to batch 128, square root above."""
    return base_lr_at_16 * batch / 16 if batch <= 128 else base_lr_at_16 * 128 / 16 * math.sqrt(batch / 128)


@pytest.mark.parametrize("rel, batch, epochs, base_lr", [
    ("COCO-Detection/agvm_sgd_R_50_FPN_b256.yaml", 256, 16, 0.02),
    ("COCO-Detection/agvm_sgd_R_50_FPN_b512.yaml", 512, 16, 0.02),
    ("COCO-Detection/agvm_sgd_R_50_FPN_b1024.yaml", 1024, 16, 0.02),
    ("COCO-Detection/agvm_adamw_R_50_FPN_b256.yaml", 256, 12, 1e-4),
    ("COCO-Detection/agvm_adamw_R_50_FPN_b512.yaml", 512, 12, 1e-4),
    ("COCO-Detection/agvm_adamw_R_50_FPN_b1024.yaml", 1024, 12, 1e-4),
    ("COCO-Detection/agvm_adamw_R_50_FPN_b1536.yaml", 1536, 12, 1e-4),
    ("COCO-InstanceSegmentation/agvm_sgd_mask_rcnn_R_50_FPN_b256.yaml", 256, 14, 0.02),
    ("COCO-InstanceSegmentation/agvm_sgd_mask_rcnn_R_50_FPN_b512.yaml", 512, 14, 0.02),
    ("COCO-InstanceSegmentation/agvm_sgd_mask_rcnn_R_50_FPN_b1024.yaml", 1024, 14, 0.02),
])
def test_agvm_matches_paper(rel, batch, epochs, base_lr):
    """AGVM: backbone anchor, alpha 0.97, tau 10 (5 above 1K); linear-then-sqrt LR; Table 2 / 3 iterations are
    16 (Faster R-CNN, SGD), 14 (Mask R-CNN, SGD) and 12 (AdamW) epochs of ceil(117266 / batch) iterations."""
    cfg, _ = _resolved_at_scale(rel)
    s = cfg.SOLVER
    assert s.IMS_PER_BATCH == batch and s.AGVM.ENABLED and s.AGVM.ANCHOR == "backbone"
    assert s.AGVM.MOMENTUM == 0.97 and s.AGVM.INTERVAL == (5 if batch > 1024 else 10)
    assert s.BASE_LR == pytest.approx(_agvm_lr(base_lr, batch))
    assert s.OPTIMIZER == ("SGD" if base_lr == 0.02 else "ADAMW")
    paper_iterations = epochs * math.ceil(COCO_TRAIN_IMAGES / batch)  # the papers' "Iterations" column
    assert s.MAX_ITER == _iterations(epochs, batch)
    assert abs(s.MAX_ITER - paper_iterations) <= epochs  # rounding vs. the paper's padded last batch
    assert cfg.MODEL.MASK_ON == ("InstanceSegmentation" in rel)


@pytest.mark.parametrize("batch, iterations, tau", [(512, 10000, 10), (1024, 5000, 10), (2048, 2500, 5)])
def test_agvm_semantic_fpn_matches_paper(batch, iterations, tau):
    """AGVM Table 2, Semantic FPN on ADE20K: SGD + AGVM, R50, Table 2's iterations (5.12M images at every batch); LR
    linear up to 256 then square root (Sec. 4: "256 on semantic segmentation") from mmsegmentation's 0.01 at batch
    16, its poly schedule to 1% of the LR, weight decay 5e-4; tau 5 above 1K."""
    cfg, _ = _resolved_at_scale(f"ADE20K-SemanticSegmentation/agvm_sgd_semantic_fpn_R_50_b{batch}.yaml")
    s = cfg.SOLVER
    assert cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor" and cfg.MODEL.RESNETS.DEPTH == 50
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 150 and cfg.DATASETS.TRAIN == ("ade20k_sem_seg_train",)
    assert s.OPTIMIZER == "SGD" and s.MOMENTUM == 0.9 and s.WEIGHT_DECAY == 5e-4
    assert s.IMS_PER_BATCH == batch and s.MAX_ITER == iterations and batch * iterations == 5_120_000
    assert s.BASE_LR == pytest.approx(0.01 * 256 / 16 * math.sqrt(batch / 256))
    assert s.LR_SCHEDULER_NAME == "WarmupPolyLR" and s.POLY_POWER == 0.9
    assert s.BASE_LR_END == pytest.approx(0.01 * s.BASE_LR)
    assert s.AGVM.ENABLED and s.AGVM.ANCHOR == "backbone" and s.AGVM.MOMENTUM == 0.97 and s.AGVM.INTERVAL == tau
    assert 0 < s.WARMUP_ITERS < iterations and cfg.MODEL.SYNC_BN.ENABLED


@pytest.mark.parametrize("batch, iterations", [(256, 6426), (512, 3220), (1024, 1610)])
def test_agvm_panoptic_fpn_matches_paper(batch, iterations):
    """AGVM Table 2, Panoptic FPN on COCO: SGD + AGVM, R50-FPN, Table 2's iterations (14 x ceil(117266 / batch), as
    its Mask R-CNN rows), LR linear up to 128 then square root from 0.02 at 16, x0.1 at 3/4 and 7/8 of the run."""
    cfg, _ = _resolved_at_scale(f"COCO-PanopticSegmentation/agvm_sgd_panoptic_fpn_R_50_FPN_b{batch}.yaml")
    s = cfg.SOLVER
    assert cfg.MODEL.META_ARCHITECTURE == "PanopticFPN" and cfg.MODEL.MASK_ON
    assert cfg.DATASETS.TRAIN == ("coco_2017_train_panoptic_separated",)
    assert not cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS and cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT == 0.5
    assert s.IMS_PER_BATCH == batch and s.MAX_ITER == iterations == 14 * math.ceil(COCO_TRAIN_IMAGES / batch)
    assert s.BASE_LR == pytest.approx(_agvm_lr(0.02, batch)) and s.OPTIMIZER == "SGD"
    assert s.STEPS == (round(0.75 * iterations), round(0.875 * iterations)) and s.GAMMA == 0.1
    assert s.WARMUP_ITERS == 2 * math.ceil(COCO_TRAIN_IMAGES / batch)
    assert s.AGVM.ENABLED and s.AGVM.ANCHOR == "backbone" and s.AGVM.MOMENTUM == 0.97 and s.AGVM.INTERVAL == 10


@pytest.mark.parametrize("batch, lr", [(4096, 0.001), (10000, 0.0015)])
def test_agvm_retinanet_r18_matches_paper(batch, lr):
    """AGVM Table 5: RetinaNet R18, AdamW + AGVM, 24 epochs, LR 0.001 at 4k and 0.0015 at 10k (Sec. 4.1), tau 5."""
    cfg, _ = _resolved_at_scale(f"COCO-Detection/agvm_adamw_retinanet_R_18_FPN_b{batch}.yaml")
    s = cfg.SOLVER
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet" and cfg.MODEL.RESNETS.DEPTH == 18
    assert s.OPTIMIZER == "ADAMW" and s.IMS_PER_BATCH == batch and s.BASE_LR == pytest.approx(lr)
    assert s.MAX_ITER == _iterations(24, batch) and s.STEPS == (_iterations(16, batch), _iterations(22, batch))
    assert s.AGVM.ENABLED and s.AGVM.ANCHOR == "backbone" and s.AGVM.MOMENTUM == 0.97 and s.AGVM.INTERVAL == 5


def test_agvm_b1024_lr():
    cfg, _ = _resolved_at_scale("COCO-Detection/agvm_sgd_R_50_FPN_b1024.yaml")
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.02 * 128 / 16 * math.sqrt(1024 / 128))


@pytest.mark.parametrize("rel, batch, lr, restarts", [
    ("COCO-InstanceSegmentation/cooldet_mask_rcnn_R_50_FPN_b64_syncbn.yaml", 64, 0.0008, False),
    ("COCO-InstanceSegmentation/cooldet_mask_rcnn_R_50_FPN_b128_syncbn.yaml", 128, 0.0008, False),
    ("COCO-InstanceSegmentation/cooldet_mask_rcnn_R_50_FPN_b64.yaml", 64, 0.0008, False),
    ("COCO-InstanceSegmentation/cooldet_mask_rcnn_R_50_FPN_b64_restarts.yaml", 64, 0.001, True),
])
def test_cooldet_matches_paper(rel, batch, lr, restarts):
    """CoolDet: LARS, no LR scaling between batches, warm-up 1 epoch, 10 epochs, cosine annealing; the restart
    variant restarts every 2 epochs with the peak halved (Table 3)."""
    cfg, _ = _resolved_at_scale(rel)
    s = cfg.SOLVER
    assert cfg.MODEL.MASK_ON and s.OPTIMIZER == "LARS" and s.IMS_PER_BATCH == batch
    assert s.BASE_LR == pytest.approx(lr) and s.BASE_LR_END == 0
    assert s.MAX_ITER == _iterations(10, batch) and s.WARMUP_ITERS == _iterations(1, batch)
    if restarts:
        assert s.LR_SCHEDULER_NAME == "WarmupCosineRestartsLR"
        assert s.RESTARTS.CYCLE_ITERS == _iterations(2, batch)  # 3665 iterations at batch 64
        assert s.RESTARTS.GAMMA == 0.5 and s.RESTARTS.CYCLE_MULT == 1.0
    else:
        assert s.LR_SCHEDULER_NAME == "WarmupCosineLR"
    assert cfg.MODEL.SYNC_BN.ENABLED == rel.endswith("_syncbn.yaml")
