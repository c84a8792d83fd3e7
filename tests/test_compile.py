"""The optimizers under torch.compile: few graphs for a whole run, the eager result, old checkpoints, the trainer key.

Graph counts use dynamo's CompileCounter backend (traces like any backend, runs the graph eagerly: fast and
exact); the inductor tests (real compilation, tens of seconds on 2 cores) are marked slow.
"""
import copy
import io

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from helpers import TinyDetector, make_batch, make_config
from largebatch.optim import LAMB, LARS, PMDLAMB, build_optimizer, compile_step
from largebatch.optim.compile import is_compiled_step

F64 = torch.float64
CASES = {
    "lars": (LARS, dict(momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02)),
    "lamb": (LAMB, dict(weight_decay=0.01)),
    "pmdlamb": (PMDLAMB, dict(cycle=8)),  # 20 steps cross two cycle wraps
}


def make_params(dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (5,), (3, 6), (3,)]
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]
    params[1].data.zero_()  # a zero-initialised bias: ratio 1.0
    return params


def groups(params):
    return [{"params": [params[0], params[2]]}, {"params": [params[1], params[3]], "adapt": False}]


def set_grads(params, step, dtype=F64):
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=gen, dtype=F64).to(dtype) * 0.1
        if i == 0 and step % 5 == 0:
            p.grad.zero_()  # an all-zero gradient: ratio 1.0


def lr_at(step):
    return 0.01 * (1.0 + 0.5 * (step % 7) / 7)  # changes every step


def round_trip(opt):
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt.load_state_dict(torch.load(buf, weights_only=False))


