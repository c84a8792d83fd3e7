"""The monitor (MonitorHook, layer_stats.jsonl, grad_var), the divergence guard and tools/plot_metrics.py, on
the real LargeBatchTrainer and the embedded shapes dataset, with a few 1-image iterations.

References are computed here from the weights and gradients the optimizer step saw (captured by a step
pre-hook) and from each rank's local gradients (captured before the all-reduce), not from the code under test.
"""
import json
import math
import os

import pytest
import torch

from distributed import run_workers
from helpers import make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs/shapes/sgd.yaml")


def _config(out, *opts, max_iter=2, ims=2):
    return make_config(
        "SOLVER.MAX_ITER", max_iter, "SOLVER.IMS_PER_BATCH", ims, "SOLVER.WARMUP_ITERS", 0, "SOLVER.STEPS", "()",
        "SOLVER.CHECKPOINT_PERIOD", 1000, "DATASETS.TEST", "()", "MONITOR.PERIOD", 1, "OUTPUT_DIR", str(out), *opts,
        config=CONFIG, register=True,
    )


def _trainer(cfg):
    from largebatch import LargeBatchTrainer

    trainer = LargeBatchTrainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def _capture_steps(trainer):
    """Record, at every optimizer step, the weights before it, the gradients it uses and the groups' LRs."""
    stepper = trainer.stepper
    layout, optimizer = stepper.layout, stepper.optimizer
    steps = []

    def pre_hook(opt, args, kwargs):
        steps.append({
            "iter": stepper.iter,
            "w": [p.detach().double().clone() for p in layout.params],
            "g": [None if p.grad is None else p.grad.double().clone() for p in layout.params],
            "lr": [g["lr"] for g in layout.groups],
        })

    (getattr(optimizer, "optimizer", optimizer)).register_step_pre_hook(pre_hook)
    return steps


def _monitor(trainer):
    from largebatch.engine.monitor import MonitorHook

    return next(h for h in trainer._hooks if isinstance(h, MonitorHook))


def _read_jsonl(path):
    def no_constants(name):  # strict JSON: NaN / Infinity are not allowed
        raise ValueError(f"non-standard JSON constant {name}")

    with open(path) as f:
        lines = f.read().splitlines()
    return [json.loads(line, parse_constant=no_constants) for line in lines], lines


def _ratio(a, b):
    return 1.0 if a == 0 or b == 0 else a / b


def _norm(t):
    return math.nan if t is None else t.norm().item()


def _check_record(record, header, layout, step, ref_ratios):
    """The jsonl record and the EventStorage per-part aggregates against per-layer references."""
    assert record["iter"] == step["iter"]
    got = [math.nan if v is None else v for v in record["trust_ratio"]]
    assert got == pytest.approx(ref_ratios, rel=1e-4, abs=1e-12, nan_ok=True)
    lr_of_layer = [record["lr"][g] for g in header["groups"]]
    assert lr_of_layer == pytest.approx(step["lr"], rel=1e-6)


def _part_reference(header, values):
    out = {}
    for part in dict.fromkeys(header["parts"]):
        vals = [v for p, v in zip(header["parts"], values) if p == part]
        out[part] = (sum(vals) / len(vals), min(vals), max(vals))
    return out


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    """One SGD + AGVM run: 2 iterations, both recorded (MONITOR.PERIOD 1), batch 2 on one worker; AGVM's mu
    is updated at both and applied in both steps, so the layers' LRs differ by part."""
    os.environ.setdefault("LARGEBATCH_DATASETS", os.path.join(REPO, "datasets"))
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sgd_run")
    trainer = _trainer(_config(out, "SOLVER.AGVM.ENABLED", "True", "SOLVER.AGVM.INTERVAL", "1",
                               "SOLVER.AGVM.START_ITER", "0"))
    steps = _capture_steps(trainer)
    trainer.train()
    return out, trainer, steps


