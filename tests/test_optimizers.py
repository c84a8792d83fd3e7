"""LARS, LAMB and PMD-LAMB against independent float64 references written from the papers' equations.

The references below are plain per-tensor loops on Python floats and float64 tensors; they share nothing
with the implementation. Every run: 50 steps, an LR that changes every step, a zero-initialised bias
(norm 0 -> ratio 1), a gradient that is all zeros every 5th step, a param without a gradient every other
step (skipped, ratio NaN), a group with ``adapt=False`` and extra keys, and a ``state_dict()`` round trip
into a fresh optimizer (and fresh param tensors) at step 25.
"""
import ast
import copy
import io
import math
import os

import pytest
import torch

from helpers import REPO
from largebatch.optim.lamb import LAMB, PMDLAMB
from largebatch.optim.lars import LARS

F64 = torch.float64
STEPS = 50
RESUME_AT = 25

# ----------------------------------------------------------------------------------------------------------
# independent references: one tensor, one step; return (new_w, ratio used)


def ref_lars(w, g, st, *, t, lr, adapt, momentum, weight_decay, trust_coefficient, eps, trust_clip):
    # CoolDet eq. 1-2 / You et al. 2017; ratio 1 where a norm is 0 or adapt=False; clip caps the local LR
    # of adapting groups (the zero-norm 1.0 included)
    wn, gn = math.sqrt(float((w * w).sum())), math.sqrt(float((g * g).sum()))
    if not adapt:
        local = 1.0
    else:
        local = trust_coefficient * wn / (gn + weight_decay * wn + eps) if (wn > 0 and gn > 0) else 1.0
        if trust_clip is not None:
            local = min(local, trust_clip)
    upd = local * (g + weight_decay * w)
    if momentum != 0:
        st["buf"] = upd.clone() if "buf" not in st else momentum * st["buf"] + upd
        upd = st["buf"]
    return w - lr * upd, local


def ref_lamb(w, g, st, *, t, lr, adapt, betas, eps, weight_decay, bias_correction, trust_clip):
    # You et al. 2020, Algorithm 2 (Adam moments, bias correction optional)
    b1, b2 = betas
    m = b1 * st.get("m", torch.zeros_like(w)) + (1 - b1) * g
    v = b2 * st.get("v", torch.zeros_like(w)) + (1 - b2) * g * g
    st["m"], st["v"] = m, v
    if bias_correction:
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    else:
        m_hat, v_hat = m, v
    u = m_hat / (torch.sqrt(v_hat) + eps) + weight_decay * w
    wn, un = math.sqrt(float((w * w).sum())), math.sqrt(float((u * u).sum()))
    if not adapt:
        trust = 1.0
    else:
        trust = wn / un if (wn > 0 and un > 0) else 1.0
        if trust_clip is not None:
            trust = min(trust, trust_clip)
    return w - lr * trust * u, trust


def ref_pmd(w, g, st, *, t, lr, adapt, betas, eps, weight_decay, cycle, scale):
    # LargeDet Algorithm 1, eq. 3-5
    b1, b2 = betas
    xi = math.cos(math.pi / 2 * (t % cycle) / cycle)
    m = xi * b1 * st.get("m", torch.zeros_like(w)) + (1 - b1) * g
    v = xi * b2 * st.get("v", torch.zeros_like(w)) + (1 - b2) * g * g
    st["m"], st["v"] = m, v
    u = m / torch.sqrt(v + eps) + weight_decay * w
    wn, un = math.sqrt(float((w * w).sum())), math.sqrt(float((u * u).sum()))
    ratio = wn / un if (adapt and wn > 0 and un > 0) else 1.0
    return w - lr * scale * ratio * u, ratio


# ----------------------------------------------------------------------------------------------------------
# the cases: optimizer class, its kwargs, the reference, the reference's full hyper-parameters

LARS_DEFAULTS = dict(momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=0.0, trust_clip=None)
LAMB_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, bias_correction=True, trust_clip=None)
PMD_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=5e-4, cycle=200, scale=0.012)

