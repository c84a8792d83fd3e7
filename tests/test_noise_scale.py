"""The gradient noise scale (largebatch/noise_scale.py, measured by the stepper): McCandlish et al.'s App. A.1
estimator against references written from its formulas, on synthetic gradients and on the trainer's own per-worker
gradients (1, 2 and 4 workers, with gradient accumulation)."""
import math
import os

import pytest
import torch

from helpers import SHAPES_CONFIG as CONFIG
from helpers import make_config
from largebatch.noise_scale import WHOLE_MODEL, NoiseScale, critical_batch_statement, noise_terms


def _mccandlish(small_sq, big_sq, b_small, b_big):
    """App. A.1 as printed: |G|^2 and tr(Sigma) from |G_small|^2 and |G_big|^2."""
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
    return grad_sq, trace


def test_noise_terms_are_mccandlishs_formulas_for_equal_workers():
    small, big = torch.tensor([5.0, 0.3], dtype=torch.float64), torch.tensor([2.0, 0.1], dtype=torch.float64)
    for workers, images in ((2, 8), (4, 3), (8, 1)):
        grad_sq, trace = noise_terms(small, big, [images] * workers, [1 / workers] * workers)
        ref = _mccandlish(small, big, images, images * workers)
        torch.testing.assert_close(grad_sq, ref[0])
        torch.testing.assert_close(trace, ref[1])
    with pytest.raises(ValueError, match="noisier"):
        noise_terms(small, big, [4], [1.0])  # one sample: nothing to compare


def test_noise_terms_are_unbiased_on_synthetic_gradients():
    """Per-example gradients drawn around a known G with a known covariance: averaged over many draws, the two
    estimates find |G|^2 and tr(Sigma), for equal and unequal small batches (one worker's two halves)."""
    gen = torch.Generator().manual_seed(0)
    dim, true_g = 50, torch.linspace(-1, 1, 50, dtype=torch.float64) * 0.3
    scales = torch.linspace(0.5, 2.0, dim, dtype=torch.float64)  # diagonal covariance, tr = sum of squares
    for sizes in ([4, 4, 4, 4], [3, 4]):
        estimates = []
        for _ in range(4000):
            smalls = [true_g + (torch.randn(b, dim, generator=gen, dtype=torch.float64) * scales).mean(0)
                      for b in sizes]
            big = sum(smalls) / len(smalls)
            small_sq = torch.stack([(s * s).sum() for s in smalls]).mean().reshape(1)
            estimates.append(torch.cat(noise_terms(small_sq, (big * big).sum().reshape(1), sizes,
                                                   [1 / len(sizes)] * len(sizes))))
        grad_sq, trace = torch.stack(estimates).mean(0).tolist()
        assert grad_sq == pytest.approx((true_g * true_g).sum().item(), rel=0.05), sizes
        assert trace == pytest.approx((scales * scales).sum().item(), rel=0.02), sizes


def test_noise_scale_averages_its_terms_separately_bias_corrected_and_round_trips():
    noise = NoiseScale(decay=0.5)
    assert noise.value("fpn") is None and critical_batch_statement(noise, 64) is None
    measurements = [({"fpn": 2.0, WHOLE_MODEL: 4.0}, {"fpn": 20.0, WHOLE_MODEL: 100.0}),
                    ({"fpn": -1.0, WHOLE_MODEL: 2.0}, {"fpn": 30.0, WHOLE_MODEL: 60.0})]
    for grad_sq, trace in measurements:
        noise.update(grad_sq, trace)
    # EMA with decay 0.5 over two values, divided by 1 - 0.5^2: (0.25 a + 0.5 b) / 0.75
    assert noise.terms("fpn") == pytest.approx(((0.25 * 2 - 0.5 * 1) / 0.75, (0.25 * 20 + 0.5 * 30) / 0.75))
    assert noise.value("fpn") is None  # averaged |G|^2 of 0: not estimated
    assert noise.value(WHOLE_MODEL) == pytest.approx((0.25 * 100 + 0.5 * 60) / (0.25 * 4 + 0.5 * 2))
    restored = NoiseScale(decay=0.5)
    restored.load_state_dict(noise.state_dict())
    assert restored.state_dict() == noise.state_dict()
    line = critical_batch_statement(noise, 64)
    assert line.startswith("Gradient noise scale (B_simple, McCandlish et al. 2018; 2 measurements): critical batch "
                           "~27.5 images at the end; this run's batch 64 images; per part: fpn n/a"), line