def test_sgd_trust_ratio_is_weight_over_grad_norm_before_the_step(sgd_run):
    out, trainer, steps = sgd_run
    layout = trainer.stepper.layout
    rows, lines = _read_jsonl(os.path.join(out, "layer_stats.jsonl"))
    header, records = rows[0], rows[1:]
    # the names once, in the first line only; one compact line per record
    assert header["format"] == "largebatch.layer_stats/1" and header["ratio"] == "weight_grad_norm"
    assert header["optimizer"] == "SGD" and len(header["names"]) == len(layout.params) == len(header["parts"])
    assert "backbone.bottom_up.stem.conv1.weight" in header["names"]
    assert all("names" not in r for r in records) and all(": " not in line and ", " not in line for line in lines)
    assert [r["iter"] for r in records] == [0, 1] == [s["iter"] for s in steps]
    storage = trainer.storage
    for record, step in zip(records, steps):
        ref = [_ratio(_norm(w), _norm(g)) for w, g in zip(step["w"], step["g"])]
        _check_record(record, header, layout, step, ref)
        local = [lr * r for lr, r in zip(step["lr"], ref)]
        for key, values in (("trust_ratio", ref), ("local_lr", local)):
            for part, (mean, lo, hi) in _part_reference(header, values).items():
                hist = dict((it, v) for v, it in storage.history(f"{key}/{part}").values())
                assert hist[step["iter"]] == pytest.approx(mean, rel=1e-4), (key, part)
                lo_hist = dict((it, v) for v, it in storage.history(f"{key}_min/{part}").values())
                hi_hist = dict((it, v) for v, it in storage.history(f"{key}_max/{part}").values())
                assert (lo_hist[step["iter"]], hi_hist[step["iter"]]) == pytest.approx((lo, hi), rel=1e-4)
    # one worker: Phi from the two halves of the batch, every MONITOR.PERIOD iterations, also in the jsonl
    for part in ("backbone", "fpn", "rpn", "box_head"):
        phis = storage.history(f"grad_var/{part}").values()
        assert [it for _, it in phis] == [0, 1] and all(0.0 <= v <= 2.0 for v, _ in phis)
        assert records[1]["grad_var"][part] == pytest.approx(phis[1][0], rel=1e-5)
        mus = storage.history(f"agvm_mu/{part}").values()
        assert [r["agvm_mu"][part] for r in records] == pytest.approx([v for v, _ in mus], rel=1e-5)
    # the explosion guard's reading, every iteration: the step's global gradient norm and the total loss, in the
    # jsonl and in EventStorage; no ratio yet (the guard judges from 5 iterations of history on)
    logged = {key: {it: v for v, it in storage.history(key).values()} for key in ("grad_norm", "total_loss")}
    for record, step in zip(records, steps):
        check = record["explosion_check"]
        grad_norm = math.sqrt(sum(_norm(g) ** 2 for g in step["g"] if g is not None))
        # (the trainer's norms are float32 reductions: ~1e-5 off the float64 reference on 800k-element tensors)
        assert check["grad_norm"] == pytest.approx(grad_norm, rel=1e-4) and check["explosion_ratio"] is None
        assert logged["grad_norm"][step["iter"]] == pytest.approx(check["grad_norm"], rel=1e-5)
        assert check["total_loss"] == pytest.approx(logged["total_loss"][step["iter"]], rel=1e-5)
    # the LR each layer stepped with includes AGVM's mu: it differs between parts
    assert len({round(lr, 12) for lr in steps[1]["lr"]}) > 1
    # the jump check's state travels with the checkpoint
    ckpt = torch.load(os.path.join(out, "model_final.pth"), weights_only=False, map_location="cpu")
    state = ckpt["trainer"]["hooks"]["MonitorHook"]
    assert state["previous_iter"] == 1 and set(state["previous"]) == {"backbone", "fpn", "rpn", "box_head"}


def test_jump_check_names_the_part_and_iteration(sgd_run):
    _, trainer, _ = sgd_run
    hook = _monitor(trainer)
    saved, factor = hook.state_dict(), hook.factor
    try:
        hook.write_layers = False
        # pretend the previous record had a 1000x smaller box_head gradient: a jump > DIVERGENCE_FACTOR 100
        prev = {part: dict(values) for part, values in saved["previous"].items()}
        prev["box_head"]["grad_norm"] /= 1000.0
        hook.load_state_dict({"previous": prev, "previous_iter": 1})
        hook.factor = 100.0
        trainer.iter = 2
        with pytest.raises(FloatingPointError) as info:
            hook.after_step()
        message = str(info.value)
        assert "iteration 2" in message and "box_head gradient norm jumped" in message, message
        assert "since iteration 1" in message and "backbone" not in message and "last good checkpoint" in message
        # under the factor: recorded, no error
        hook.factor = 1e4
        hook.after_step()
        assert hook.previous_iter == 2
    finally:
        hook.factor = factor
        hook.load_state_dict(saved)