CASES = {
    "lars": (LARS, dict(trust_coefficient=0.02, eps=1e-9), ref_lars, LARS_DEFAULTS, 0.5),
    "lars_clip": (LARS, dict(trust_coefficient=1.0, trust_clip=0.7), ref_lars, LARS_DEFAULTS, 0.01),
    "lars_no_momentum": (LARS, dict(momentum=0.0, trust_coefficient=0.05), ref_lars, LARS_DEFAULTS, 0.3),
    "lamb": (LAMB, dict(), ref_lamb, LAMB_DEFAULTS, 0.01),
    "lamb_no_bias_correction": (
        LAMB, dict(bias_correction=False, betas=(0.8, 0.99), eps=1e-4), ref_lamb, LAMB_DEFAULTS, 0.01
    ),
    "lamb_clip": (LAMB, dict(trust_clip=0.8), ref_lamb, LAMB_DEFAULTS, 0.01),
    "pmd_cycle7": (PMDLAMB, dict(cycle=7), ref_pmd, PMD_DEFAULTS, 1.0),
    "pmd_defaults": (PMDLAMB, dict(), ref_pmd, PMD_DEFAULTS, 1.0),
}

# group 0 (adapt): two weights, a zero-initialised bias, a param without a gradient every other step;
# group 1 (adapt=False, its own LR factor, extra keys)
SHAPES = [[(6, 4), (3, 4, 2, 2), (5,), (7,)], [(4,), (3,)]]
SKIPPED = (0, 3)  # no gradient on odd steps
ZERO_GRAD = (0, 0)  # an all-zero gradient every 5th step
LR_FACTOR = [1.0, 0.5]


def init_params(dtype=F64):
    gen = torch.Generator().manual_seed(1234)
    params = [[torch.randn(s, generator=gen, dtype=F64) for s in shapes] for shapes in SHAPES]
    params[0][2].zero_()
    return [[p.to(dtype) for p in ps] for ps in params]


def grads_at(step, dtype=F64):
    gen = torch.Generator().manual_seed(10_000 + step)
    grads = [[torch.randn(s, generator=gen, dtype=F64) * 0.1 for s in shapes] for shapes in SHAPES]
    if step % 2 == 1:
        grads[SKIPPED[0]][SKIPPED[1]] = None
    if step % 5 == 0:
        grads[ZERO_GRAD[0]][ZERO_GRAD[1]].zero_()
    return [[None if g is None else g.to(dtype) for g in gs] for gs in grads]


def lr_at(step, base):
    return base * (1.0 + 0.5 * math.sin(step))  # changes every step


def build(cls, params, kwargs, foreach):
    """``foreach``: True, False, or "alloc" (the multi-tensor path with fresh temporaries, the default on
    CUDA, instead of the persistent work buffers used on CPU)."""
    groups = [
        {"params": params[0], "module": "backbone"},
        {"params": params[1], "adapt": False, "module": "rpn", "names": ["rpn.bias", "rpn.norm"]},
    ]
    opt = cls(groups, lr=0.0, foreach=bool(foreach), **kwargs)
    if foreach == "alloc":
        opt._reuse_buffers = False
    return opt


def run_reference(case, wd, steps=STEPS):
    cls, kwargs, ref, defaults, base_lr = CASES[case]
    hp = dict(defaults, **kwargs)
    hp["weight_decay"] = wd
    params = init_params()
    states = [[{} for _ in ps] for ps in params]
    history = []  # per step: (params, ratios per group)
    for step in range(1, steps + 1):
        grads = grads_at(step)
        ratios = []
        for gi, (ps, gs) in enumerate(zip(params, grads)):
            group_ratios = []
            for j, (p, g) in enumerate(zip(ps, gs)):
                if g is None:
                    group_ratios.append(float("nan"))
                    continue
                lr = lr_at(step, base_lr) * LR_FACTOR[gi]
                ps[j], r = ref(p, g, states[gi][j], t=step, lr=lr, adapt=(gi == 0), **hp)
                group_ratios.append(r)
            ratios.append(torch.tensor(group_ratios, dtype=F64))
        history.append(([[p.clone() for p in ps] for ps in params], ratios))
    return history


def set_grads(params, grads):
    for ps, gs in zip(params, grads):
        for p, g in zip(ps, gs):
            p.grad = None if g is None else g.clone()