def _preconditioner(stepper):
    """Adam's 1 / (sqrt(v) + eps) per element from the optimizer's state as it is now (before the step)."""
    pieces = []
    for p, group in zip(stepper.layout.params, stepper.layout.groups):
        v = stepper.optimizer.state.get(p, {}).get("exp_avg_sq")
        v = torch.zeros(p.numel(), dtype=torch.float64) if v is None else v.reshape(-1).double()
        pieces.append(1.0 / (v.sqrt() + group["eps"]))
    return torch.cat(pieces)


def _noise_worker(rank, world_size, out, accumulate, optimizer="SGD"):
    """Train 3 iterations (each a measurement), capture every worker's own gradient before the all-reduce (one
    worker: the two half-batch gradients), and compare the logged terms with McCandlish's formulas on them."""
    import torch.distributed as dist

    from largebatch import LargeBatchTrainer

    torch.manual_seed(rank)
    ims = 2 * max(world_size, 1) if world_size > 1 else 4
    cfg = make_config("SOLVER.MAX_ITER", 3, "SOLVER.IMS_PER_BATCH", ims, "SOLVER.ACCUMULATE_STEPS", accumulate,
                      "SOLVER.WARMUP_ITERS", 0, "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", 1000,
                      "DATASETS.TEST", "()", "MONITOR.PERIOD", 1, "MONITOR.NOISE_SCALE_DECAY", 0.5,
                      "SOLVER.OPTIMIZER", optimizer, "SOLVER.BASE_LR", 0.001 if optimizer == "LAMB" else 0.02,
                      "OUTPUT_DIR", str(out), config=CONFIG, register=True)
    trainer = LargeBatchTrainer(cfg)
    trainer.resume_or_load(resume=False)
    stepper = trainer.stepper
    layout = stepper.layout
    small = []  # per measurement: the small gradients (float64), and the images behind each
    preconditioners = []  # per measurement, Adam's before the step
    if world_size > 1:
        reduce = stepper.reducer.reduce

        def capturing_reduce(lay, **kwargs):
            small.append([lay.flat_grads().double().clone()])  # this rank's own, over its accumulated micro-batches
            preconditioners.append(_preconditioner(stepper) if optimizer == "LAMB" else None)
            return reduce(lay, **kwargs)

        stepper.reducer.reduce = capturing_reduce
    else:
        split = stepper._split_batch_halves

        def capturing_split(batches, loss_dicts, *args):
            preconditioners.append(_preconditioner(stepper) if optimizer == "LAMB" else None)
            reduced = split(batches, loss_dicts, *args)
            small.append([reduced.g1.double().clone(), reduced.g2.double().clone()])
            return reduced

        stepper._split_batch_halves = capturing_split
    trainer.train()
    assert len(small) == 3
    history = trainer.storage.history
    per_sample = ims // max(world_size, 1) * accumulate if world_size > 1 else ims // 2 * accumulate
    averaged = {}
    variants = [("", lambda g, m: g)]
    if optimizer == "LAMB":
        variants.append(("_adam", lambda g, m: g * preconditioners[m]))
    assert (stepper.noise_scale_adam is not None) == (optimizer == "LAMB")
    for m, grads in enumerate(small):
        if world_size > 1:
            every = [torch.zeros_like(grads[0]) for _ in range(world_size)]
            dist.all_gather(every, grads[0])
            grads = every
        for suffix, transform in variants:
            seen = [transform(g, m) for g in grads]
            big = sum(seen) / len(seen)
            for part, sl in [*layout.slices.items(), (WHOLE_MODEL, slice(0, layout.numel))]:
                small_sq = sum((g[sl] * g[sl]).sum().item() for g in seen) / len(seen)
                ref_grad_sq, ref_trace = _mccandlish(small_sq, (big[sl] * big[sl]).sum().item(), per_sample,
                                                     per_sample * len(seen))
                got_grad_sq = history(f"noise_grad_sq{suffix}_raw/{part}").values()[m]
                got_trace = history(f"noise_trace{suffix}_raw/{part}").values()[m]
                assert got_grad_sq[1] == got_trace[1] == m, part
                scale = abs(ref_trace) / (per_sample * len(seen)) + abs(ref_grad_sq)  # the size of E|G_big|^2
                assert got_trace[0] == pytest.approx(ref_trace, rel=1e-4, abs=1e-5 * scale * per_sample), part
                assert got_grad_sq[0] == pytest.approx(ref_grad_sq, abs=1e-4 * scale + 1e-12), part
                if suffix:
                    continue
                a = averaged.setdefault(part, [0.0, 0.0])
                a[0], a[1] = 0.5 * a[0] + 0.5 * ref_grad_sq, 0.5 * a[1] + 0.5 * ref_trace
    for part, (grad_sq, trace) in averaged.items():
        correction = 1 - 0.5 ** 3
        logged = history(f"noise_trace/{part}").latest()
        assert logged == pytest.approx(trace / correction, rel=1e-3, abs=1e-6), part
        if grad_sq > 0 and f"noise_scale/{part}" in history_keys(trainer):
            assert history(f"noise_scale/{part}").latest() == pytest.approx(
                trace / grad_sq, rel=1e-2, abs=1e-3 * abs(trace / grad_sq)), part
    if rank == 0:  # layer_stats.jsonl holds every measurement's terms (metrics.json: the latest of 20 iterations)
        from largebatch.analysis.metrics import read_layer_stats

        _, records = read_layer_stats(os.path.join(str(out), "layer_stats.jsonl"))
        assert [r["iter"] for r in records if "noise" in r] == [0, 1, 2]
        for r in records:
            trace = history(f"noise_trace_raw/{WHOLE_MODEL}").values()[r["iter"]][0]
            assert r["noise"][WHOLE_MODEL][1] == pytest.approx(trace, rel=1e-5)
            assert set(r["noise_scale"]) == {*layout.slices, WHOLE_MODEL}
    state = trainer.state_dict()["_trainer"]["noise_scale"]
    assert state["count"] == 3 and set(state["trace"]) == {*layout.slices, WHOLE_MODEL}
    return {part: history(f"noise_trace_raw/{part}").values()[0][0] for part in averaged}