def test_layer_stats_resume_keeps_the_records_before_the_restart(sgd_run, tmp_path):
    _, trainer, _ = sgd_run
    hook = _monitor(trainer)
    path, hook.path = hook.path, str(tmp_path / "layer_stats.jsonl")
    try:
        hook._start_layer_file(0)
        with open(hook.path, "a") as f:
            for it in range(4):
                f.write(json.dumps({"iter": it, "lr": [0.1], "trust_ratio": [1.0]}) + "\n")
            f.write('{"iter": 4, "lr": [0.')  # a line cut short by a crash
        hook._start_layer_file(2)  # --resume from iteration 2: records 2, 3 are redone
        rows, _ = _read_jsonl(hook.path)
        assert rows[0]["names"] == hook.names and [r["iter"] for r in rows[1:]] == [0, 1]
        hook._start_layer_file(0)  # a fresh run in the same OUTPUT_DIR starts the file anew
        assert len(_read_jsonl(hook.path)[0]) == 1
    finally:
        hook.path = path


def _lamb_reference(step, layout):
    """LAMB's first step (bias-corrected: m_hat = g, v_hat = g^2): u = g / (|g| + eps) + wd * w,
    trust = ||w|| / ||u||, 1.0 for adapt=False groups."""
    out = []
    for w, g, group in zip(step["w"], step["g"], layout.groups):
        if not group.get("adapt", True):
            out.append(1.0)
            continue
        u = g / (g.abs() + group["eps"]) + group["weight_decay"] * w
        out.append(_ratio(w.norm().item(), u.norm().item()))
    return out


def _lamb_worker(rank, world_size, out):
    import torch.distributed as dist

    torch.manual_seed(rank)
    trainer = _trainer(_config(out, "SOLVER.OPTIMIZER", "LAMB", "SOLVER.BASE_LR", "0.001", max_iter=1))
    stepper = trainer.stepper
    layout = stepper.layout
    steps = _capture_steps(trainer)
    local = []
    reduce = stepper.reducer.reduce

    def capturing_reduce(lay, **kwargs):
        local.append(lay.flat_grads().double().clone())  # this rank's own gradient, before any all-reduce
        return reduce(lay, **kwargs)

    stepper.reducer.reduce = capturing_reduce
    trainer.train()
    assert len(local) == 1 and len(steps) == 1
    grads = [torch.zeros_like(local[0]) for _ in range(world_size)]
    dist.all_gather(grads, local[0])
    # the step used the exact mean of the two ranks' gradients
    step_grad = torch.cat([g.reshape(-1) for g in steps[0]["g"]])
    torch.testing.assert_close(step_grad, (grads[0] + grads[1]) / 2, rtol=1e-5, atol=1e-9)
    # Phi from each rank's gradient, Adam-normalised with v = 0 (first step) as for LAMB
    pairs = list(zip(layout.params, layout.groups))
    b2 = torch.cat([torch.full((p.numel(),), g["betas"][1], dtype=torch.float64) for p, g in pairs])
    eps = torch.cat([torch.full((p.numel(),), g["eps"], dtype=torch.float64) for p, g in pairs])
    normed = [g / (((1 - b2) * g * g).sqrt() + eps) for g in grads]
    history = trainer.storage.history
    phis = {}
    for part, sl in layout.slices.items():
        a, b = normed[0][sl], normed[1][sl]
        ref = 1.0 - (a @ b / (a.norm() * b.norm())).item()
        got = history(f"grad_var/{part}").values()
        assert got[0][1] == 0 and got[0][0] == pytest.approx(ref, rel=1e-4, abs=1e-6), part
        phis[part] = got[0][0]
    # the trust ratios LAMB used, read from the optimizer, against the formula on the same weights/gradients
    ref_ratios = _lamb_reference(steps[0], layout)
    for part in layout.slices:
        vals = [r for r, p in zip(ref_ratios, _monitor(trainer).layer_parts) if p == part]
        assert history(f"trust_ratio/{part}").latest() == pytest.approx(sum(vals) / len(vals), rel=5e-4)
    hook = _monitor(trainer)
    return {
        "write_layers": hook.write_layers, "phis": phis, "ref_ratios": ref_ratios,
        "lr": steps[0]["lr"], "iter": steps[0]["iter"], "n_params": len(layout.params),
    }