def run(case, *, compiled, tensor_lr, steps=20, round_trip_at=10, backend=None, dtype=F64):
    """``steps`` steps of one optimizer with a changing LR and a state-dict round trip; the params and the number
    of graphs dynamo built (None when eager)."""
    cls, kwargs = CASES[case]
    params = make_params(dtype)
    lr = torch.tensor(lr_at(0), dtype=F64) if tensor_lr else lr_at(0)  # float64: no rounding of lr x ratio
    opt = cls(groups(params), lr=lr, **kwargs)
    counter = CompileCounter() if backend is None else backend
    step = opt.step
    if compiled:
        torch._dynamo.reset()
        step = torch.compile(opt.step, backend=counter, fullgraph=True)
    for i in range(steps):
        set_grads(params, i, dtype)
        for g in opt.param_groups:
            if tensor_lr:
                g["lr"].fill_(lr_at(i))  # what torch's LR schedulers do with a tensor LR
            else:
                g["lr"] = lr_at(i)
        step()
        if i == round_trip_at:
            round_trip(opt)
    graphs = counter.frame_count if compiled and backend is None else None
    return [p.detach().clone() for p in params], graphs, opt


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("tensor_lr", [True, False], ids=["tensor_lr", "float_lr"])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_builds_at_most_three_graphs_and_matches_eager(case, tensor_lr, dtype):
    """fullgraph=True traces the whole step; 20 steps with PMD cycle wraps, a new LR every step and a state-dict
    round trip build <= 3 graphs (the first, the float LR made dynamic, the new state tensors after loading)."""
    want, _, _ = run(case, compiled=False, tensor_lr=tensor_lr, dtype=dtype)
    got, graphs, _ = run(case, compiled=True, tensor_lr=tensor_lr, dtype=dtype)
    assert graphs <= 3, graphs
    # the compiled step computes the bias corrections and xi as tensor ops (float64, then the params' dtype),
    # eagerly they are Python floats
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == F64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("case", ["lamb", "pmdlamb"])
def test_a_checkpoint_with_a_python_int_step_still_resumes(case):
    """Checkpoints written before the step counter became a tensor hold ``group["step"]`` as a Python int."""
    cls, kwargs = CASES[case]
    kwargs = dict(kwargs, cycle=3) if case == "pmdlamb" else kwargs
    params = make_params()
    opt = cls(groups(params), lr=0.01, **kwargs)
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    twin = cls(groups(twin_params), lr=0.01, **kwargs)
    for i in range(4):
        for ps, o in ((params, opt), (twin_params, twin)):
            set_grads(ps, i)
            o.step()
    old = copy.deepcopy(opt.state_dict())
    for g in old["param_groups"]:
        step = g["step"]
        assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.device.type == "cpu"
        g["step"] = int(g["step"])  # the earlier format
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = cls(groups(resumed_params), lr=0.01, **kwargs)
    resumed.load_state_dict(old)
    assert all(isinstance(g["step"], torch.Tensor) and float(g["step"]) == 4 for g in resumed.param_groups)
    for i in range(4, 9):  # past PMD's cycle wrap at t = 6 and 9
        for ps, o in ((resumed_params, resumed), (twin_params, twin)):
            set_grads(ps, i)
            o.step()
    for a, b in zip(resumed_params, twin_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_each_group_has_its_own_step_counter():
    """A step counter is a tensor of its group's own (one shared default tensor would count every group's steps)."""
    params = make_params()
    opt = LAMB(groups(params), lr=0.01)
    params[1].grad = params[3].grad = None
    params[0].grad, params[2].grad = torch.ones_like(params[0]), torch.ones_like(params[2])
    opt.step()
    assert [float(g["step"]) for g in opt.param_groups] == [1.0, 0.0]
    assert opt.param_groups[0]["step"] is not opt.param_groups[1]["step"]


def test_compile_step_keeps_wrappers_eager_and_the_closure_path():
    params = make_params()
    opt = compile_step(LARS(groups(params), lr=0.01), backend=CompileCounter())
    assert isinstance(opt, LARS) and is_compiled_step(opt) and type(opt).__name__ == "CompiledLARS"
    assert compile_step(opt) is opt and type(opt).__name__ == "CompiledLARS"  # applied once
    set_grads(params, 0)
    closure_calls = []
    opt.step(lambda: closure_calls.append(1) or 0.0)  # a closure runs the eager step
    assert closure_calls == [1]


@pytest.mark.slow
def test_inductor_compiled_steps_match_eager_in_float32():
    """Real compilation (inductor, C++ on CPU): each optimizer's compiled step gives its eager result."""
    for case in CASES:
        want, _, _ = run(case, compiled=False, tensor_lr=True, steps=8, round_trip_at=4, dtype=torch.float32)
        got, _, _ = run(case, compiled=True, tensor_lr=True, steps=8, round_trip_at=4, dtype=torch.float32,
                        backend="inductor")
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{case}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["PMDLAMB", "SGD"])
def test_solver_compile_step_with_agvm_and_clipping_gives_the_eager_run(name):
    """SOLVER.COMPILE_STEP: the base optimizer's update compiled (inductor), detectron2's clipping and AGVM eager
    around it; a scheduled LR and AGVM's mu change every step; the result is the eager run's, in <= 3 graphs."""
    from detectron2.solver import build_lr_scheduler
    from detectron2.solver.build import maybe_add_gradient_clipping
    from torch._dynamo.utils import counters

    opts = ["SOLVER.OPTIMIZER", name, "SOLVER.BASE_LR", 0.01, "SOLVER.AGVM.ENABLED", True,
            "SOLVER.AGVM.START_ITER", 0, "SOLVER.PMDLAMB.CYCLE", 4, "SOLVER.WARMUP_ITERS", 4, "SOLVER.MAX_ITER", 10,
            "SOLVER.STEPS", (6,), "SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.05]
    runs = []
    for compiled in (False, True):
        cfg = make_config(*opts, "SOLVER.COMPILE_STEP", compiled, config=None)
        model = TinyDetector(dtype=torch.float32)
        torch._dynamo.reset()
        counters.clear()
        optimizer = build_optimizer(cfg, model, wrap=lambda opt: maybe_add_gradient_clipping(cfg, opt))
        assert is_compiled_step(optimizer) == compiled
        scheduler = build_lr_scheduler(cfg, optimizer)
        for it in range(10):
            optimizer.zero_grad()
            sum(model(make_batch(it, 4)).values()).backward()
            optimizer.mu.update({"rpn": 1.0 + 0.1 * it, "box_head": 1.0 - 0.05 * it})
            optimizer.set_iteration(it)
            optimizer.step()
            scheduler.step()
        runs.append([p.detach().clone() for p in model.parameters()])
        if compiled:
            assert 1 <= counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adamw_on_cpu_keeps_a_float_lr_and_the_config_refuses_compiling_it():
    """torch's compiled AdamW takes a tensor LR only with capturable (GPU params): on the CPU compile_step leaves
    the float, and SOLVER.COMPILE_STEP with ADAMW on cpu is one line before training (each new LR recompiles)."""
    from largebatch.config import ConfigError
    from largebatch.optim.compile import supports_tensor_lr

    params = make_params(torch.float32)
    assert not supports_tensor_lr(torch.optim.AdamW(params, lr=0.01))
    assert supports_tensor_lr(torch.optim.SGD(params, lr=0.01)) and supports_tensor_lr(LAMB(params, lr=0.01))
    with pytest.raises(ConfigError, match="SOLVER.COMPILE_STEP.*ADAMW"):
        make_config("SOLVER.OPTIMIZER", "ADAMW", "SOLVER.COMPILE_STEP", True, "MODEL.DEVICE", "cpu")
    make_config("SOLVER.OPTIMIZER", "LAMB", "SOLVER.COMPILE_STEP", True, "MODEL.DEVICE", "cpu")  # accepted
