"""CUDA-only checks (issue 10, "GPU-ready"): every test here is marked ``cuda`` and skipped without a GPU;
``tools/gpu_check.sh`` runs them (``pytest -m cuda tests/test_cuda.py``) on the first machine that has one.

- optimizer parity: LARS, LAMB and PMD-LAMB on CUDA (multi-tensor path with fresh temporaries, the CUDA
  default; multi-tensor with persistent work buffers, the CPU default; the per-tensor loop) against a float64
  CPU run of the same optimizer, over 20 steps with a changing LR, in float32, bfloat16 and float16;
- the same for the compiled step (``compile_step``, inductor);
- no host sync inside ``step()`` (``torch.cuda.set_sync_debug_mode("error")``);
- AGVM + GradScaler: a float16 overflow skips the step (weights, optimizer state, mu unchanged) and
  ``AGVM.update`` leaves a module's mu unchanged for a non-finite Phi; the same through ``LargeBatchStepper``;
- a few iterations of ``LargeBatchTrainer`` on one GPU with AMP.
"""
import functools
import json
import math
import os

import pytest
import torch

from helpers import TinyDetector
from helpers import make_batch as tiny_batch
from largebatch.optim import AGVM, LAMB, LARS, PMDLAMB, compile_step
from largebatch.optim.groups import build_param_groups
from largebatch.probe import ModuleLayout, cosine_variance

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by tools/gpu_check.sh)"),
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")  # the tests' device; AMP below is float16 autocast + GradScaler on its type
CPU = torch.device("cpu")
F64 = torch.float64
STEPS = 20

# ----------------------------------------------------------------------------------------------------------
# optimizer parity
#
# Param groups shaped like R50-FPN's (conv stem, 1x1 / 3x3 convs, a 1M-element FC that spans many CUDA
# multi-tensor chunks, norm weights and biases); every group carries "module" as build_param_groups makes
# them. Special cases: a zero-initialised tensor in an adapting group (ratio 1 from ||w|| = 0), a tensor whose
# gradient is all zeros every 5th step (ratio 1 from ||g|| = 0), a tensor without gradient on odd steps
# (skipped, ratio NaN), an ``adapt: False`` group without weight decay, per-group LR factors.
GROUPS = [
    dict(module="backbone", shapes=[(64, 3, 7, 7), (256, 64, 1, 1), (64, 64, 3, 3), (256, 256, 3, 3), (256,),
                                    (128, 64, 3, 3)]),
    dict(module="box_head", shapes=[(1024, 1024), (81, 1024), (320, 1024)], lr_factor=0.5, weight_decay=1e-3),
    dict(module="backbone", shapes=[(64,), (64,), (256,), (1024,)], adapt=False, weight_decay=0.0),
]
ZERO_INIT = [(0, 4), (2, 2)]  # a zero-initialised weight (adapting group) and a zero bias
ZERO_GRAD = (1, 1)  # all-zero gradient every 5th step
NO_GRAD = (0, 5)  # no gradient on odd steps

# (class, kwargs, base LR): hyper-parameters that make every step move the weights visibly
CASES = {
    "lars": (LARS, dict(momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02, eps=1e-9), 0.5),
    "lamb": (LAMB, dict(weight_decay=0.01), 0.02),
    "pmdlamb": (PMDLAMB, dict(cycle=7, weight_decay=5e-4), 2.0),  # cycle 7: xi wraps twice in 20 steps
}

