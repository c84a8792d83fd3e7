"""LR schedules, scaling rules and prepare_solver (largebatch/schedule.py), tools/plot_schedule.py.

References are computed here from the formulas, not from the module's helpers.
"""
import logging
import math
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer

from largebatch.config import ConfigError, add_largebatch_config
from largebatch.schedule import (
    CosineRestartsParamScheduler,
    build_lr_scheduler,
    lr_curve,
    schedule_marks,
)
from largebatch.solver import describe_batch, lr_scale_factor, prepare_solver, scale_learning_rate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_cfg(**solver):
    cfg = get_cfg()
    add_largebatch_config(cfg)
    s = cfg.SOLVER
    s.BASE_LR = 0.1
    s.MAX_ITER = 100
    s.WARMUP_ITERS = 0
    s.WARMUP_FACTOR = 0.001
    s.IMS_PER_BATCH = 16
    for key, value in solver.items():
        node = s
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg


def assert_curve(actual, expected, rel=1e-12):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a == pytest.approx(e, rel=rel, abs=1e-15), f"iteration {i}: {a} != {e}"


def warmup_ref(method, factor, warmup, it, start, end):
    """detectron2 (fvcore) warm-up: from factor * schedule(0) to schedule(warmup) linearly, or constant."""
    if method == "constant":
        return factor * start
    return factor * start + (end - factor * start) * it / warmup


# ----------------------------------------------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.5, 2.0, 0.1])
@pytest.mark.parametrize("method", ["linear", "constant"])
def test_multistep(gamma, method):
    steps, warmup, lr, n = (30, 58, 80), 10, 0.02, 100
    cfg = make_cfg(LR_SCHEDULER_NAME="WarmupMultiStepLR", BASE_LR=lr, GAMMA=gamma, STEPS=steps,
                   WARMUP_ITERS=warmup, WARMUP_METHOD=method, MAX_ITER=n)

    def sched(it):
        return gamma ** sum(1 for s in steps if it >= s)

    expected = [
        lr * (warmup_ref(method, 0.001, warmup, i, sched(0), sched(warmup)) if i < warmup else sched(i))
        for i in range(n)
    ]
    assert_curve(lr_curve(cfg), expected)


def test_multistep_ignores_steps_past_max_iter(caplog):
    cfg = make_cfg(LR_SCHEDULER_NAME="WarmupMultiStepLR", GAMMA=0.5, STEPS=(50, 100, 150), MAX_ITER=100)
    with caplog.at_level(logging.WARNING, logger="largebatch"):
        curve = lr_curve(cfg)
    assert curve[49] == pytest.approx(0.1) and curve[50] == pytest.approx(0.05) and curve[99] == pytest.approx(0.05)
    assert "ignored" in caplog.text


@pytest.mark.parametrize("method", ["linear", "constant"])
@pytest.mark.parametrize("end", [0.0, 0.001])
def test_cosine(method, end):
    lr, n, warmup = 0.08, 120, 12
    cfg = make_cfg(LR_SCHEDULER_NAME="WarmupCosineLR", BASE_LR=lr, BASE_LR_END=end, MAX_ITER=n,
                   WARMUP_ITERS=warmup, WARMUP_METHOD=method)
    e = end / lr

    def sched(it):  # detectron2 main: CosineParamScheduler(1, end / base) over the whole run
        return e + (1 - e) * 0.5 * (1 + math.cos(math.pi * it / n))

    expected = [
        lr * (warmup_ref(method, 0.001, warmup, i, sched(0), sched(warmup)) if i < warmup else sched(i))
        for i in range(n)
    ]
    assert_curve(lr_curve(cfg), expected)