def test_two_workers_lamb_grad_var_and_trust_ratios_against_references(tmp_path):
    os.environ.setdefault("LARGEBATCH_DATASETS", os.path.join(REPO, "datasets"))
    results = run_workers(_lamb_worker, 2, str(tmp_path), timeout=240)
    assert [r["write_layers"] for r in results] == [True, False]
    assert results[0]["phis"] == results[1]["phis"]  # identical on both workers (AGVM's multipliers too)
    # the jsonl: written once, by rank 0 only (a second writer would double the header or the record)
    rows, lines = _read_jsonl(os.path.join(tmp_path, "layer_stats.jsonl"))
    assert len(lines) == 2 and rows[0]["optimizer"] == "LAMB" and rows[0]["ratio"] == "optimizer"
    record = rows[1]
    got = [math.nan if v is None else v for v in record["trust_ratio"]]
    # LAMB's own float32 norms of ~1e6-element tensors are good to ~2e-4 against a float64 reference
    assert got == pytest.approx(results[0]["ref_ratios"], rel=5e-4)
    assert [record["lr"][g] for g in rows[0]["groups"]] == pytest.approx(results[0]["lr"], rel=1e-6)
    assert record["grad_var"] == pytest.approx(results[0]["phis"], rel=1e-5)


def test_divergence_guard_stops_on_injected_nan_and_keeps_the_last_good_checkpoint(tmp_path):
    os.environ.setdefault("LARGEBATCH_DATASETS", os.path.join(REPO, "datasets"))
    torch.set_num_threads(1)
    cfg = _config(tmp_path, "SOLVER.CHECKPOINT_PERIOD", "1", "MONITOR.PERIOD", "20", "MONITOR.GRAD_VARIANCE",
                  "False", max_iter=4)
    trainer = _trainer(cfg)
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    weight = model.roi_heads.box_predictor.cls_score.weight
    weight.register_hook(lambda g: torch.full_like(g, float("nan")) if trainer.iter == 1 else g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith("Training diverged at iteration 1: non-finite gradients in box_head"), message
    assert "rpn" not in message and "backbone" not in message and "--resume" in message
    # nothing saved after the divergence: --resume uses iteration 0's checkpoint
    with open(os.path.join(tmp_path, "last_checkpoint")) as f:
        assert f.read().strip() == "model_0000000.pth"
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".pth")) == ["model_0000000.pth"]
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # iteration 0 stepped
    resumed = _trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 1
    # a NaN weight: the guard names the part whose weights broke and the non-finite losses
    stepper = trainer.stepper
    with torch.no_grad():
        model.proposal_generator.rpn_head.conv.weight[0, 0, 0, 0] = float("nan")
    stepper.iter = 3
    with pytest.raises(FloatingPointError) as info:
        stepper._check_finite({"loss_rpn_cls": torch.tensor(float("nan")), "loss_cls": torch.tensor(1.0)})
    message = str(info.value)
    assert "iteration 3" in message and "non-finite weights in rpn" in message, message
    assert "non-finite losses loss_rpn_cls=nan" in message and "loss_cls" not in message