# Tolerances. float32 against float64 (same init and gradients, both float32 values): weights within rtol 2e-5
# / atol 1e-5 (|w| ~ 1-50, i.e. ~20 float32 ulps at |w| = 4 accumulated over 20 steps: measured on CPU <= 6e-6
# absolute, mostly from the CPU norms below) and
# trust ratios within rtol 1e-4 (the ratios are quotients of norms over up to 1M entries; CUDA reduces them
# in trees, ~1e-6; torch's CPU float32 vector_norm is off by up to 2e-4 on such tensors, which is why the
# reference runs in float64).
F32_TOL = dict(rtol=2e-5, atol=1e-5)
F32_RATIO_TOL = dict(rtol=1e-4, atol=1e-7)
# bfloat16 / float16 weights: every step rounds w to 8 / 11 significant bits (relative error 2^-9 / 2^-12), so
# the weights cannot match elementwise. What must hold is that the low-precision run moves the weights the
# same way: ||w - w_ref|| / ||w_ref - w_0|| per tensor (the error relative to the distance travelled) below
# 0.2 for bfloat16 and 0.03 for float16 (measured on CPU: <= 0.08 and <= 0.009, rounding errors that accumulate
# as a random walk against per-step updates of 1-5% of ||w||; a wrong update gives ~1). The trust ratios
# (float32 for half types, but from rounded weights and moments) within rtol 5e-2 (bf16) / 1e-2 (fp16)
# (measured: <= 1.1e-2 and <= 6e-4; the multi-tensor path rounds the per-tensor factor lr * ratio to the
# params' dtype, the per-tensor loop does not).
LOW_TOL = {torch.bfloat16: (0.2, 5e-2), torch.float16: (0.03, 1e-2)}


def _cast(t, grid):
    """The float64 values of ``t`` rounded to ``grid``: every run starts from the same representable numbers."""
    return t.to(grid).to(F64)


def init_params(grid):
    gen = torch.Generator().manual_seed(1234)
    params = [[torch.randn(s, generator=gen, dtype=F64) for s in g["shapes"]] for g in GROUPS]
    for gi, j in ZERO_INIT:
        params[gi][j].zero_()
    return [[_cast(p, grid) for p in ps] for ps in params]


@functools.lru_cache(maxsize=None)  # every run of a grid sees the same gradients: draw them once (~1 GB in all)
def grads_at(step, grid):
    # |g| >= 0.25: the second moment (1 - beta2) * g^2 stays a normal float16 number (>= 6.1e-5); smaller
    # entries underflow a float16 moment to 0, and m / sqrt(v) explodes (a property of float16 moments, which
    # real float16 training avoids by keeping float32 master weights and state)
    gen = torch.Generator().manual_seed(10_000 + step)
    grads = []
    for g in GROUPS:
        normal = [torch.randn(s, generator=gen, dtype=F64) for s in g["shapes"]]
        grads.append([_cast(n.sign() * (n.abs() + 0.25), grid) for n in normal])
    if step % 5 == 0:
        grads[ZERO_GRAD[0]][ZERO_GRAD[1]].zero_()
    if step % 2 == 1:
        grads[NO_GRAD[0]][NO_GRAD[1]] = None
    return grads


def lr_at(step, base):
    return base * (1.0 + 0.5 * math.sin(step))  # changes every step


def run(case, *, device, dtype, grid, foreach, reuse_buffers=None, steps=STEPS, compiled=False):
    """``steps`` steps of the optimizer of ``case`` on ``device`` in ``dtype`` from values on the ``grid`` dtype
    (``compiled``: its step through ``compile_step``, inductor). Returns the initial and final weights and the
    trust ratios of every step, as float64 CPU tensors."""
    cls, kwargs, base_lr = CASES[case]
    params = [[p.to(device=device, dtype=dtype) for p in ps] for ps in init_params(grid)]
    groups = []
    for spec, ps in zip(GROUPS, params):
        group = {"params": ps, "module": spec["module"], "adapt": spec.get("adapt", True)}
        if "weight_decay" in spec:
            group["weight_decay"] = spec["weight_decay"]
        groups.append(group)
    opt = cls(groups, lr=0.0, foreach=foreach, **kwargs)
    opt._reuse_buffers = reuse_buffers
    if compiled:
        compile_step(opt)
    w0 = [[p.to(CPU, F64, copy=True) for p in ps] for ps in params]  # copy: float64 CPU .to() is a no-op
    ratios = []
    for step in range(1, steps + 1):
        for ps, gs in zip(params, grads_at(step, grid)):
            for p, g in zip(ps, gs):
                p.grad = None if g is None else g.to(device=device, dtype=dtype, copy=True)  # never the cached one
        for spec, group in zip(GROUPS, opt.param_groups):
            group["lr"] = lr_at(step, base_lr) * spec.get("lr_factor", 1.0)
        opt.step()
        ratios.append([r.to(CPU, F64, copy=True) for r in opt.last_trust_ratios()])
    assert opt.param_groups[0]["module"] == "backbone" and opt.param_groups[2]["adapt"] is False
    return {"w0": w0, "w": [[p.to(CPU, F64, copy=True) for p in ps] for ps in params], "ratios": ratios, "opt": opt}