@pytest.mark.parametrize("power, end", [(0.9, 0.0), (1.0, 0.0001), (2.0, 0.001)])
def test_poly(power, end):
    """mmsegmentation's poly: (base - min) * (1 - t / T) ** power + min, after the warm-up as the cosine's."""
    lr, n, warmup = 0.01, 80, 8
    cfg = make_cfg(LR_SCHEDULER_NAME="WarmupPolyLR", BASE_LR=lr, BASE_LR_END=end, MAX_ITER=n, WARMUP_ITERS=warmup,
                   POLY_POWER=power)

    def sched(it):
        return ((lr - end) * (1 - it / n) ** power + end) / lr

    expected = [lr * (warmup_ref("linear", 0.001, warmup, i, sched(0), sched(warmup)) if i < warmup else sched(i))
                for i in range(n)]
    assert_curve(lr_curve(cfg), expected)


def test_poly_power_is_checked():
    with pytest.raises(ConfigError, match="SOLVER.POLY_POWER = 0.0 is not allowed: expected a number > 0"):
        lr_curve(make_cfg(LR_SCHEDULER_NAME="WarmupPolyLR", POLY_POWER=0.0))


def test_cosine_zero_base_lr():
    cfg = make_cfg(LR_SCHEDULER_NAME="WarmupCosineLR", BASE_LR=0.0, BASE_LR_END=0.0)
    assert lr_curve(cfg) == [0.0] * 100
    assert lr_curve(cfg, base_lr=1.0)[0] == 1.0  # multiplier 1 at the start, no division by zero


def restarts_ref(it, warmup, t0, mult, gamma, end, method="linear", factor=0.001):
    """SGDR after a warm-up of `warmup` iterations, cycles of round(t0 * mult**i) iterations."""
    if it < warmup:
        return warmup_ref(method, factor, warmup, it, 1.0, 1.0)
    t, i, length = it - warmup, 0, t0
    while t >= length:
        t -= length
        i += 1
        length = max(1, round(t0 * mult ** i))
    peak = gamma ** i
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t / length))


@pytest.mark.parametrize("mult", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("method", ["linear", "constant"])
def test_restarts(mult, method):
    lr, end_lr, n, warmup, t0, gamma = 0.04, 0.0004, 250, 10, 20, 0.5
    cfg = make_cfg(LR_SCHEDULER_NAME="WarmupCosineRestartsLR", BASE_LR=lr, BASE_LR_END=end_lr, MAX_ITER=n,
                   WARMUP_ITERS=warmup, WARMUP_METHOD=method,
                   RESTARTS__CYCLE_ITERS=t0, RESTARTS__CYCLE_MULT=mult, RESTARTS__GAMMA=gamma)
    expected = [lr * restarts_ref(i, warmup, t0, mult, gamma, end_lr / lr, method) for i in range(n)]
    curve = lr_curve(cfg)
    assert_curve(curve, expected)
    # the cycles start at the end of the warm-up, at the peak gamma**i
    starts = {1.0: [10, 30, 50, 70], 2.0: [10, 30, 70, 150], 1.5: [10, 30, 60, 105]}[mult]
    for i, s in enumerate(starts):
        assert curve[s] == pytest.approx(lr * gamma ** i)
    assert schedule_marks(cfg)["restarts"][:3] == starts[1:]
    assert schedule_marks(cfg)["warmup_end"] == warmup


@pytest.mark.parametrize("t0,mult", [(10, 1), (7, 2), (5, 3)])
def test_restarts_match_torch(t0, mult):
    lr, eta_min, n = 0.1, 0.002, 200
    cfg = make_cfg(LR_SCHEDULER_NAME="WarmupCosineRestartsLR", BASE_LR=lr, BASE_LR_END=eta_min, MAX_ITER=n,
                   WARMUP_ITERS=0, RESTARTS__CYCLE_ITERS=t0, RESTARTS__CYCLE_MULT=float(mult),
                   RESTARTS__GAMMA=1.0)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=t0, T_mult=mult, eta_min=eta_min)
    expected = []
    for _ in range(n):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert_curve(lr_curve(cfg), expected, rel=1e-9)