def history_keys(trainer):
    return set(trainer.storage.histories())


@pytest.mark.parametrize("accumulate, optimizer", [(1, "SGD"), (2, "SGD"), (1, "LAMB")])
def test_the_logged_noise_scale_on_one_worker_is_the_formula_on_its_two_halves(tmp_path, accumulate, optimizer):
    _noise_worker(0, 1, tmp_path, accumulate, optimizer)


@pytest.mark.slow
@pytest.mark.parametrize("world_size, accumulate, optimizer", [(2, 2, "LAMB"), (4, 2, "SGD")])
def test_the_logged_noise_scale_is_the_formula_on_every_workers_gradient(tmp_path, run_workers, world_size,
                                                                         accumulate, optimizer):
    """Raw gradients, and for LAMB also the Adam-preconditioned ones (1 / (sqrt(v) + eps), v before each step)."""
    results = run_workers(_noise_worker, world_size, str(tmp_path), accumulate, optimizer, timeout=600)
    assert all(r == results[0] for r in results)  # identical on every worker (rank 0's values)
    assert all(math.isfinite(v) for v in results[0].values())


def test_the_planner_follows_mccandlishs_tradeoff(tmp_path, capsys):
    import json

    from helpers import import_script
    from largebatch.analysis.planner import plan_batches

    rows = plan_batches(noise_scale=64.0, step_time_s=0.5, images_per_gpu=4, gpus=[1, 16, 64], comm_ms=0.0)
    assert [r.batch for r in rows] == [4, 64, 256]
    assert [r.steps_per_min for r in rows] == pytest.approx([17.0, 2.0, 1.25])  # 1 + B_noise / B
    assert [r.images_per_min for r in rows] == pytest.approx([1.0625, 2.0, 5.0])  # 1 + B / B_noise
    assert [r.speedup for r in rows] == pytest.approx([1.0, 8.5, 13.6])  # 17 / 2, 17 / 1.25
    with_comm = plan_batches(64.0, 0.5, 4, [1, 16], comm_ms=100.0)
    assert with_comm[1].step_time_s == pytest.approx(0.9) and with_comm[1].speedup == pytest.approx(17 / 2 / 1.8)
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.json", "w") as f:
        for it in range(0, 100, 20):
            f.write(json.dumps({"iteration": it, "time": 0.5, "noise_scale/all": 10.0 + it}) + "\n")
    tool = import_script("tools/plan_batch.py")
    assert tool.main([str(run), "--gpus", "1,2", "--images-per-gpu", "4", "--comm-ms", "0"]) == 0
    out = capsys.readouterr().out
    assert "B_noise = 90 images (noise_scale/all at iteration 80)" in out and "A model" in out
    assert "| 2 | 8 | 12.25 | 1.09 | 500 | 1.92x |" in out, out
    assert tool.main([str(tmp_path)]) == 2 and "has no noise_scale/all" in capsys.readouterr().err