def run_optimizer(case, wd, foreach, dtype=F64, steps=STEPS, resume_at=RESUME_AT):
    cls, kwargs, _, _, base_lr = CASES[case]
    kwargs = dict(kwargs, weight_decay=wd)
    params = init_params(dtype)
    opt = build(cls, params, kwargs, foreach)
    history = []
    for step in range(1, steps + 1):
        if step == resume_at + 1:
            # checkpoint round trip into a fresh optimizer over fresh tensors
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            params = [[p.detach().clone() for p in ps] for ps in params]
            opt = build(cls, params, dict(kwargs), foreach)
            opt.load_state_dict(torch.load(buf, weights_only=False))
        grads = grads_at(step, dtype)
        set_grads(params, grads)
        grads_before = [[None if p.grad is None else p.grad.clone() for p in ps] for ps in params]
        for gi, group in enumerate(opt.param_groups):
            group["lr"] = lr_at(step, base_lr) * LR_FACTOR[gi]
        opt.step()
        for ps, gs in zip(params, grads_before):  # p.grad is never modified
            for p, g in zip(ps, gs):
                if g is not None:
                    assert torch.equal(p.grad, g)
        history.append(([[p.detach().clone() for p in ps] for ps in params], opt.last_trust_ratios()))
    return history, opt