def test_restarts_scheduler_where_units():
    s = CosineRestartsParamScheduler(1.0, 0.0, 25, cycle_mult=1.0, gamma=0.5, num_updates=100, offset=0)
    # 58/100*100 is 57.99999999999999 in floating point: restarts still land on their iteration
    assert s(75 / 100) == pytest.approx(0.125)
    assert s(50 / 100) == pytest.approx(0.25)
    assert s(0.125) == pytest.approx(0.5 * (1 + math.cos(math.pi * 12.5 / 25)))


@pytest.mark.parametrize("name", ["WarmupMultiStepLR", "WarmupCosineLR", "WarmupCosineRestartsLR", "WarmupPolyLR"])
@pytest.mark.parametrize("k", [7, 33])
def test_resume_mid_cycle(name, k):
    cfg = make_cfg(LR_SCHEDULER_NAME=name, BASE_LR=0.05, BASE_LR_END=0.001, MAX_ITER=90, WARMUP_ITERS=10,
                   STEPS=(40, 70), GAMMA=0.5, RESTARTS__CYCLE_ITERS=15, RESTARTS__CYCLE_MULT=2.0)

    def build():
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.01}], lr=0.05,
                              momentum=0.9)
        return model, opt, build_lr_scheduler(cfg, opt)

    def step(model, opt, sched):
        opt.zero_grad()
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        sched.step()

    model, opt, sched = build()
    full = []
    for _ in range(90):
        full.append([g["lr"] for g in opt.param_groups])
        step(model, opt, sched)

    model, opt, sched = build()
    resumed = []
    for _ in range(k):
        resumed.append([g["lr"] for g in opt.param_groups])
        step(model, opt, sched)
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    assert saved["sched"]["last_epoch"] == k

    model, opt, sched = build()  # fresh objects, as after a restart of the process
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    for _ in range(90 - k):
        resumed.append([g["lr"] for g in opt.param_groups])
        step(model, opt, sched)
    assert resumed == full  # exactly
    assert full[0][1] == pytest.approx(0.01 * 0.001)  # per-group LRs keep their ratio


def test_unknown_scheduler_name():
    cfg = make_cfg(LR_SCHEDULER_NAME="WarmupExponentialLR")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ConfigError) as e:
        build_lr_scheduler(cfg, opt)
    msg = str(e.value)
    assert msg.startswith("SOLVER.LR_SCHEDULER_NAME = 'WarmupExponentialLR' is not allowed: expected one of ")
    assert "WarmupPolyLR" in msg and "\n" not in msg


# ----------------------------------------------------------------------------------------------------------------
# LR scaling rules
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rule,ims,accum,expected_factor",
    [
        ("none", 256, 1, 1.0),
        ("linear", 256, 1, 256 / 16),
        ("linear", 16, 8, 128 / 16),  # accumulation counts in the total batch
        ("sqrt", 256, 1, math.sqrt(256 / 16)),
        ("sqrt", 64, 4, math.sqrt(256 / 16)),
        ("linear_then_sqrt", 64, 1, 64 / 16),  # below SQRT_ABOVE: linear
        ("linear_then_sqrt", 128, 1, 128 / 16),  # at SQRT_ABOVE: linear
        ("linear_then_sqrt", 512, 1, (128 / 16) * math.sqrt(512 / 128)),  # above: sqrt from S on
        ("linear_then_sqrt", 128, 8, (128 / 16) * math.sqrt(1024 / 128)),
    ],
)
def test_scaling_rules(rule, ims, accum, expected_factor):
    cfg = make_cfg(BASE_LR=0.02, BASE_LR_END=0.0002, IMS_PER_BATCH=ims, ACCUMULATE_STEPS=accum,
                   LR_SCALING__RULE=rule, LR_SCALING__REFERENCE_BATCH=16, LR_SCALING__SQRT_ABOVE=128)
    lr, lr_end, factor, message = scale_learning_rate(cfg)
    assert factor == pytest.approx(expected_factor)
    assert lr == pytest.approx(0.02 * expected_factor)
    assert lr_end == pytest.approx(0.0002 * expected_factor)  # the end LR keeps its ratio
    assert f"rule {rule}" in message and f"total batch {ims * accum}" in message
    out = prepare_solver(cfg, world_size=1)
    assert out.SOLVER.BASE_LR == pytest.approx(0.02 * expected_factor)
    assert out.SOLVER.BASE_LR_END == pytest.approx(0.0002 * expected_factor)