def test_plot_metrics_writes_the_pngs(sgd_run, tmp_path, capsys):
    from helpers import import_script

    plot_metrics = import_script("tools/plot_metrics.py")

    out, _, _ = sgd_run
    assert plot_metrics.main([str(out), "--out", str(tmp_path / "a"), "--iters", "0,1,7"]) == 0
    printed = capsys.readouterr().out
    expected = ["loss", "lr", "local_lr", "trust_ratio", "grad_var", "agvm_mu", "layer_local_lr", "layer_trust_ratio"]
    # B_simple is drawn where the averaged |G|^2 came out positive (it depends on the run, hence on the CPU)
    if "noise_scale/" in (out / "metrics.json").read_text():
        expected.append("noise_scale")
    assert sorted(os.listdir(tmp_path / "a")) == sorted(f"{n}.png" for n in expected)  # no temporary left
    for name in expected:
        path = tmp_path / "a" / f"{name}.png"
        assert str(path) in printed and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "skipped ap.png" in printed and "agvm_mu.png: " not in printed
    assert "--iters 7: not recorded, using the nearest record, iteration 1" in printed
    # a run that evaluated, without layer_stats.jsonl: the AP figure too, no per-layer ones
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.json", "w") as f:
        for it in range(0, 60, 20):
            f.write(json.dumps({"iteration": it, "total_loss": 2.0 - it / 100, "lr": 0.01, "grad_var/rpn": 0.5,
                                "agvm_mu/rpn": 1.0 + it / 100, "agvm_mu/backbone": 1.0}) + "\n")
        f.write(json.dumps({"iteration": 59, "bbox/AP": 1.5, "bbox/AP50": float("nan")}) + "\n")
        f.write('{"iteration": 60, "total_')  # cut short
    assert plot_metrics.main([str(run)]) == 0
    written = sorted(os.listdir(run / "plots"))
    assert written == ["agvm_mu.png", "ap.png", "grad_var.png", "loss.png", "lr.png"]
    assert "skipped layer_trust_ratio.png" in capsys.readouterr().out
    assert plot_metrics.main([str(tmp_path / "nope")]) == 2


def test_explosion_guard_stops_on_a_spike_of_the_loss_or_the_gradient_norm():
    from largebatch.engine.divergence import ExplosionGuard

    guard = ExplosionGuard(factor=10, window=4, min_history=3)
    for i, (loss, grad) in enumerate([(2.0, 10.0), (1.0, 5.0), (30.0, 5.0), (1.5, 6.0)]):
        guard.check(i, loss, grad)  # a spike within the first min_history iterations is not judged
    guard.check(4, 9.0, 40.0)  # 6x and below 10x its median: accepted, and remembered
    with pytest.raises(FloatingPointError, match=r"iteration 5: the gradient norm 600 is \d+x its median .* over "
                                                 r"the last 4 iterations \(MONITOR.EXPLOSION_FACTOR = 10\)"):
        guard.check(5, 1.0, 600.0)
    restored = ExplosionGuard(factor=10, window=4, min_history=3)
    restored.load_state_dict(guard.state_dict())
    assert list(restored.history) == list(guard.history)
    with pytest.raises(FloatingPointError, match="the total loss 1000 is 190x its median 5.25"):
        restored.check(5, 1000.0, 6.0)
    ExplosionGuard(factor=0).check(0, float("inf"), float("inf"))  # 0 disables it
    # ... but still measures: the trainer logs the ratio (explosion_ratio) with the guard off too
    off = ExplosionGuard(factor=0, window=4, min_history=3)
    for i, grad in enumerate((1.0, 2.0, 3.0)):
        off.check(i, 1.0, grad)
    off.check(3, 1.0, 600.0)
    assert (off.ratio, off.ratio_of, off.trouble()) == (300.0, "the gradient norm", None)
    off.check(4, 1.0, 3.0)  # the run's highest ratio is remembered, also across a checkpoint
    assert off.ratio == pytest.approx(3.0 / 2.5) and off.highest == (300.0, 3)
    again = ExplosionGuard(factor=0, window=4, min_history=3)
    again.load_state_dict(off.state_dict())
    assert again.highest == (300.0, 3) and list(again.history) == list(off.history)


def _guard_bench(monkeypatch):
    from helpers import REPO, import_script

    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))  # its sibling module harness
    return import_script("bench/explosion_guard.py")


