"""Part-aware param groups and build_optimizer: detector parts from parameter names, detectron2's decay
rules plus "adapt", merged groups, every SOLVER.OPTIMIZER, gradient clipping, and a few training iterations
of a small detector with each optimizer."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from helpers import make_config
from largebatch.config import validate
from largebatch.optim import AGVM, LAMB, LARS, PMDLAMB, ModulePartition, build_optimizer
from largebatch.optim.build import optimizer_name

SMALL = [
    "SOLVER.IMS_PER_BATCH", "2", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16", "MODEL.RESNETS.STEM_OUT_CHANNELS", "16",
    "MODEL.FPN.OUT_CHANNELS", "32", "MONITOR.PERIOD", "2", "SOLVER.WARMUP_ITERS", "1",
]


def small_cfg(*opts, register=False):
    return make_config(*SMALL, *opts, register=register)


@pytest.fixture(scope="module")
def rcnn():
    torch.manual_seed(0)
    return build_model(small_cfg("MODEL.MASK_ON", "True"))


def test_partition_of_an_rcnn_covers_every_part(rcnn):
    partition = ModulePartition()
    parts = {name: partition(name) for name, _ in rcnn.named_parameters()}
    assert parts["backbone.bottom_up.stem.conv1.weight"] == "backbone"
    assert parts["backbone.fpn_lateral2.weight"] == "fpn"
    assert parts["proposal_generator.rpn_head.conv.weight"] == "rpn"
    assert parts["roi_heads.box_head.fc1.weight"] == "box_head"
    assert parts["roi_heads.box_predictor.cls_score.weight"] == "box_head"
    assert parts["roi_heads.mask_head.mask_fcn1.weight"] == "mask_head"
    assert "other" not in parts.values()
    # DDP's "module." prefix is ignored, RetinaNet / Panoptic FPN heads have their parts
    assert partition("module.backbone.fpn_output3.bias") == "fpn"
    assert partition("head.cls_score.weight") == "head"
    assert partition("sem_seg_head.predictor.weight") == "sem_seg_head"


def test_partition_rules_from_the_config_come_first(rcnn):
    cfg = small_cfg("MODEL.MODULE_PARTITION", '[["head", "^roi_heads\\\\.box_predictor\\\\."]]')
    groups = build_optimizer(cfg, rcnn).param_groups
    names = {n: g["module"] for g in groups for n in g["param_names"]}
    assert names["roi_heads.box_predictor.cls_score.weight"] == "head"
    assert names["roi_heads.box_head.fc1.weight"] == "box_head"


def test_groups_carry_part_adapt_and_detectron2_decay_rules(rcnn):
    cfg = small_cfg("SOLVER.OPTIMIZER", "LARS", "SOLVER.WEIGHT_DECAY", "1e-4", "SOLVER.WEIGHT_DECAY_NORM", "0.0",
                    "SOLVER.WEIGHT_DECAY_BIAS", "2e-5", "SOLVER.BIAS_LR_FACTOR", "2.0")
    optimizer = build_optimizer(cfg, rcnn)
    assert isinstance(optimizer, LARS)
    groups = optimizer.param_groups
    by_name = {n: g for g in groups for n in g["param_names"]}
    norm = by_name["backbone.bottom_up.stem.conv1.norm.weight"]
    assert (norm["weight_decay"], norm["adapt"], norm["lr"]) == (0.0, False, cfg.SOLVER.BASE_LR)
    bias = by_name["roi_heads.box_head.fc1.bias"]
    assert (bias["weight_decay"], bias["adapt"], bias["lr"]) == (2e-5, False, 2 * cfg.SOLVER.BASE_LR)
    weight = by_name["roi_heads.box_head.fc1.weight"]
    assert (weight["weight_decay"], weight["adapt"]) == (1e-4, True)
    # every trainable parameter exactly once, and equal settings merged: a few groups per part
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len(set(params)) == sum(p.requires_grad for p in rcnn.parameters())
    keys = [(g["module"], g["lr"], g["weight_decay"], g["adapt"]) for g in groups]
    assert len(keys) == len(set(keys)) and len(groups) <= 3 * len({g["module"] for g in groups})
    # the switches for the trust-ratio exclusions
    adapt_all = build_optimizer(small_cfg("SOLVER.ADAPT_BIAS", "True", "SOLVER.ADAPT_NORM", "True"), rcnn)
    assert all(g["adapt"] for g in adapt_all.param_groups)


@pytest.mark.parametrize(
    "name, cls, hyper",
    [
        ("sgd", torch.optim.SGD, {"momentum": 0.9}),
        ("AdamW", torch.optim.AdamW, {"betas": (0.9, 0.999), "eps": 1e-8}),
        ("lars", LARS, {"trust_coefficient": 0.001, "trust_clip": None}),
        ("LAMB", LAMB, {"bias_correction": True, "eps": 1e-6}),
        ("pmdlamb", PMDLAMB, {"cycle": 200, "scale": 0.012}),
    ],
)
def test_build_optimizer_reads_every_optimizer_case_insensitively(rcnn, name, cls, hyper):
    optimizer = build_optimizer(small_cfg("SOLVER.OPTIMIZER", name), rcnn)
    assert type(optimizer) is cls
    for key, value in hyper.items():
        assert optimizer.param_groups[0][key] == value


def test_agvm_wraps_any_optimizer_and_clipping_wraps_the_inner_one(rcnn):
    cfg = small_cfg("SOLVER.OPTIMIZER", "LAMB", "SOLVER.AGVM.ENABLED", "True", "SOLVER.WARMUP_ITERS", "7",
                    "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm")
    from largebatch import LargeBatchTrainer

    optimizer = LargeBatchTrainer.build_optimizer(cfg, rcnn)
    assert isinstance(optimizer, AGVM) and isinstance(optimizer.optimizer, LAMB)
    assert type(optimizer.optimizer).__name__ == "LAMBWithGradientClip"
    assert optimizer.start_iter == 7  # START_ITER -1 = end of warm-up
    assert optimizer.param_groups is optimizer.optimizer.param_groups


def test_unknown_optimizer_is_one_line_listing_the_valid_ones():
    cfg = small_cfg()
    cfg.defrost()
    cfg.SOLVER.OPTIMIZER = "adagrad"
    for check in (validate, optimizer_name):
        with pytest.raises(ValueError) as e:
            check(cfg)
        assert str(e.value) == (
            "SOLVER.OPTIMIZER = 'adagrad' is not allowed: expected one of SGD, ADAMW, LARS, LAMB, PMDLAMB"
        )


@pytest.mark.parametrize("optimizer", ["SGD", "ADAMW", "LARS", "LAMB", "PMDLAMB"])
def test_a_small_detector_trains_a_few_iterations_with_each_optimizer(optimizer, tmp_path):
    from largebatch import LargeBatchTrainer

    cfg = small_cfg("SOLVER.OPTIMIZER", optimizer, "SOLVER.AGVM.ENABLED", "True", "SOLVER.AGVM.INTERVAL", "2",
                    "SOLVER.BASE_LR", "0.01", "OUTPUT_DIR", str(tmp_path), register=True)
    trainer = LargeBatchTrainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with EventStorage(0) as trainer.storage:
        trainer.before_train()
        for trainer.iter in range(3):
            trainer.before_step()
            trainer.run_step()
            trainer.after_step()
        history = trainer.storage.histories()
    assert torch.isfinite(torch.tensor(history["total_loss"].values()[-1][0]))
    changed = {trainer._trainer.layout.groups[i]["module"]
               for i, p in enumerate(trainer._trainer.layout.params)
               if not torch.equal(before[_name(trainer.model, p)], p.detach())}
    assert changed == {"backbone", "fpn", "rpn", "box_head"}
    assert "agvm_mu/box_head" in history and "trust_ratio/rpn" in history


def _name(model, param):
    return next(n for n, p in model.named_parameters() if p is param)


def test_sync_bn_parts_select_which_detector_parts_are_converted():
    from largebatch import LargeBatchTrainer
    from largebatch.norm import GroupSyncBatchNorm

    cfg = small_cfg("MODEL.FPN.NORM", "BN", "MODEL.SYNC_BN.ENABLED", "True", "MODEL.SYNC_BN.PARTS", '["fpn"]')
    model = LargeBatchTrainer.build_model(cfg)
    partition = ModulePartition()
    converted = {partition(n + ".weight") for n, m in model.named_modules() if isinstance(m, GroupSyncBatchNorm)}
    plain = {partition(n + ".weight") for n, m in model.named_modules()
             if isinstance(m, torch.nn.BatchNorm2d) and not isinstance(m, GroupSyncBatchNorm)}
    assert converted == {"fpn"} and plain == {"backbone"}