def test_linear_then_sqrt_continuous():
    s = 128
    below = lr_scale_factor("linear_then_sqrt", s - 1e-9, 16, s)
    above = lr_scale_factor("linear_then_sqrt", s + 1e-9, 16, s)
    assert below == pytest.approx(above)


def test_scaling_logged(caplog):
    cfg = make_cfg(BASE_LR=0.02, IMS_PER_BATCH=16, ACCUMULATE_STEPS=8, LR_SCALING__RULE="linear")
    with caplog.at_level(logging.INFO, logger="largebatch"):
        prepare_solver(cfg, world_size=1)
    assert "BASE_LR 0.02 -> 0.16 (rule linear, total batch 128 = 16 images x 8 accumulation steps" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# prepare_solver: REFERENCE_WORLD_SIZE, epochs, SCHEDULE_MULT
# ----------------------------------------------------------------------------------------------------------------
def reference_world_cfg(rule):
    cfg = make_cfg(BASE_LR=0.02, BASE_LR_END=0.0, IMS_PER_BATCH=16, REFERENCE_WORLD_SIZE=8, MAX_ITER=5000,
                   STEPS=(4000,), WARMUP_ITERS=1000, CHECKPOINT_PERIOD=1000, LR_SCALING__RULE=rule,
                   RESTARTS__CYCLE_ITERS=2000)
    cfg.TEST.EVAL_PERIOD = 500
    return cfg


def test_reference_world_size_rule_none_is_detectron2():
    cfg = reference_world_cfg("none")
    ours = prepare_solver(cfg, world_size=16)
    d2 = DefaultTrainer.auto_scale_workers(cfg, 16)
    for key in ("IMS_PER_BATCH", "BASE_LR", "MAX_ITER", "STEPS", "WARMUP_ITERS", "CHECKPOINT_PERIOD",
                "REFERENCE_WORLD_SIZE"):
        assert ours.SOLVER[key] == d2.SOLVER[key], key
    assert ours.TEST.EVAL_PERIOD == d2.TEST.EVAL_PERIOD == 250
    assert ours.SOLVER.RESTARTS.CYCLE_ITERS == 1000  # our iteration keys follow too
    # detectron2's own call in DefaultTrainer.__init__ is then a no-op
    assert DefaultTrainer.auto_scale_workers(ours, 16) is ours


@pytest.mark.parametrize("rule,factor", [("linear", 32 / 16), ("sqrt", math.sqrt(32 / 16))])
def test_reference_world_size_no_double_scaling(rule, factor):
    cfg = reference_world_cfg(rule)
    out = prepare_solver(cfg, world_size=16)  # 16 -> 32 images, iterations halved
    assert out.SOLVER.IMS_PER_BATCH == 32
    assert out.SOLVER.MAX_ITER == 2500 and tuple(out.SOLVER.STEPS) == (2000,) and out.SOLVER.WARMUP_ITERS == 500
    # the LR comes from the rule alone, applied to the original BASE_LR and the final total batch
    assert out.SOLVER.BASE_LR == pytest.approx(0.02 * factor)
    # with accumulation the total batch includes it
    cfg.SOLVER.ACCUMULATE_STEPS = 4
    out = prepare_solver(cfg, world_size=16)
    assert out.SOLVER.BASE_LR == pytest.approx(0.02 * lr_scale_factor(rule, 128, 16))


def test_prepare_solver_is_idempotent_and_keeps_frozen():
    cfg = reference_world_cfg("linear")
    cfg.SOLVER.SCHEDULE_MULT = 1.4
    cfg.freeze()
    once = prepare_solver(cfg, world_size=16)
    assert once.is_frozen() and cfg.SOLVER.BASE_LR == 0.02  # the input is left alone
    twice = prepare_solver(once, world_size=16)
    assert twice == once