def test_noise_scale_off_measures_nothing_and_grad_var_stays(tmp_path):
    from largebatch import LargeBatchTrainer

    cfg = make_config("SOLVER.MAX_ITER", 2, "SOLVER.IMS_PER_BATCH", 2, "SOLVER.WARMUP_ITERS", 0, "SOLVER.STEPS", "()",
                      "DATASETS.TEST", "()", "MONITOR.PERIOD", 1, "MONITOR.NOISE_SCALE", False,
                      "OUTPUT_DIR", str(tmp_path), config=CONFIG, register=True)
    trainer = LargeBatchTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    keys = set(trainer.storage.histories())
    assert trainer.stepper.noise_scale is None and trainer.stepper.measurement.noise is None
    assert not any(k.startswith("noise") for k in keys) and "grad_var/backbone" in keys
    assert "noise_scale" not in trainer.state_dict()["_trainer"]


def test_steps_to_target_and_mccandlishs_fit_on_constructed_runs():
    from largebatch.analysis.scaling import fit_tradeoff, predicted_steps, smoothing_window, steps_to_target

    assert smoothing_window(4, 256) == 64 and smoothing_window(512, 256) == 1
    losses = list(enumerate([3.0, 2.0, 1.0, 0.9, 0.7, 0.8, 0.5]))
    assert steps_to_target(losses, 0.85, 1) == 5  # iteration 4 (the 5th step) is the first at or below
    assert steps_to_target(losses, 0.79, 2) == 5.5  # window (0.7, 0.8) at iterations 4-5: centre 4.5, step 5.5
    assert steps_to_target(losses, 0.1, 2) is None
    s_min, e_min = 50.0, 1600.0  # B_crit 32
    batches = [4, 8, 16, 32, 64, 128]
    fitted = fit_tradeoff(batches, predicted_steps(s_min, e_min, batches))
    assert fitted == pytest.approx((50.0, 1600.0, 32.0))
    with pytest.raises(ValueError, match="do not follow"):
        fit_tradeoff([4, 64], [10.0, 100.0])  # more steps at the larger batch
    with pytest.raises(ValueError, match="two"):
        fit_tradeoff([16], [100.0])