def assert_history_close(got, want, rtol, atol):
    assert len(got) == len(want)
    for step, ((gp, gr), (wp, wr)) in enumerate(zip(got, want), start=1):
        for gps, wps in zip(gp, wp):
            for a, b in zip(gps, wps):
                torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol,
                                           msg=lambda m: f"step {step}: {m}")
        for a, b in zip(gr, wr):
            torch.testing.assert_close(
                a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"ratios, step {step}: {m}"
            )


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreach", [True, "alloc", False], ids=["foreach", "foreach_alloc", "per_tensor"])
@pytest.mark.parametrize("wd", [0.0, 0.01], ids=["wd0", "wd"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, wd, foreach):
    want = run_reference(case, wd)
    got, opt = run_optimizer(case, wd, foreach)
    assert_history_close(got, want, rtol=1e-10, atol=1e-12)

    ratios = torch.stack([r[0] for _, r in want])
    if "clip" in case:  # the cap was active somewhere, and never exceeded
        clip = CASES[case][1]["trust_clip"]
        assert (ratios == clip).any() and (ratios[~ratios.isnan()] <= clip).all()
    # the special cases were exercised: zero-initialised bias (ratio 1 at step 1), skipped param (NaN)
    assert want[0][1][0][2] == min(1.0, CASES[case][1].get("trust_clip") or 1.0)
    assert math.isnan(want[0][1][0][SKIPPED[1]])
    assert (want[-1][1][1] == 1.0).all()  # adapt=False group
    # extra group keys survive steps and the state_dict round trip
    assert opt.param_groups[0]["module"] == "backbone"
    assert opt.param_groups[1]["names"] == ["rpn.bias", "rpn.norm"] and opt.param_groups[1]["adapt"] is False


@pytest.mark.parametrize("case", ["lars", "lamb", "pmd_cycle7"])
@pytest.mark.parametrize("dtype", [torch.float32])
@pytest.mark.parametrize("foreach", [True, "alloc"], ids=["foreach", "foreach_alloc"])
def test_foreach_matches_per_tensor_float32(case, dtype, foreach):
    a, _ = run_optimizer(case, 0.01, foreach, dtype=dtype, steps=20, resume_at=10)
    b, _ = run_optimizer(case, 0.01, False, dtype=dtype, steps=20, resume_at=10)
    for (ap, ar), (bp, br) in zip(a, b):
        assert all(x.dtype == dtype for ps in ap for x in ps)
        for aps, bps in zip(ap, bp):
            for x, y in zip(aps, bps):
                torch.testing.assert_close(x, y, rtol=2e-5, atol=1e-6)
        for x, y in zip(ar, br):
            assert x.dtype == dtype
            torch.testing.assert_close(x, y, rtol=2e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", [LARS, LAMB, PMDLAMB])
def test_low_precision(cls, dtype):
    results = []
    for foreach in (False, True, "alloc"):
        torch.manual_seed(0)
        ws = [torch.randn(64, 32).to(dtype), torch.zeros(32, dtype=dtype)]
        opt = cls(ws, lr=0.01, weight_decay=1e-4, foreach=bool(foreach))
        opt._reuse_buffers = False if foreach == "alloc" else None
        for step in range(5):
            gen = torch.Generator().manual_seed(step)
            for w in ws:
                w.grad = torch.randn(w.shape, generator=gen).to(dtype)  # v = (1 - b2) g^2 must not underflow
            opt.step()
        (ratios,) = opt.last_trust_ratios()
        assert all(w.dtype == dtype and torch.isfinite(w).all() for w in ws)
        assert ratios.dtype == torch.float32 and torch.isfinite(ratios).all()
        results.append((ws, ratios))
    (wa, ra) = results[0]
    tol = dict(rtol=2e-2, atol=2e-3)
    for wb, rb in results[1:]:
        for x, y in zip(wa, wb):
            torch.testing.assert_close(x.float(), y.float(), **tol)
        torch.testing.assert_close(ra, rb, **tol)


# ----------------------------------------------------------------------------------------------------------
# API details


def _one_param(shape=(3, 2)):
    p = torch.nn.Parameter(torch.randn(shape, dtype=F64))
    p.grad = torch.randn(shape, dtype=F64)
    return p


@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (LARS, dict(lr=-1.0), "lr"),
        (LARS, dict(lr=0.1, momentum=-0.1), "momentum"),
        (LARS, dict(lr=0.1, weight_decay=-1e-4), "weight_decay"),
        (LARS, dict(lr=0.1, trust_coefficient=0.0), "trust_coefficient"),
        (LARS, dict(lr=0.1, eps=-1.0), "eps"),
        (LARS, dict(lr=0.1, trust_clip=0.0), "trust_clip"),
        (LAMB, dict(lr=-0.1), "lr"),
        (LAMB, dict(lr=0.1, betas=(1.0, 0.999)), "betas"),
        (LAMB, dict(lr=0.1, betas=(0.9, -0.1)), "betas"),
        (LAMB, dict(lr=0.1, eps=-1e-6), "eps"),
        (LAMB, dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
        (LAMB, dict(lr=0.1, trust_clip=-2.0), "trust_clip"),
        (PMDLAMB, dict(lr=-1.0), "lr"),
        (PMDLAMB, dict(lr=0.1, betas=(0.9, 1.5)), "betas"),
        (PMDLAMB, dict(lr=0.1, eps=-1.0), "eps"),
        (PMDLAMB, dict(lr=0.1, weight_decay=-1.0), "weight_decay"),
        (PMDLAMB, dict(lr=0.1, cycle=0), "cycle"),
        (PMDLAMB, dict(lr=0.1, cycle=2.5), "cycle"),
        (PMDLAMB, dict(lr=0.1, scale=0.0), "scale"),
    ],
)
def test_invalid_arguments(cls, kwargs, name):
    with pytest.raises(ValueError, match=name.replace("[", r"\[")):
        cls([_one_param()], **kwargs)


def test_invalid_group_override():
    with pytest.raises(ValueError, match="weight_decay"):
        LAMB([{"params": [_one_param()], "weight_decay": -1.0}], lr=0.1)


@pytest.mark.parametrize("cls", [LARS, LAMB, PMDLAMB])
@pytest.mark.parametrize("foreach", [True, False])
def test_sparse_gradient_raises(cls, foreach):
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        cls([p], lr=0.1, foreach=foreach).step()


@pytest.mark.parametrize("cls", [LARS, LAMB, PMDLAMB])
def test_is_an_optimizer_with_closure_and_scheduler(cls):
    model = torch.nn.Linear(4, 2).double()
    opt = cls(model.parameters(), lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.defaults["adapt"] is True and opt.param_groups[0]["adapt"] is True
    assert opt.last_trust_ratios() == [None]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x = torch.randn(8, 4, dtype=F64)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).sum()
        loss.backward()
        return loss

    before = model.weight.detach().clone()
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and not torch.equal(before, model.weight)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    (ratios,) = opt.last_trust_ratios()
    assert ratios.shape == (2,) and ratios.dtype == F64


@pytest.mark.parametrize("cls", [LARS, LAMB, PMDLAMB])
def test_state_dict_holds_no_ratio_tensors_and_round_trips(cls):
    ps = [_one_param(), _one_param((5,))]
    opt = cls([{"params": ps, "module": "head"}], lr=0.1, foreach=True)
    opt.step()
    opt.step()
    sd = opt.state_dict()
    assert all("trust_ratios" not in g for g in sd["param_groups"])
    assert sd["param_groups"][0]["module"] == "head"
    if cls is not LARS:
        assert sd["param_groups"][0]["step"] == 2  # the step counter (PMD cycle position) is saved
    fresh = cls([{"params": [p.detach().clone() for p in ps], "module": "head"}], lr=0.1)
    fresh.load_state_dict(copy.deepcopy(sd))
    assert fresh.last_trust_ratios() == [None]
    assert fresh.state_dict()["param_groups"] == sd["param_groups"]
    # a deep copy / pickle of the optimizer keeps working
    clone = copy.deepcopy(opt)
    assert clone.last_trust_ratios() == [None] or clone.last_trust_ratios()[0].shape == (2,)


@pytest.mark.parametrize("cls", [LARS, LAMB, PMDLAMB])
@pytest.mark.parametrize("foreach", [True, False])
def test_params_without_grad_are_skipped(cls, foreach):
    a, b = _one_param(), _one_param((4,))
    b.grad = None
    b_before = b.detach().clone()
    opt = cls([a, b], lr=0.1, weight_decay=0.01, foreach=foreach)
    opt.step()
    assert torch.equal(b, b_before) and len(opt.state[b]) == 0
    (ratios,) = opt.last_trust_ratios()
    assert torch.isfinite(ratios[0]) and torch.isnan(ratios[1])
    # a group with no gradient at all: all NaN, nothing moves
    a.grad = None
    a_before = a.detach().clone()
    opt.step()
    assert torch.equal(a, a_before) and torch.isnan(opt.last_trust_ratios()[0]).all()


@pytest.mark.parametrize("cls", [LARS, LAMB, PMDLAMB])
def test_zero_weights_and_grads_give_ratio_one(cls):
    w = torch.nn.Parameter(torch.zeros(3, 3, dtype=F64))
    w.grad = torch.zeros(3, 3, dtype=F64)
    opt = cls([w], lr=0.1)
    opt.step()
    (ratios,) = opt.last_trust_ratios()
    assert ratios.tolist() == [1.0] and torch.isfinite(w).all()


def test_foreach_default_and_mixed_dtype_groups():
    ws = [_one_param(), torch.nn.Parameter(torch.randn(3, 2)), _one_param((2,))]
    ws[1].grad = torch.randn(3, 2)
    ref = [torch.nn.Parameter(w.detach().clone()) for w in ws]
    for r, w in zip(ref, ws):
        r.grad = w.grad.clone()
    a, b = LAMB(ws, lr=0.1, weight_decay=0.01), LAMB(ref, lr=0.1, weight_decay=0.01, foreach=False)
    assert a.param_groups[0]["foreach"] is None
    a.step()
    b.step()
    for x, y in zip(ws, ref):
        torch.testing.assert_close(x, y)
    (ra,), (rb,) = a.last_trust_ratios(), b.last_trust_ratios()
    assert ra.dtype == torch.float32 and ra.shape == (3,)  # mixed float64/float32 group: float32 ratios
    torch.testing.assert_close(ra, rb)


def test_pmd_xi_wraps_each_cycle():
    # with beta1 = 0 the first moment is (1 - b1) g regardless of xi; with the xi wrap at t % T == 0
    # the second moment decay is exactly beta2; compare the saved moments to the formula directly.
    p = _one_param((5,))
    opt = PMDLAMB([p], lr=0.0, betas=(0.5, 0.9), eps=0.0, weight_decay=0.0, cycle=3)
    m = torch.zeros(5, dtype=F64)
    v = torch.zeros(5, dtype=F64)
    for t in range(1, 8):
        p.grad = torch.full((5,), float(t), dtype=F64)
        opt.step()
        xi = math.cos(math.pi / 2 * (t % 3) / 3)
        m = xi * 0.5 * m + 0.5 * p.grad
        v = xi * 0.9 * v + 0.1 * p.grad**2
        torch.testing.assert_close(opt.state[p]["exp_avg"], m, rtol=1e-12, atol=0)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], v, rtol=1e-12, atol=0)
    assert opt.param_groups[0]["step"] == 7