def test_epoch_conversion():
    cfg = make_cfg(SCHEDULE_UNIT="epoch", IMS_PER_BATCH=32, ACCUMULATE_STEPS=2, MAX_ITER=12, STEPS=(8, 10.5),
                   WARMUP_ITERS=0, CHECKPOINT_PERIOD=1, RESTARTS__CYCLE_ITERS=2, AGVM__START_ITER=1)
    cfg.TEST.EVAL_PERIOD = 0
    out = prepare_solver(cfg, world_size=1, num_train_images=1000)  # 1000 / 64 = 15.625 iterations/epoch
    s = out.SOLVER
    assert s.MAX_ITER == round(12 * 15.625) == 188
    assert tuple(s.STEPS) == (125, round(10.5 * 15.625))
    assert s.WARMUP_ITERS == 0 and out.TEST.EVAL_PERIOD == 0
    assert s.CHECKPOINT_PERIOD == 16 and s.RESTARTS.CYCLE_ITERS == 31 and s.AGVM.START_ITER == 16
    for v in (s.MAX_ITER, s.WARMUP_ITERS, s.CHECKPOINT_PERIOD, s.RESTARTS.CYCLE_ITERS, *s.STEPS):
        assert type(v) is int


def test_epoch_conversion_with_schedule_mult_and_world_size(caplog):
    cfg = make_cfg(SCHEDULE_UNIT="epoch", IMS_PER_BATCH=16, REFERENCE_WORLD_SIZE=2, MAX_ITER=10, STEPS=(6,),
                   WARMUP_ITERS=1, SCHEDULE_MULT=1.4, CHECKPOINT_PERIOD=5, AGVM__START_ITER=-1)
    cfg.TEST.EVAL_PERIOD = 1
    with caplog.at_level(logging.INFO, logger="largebatch"):
        out = prepare_solver(cfg, world_size=4, num_train_images=3200)
    s = out.SOLVER
    # world 2 -> 4: 32 images; epochs are not divided by the auto-scaling (the conversion accounts for the batch)
    assert s.IMS_PER_BATCH == 32  # 100 iterations per epoch
    assert s.MAX_ITER == 1400 and tuple(s.STEPS) == (840,) and s.WARMUP_ITERS == 140
    assert s.CHECKPOINT_PERIOD == 700 and out.TEST.EVAL_PERIOD == 140
    assert s.AGVM.START_ITER == -1
    assert s.SCHEDULE_UNIT == "iter" and s.SCHEDULE_MULT == 1.0
    assert "100 iterations per epoch" in caplog.text


def test_schedule_mult_iterations():
    cfg = make_cfg(MAX_ITER=1000, STEPS=(700, 900), WARMUP_ITERS=101, SCHEDULE_MULT=1.4, AGVM__START_ITER=250)
    s = prepare_solver(cfg).SOLVER
    assert (s.MAX_ITER, tuple(s.STEPS), s.WARMUP_ITERS, s.AGVM.START_ITER) == (1400, (980, 1260), 141, 350)


def test_epochs_need_dataset_size():
    cfg = make_cfg(SCHEDULE_UNIT="epoch")
    for n in (None, 0):
        with pytest.raises(ConfigError, match="SCHEDULE_UNIT"):
            prepare_solver(cfg, 1, n)


# ----------------------------------------------------------------------------------------------------------------
# tools/plot_schedule.py
# ----------------------------------------------------------------------------------------------------------------
def load_tool():
    from helpers import import_script

    return import_script("tools/plot_schedule.py")