@functools.lru_cache(maxsize=None)
def reference(case, grid):
    """The same optimizer on CPU in float64 (its per-tensor loop, which tests/test_optimizers.py checks against
    the papers' equations), from the same grid values."""
    return run(case, device=CPU, dtype=F64, grid=grid, foreach=False)


def assert_ratios_close(got, want, rtol, atol):
    for step, (gr, wr) in enumerate(zip(got, want), start=1):
        for a, b in zip(gr, wr):
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m: f"trust ratios, step {step}: {m}")


def displacement_errors(got, want):
    """Per tensor: ||w - w_ref|| / ||w_ref - w_0||."""
    out = []
    for gps, wps, w0s in zip(got["w"], want["w"], want["w0"]):
        for a, b, a0 in zip(gps, wps, w0s):
            out.append(float((a - b).norm() / (b - a0).norm().clamp_min(1e-30)))
    return out


VARIANTS = {  # (foreach, _reuse_buffers)
    "foreach": (True, None),  # the CUDA default: fresh temporaries from the caching allocator
    "foreach_buffers": (True, True),  # the CPU default's persistent work buffers, here on CUDA
    "per_tensor": (False, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_matches_float64_reference(case):
    """SOLVER.COMPILE_STEP on CUDA: the inductor-compiled step (step counter and PMD's xi as CPU tensor ops moved
    to the GPU in the graph) against the float64 CPU reference, with the eager float32 tolerances; and few graphs
    (the gradient pattern alternates between two, the changing float LR becomes a graph input once)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    got = run(case, device=CUDA, dtype=torch.float32, grid=torch.float32, foreach=True, compiled=True)
    want = reference(case, torch.float32)
    for gps, wps in zip(got["w"], want["w"]):
        for a, b in zip(gps, wps):
            torch.testing.assert_close(a, b, **F32_TOL)
    assert_ratios_close(got["ratios"], want["ratios"], **F32_RATIO_TOL)
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(CASES))
def test_float32_matches_float64_reference(case, variant):
    foreach, reuse = VARIANTS[variant]
    want = reference(case, torch.float32)
    got = run(case, device=CUDA, dtype=torch.float32, grid=torch.float32, foreach=foreach, reuse_buffers=reuse)
    for gi, (gps, wps) in enumerate(zip(got["w"], want["w"])):
        for j, (a, b) in enumerate(zip(gps, wps)):
            torch.testing.assert_close(a, b, **F32_TOL, msg=lambda m: f"group {gi} tensor {j}: {m}")
    assert_ratios_close(got["ratios"], want["ratios"], **F32_RATIO_TOL)
    # the special cases were hit: ratio 1 for the zero-initialised weight at step 1, NaN for the skipped one
    assert want["ratios"][0][0][4] == 1.0 and math.isnan(want["ratios"][0][0][5])
    assert all(torch.equal(r[2], torch.ones(4, dtype=F64)) for r in got["ratios"])  # adapt=False group


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_low_precision_tracks_float64_reference(case, dtype, variant):
    foreach, reuse = VARIANTS[variant]
    disp_tol, ratio_rtol = LOW_TOL[dtype]
    want = reference(case, dtype)
    got = run(case, device=CUDA, dtype=dtype, grid=dtype, foreach=foreach, reuse_buffers=reuse)
    assert all(p.dtype == dtype for p in got["opt"].param_groups[0]["params"])
    assert all(torch.isfinite(w).all() for ws in got["w"] for w in ws)
    errors = displacement_errors(got, want)
    assert max(errors) < disp_tol, f"relative displacement errors per tensor: {[f'{e:.3g}' for e in errors]}"
    assert_ratios_close(got["ratios"], want["ratios"], rtol=ratio_rtol, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_foreach_matches_per_tensor_on_cuda(case, dtype):
    """The multi-tensor paths against the per-tensor loop, both on CUDA in the same dtype."""
    single = run(case, device=CUDA, dtype=dtype, grid=dtype, foreach=False, steps=10)
    for foreach, reuse in (VARIANTS["foreach"], VARIANTS["foreach_buffers"]):
        multi = run(case, device=CUDA, dtype=dtype, grid=dtype, foreach=foreach, reuse_buffers=reuse, steps=10)
        if dtype == torch.float32:
            for a_ps, b_ps in zip(multi["w"], single["w"]):
                for a, b in zip(a_ps, b_ps):
                    torch.testing.assert_close(a, b, **F32_TOL)
            assert_ratios_close(multi["ratios"], single["ratios"], **F32_RATIO_TOL)
        else:  # as against the reference: the two paths round in different places
            disp_tol, ratio_rtol = LOW_TOL[dtype]
            errors = displacement_errors(multi, single)
            assert max(errors) < disp_tol, f"relative displacement errors per tensor: {[f'{e:.3g}' for e in errors]}"
            assert_ratios_close(multi["ratios"], single["ratios"], rtol=ratio_rtol, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# no host sync in step()


def _sync_test_optimizer(name, params, reuse):
    groups = [
        {"params": params[:4], "module": "backbone"},
        {"params": params[4:], "module": "rpn", "adapt": False, "weight_decay": 0.0},
    ]
    if name == "LARS":
        opt = LARS(groups, lr=0.1, weight_decay=1e-4, trust_coefficient=0.02, foreach=True)
    elif name == "PMDLAMB":
        opt = PMDLAMB(groups, lr=0.1, cycle=3, foreach=True)
    else:
        opt = LAMB(groups, lr=0.01, weight_decay=0.01, trust_clip=5.0, foreach=True)
    opt._reuse_buffers = reuse
    return AGVM(opt, anchor="backbone", start_iter=0) if name == "AGVM(LAMB)" else opt


@pytest.mark.parametrize("reuse", [None, True], ids=["temporaries", "work_buffers"])
@pytest.mark.parametrize("name", ["LARS", "LAMB", "PMDLAMB", "AGVM(LAMB)"])
def test_step_never_syncs_with_the_host(name, reuse):
    """A step that reads a value back (``.item()``, ``bool(tensor)``, a blocking copy) stalls the GPU every
    iteration; under sync debug mode "error" torch raises RuntimeError at that call instead."""
    torch.manual_seed(0)
    shapes = [(64, 3, 7, 7), (256, 256, 3, 3), (1024, 1024), (256,), (64,), (64,)]
    params = [torch.randn(s, device=CUDA) for s in shapes]
    params[3].zero_()  # ratio 1 from ||w|| = 0
    params[2] = params[2].to(torch.bfloat16)  # a second dtype bucket in the group
    opt = _sync_test_optimizer(name, params, reuse)

    def new_grads(step):
        for j, p in enumerate(params):
            # no gradient for one tensor on odd steps: the NaN-filling path of the ratios
            p.grad = None if (j == 1 and step % 2) else torch.randn_like(p)

    new_grads(0)
    opt.step()  # warm-up: the state (moments, momentum buffers, work buffers) is created here
    torch.cuda.synchronize()
    for step in (1, 2, 3):
        new_grads(step)
        for g in opt.param_groups:
            g["lr"] = 0.01 * (1 + step)  # an LR change is a Python float: no device traffic
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            ratios = opt.last_trust_ratios()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)
    assert ratios[0].device.type == CUDA.type and torch.isnan(ratios[0][1])


# ----------------------------------------------------------------------------------------------------------
# AGVM + GradScaler (float16) on CUDA


def tiny_model(seed=0):
    """tests/helpers.py's TinyDetector (R-CNN parameter names: backbone / rpn / box_head) in float32 on the GPU."""
    return TinyDetector(seed=seed, dtype=torch.float32).to(CUDA)


def make_batch(seed, n):
    return [{k: v.to(CUDA) for k, v in d.items()} for d in tiny_batch(seed, n)]


def sgd_agvm(model, **agvm):
    groups = build_param_groups(model, base_lr=0.05, weight_decay=1e-4)
    assert {g["module"] for g in groups} == {"backbone", "rpn", "box_head"}
    return AGVM(torch.optim.SGD(groups, lr=0.05, momentum=0.9), **agvm)


def snapshot(optimizer):
    """Weights and optimizer state (momentum buffers), cloned."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items() if torch.is_tensor(v)} for p in params}
    return [p.detach().clone() for p in params], state


def assert_unchanged(optimizer, before):
    weights, state = before
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(torch.equal(p, w) for p, w in zip(params, weights)), "a skipped step changed the weights"
    for p in params:
        for k, v in state[id(p)].items():
            assert torch.equal(optimizer.state[p][k], v), f"a skipped step changed the optimizer state {k}"


def assert_changed(optimizer, before):
    weights, _ = before
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert any(not torch.equal(p, w) for p, w in zip(params, weights)), "the step did not move the weights"


INF_AT = 3


def test_agvm_with_gradscaler_skips_an_overflowed_step_and_keeps_mu_finite():
    """The trainer's single-worker measurement by hand: two half-batch backward passes under float16 autocast,
    G1 / G2 from the scaled gradients, Phi = 1 - cos(G1, G2) per part, mu updated, GradScaler steps AGVM.
    At INF_AT an inf lands in the rpn gradient of the second half: GradScaler skips the step (weights and
    momentum unchanged, scale halved), Phi of rpn is not finite and rpn's mu stays what it was."""
    model = tiny_model()
    agvm = sgd_agvm(model, interval=1, start_iter=0)
    layout = ModuleLayout(agvm)
    # 1024, not the default 65536: a fresh float16 run may overflow by itself at first and skip steps
    scaler = torch.amp.GradScaler(CUDA.type, init_scale=1024.0)
    rpn = layout.slices["rpn"]
    for it in range(6):
        batch = make_batch(it, 8)
        halves = []
        for half in (batch[:4], batch[4:]):
            agvm.zero_grad()
            with torch.autocast(CUDA.type, dtype=torch.float16):
                losses = sum(model(half).values())
            scaler.scale(losses).backward()
            halves.append(layout.flat_grads())
        if it == INF_AT:
            halves[1][rpn.start] = float("inf")
        layout.write_grads((halves[0] + halves[1]) / 2)
        scaler.unscale_(agvm)
        inv_scale = 1.0 / scaler.get_scale()
        phi = dict(zip(layout.modules, cosine_variance(halves[0] * inv_scale, halves[1] * inv_scale,
                                                       layout.slices).tolist()))
        mu_before = dict(agvm.mu)
        agvm.update(phi)
        before, scale = snapshot(agvm), scaler.get_scale()
        scaler.step(agvm)
        scaler.update()
        assert all(math.isfinite(m) for m in agvm.mu.values()), agvm.mu
        if it == INF_AT:
            assert not math.isfinite(phi["rpn"]) and math.isfinite(phi["box_head"])
            assert agvm.mu["rpn"] == mu_before["rpn"]
            assert agvm.mu["box_head"] != mu_before["box_head"]  # the finite parts still moved
            assert_unchanged(agvm, before)
            assert scaler.get_scale() == scale / 2
        else:
            assert all(math.isfinite(v) for v in phi.values()), phi
            assert_changed(agvm, before)
            assert scaler.get_scale() == scale
    assert agvm.mu["rpn"] != 1.0 and agvm.mu["backbone"] == 1.0


def test_agvm_update_ignores_non_finite_phi():
    """Contract: a module's mu is unchanged for a non-finite Phi (NaN from 0/0 or inf - inf in a float16
    overflow, inf from an overflowed norm); the finite ones follow eq. 4-5; mu stays finite."""
    agvm = sgd_agvm(tiny_model())
    agvm.update({"backbone": 0.4, "rpn": 0.2, "box_head": 0.8})
    mu = dict(agvm.mu)
    agvm.update({"backbone": 0.4, "rpn": float("nan"), "box_head": float("inf")})
    assert agvm.mu["rpn"] == mu["rpn"] and agvm.mu["box_head"] == mu["box_head"]
    agvm.update({"backbone": 0.4, "rpn": float("-inf"), "box_head": 0.1})
    assert agvm.mu["rpn"] == mu["rpn"] and agvm.mu["box_head"] != mu["box_head"]
    # a non-finite anchor makes every target non-finite: nothing may become NaN
    agvm.update({"backbone": float("nan"), "rpn": 0.3, "box_head": 0.3})
    assert all(math.isfinite(m) for m in agvm.mu.values()), agvm.mu
    assert agvm.mu["backbone"] == 1.0


def test_stepper_amp_overflow_changes_nothing_and_mu_stays_finite():
    """The same through LargeBatchStepper (amp=True on CUDA, one worker, AGVM measuring every iteration): an
    inf in one rpn gradient at INF_AT. GradScaler skips that step, and nothing of it is applied or measured:
    weights, momentum, mu, last_phi and the grad_var / agvm_mu records stay as they were."""
    from detectron2.utils.events import EventStorage

    from largebatch.engine.stepper import LargeBatchStepper

    model = tiny_model(seed=1)
    agvm = sgd_agvm(model, interval=1, start_iter=0)
    stepper = LargeBatchStepper(model, iter([make_batch(100 + it, 4) for it in range(6)]), agvm, amp=True,
                                device_type=CUDA.type)
    assert stepper.grad_scaler is not None
    stepper.grad_scaler = torch.amp.GradScaler(CUDA.type, init_scale=1024.0)  # no overflow of its own at first
    inject = {"on": False}

    def poison(grad):  # a float16 overflow in the rpn gradient, as the scaled backward would produce it
        if inject["on"]:
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
        return grad

    model.proposal_generator.weight.register_hook(poison)
    with EventStorage(0) as storage:
        for it in range(6):
            storage.iter = stepper.iter = it
            inject["on"] = it == INF_AT
            mu_before, phi_before, before = dict(agvm.mu), stepper.last_phi, snapshot(agvm)
            scale = stepper.grad_scaler.get_scale()
            stepper.run_step()
            assert all(math.isfinite(m) for m in agvm.mu.values()), (it, agvm.mu)
            if it == INF_AT:
                assert_unchanged(agvm, before)
                assert agvm.mu == mu_before and stepper.last_phi == phi_before
                assert storage.latest()["grad_var/rpn"][1] == it - 1 and storage.latest()["agvm_mu/rpn"][1] == it - 1
                assert stepper.grad_scaler.get_scale() == scale / 2
            else:
                assert_changed(agvm, before)
                assert all(math.isfinite(v) for v in stepper.last_phi.values())
                assert storage.latest()["agvm_mu/rpn"][1] == it
    assert agvm.mu["rpn"] != 1.0
    assert all(p.device.type == CUDA.type for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------
# the trainer on one GPU


def test_trainer_trains_the_demo_on_one_gpu_with_amp(tmp_path):
    from largebatch import LargeBatchTrainer
    from largebatch.config import load_config
    from largebatch.data import register_datasets

    os.environ.setdefault("LARGEBATCH_DATASETS", os.path.join(REPO, "datasets"))
    cfg = load_config(os.path.join(REPO, "configs/shapes/demo.yaml"), [
        "MODEL.DEVICE", CUDA.type, "SOLVER.AMP.ENABLED", "True",
        "SOLVER.SCHEDULE_UNIT", "iter", "SOLVER.MAX_ITER", "4", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.CHECKPOINT_PERIOD", "1000",
        "SOLVER.AGVM.INTERVAL", "1", "SOLVER.AGVM.START_ITER", "0", "MONITOR.PERIOD", "1",
        "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path),
    ])
    assert cfg.MODEL.DEVICE == CUDA.type and cfg.SOLVER.AGVM.ENABLED and cfg.MODEL.SYNC_BN.ENABLED
    register_datasets(cfg)
    trainer = LargeBatchTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()

    assert all(p.device.type == CUDA.type for p in trainer.stepper.model.parameters())
    stepper = trainer.stepper
    assert stepper.grad_scaler is not None and math.isfinite(stepper.grad_scaler.get_scale())
    assert all(math.isfinite(m) for m in stepper.optimizer.mu.values())
    with open(tmp_path / "metrics.json") as f:
        metrics = [json.loads(line) for line in f]
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(math.isfinite(x) for x in losses), losses
    assert any("grad_var/backbone" in m for m in metrics) and any("agvm_mu/rpn" in m for m in metrics)
    assert os.path.exists(tmp_path / "model_final.pth") and os.path.exists(tmp_path / "layer_stats.jsonl")