def test_no_detectron2_import_in_optimizers():
    optim_dir = os.path.join(REPO, "projects", "largebatch", "optim")
    for name in ("lars.py", "lamb.py", "trust_ratio.py", "checks.py", "agvm.py", "groups.py", "build.py"):
        tree = ast.parse(open(os.path.join(optim_dir, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "detectron2" for a in node.names), name
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "detectron2", name


# ----------------------------------------------------------------------------------------------------------
# edge cases (conventions of torch.optim and timm's optimizer tests)
@pytest.mark.parametrize("cls", [LAMB, PMDLAMB])
def test_complex_parameters_are_refused_by_name(cls):
    with pytest.raises(ValueError, match="does not support complex parameters"):
        cls([torch.zeros(3, dtype=torch.complex64, requires_grad=True)], lr=0.1)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per_tensor"])
def test_lars_on_complex_parameters_is_lars_on_their_real_view(foreach):
    """LARS is SGD with a per-tensor factor: on a complex tensor it equals LARS on ``view_as_real`` (same norms,
    same update), as torch's SGD does; its local LRs are real."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, dtype=torch.complex128, generator=gen).requires_grad_()
    w_real = torch.view_as_real(w.detach().clone()).requires_grad_()
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02, foreach=foreach)
    opt, opt_real = LARS([w], **kwargs), LARS([w_real], **kwargs)
    for _ in range(5):
        g = torch.randn(5, 3, dtype=torch.complex128, generator=gen)
        w.grad, w_real.grad = g.clone(), torch.view_as_real(g).clone()
        opt.step()
        opt_real.step()
        (ratio,), (ratio_real,) = opt.last_trust_ratios(), opt_real.last_trust_ratios()
        assert ratio.dtype == torch.float64
        torch.testing.assert_close(ratio, ratio_real, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.view_as_real(w.detach()), w_real.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [LARS, LAMB, PMDLAMB])
def test_a_refused_param_group_is_not_added(cls):
    opt = cls([torch.zeros(3, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "lr": -1.0})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("reuse_buffers", [True, False])
def test_lamb_float16_small_eps_and_zero_gradients_stay_finite_on_the_multi_tensor_path(reuse_buffers):
    """eps * sqrt(1 - beta2) underflows in float16 (1e-7 x 0.03): the multi-tensor path must not divide 0 by 0
    where the gradient is exactly zero, and agrees with the per-tensor path."""
    torch.manual_seed(0)
    grads = [torch.randn(64, dtype=torch.float16) for _ in range(3)]
    for g in grads:
        g[::4] = 0.0
    results = []
    for foreach in (True, False):
        params = [torch.ones(64, dtype=torch.float16, requires_grad=True) for _ in range(3)]
        opt = LAMB(params, lr=0.01, eps=1e-7, weight_decay=0.01, foreach=foreach)
        opt._reuse_buffers = reuse_buffers
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        results.append(torch.cat([p.detach().float() for p in params]))
    assert all(bool(torch.isfinite(r).all()) for r in results)
    torch.testing.assert_close(results[0], results[1], rtol=2e-3, atol=2e-3)


def test_agvm_survives_deepcopy_and_pickle_and_runs_state_dict_hooks():
    import pickle

    from helpers import TinyDetector
    from largebatch.optim import AGVM
    from largebatch.optim.groups import build_param_groups

    model = TinyDetector()
    agvm = AGVM(torch.optim.SGD(build_param_groups(model, base_lr=0.1, weight_decay=0.0), lr=0.1), interval=1)
    agvm.update({"backbone": 0.5, "rpn": 0.1, "box_head": 0.2})
    for clone in (copy.deepcopy(agvm), pickle.loads(pickle.dumps(agvm))):
        assert clone.mu == agvm.mu and clone.anchor == agvm.anchor and len(clone.param_groups) == len(agvm.param_groups)
    calls = []
    agvm.register_state_dict_pre_hook(lambda opt: calls.append("pre"))
    agvm.register_state_dict_post_hook(lambda opt, sd: {**sd, "tag": 1})
    agvm.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("load_pre"))
    agvm.register_load_state_dict_post_hook(lambda opt: calls.append("load_post"))
    state = agvm.state_dict()
    assert state["tag"] == 1 and calls == ["pre"]
    agvm.load_state_dict(state)
    assert calls == ["pre", "load_pre", "load_post"]