def test_the_guard_study_reports_where_each_factor_stops_and_how_close_healthy_runs_come(monkeypatch):
    """bench/explosion_guard.py's report on constructed runs (what a real divergence does differs between CPU
    models): per factor, the stop before the non-finite iteration, the runs it misses, the healthy margin."""
    from types import SimpleNamespace

    bench = _guard_bench(monkeypatch)
    diverging = [
        {"name": "seed 1", "non_finite": 6, "iters": list(range(6)), "ratio": [None, 1.0, 1.2, 4.5, 11.0, 300.0],
         "total_loss": [2.3, 2.0, 2.1, 8.0, 20.0, 900.0]},
        {"name": "seed 2", "non_finite": 4, "iters": list(range(4)), "ratio": [None, 1.1, 1.3, 9.0],
         "total_loss": [2.3, 2.1, 2.2, 15.0]},  # non-finite right after a ratio of 9: factor 10 misses it
    ]
    healthy = [{"name": "sgd", "non_finite": None, "iters": list(range(4)), "ratio": [None, 2.5, 1.5, 1.2],
                "total_loss": [2.3, 2.0, 1.8, 1.7]}]
    args = SimpleNamespace(factors=[4.0, 10.0], warmup=2, num_workers=2)
    text = bench.report(diverging, healthy, args, "python bench/explosion_guard.py")
    assert "| seed 1 | 6 | 3 (3 before), loss 8 | 4 (2 before), loss 20 |" in text, text
    assert "| seed 2 | 4 | 3 (1 before), loss 15 | - |" in text, text
    assert "| sgd | 4 | 2.50 (iteration 1) | 1.50 (iteration 2) | no |" in text, text
    assert "- factor 4: stops 2 of 2 diverging runs 1-3 iterations before they turn non-finite; 1.6x above the " \
           "healthy runs' highest ratio" in text, text
    assert "- factor 10: stops 1 of 2 diverging runs 2-2 iterations before they turn non-finite, misses 1; 4.0x " \
           "above the healthy runs' highest ratio" in text, text


@pytest.mark.slow
def test_the_guard_study_runs_a_diverging_seed_and_writes_its_report(tmp_path, monkeypatch):
    """bench/explosion_guard.py end to end on one seed of the diverging run (2 workers, BASE_LR 0.3, the guard
    measuring only; no healthy runs): every iteration's ratio recorded up to where the run ended, and the report's
    factor-10 line agrees with them. Where it stops and turns non-finite depends on the CPU model: not asserted."""
    from helpers import run_python

    result = run_python("bench/explosion_guard.py", "--seeds", "1", "--healthy-iters", "0", "--factors", "10",
                        "--max-iter", "30", "--output", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "explosion_guard.json") as f:
        data = json.load(f)
    run = data["diverging"][0]
    end = run["non_finite"] if run["non_finite"] is not None else 30
    assert run["iters"] == list(range(end)) and data["healthy"] == []
    assert all(r is None or r >= 0 for r in run["ratio"]) and run["ratio"][0] is None  # judged from the 6th on
    stop = _guard_bench(monkeypatch).first_above(run, 10)
    text = (tmp_path / "explosion_guard.md").read_text()
    stopped = stop is not None and run["non_finite"] is not None
    assert f"- factor 10: stops {int(stopped)} of 1 diverging runs" in text, text


def test_an_exploding_loss_stops_before_its_step_and_the_weights_are_the_last_good_ones(tmp_path):
    """A constructed divergence (the real ones take a different path on every CPU model): from iteration 6 on the
    model's losses are multiplied by 1000, and so are their gradients. The guard stops iteration 6 before its
    optimizer step, on the loss or the gradient norm (healthy ratios stay near 1-2, far below the factor of 10,
    these are hundreds of times their medians): the weights are
    those iteration 5's step made, every one finite."""
    torch.set_num_threads(1)
    cfg = _config(tmp_path, "MONITOR.DIVERGENCE_FACTOR", 0.0, max_iter=10, ims=2)
    trainer = _trainer(cfg)
    stepper = trainer.stepper
    model, forward = stepper.model, stepper.model.forward

    def exploding(*args, **kwargs):
        losses = forward(*args, **kwargs)
        return {k: v * 1000.0 for k, v in losses.items()} if stepper.iter >= 6 else losses

    model.forward = exploding
    after_step = {}
    optimizer = stepper.optimizer

    def remember(opt, args, kwargs):
        after_step[stepper.iter] = [p.detach().clone() for p in stepper.layout.params]

    (getattr(optimizer, "optimizer", optimizer)).register_step_post_hook(remember)
    with pytest.raises(FloatingPointError) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith(("Training diverged at iteration 6: the total loss ",
                               "Training diverged at iteration 6: the gradient norm ")) and "x its median" in message
    assert "(MONITOR.EXPLOSION_FACTOR = 10). Stopped on every worker before the optimizer step" in message
    assert sorted(after_step) == [0, 1, 2, 3, 4, 5]  # iteration 6 made no step
    for p, last_good in zip(stepper.layout.params, after_step[5]):
        assert torch.equal(p.detach(), last_good) and bool(torch.isfinite(p).all())
