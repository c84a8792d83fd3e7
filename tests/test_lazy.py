"""LazyConfig (detectron2's Python configs) through train_net.py: the part-aware param groups, the largebatch node,
the run config and its one-line errors, and detectron2's own LSJ new baseline taken to the shapes data
(configs/lazy/shapes_mask_rcnn_LSJ_lamb_agvm.py) trained with LAMB + AGVM on 2 CPU workers, resumed exactly and
evaluated with --eval-only."""
import inspect
import json
import os
import shutil

import pytest
import torch

from helpers import REPO, import_script, make_config, run_python

LAZY_SHAPES = "configs/lazy/shapes_mask_rcnn_LSJ_lamb_agvm.py"
# 4 iterations of batch 4 (2 per worker), a checkpoint every 2, AGVM and the monitor from iteration 0 every 2
SHORT = ["train.max_iter=4", "dataloader.train.total_batch_size=4", "train.checkpointer.period=2",
         "largebatch.monitor.period=2", "optimizer.interval=2", "optimizer.start_iter=0"]
PARTS = {"backbone", "fpn", "rpn", "box_head", "mask_head"}


@pytest.fixture(scope="module")
def shapes_model():
    from largebatch.engine.trainer import LargeBatchTrainer

    return LargeBatchTrainer.build_model(make_config(), for_training=False)  # the small shapes Faster R-CNN


def _by_param(groups):
    """parameter -> (lr, weight_decay) of the group that holds it; each parameter in one group only."""
    out = {}
    for g in groups:
        for p in g["params"]:
            assert p not in out, "a parameter in two groups"
            out[p] = (g.get("lr"), g.get("weight_decay"))
    return out


def test_get_part_params_keeps_detectron2s_rules_and_adds_the_parts(shapes_model):
    from detectron2.solver.build import get_default_optimizer_params

    from largebatch.lazy import get_part_params
    from largebatch.optim.groups import ModulePartition

    kwargs = dict(base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.0, bias_lr_factor=2.0, weight_decay_bias=0.0)
    reference = _by_param(get_default_optimizer_params(shapes_model, **kwargs))
    groups = get_part_params(shapes_model, **kwargs)
    assert _by_param(groups) == reference  # detectron2's LR / weight decay of every parameter, nothing more or less
    partition = ModulePartition()
    norms = {p for m in shapes_model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             for p in m.parameters(recurse=False)}
    for g in groups:
        for p, name in zip(g["params"], g["param_names"]):
            assert dict(shapes_model.named_parameters())[name] is p
            assert g["module"] == partition(name)
            assert g["adapt"] == (p not in norms and not name.endswith(".bias")), name
    assert {g["module"] for g in groups} == {"backbone", "fpn", "rpn", "box_head"}


def test_get_part_params_layerwise_decay_where_detectron2_has_it(shapes_model):
    from detectron2.solver.build import get_default_optimizer_params

    from largebatch.lazy import get_part_params

    def decay(name):  # ViTDet-style: a factor per parameter name
        return 0.5 if name.startswith("backbone.bottom_up") else 1.0

    if "lr_factor_func" not in inspect.signature(get_default_optimizer_params).parameters:  # detectron2 v0.6
        with pytest.raises(ValueError, match="layer-wise LR decay needs detectron2 main"):
            get_part_params(shapes_model, base_lr=0.1, lr_factor_func=decay)
        return
    groups = get_part_params(shapes_model, base_lr=0.1, lr_factor_func=decay)
    for g in groups:
        expected = 0.05 if g["module"] == "backbone" else 0.1
        assert g["lr"] == pytest.approx(expected), (g["module"], g["lr"])


def test_the_largebatch_node_mirrors_the_yaml_keys():
    from largebatch.lazy.config import LAZY_KEYS, largebatch_node, lazy_key

    node = largebatch_node()
    cfg = make_config(config=None)
    assert node.monitor.period == cfg.MONITOR.PERIOD and node.sync_bn.group_size == cfg.MODEL.SYNC_BN.GROUP_SIZE
    assert node.solver.lr_scaling.rule == "none" and node.solver.accumulate_steps == 1
    assert node.datasets.check_images is True and list(node.module_partition) == []
    assert LAZY_KEYS["largebatch.sync_bn.group_size"] == "MODEL.SYNC_BN.GROUP_SIZE"
    assert lazy_key("MONITOR.EXPLOSION_FACTOR") == "largebatch.monitor.explosion_factor"
    assert lazy_key("SOLVER.MAX_ITER") == "train.max_iter"