def test_plot_schedule_writes_png(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text(
        "SOLVER:\n  BASE_LR: 0.001\n  IMS_PER_BATCH: 32\n  WARMUP_ITERS: 1\n  WARMUP_FACTOR: 0.01\n"
    )
    (tmp_path / "cfg.yaml").write_text(
        "_BASE_: base.yaml\n"
        "DATASETS:\n  TRAIN: ('not_registered_train',)\n"
        "SOLVER:\n  LR_SCHEDULER_NAME: WarmupCosineRestartsLR\n  SCHEDULE_UNIT: epoch\n  MAX_ITER: 12\n"
        "  ACCUMULATE_STEPS: 2\n  BASE_LR_END: 0.00001\n"
        "  RESTARTS:\n    CYCLE_ITERS: 2\n    CYCLE_MULT: 1.5\n    GAMMA: 0.5\n"
        "  LR_SCALING:\n    RULE: linear\n"
    )
    out = tmp_path / "plots" / "lr.png"
    tool = load_tool()
    code = tool.main(["--config-file", str(tmp_path / "cfg.yaml"), "--num-train-images", "6400",
                      "--output", str(out), "SOLVER.CHECKPOINT_PERIOD", "1"])
    assert code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip() == str(out)
    assert [p.name for p in out.parent.iterdir()] == ["lr.png"]  # no temporary file left

    # epochs without a dataset size: one clear line, exit code 2
    code = tool.main(["--config-file", str(tmp_path / "cfg.yaml"), "--output", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "--num-train-images" in err and len(err.splitlines()) == 1


def test_plot_schedule_errors(tmp_path, capsys):
    tool = load_tool()
    assert tool.main(["--config-file", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config file not found") and len(err.splitlines()) == 1
    (tmp_path / "bad.yaml").write_text("SOLVER:\n  LR_SCHEDULER_NAME: Nope\n")
    assert tool.main(["--config-file", str(tmp_path / "bad.yaml"), "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "SOLVER.LR_SCHEDULER_NAME = 'Nope' is not allowed" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.png").exists()

    # a COCO recipe in epochs without COCO on this machine: one line naming the flag, no PNG
    coco = os.path.join(os.environ.get("DETECTRON2_DATASETS", "datasets"), "coco")
    if not os.path.isfile(os.path.join(coco, "annotations/instances_train2017.json")):
        config = os.path.join(ROOT, "configs/COCO-Detection/agvm_sgd_R_50_FPN_b256.yaml")
        assert tool.main(["--config-file", config, "--output", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert "coco_2017_train" in err and "pass --num-train-images" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "x.png").exists()


def shipped_configs():
    """Every YAML under configs/, relative to the repository."""
    found = []
    for folder, _, files in os.walk(os.path.join(ROOT, "configs")):
        found += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files if f.endswith(".yaml")]
    return sorted(found)


# a hundredth of COCO train2017 (117266 images after detectron2's filtering): COCO is not here, and the same
# schedule in epochs over 100x fewer iterations keeps each case fast
COCO_IMAGES = "1173"


@pytest.mark.parametrize("config", shipped_configs())
def test_plot_schedule_every_shipped_config(config, tmp_path, capsys, monkeypatch):
    """The README's command on every config, 2 workers: the shapes ones as they are (the embedded dataset is
    registered and counted), the COCO ones with --num-train-images."""
    monkeypatch.setenv("LARGEBATCH_DATASETS", os.environ.get("LARGEBATCH_DATASETS", os.path.join(ROOT, "datasets")))
    out = tmp_path / "lr.png"
    argv = ["--config-file", os.path.join(ROOT, config), "--num-gpus", "2", "--output", str(out)]
    if not config.startswith(os.path.join("configs", "shapes")):
        argv += ["--num-train-images", COCO_IMAGES]
    code = load_tool().main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip() == str(out) and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_schedule_draws_a_batch_the_workers_cannot_split_and_says_so(tmp_path, capsys, monkeypatch):
    """The README's `--num-gpus 8` on the study's batch-4 baseline: the LR curve does not depend on how the batch
    splits, so it is drawn, with one line saying that training on 8 workers would refuse the config."""
    monkeypatch.setenv("LARGEBATCH_DATASETS", os.environ.get("LARGEBATCH_DATASETS", os.path.join(ROOT, "datasets")))
    out = tmp_path / "lr.png"
    code = load_tool().main(["--config-file", os.path.join(ROOT, "configs/shapes/study/sgd_b4.yaml"), "--num-gpus",
                             "8", "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "would refuse this config on 8 workers (SOLVER.IMS_PER_BATCH = 4" in notes[0], notes


def test_plot_schedule_counts_the_demo_dataset(tmp_path, capsys, monkeypatch, caplog):
    # the README's example: demo.yaml is in epochs and names shapes_train, registered by the tool itself
    monkeypatch.setenv("LARGEBATCH_DATASETS", os.environ.get("LARGEBATCH_DATASETS", os.path.join(ROOT, "datasets")))
    out = tmp_path / "lr.png"
    with caplog.at_level(logging.INFO, logger="largebatch"):
        code = load_tool().main(["--config-file", os.path.join(ROOT, "configs/shapes/demo.yaml"), "--num-gpus", "2",
                                 "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "1024 images / total batch 32 = 32 iterations per epoch" in caplog.text
    assert "SOLVER.MAX_ITER 8 -> 256" in caplog.text


def test_end_lr_above_base_lr_is_an_error():
    cfg = make_cfg(LR_SCHEDULER_NAME="WarmupCosineLR", BASE_LR=0.01, BASE_LR_END=0.1)
    with pytest.raises(ConfigError, match=r"^SOLVER.BASE_LR_END = 0.1 is not allowed: expected a number <= "):
        lr_curve(cfg)


def _cfg_for_steps():
    from detectron2.config import get_cfg

    from largebatch.config import add_largebatch_config

    cfg = add_largebatch_config(get_cfg())
    cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS = 0.1, 18, 0
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    cfg.SOLVER.STEPS, cfg.SOLVER.STEP_GAMMAS = (11, 14, 17), [0.1, 0.1, 0.5]
    return cfg


def test_multistep_with_one_gamma_per_step_megdet_long_policy():
    """SOLVER.STEP_GAMMAS: MegDet's long policy, x0.1 at 11 and 14, x0.5 at 17 (epochs as iterations here)."""
    from largebatch.schedule import lr_curve

    lrs = lr_curve(_cfg_for_steps())
    expected = [0.1 * (1.0 if t < 11 else 0.1 if t < 14 else 0.01 if t < 17 else 0.005) for t in range(18)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_step_gammas_must_match_the_steps():
    from largebatch.config import ConfigError, validate

    cfg = _cfg_for_steps()
    cfg.SOLVER.STEP_GAMMAS = [0.1, 0.5]
    with pytest.raises(ConfigError, match="SOLVER.STEP_GAMMAS"):
        validate(cfg)


@pytest.mark.parametrize("workers, expected", [
    (32, None),  # the recipe's 8 images per GPU
    (16, "SOLVER.IMS_PER_BATCH 128 SOLVER.ACCUMULATE_STEPS 2"),
    (8, "SOLVER.IMS_PER_BATCH 64 SOLVER.ACCUMULATE_STEPS 4"),  # one 8-GPU machine: 32 images per GPU
])
def test_describe_batch_states_images_per_worker_and_bn_size(workers, expected):
    """MegDet b256 (8 images per GPU, BN groups of 4 GPUs) on fewer GPUs than written for."""
    from largebatch.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs/COCO-Detection/megdet_R_50_FPN_b256.yaml"), [], workers)
    info, warning = describe_batch(cfg, workers)
    per_worker = 256 // workers
    assert info.startswith(f"Batch: {workers} workers x {per_worker} images = 256 per micro-batch")
    assert f"BN size {4 * per_worker} (SyncBN over 4 workers)" in info
    if expected is None:
        assert warning is None
    else:
        assert f"{per_worker} images per worker (256 on {workers} workers) is more than the 8" in warning
        assert warning.endswith(f"To keep the total batch of 256 at 8 images per worker: {expected}")