def test_the_run_config_comes_from_the_lazy_config_and_the_lr_rule_applies_once():
    from largebatch.lazy import load_lazy_config

    lazy, cfg = load_lazy_config(os.path.join(REPO, LAZY_SHAPES), [
        "largebatch.solver.lr_scaling.rule=linear", "largebatch.solver.lr_scaling.reference_batch=4"], 2)
    s = cfg.SOLVER
    assert (s.IMS_PER_BATCH, s.MAX_ITER, s.OPTIMIZER, s.WARMUP_ITERS) == (8, 128, "LAMB", 10)
    assert s.AGVM.ENABLED and cfg.MODEL.SYNC_BN.ENABLED and cfg.MONITOR.PERIOD == 10
    assert lazy.optimizer.optimizer.lr == pytest.approx(0.004 * 8 / 4) == s.BASE_LR
    assert s.LR_SCALING.RULE == "none"  # applied: the trainer's prepare_solver does not scale again
    assert cfg.DATASETS.TRAIN == ("shapes_train",) and cfg.DATASETS.TEST == ("shapes_val",)
    assert cfg.OUTPUT_DIR == "output/lazy_shapes_lsj" and cfg.MODEL.DEVICE == "cpu" and cfg.SEED == 1


@pytest.mark.parametrize("argv, message", [
    ([LAZY_SHAPES, "train.max_itr=10"], "unknown config key 'train.max_itr'"),
    ([LAZY_SHAPES, "SOLVER.BASE_LR", "0.1"], "override 'SOLVER.BASE_LR' is not key=value"),
    ([LAZY_SHAPES, "largebatch.monitor.period=0"], "largebatch.monitor.period = 0 is not allowed"),
    ([LAZY_SHAPES, "largebatch.monitor.perod=5"], "unknown config key 'largebatch.monitor.perod'"),
    ([LAZY_SHAPES, "train.max_iter=0"], "train.max_iter = 0 is not allowed"),
    ([LAZY_SHAPES, "largebatch.sync_bn.enabled=False"], "torch.nn.SyncBatchNorm layers (norm 'SyncBN') run on GPUs"),
    ([LAZY_SHAPES, "optimizer.optimizer.lr=-1.0"], "optimizer.optimizer.lr = -1.0 is not allowed: expected a number"),
    ([LAZY_SHAPES, "optimizer.optimizer.betas=[0.9,1.5]"], "optimizer: cannot be built (ValueError: Invalid beta"),
    (["configs/lazy/nope.py"], "--config-file 'configs/lazy/nope.py': no such file"),
    (["model_zoo://new_baselines/nope.py"], "model_zoo://new_baselines/nope.py is not a config of detectron2's"),
])
def test_bad_lazy_configs_fail_at_once_with_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    cli = import_script("train_net.py").cli
    with pytest.raises(SystemExit) as exit_info:
        cli(["--num-gpus", "2", "--config-file", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def _train(out, *opts, resume=False):
    result = run_python("train_net.py", "--num-gpus", "2", "--dist-url", "auto", *(["--resume"] if resume else []),
                        "--config-file", LAZY_SHAPES, *SHORT, f"train.output_dir={out}", *opts)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def lazy_run(tmp_path_factory):
    """The shapes LSJ LazyConfig trained 4 iterations (evaluated at the end); then, from its checkpoint of iteration
    2 (what a kill -9 right after it leaves), resumed to the end in another folder."""
    root = tmp_path_factory.mktemp("lazy")
    whole, resumed = root / "whole", root / "resumed"
    log = _train(whole)
    resumed.mkdir()
    shutil.copy(whole / "model_0000001.pth", resumed)
    (resumed / "last_checkpoint").write_text("model_0000001.pth")
    resumed_log = _train(resumed, resume=True)
    return whole, resumed, log, resumed_log


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_the_lsj_baseline_trains_with_lamb_and_agvm_per_part(lazy_run):
    whole, _, log, _ = lazy_run
    logged = set().union(*_metrics(whole))
    for kind in ("agvm_mu", "trust_ratio", "grad_var"):
        assert {k.split("/")[1] for k in logged if k.startswith(kind + "/")} == PARTS, (kind, sorted(logged))
    assert "LAMB at SOLVER.BASE_LR 0.004" in log and "get_part_params" in log
    assert (whole / "config_lazy.yaml").exists() and "bbox/AP" in _metrics(whole)[-1]


@pytest.mark.slow
def test_the_lsj_baseline_resumes_to_the_uninterrupted_runs_weights(lazy_run):
    whole, resumed, _, log = lazy_run
    assert "Starting training from iteration 2" in log
    a, b = (torch.load(run / "model_final.pth", map_location="cpu", weights_only=False)["model"]
            for run in (whole, resumed))
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff <= 1e-6, diff


@pytest.mark.slow
def test_the_lsj_baseline_evaluates_with_eval_only_as_at_the_end_of_training(lazy_run):
    whole, _, _, _ = lazy_run
    result = run_python("train_net.py", "--eval-only", "--num-gpus", "2", "--dist-url", "auto", "--config-file",
                        LAZY_SHAPES, f"train.init_checkpoint={whole / 'model_final.pth'}",
                        f"train.output_dir={whole / 'eval'}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.split("copypaste: ", 1)[1] for line in (result.stdout + result.stderr).splitlines()
             if "copypaste: " in line]
    values = dict(zip(lines[lines.index("Task: bbox") + 1].split(","),
                      map(float, lines[lines.index("Task: bbox") + 2].split(","))))
    assert values["AP"] == pytest.approx(_metrics(whole)[-1]["bbox/AP"], abs=5e-5, nan_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# the LazyConfig recipes at COCO scale: the rule that set each one's LR and warm-up, recomputed here
# ---------------------------------------------------------------------------------------------------------------
LSJ_IMAGES = 184375 * 64  # the LSJ baseline's 100 epochs, in images
LAZY_RECIPES = {  # file -> (optimizer, batch, LR after scaling, warm-up epochs, SyncBN group, AGVM)
    "megdet_sgd_LSJ_100ep_b512.py": ("SGD", 512, 0.1 * 512 / 64, 1, 4, False),
    "largedet_pmdlamb_LSJ_100ep_b1024.py": ("PMDLAMB", 1024, 0.1 * 1024 / 64, 2, 0, False),
    "agvm_sgd_LSJ_100ep_b1024.py": ("SGD", 1024, 0.1 * 128 / 64 * (1024 / 128) ** 0.5, 2, 0, True),
    "cooldet_lars_LSJ_100ep_b256.py": ("LARS", 256, 0.0008, 1, 0, False),
}


@pytest.mark.parametrize("name", sorted(LAZY_RECIPES))
def test_lazy_recipes_resolve_to_their_papers_rules(name):
    from largebatch.lazy import build_lazy_model, build_lazy_optimizer, load_lazy_config
    from largebatch.optim import AGVM

    optimizer, batch, lr, warmup_epochs, group, agvm = LAZY_RECIPES[name]
    lazy, cfg = load_lazy_config(os.path.join(REPO, "configs", "lazy", name), [], batch // 8)  # 8 images per GPU
    s = cfg.SOLVER
    assert (s.OPTIMIZER, s.IMS_PER_BATCH, s.AGVM.ENABLED) == (optimizer, batch, agvm)
    assert s.BASE_LR == pytest.approx(lr) and s.MAX_ITER == round(LSJ_IMAGES / batch)
    assert s.WARMUP_ITERS == round(warmup_epochs * 118000 / batch)
    assert cfg.MODEL.SYNC_BN.ENABLED and cfg.MODEL.SYNC_BN.GROUP_SIZE == group and s.AMP.ENABLED
    milestones = lazy.lr_multiplier.scheduler.get("milestones")
    if milestones is not None:  # the LSJ file's x0.1 steps at the same fractions of the run
        assert [m / s.MAX_ITER for m in milestones] == pytest.approx([163889 / 184375, 177546 / 184375], abs=1e-4)
    cpu = cfg.clone()
    cpu.defrost()
    cpu.MODEL.DEVICE = "cpu"
    model = build_lazy_model(lazy, cpu, for_training=False)  # R50-FPN Mask R-CNN, SyncBN converted
    built = build_lazy_optimizer(lazy, cfg, model)
    assert isinstance(built, AGVM) == agvm
    assert {g["module"] for g in built.param_groups} == PARTS
    assert all(g["lr"] == pytest.approx(lr) for g in built.param_groups if g["module"] != "other")


def test_the_vitdet_recipe_decays_the_lr_by_layer_on_detectron2_main():
    """AdamW + AGVM over ViTDet with its layer-wise LR decay (0.7 over 12 blocks): on detectron2 main the backbone's
    groups take 0.7^k of the LR (k = 1 for the last block ... 13 for the patch / position embeddings), the other parts
    the LR; on v0.6 the recipe refuses to load, in one line."""
    from detectron2.solver.build import get_default_optimizer_params

    from largebatch.config import ConfigError
    from largebatch.lazy import build_lazy_model, build_lazy_optimizer, load_lazy_config
    from largebatch.optim import AGVM

    path = os.path.join(REPO, "configs", "lazy", "agvm_adamw_vitdet_b_100ep_b1024.py")
    if "lr_factor_func" not in inspect.signature(get_default_optimizer_params).parameters:
        with pytest.raises(ConfigError, match="ImportError: this recipe needs detectron2 main"):
            load_lazy_config(path, [], 128)
        pytest.skip("detectron2 v0.6 has no ViT, SimpleFeaturePyramid or layer-wise LR decay (refused: checked)")
    lazy, cfg = load_lazy_config(path, [], 128)
    lr = 1e-4 * 128 / 64 * (1024 / 128) ** 0.5  # AGVM's rule from ViTDet's 1e-4 at batch 64
    assert cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.SOLVER.BASE_LR == pytest.approx(lr) and cfg.SOLVER.AGVM.ENABLED
    cpu = cfg.clone()
    cpu.defrost()
    cpu.MODEL.DEVICE = "cpu"
    built = build_lazy_optimizer(lazy, cfg, build_lazy_model(lazy, cpu, for_training=False))
    assert isinstance(built, AGVM)
    factors = {}
    for g in built.param_groups:
        factors.setdefault(g["module"], set()).add(round(g["lr"] / lr, 6))
    assert factors.pop("backbone") == {round(0.7 ** k, 6) for k in range(1, 14)}
    assert factors == {part: {1.0} for part in PARTS - {"backbone"}}  # the SimpleFeaturePyramid is the "fpn"


@pytest.mark.slow
def test_sigterm_checkpoints_a_lazy_config_run_and_resume_continues(tmp_path):
    """Preemption as for a YAML config: SIGTERM to the launcher, every worker checkpoints and exits with 75, and
    --resume continues from the next iteration."""
    import signal
    import sys

    from test_resume import start_and_wait_for_iteration

    common = ["train_net.py", "--num-gpus", "2", "--dist-url", "auto", "--config-file", LAZY_SHAPES,
              "dataloader.train.total_batch_size=4", "train.checkpointer.period=1000", "largebatch.monitor.period=1",
              f"train.output_dir={tmp_path}"]
    proc = start_and_wait_for_iteration([sys.executable, *common, "train.max_iter=500"], tmp_path)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, log[-3000:]
    last = (tmp_path / "last_checkpoint").read_text().strip()
    iteration = torch.load(tmp_path / last, map_location="cpu", weights_only=False)["iteration"]
    assert 2 <= iteration < 499
    resumed = run_python("train_net.py", "--resume", *common[1:], f"train.max_iter={iteration + 2}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Starting training from iteration {iteration + 1}" in resumed.stdout + resumed.stderr
