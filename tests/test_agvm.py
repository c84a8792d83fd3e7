"""AGVM (Xue et al., NeurIPS 2022): the mu update (eq. 4-5), Phi = 1 - cos(G1, G2) (eq. 3) measured by
``LargeBatchStepper`` on 1, 2, 3 and 4 gloo CPU workers against gradients computed by hand from each rank's
data, the step on the exact global mean, every SOLVER.OPTIMIZER under AGVM, and resume (mu checkpointed).

The tiny model has the parameter names of a detectron2 R-CNN (``backbone.*``, ``proposal_generator.*``,
``roi_heads.box_head.*``), so that ``ModulePartition`` maps them to backbone / rpn / box_head, and runs in
float64, so that the references match to ~1e-12.
"""
import copy
import io
import math
import os

import pytest
import torch
from detectron2.utils.events import EventStorage

from distributed import run_workers
from helpers import TinyDetector, make_batch, part_of
from largebatch.optim import AGVM, LAMB, LARS, PMDLAMB, build_optimizer
from largebatch.optim.groups import build_param_groups
from largebatch.probe import ModuleLayout, cosine_variance

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("backbone", "rpn", "box_head")
TIGHT = dict(rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------------
# a tiny "detector" and references computed by hand
# ------------------------------------------------------------------------------------------------------
def rank_batch(iteration, rank, micro=0, n=2):
    return make_batch(100_000 * iteration + 100 * rank + micro, n)


def ref_grads(model, batch):
    """{parameter name: d(sum of the losses)/d(parameter)} of a bare model on one batch."""
    model = copy.deepcopy(model)
    losses = sum(model(batch).values())
    names, params = zip(*model.named_parameters())
    return dict(zip(names, torch.autograd.grad(losses, params)))


def mean_grads(list_of_grads):
    return {k: sum(g[k] for g in list_of_grads) / len(list_of_grads) for k in list_of_grads[0]}


def per_part(grads):
    """{part: flat gradient}, parameters in name order (cosine and norms do not depend on the order)."""
    out = {}
    for name in sorted(grads):
        out.setdefault(part_of(name), []).append(grads[name].reshape(-1))
    return {part: torch.cat(v) for part, v in out.items()}


def ref_phi(g1, g2):
    a, b = per_part(g1), per_part(g2)
    return {m: 1.0 - float(torch.dot(a[m], b[m]) / (a[m].norm() * b[m].norm())) for m in a}


def ref_update(mu, phi, anchor="backbone", momentum=0.97, low=0.5, high=10.0):
    """Eq. 4 and 5 as the official code writes them."""
    out = dict(mu)
    for m, p in phi.items():
        new = math.sqrt(min(max((phi[anchor] + 1e-6) / (p + 1e-6), low), high))
        out[m] = momentum * mu[m] + (1 - momentum) * new
    out[anchor] = 1.0
    return out


def adam_normalized(grads, v_before, beta2, eps):
    """g / (sqrt(beta2 * v + (1 - beta2) * g^2) + eps), v = AdamW's exp_avg_sq before the step."""
    return {k: g / ((beta2 * v_before[k] + (1 - beta2) * g * g).sqrt() + eps) for k, g in grads.items()}


def flat_to_named(flat, layout, model):
    """Cut a layout-ordered flat vector into {parameter name: tensor}."""
    index = {id(p): name for name, p in model.named_parameters()}
    return {index[id(p)]: v.view_as(p) for p, v in zip(layout.params, flat.split(layout.sizes))}


def make_stepper(model, optimizer, batches, **kwargs):
    """A LargeBatchStepper that records the raw half means G1, G2 it measured Phi on (through its public
    ``measure_variance``), in the list it returns with it."""
    from torch.nn.parallel import DistributedDataParallel

    from largebatch.engine.stepper import LargeBatchStepper

    captured = []

    class RecordingStepper(LargeBatchStepper):
        def measure_variance(self, g1, g2):
            captured.append((g1.clone(), g2.clone()))
            return super().measure_variance(g1, g2)

    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        model = DistributedDataParallel(model, device_ids=None, broadcast_buffers=False)
    return RecordingStepper(model, iter(batches), optimizer, **kwargs), captured


def sgd_agvm(model, lr=0.1, **agvm):
    groups = build_param_groups(model, base_lr=lr, weight_decay=0.0)
    return AGVM(torch.optim.SGD(groups, lr=lr, momentum=0.0), **agvm)


def adamw_agvm(model, lr=1e-2, **agvm):
    groups = build_param_groups(model, base_lr=lr, weight_decay=0.0)
    return AGVM(torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0), **agvm)


def lr_of(optimizer):
    """{parameter name: group LR} of an optimizer built by build_param_groups."""
    return {n: g["lr"] for g in optimizer.param_groups for n in g["param_names"]}


def check_sgd_step(model, before, grad, optimizer, mu):
    """momentum 0, no decay: w_after = w_before - lr * mu[part] * grad, with grad the global mean."""
    lrs = lr_of(optimizer)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grad[name], **TIGHT)
        expected = before[name] - lrs[name] * mu[part_of(name)] * grad[name]
        torch.testing.assert_close(p.detach(), expected, **TIGHT)


def check_halves(stepper, model, measured, g1, g2):
    """The G1 / G2 the stepper measured (flat, layout order) equal the reference half means."""
    for got, ref in zip(measured, (g1, g2)):
        named = flat_to_named(got, stepper.layout, model)
        for k in ref:
            torch.testing.assert_close(named[k], ref[k], **TIGHT)


def check_measurement(stepper, storage, iteration, phi, mu):
    """The stepper's Phi and the grad_var / agvm_mu metrics of this iteration equal the references."""
    assert stepper.last_phi == pytest.approx(phi, rel=1e-9, abs=1e-12)
    latest = storage.latest()
    for m in MODULES:
        value, it = latest[f"grad_var/{m}"]
        assert it == iteration and value == pytest.approx(phi[m], rel=1e-9, abs=1e-12)
        value, it = latest[f"agvm_mu/{m}"]
        assert it == iteration and value == pytest.approx(mu[m], rel=1e-12)


# ------------------------------------------------------------------------------------------------------
# eq. 4-5 and eq. 3 on their own
# ------------------------------------------------------------------------------------------------------
def test_update_matches_the_formula_of_eq4_eq5():
    model = TinyDetector()
    agvm = sgd_agvm(model)
    assert agvm.mu == {m: 1.0 for m in MODULES}
    mu = dict(agvm.mu)
    g = torch.Generator().manual_seed(3)
    phis = [{m: float(torch.rand(1, generator=g)) for m in MODULES} for _ in range(6)]
    phis += [
        {"backbone": 0.9, "rpn": 1e-4, "box_head": 0.0},  # ratio above 10: clamped to sqrt(10)
        {"backbone": 1e-4, "rpn": 0.9, "box_head": 2.0},  # below 0.5: clamped to sqrt(0.5)
        {"backbone": 0.0, "rpn": 0.0, "box_head": 0.3},
    ]
    for phi in phis:
        mu = ref_update(mu, phi)
        out = agvm.update(phi)
        assert out == pytest.approx(mu, rel=1e-14) and agvm.mu == pytest.approx(mu, rel=1e-14)
        assert agvm.mu["backbone"] == 1.0
    # parts without a measurement keep their mu; other settings of eq. 4-5
    before = dict(agvm.mu)
    agvm.update({"backbone": 0.5, "rpn": 0.1})
    assert agvm.mu["box_head"] == before["box_head"]
    other = AGVM(agvm.optimizer, anchor="rpn", momentum=0.5, clamp=(0.25, 4.0))
    phi = {"backbone": 0.2, "rpn": 0.6, "box_head": 0.01}
    assert other.update(phi) == pytest.approx(
        ref_update({m: 1.0 for m in MODULES}, phi, anchor="rpn", momentum=0.5, low=0.25, high=4.0), rel=1e-14
    )


def test_invalid_arguments_are_refused():
    model = TinyDetector()
    with pytest.raises(ValueError, match="anchor"):
        sgd_agvm(model, anchor="fpn")
    with pytest.raises(ValueError, match="module"):
        AGVM(torch.optim.SGD(model.parameters(), lr=0.1))
    for bad in (dict(momentum=1.0), dict(interval=0), dict(start_iter=-1), dict(clamp=(2.0, 1.0))):
        with pytest.raises(ValueError):
            sgd_agvm(model, **bad)


def test_cosine_variance_on_known_gradients():
    slices = {"same": slice(0, 2), "orthogonal": slice(2, 4), "opposite": slice(4, 6), "zero": slice(6, 8),
              "scaled": slice(8, 11), "angle": slice(11, 13)}
    g1 = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 2.0, 0.0, 0.0, 1.0, 2.0, 3.0, 1.0, 0.0])
    g2 = torch.tensor([3.0, 0.0, 0.0, 2.0, -1.0, -2.0, 1.0, 1.0, 2.0, 4.0, 6.0, 1.0, 1.0])
    phi = cosine_variance(g1, g2, slices)
    assert phi.dtype == torch.float64
    expected = [0.0, 1.0, 2.0, 1.0, 0.0, 1.0 - 1.0 / math.sqrt(2.0)]
    torch.testing.assert_close(phi, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    # float32 gradients of a big part, nearly parallel halves (Phi ~ 5e-5): within 2e-7 of float64 (a float32
    # BLAS dot is ~1e-5 off here); squares that overflow float32 fall back to float64
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300_000, generator=gen)
    b = a + 0.01 * torch.randn(300_000, generator=gen)
    exact = 1 - torch.dot(a.double(), b.double()) / (a.double().norm() * b.double().norm())
    assert abs(cosine_variance(a, b, {"part": slice(0, 300_000)})[0] - exact) < 2e-7
    big = torch.full((4,), 1e25)
    assert cosine_variance(big, 2 * big, {"part": slice(0, 4)}).tolist() == pytest.approx([0.0], abs=1e-12)


def test_layout_flattens_writes_back_and_follows_load_state_dict():
    model = TinyDetector()
    optimizer = sgd_agvm(model)
    layout = ModuleLayout(optimizer)
    assert layout.modules == list(MODULES)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.proposal_generator.bias.grad = None
    flat = layout.flat_grads()
    assert flat.dtype == torch.float64 and flat.numel() == sum(p.numel() for p in model.parameters())
    named = flat_to_named(flat, layout, model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(named[name], p.grad if p.grad is not None else torch.zeros_like(p), rtol=0, atol=0)
    names = {id(p): n for n, p in model.named_parameters()}
    offset = 0
    for p, n in zip(layout.params, layout.sizes):  # each part is one contiguous slice of the bucket
        assert layout.slices[part_of(names[id(p)])].start <= offset < layout.slices[part_of(names[id(p)])].stop
        offset += n
    layout.write_grads(flat * 2)
    for name, p in model.named_parameters():
        expected = named[name] * 2
        torch.testing.assert_close(p.grad, expected, rtol=0, atol=0)
    # a resume replaces the optimizer's group dicts: the layout must name the new ones (their LR moves on)
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for g in optimizer.param_groups:
        g["lr"] = 0.123
    assert all(g["lr"] == 0.123 for g in layout.groups)


# ------------------------------------------------------------------------------------------------------
# the step: mu applied to the LR, LR restored, start_iter
# ------------------------------------------------------------------------------------------------------
def test_step_scales_each_modules_lr_from_start_iter_and_restores_it():
    model = TinyDetector()
    agvm = sgd_agvm(model, start_iter=2)
    agvm.mu.update({"rpn": 2.0, "box_head": 0.5})
    lrs = [g["lr"] for g in agvm.param_groups]
    for it in range(4):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
        agvm.step()
        mu = agvm.mu if it >= 2 else {m: 1.0 for m in MODULES}
        check_sgd_step(model, before, grads, agvm, mu)
        assert [g["lr"] for g in agvm.param_groups] == lrs
    assert agvm.iteration == 4


@pytest.mark.parametrize("name", ["SGD", "ADAMW", "LARS", "LAMB", "PMDLAMB"])
def test_agvm_from_config_with_every_optimizer(name):
    """SOLVER.AGVM.* with each SOLVER.OPTIMIZER: the wrapper, START_ITER -1 = the end of the warm-up, a step
    equal to the bare optimizer's with LR x mu, and a single-worker measurement through the stepper."""
    from detectron2.config import get_cfg

    from largebatch.config import add_largebatch_config

    cfg = add_largebatch_config(get_cfg())
    cfg.SOLVER.OPTIMIZER = name.lower()
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.WARMUP_ITERS = 7
    cfg.SOLVER.AGVM.ENABLED = True
    cfg.SOLVER.AGVM.INTERVAL = 3
    model = TinyDetector()
    optimizer = build_optimizer(cfg, model)
    expected_type = {"SGD": torch.optim.SGD, "ADAMW": torch.optim.AdamW, "LARS": LARS, "LAMB": LAMB,
                     "PMDLAMB": PMDLAMB}[name]
    assert isinstance(optimizer, AGVM) and isinstance(optimizer.optimizer, expected_type)
    assert optimizer.start_iter == 7 and optimizer.interval == 3 and optimizer.momentum == 0.97
    assert optimizer.clamp == (0.5, 10.0) and optimizer.anchor == "backbone"

    # the step: the bare optimizer with every group's LR multiplied by mu gives the same parameters
    cfg.SOLVER.AGVM.START_ITER = 0
    twin = copy.deepcopy(model)
    agvm = build_optimizer(cfg, model)
    cfg.SOLVER.AGVM.ENABLED = False
    bare = build_optimizer(cfg, twin)
    mu = {"backbone": 1.0, "rpn": 1.7, "box_head": 0.6}
    agvm.mu.update(mu)
    for g in bare.param_groups:
        g["lr"] *= mu[g["module"]]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for a, b, g in zip(model.parameters(), twin.parameters(), grads):
            a.grad, b.grad = g.clone(), g.clone()
        agvm.step()
        bare.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [g["lr"] for g in agvm.param_groups] == [g["lr"] / mu[g["module"]] for g in bare.param_groups]

    # one worker, a measurement iteration: the batch is split in two halves
    cfg.SOLVER.AGVM.ENABLED = True
    model = TinyDetector()
    agvm = build_optimizer(cfg, model)
    stepper, captured = make_stepper(model, agvm, [make_batch(i, 4) for i in range(6)])
    assert stepper.adam_normalized == (name in ("ADAMW", "LAMB", "PMDLAMB"))
    with EventStorage(0) as storage:
        for it in range(4):
            storage.iter = stepper.iter = it
            stepper.run_step()
    assert len(captured) == 2  # iterations 0 and 3
    latest = storage.latest()
    assert latest["agvm_mu/rpn"][1] == 3 and latest["grad_var/rpn"][1] == 3
    assert agvm.mu["backbone"] == 1.0 and all(0.5 ** 0.5 <= v <= 10 ** 0.5 for v in agvm.mu.values())
    assert agvm.mu["rpn"] != 1.0 and agvm.mu["box_head"] != 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------
# the stepper: one worker splits the batch, W >= 2 workers split the workers
# ------------------------------------------------------------------------------------------------------
def test_single_worker_splits_each_micro_batch_in_halves():
    """W = 1, two micro-batches of 4 images: G1 / G2 = the gradients of the first / second two images of each
    micro-batch (averaged over the micro-batches); the step uses their mean; mu follows eq. 4-5."""
    model = TinyDetector()
    agvm = sgd_agvm(model, interval=2)
    batches = [make_batch(1000 * it + micro, 4) for it in range(3) for micro in range(2)]
    stepper, captured = make_stepper(model, agvm, batches, accumulate_steps=2)
    mu = {m: 1.0 for m in MODULES}
    with EventStorage(0) as storage:
        for it in range(3):
            micro = batches[2 * it : 2 * it + 2]
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            storage.iter = stepper.iter = it
            stepper.run_step()
            if it % 2 == 0:
                g1 = mean_grads([ref_grads_at(before, b[:2]) for b in micro])
                g2 = mean_grads([ref_grads_at(before, b[2:]) for b in micro])
                check_halves(stepper, model, captured[-1], g1, g2)
                phi = ref_phi(g1, g2)
                mu = ref_update(mu, phi)
                check_measurement(stepper, storage, it, phi, mu)
                grad = mean_grads([g1, g2])
            else:
                grad = mean_grads([ref_grads_at(before, b) for b in micro])
                assert storage.latest()["grad_var/rpn"][1] == it - 1  # nothing measured at this iteration
            assert agvm.mu == pytest.approx(mu, rel=1e-12)
            check_sgd_step(model, before, grad, agvm, mu)
    assert len(captured) == 2


def ref_grads_at(params, batch):
    model = TinyDetector()
    model.load_state_dict(params)
    return ref_grads(model, batch)


def _half_groups_worker(rank, world_size, accumulate):
    """SGD then AdamW over W workers: G1 / G2 against the means of ranks [0, W/2) and [W/2, W) of gradients
    computed by hand from every rank's data, Phi, mu, the metrics, and the step on the exact global mean.
    The SGD part accumulates ``accumulate`` micro-batches per step (all of them without DDP's all-reduce on a
    measurement iteration)."""
    split = world_size // 2
    first, second = range(split), range(split, world_size)
    results = {}

    # --- SGD, interval 2: iterations 0 and 2 measure (no DDP all-reduce), iteration 1 is a plain DDP one
    model = TinyDetector()
    agvm = sgd_agvm(model, interval=2)
    batches = [rank_batch(it, rank, m) for it in range(3) for m in range(accumulate)]
    stepper, captured = make_stepper(model, agvm, batches, accumulate_steps=accumulate)
    mu = {m: 1.0 for m in MODULES}
    with EventStorage(0) as storage:
        for it in range(3):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            local = [mean_grads([ref_grads_at(before, rank_batch(it, r, m)) for m in range(accumulate)])
                     for r in range(world_size)]
            grad = mean_grads(local)
            storage.iter = stepper.iter = it
            stepper.run_step()
            if it % 2 == 0:
                g1, g2 = mean_grads([local[r] for r in first]), mean_grads([local[r] for r in second])
                check_halves(stepper, model, captured[-1], g1, g2)
                phi = ref_phi(g1, g2)
                mu = ref_update(mu, phi)
                check_measurement(stepper, storage, it, phi, mu)
            else:
                assert len(captured) == 1
            assert agvm.mu == pytest.approx(mu, rel=1e-12)
            check_sgd_step(model, before, grad, agvm, mu)  # the exact global mean, LR x mu
    results["sgd_mu"] = dict(agvm.mu)
    results["sgd_params"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    # --- AdamW, interval 1: Phi on the Adam-normalised half means, v = exp_avg_sq before the step
    model = TinyDetector(seed=1)
    agvm = adamw_agvm(model, interval=1)
    stepper, captured = make_stepper(model, agvm, [rank_batch(it, rank) for it in range(10, 12)])
    names = {id(p): n for n, p in model.named_parameters()}
    mu = {m: 1.0 for m in MODULES}
    with EventStorage(0) as storage:
        for it in range(2):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            v = {n: torch.zeros_like(p) for n, p in before.items()}
            for p, state in agvm.state.items():
                v[names[id(p)]] = state["exp_avg_sq"].clone()
            local = [ref_grads_at(before, rank_batch(10 + it, r)) for r in range(world_size)]
            storage.iter = stepper.iter = it
            stepper.run_step()
            g1, g2 = mean_grads([local[r] for r in first]), mean_grads([local[r] for r in second])
            check_halves(stepper, model, captured[-1], g1, g2)
            phi = ref_phi(adam_normalized(g1, v, 0.999, 1e-8), adam_normalized(g2, v, 0.999, 1e-8))
            plain = ref_phi(g1, g2)
            assert any(abs(phi[m] - plain[m]) > 1e-6 for m in MODULES)  # the normalisation matters here
            mu = ref_update(mu, phi)
            check_measurement(stepper, storage, it, phi, mu)
            for n, p in model.named_parameters():
                torch.testing.assert_close(p.grad, mean_grads(local)[n], **TIGHT)
    results["adamw_mu"] = dict(agvm.mu)
    return results


@pytest.mark.parametrize("world_size, accumulate", [(2, 1), (3, 2), (4, 1)])
def test_half_group_gradients_on_gloo_workers(world_size, accumulate):
    results = run_workers(_half_groups_worker, world_size, accumulate, timeout=180)
    for key in ("sgd_mu", "adamw_mu"):  # every worker applies the same mu
        assert all(r[key] == results[0][key] for r in results)
        assert results[0][key]["rpn"] != 1.0
    for r in results[1:]:
        for n, p in r["sgd_params"].items():
            torch.testing.assert_close(p, results[0]["sgd_params"][n], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------------
def test_state_dict_round_trip_continues_identically():
    """mu, the iteration count (here across start_iter) and the wrapped optimizer's momentum buffers."""
    model = TinyDetector()
    groups = build_param_groups(model, base_lr=0.05, weight_decay=1e-3)
    agvm = AGVM(torch.optim.SGD(groups, lr=0.05, momentum=0.9), start_iter=4)
    def train(model, agvm, iterations, seed_offset):
        for it in range(iterations):
            gen = torch.Generator().manual_seed(seed_offset + it)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            agvm.update({m: float(torch.rand(1, generator=gen)) for m in MODULES})
            agvm.step()

    train(model, agvm, 3, 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": agvm.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    assert saved["optimizer"]["agvm"]["mu"] == agvm.mu and saved["optimizer"]["agvm"]["iteration"] == 3

    fresh = TinyDetector(seed=5)
    fresh.load_state_dict(saved["model"])
    resumed = AGVM(torch.optim.SGD(build_param_groups(fresh, base_lr=0.05, weight_decay=1e-3), lr=0.05,
                                   momentum=0.9), start_iter=4)
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.mu == agvm.mu and resumed.iteration == 3
    for p, q in zip(model.parameters(), fresh.parameters()):
        torch.testing.assert_close(resumed.state[q]["momentum_buffer"], agvm.state[p]["momentum_buffer"],
                                   rtol=0, atol=0)
    train(model, agvm, 4, 100)
    train(fresh, resumed, 4, 100)
    assert resumed.mu == agvm.mu and resumed.iteration == agvm.iteration == 7
    for p, q in zip(model.parameters(), fresh.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)

    # a checkpoint of a run without AGVM, resumed with AGVM on: the optimizer state loads, mu starts at 1
    plain = torch.optim.SGD(build_param_groups(model, base_lr=0.05, weight_decay=1e-3), lr=0.05, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    plain.step()
    other = AGVM(torch.optim.SGD(build_param_groups(fresh, base_lr=0.05, weight_decay=1e-3), lr=0.05, momentum=0.9))
    other.load_state_dict(plain.state_dict())
    assert other.mu == {m: 1.0 for m in MODULES} and len(other.state) == len(plain.state)
    with pytest.raises(KeyError, match="agvm"):
        other.load_state_dict({"something": 1})


def test_trainer_resume_restores_mu(tmp_path, monkeypatch):
    """LargeBatchTrainer on the shapes config, one worker, AGVM every 2 iterations: the checkpoint holds mu and
    the iteration; --resume restores them and the next measurement moves mu on from the restored value."""
    from largebatch import LargeBatchTrainer
    from largebatch.config import load_config
    from largebatch.data import register_datasets

    monkeypatch.setenv("LARGEBATCH_DATASETS", os.path.join(REPO, "datasets"))
    torch.set_num_threads(1)

    def config(max_iter):
        cfg = load_config(os.path.join(REPO, "configs/shapes/sgd.yaml"), [
            "SOLVER.AGVM.ENABLED", "True", "SOLVER.AGVM.START_ITER", "0", "SOLVER.AGVM.INTERVAL", "2",
            "SOLVER.MAX_ITER", str(max_iter), "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
            "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()", "MONITOR.ENABLED", "False", "DATASETS.TEST", "()",
            "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(tmp_path),
        ])
        register_datasets(cfg)
        return cfg

    trainer = LargeBatchTrainer(config(4))
    trainer.resume_or_load(resume=False)
    trainer.train()
    mu = dict(trainer.stepper.optimizer.mu)
    assert mu["backbone"] == 1.0 and mu["rpn"] != 1.0 and mu["box_head"] != 1.0
    checkpoint = torch.load(os.path.join(tmp_path, "model_final.pth"), weights_only=False)
    assert checkpoint["trainer"]["_trainer"]["optimizer"]["agvm"] == {"mu": mu, "iteration": 4}

    resumed = LargeBatchTrainer(config(5))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4
    assert resumed.stepper.optimizer.mu == mu and resumed.stepper.optimizer.iteration == 4
    resumed.train()  # iteration 4 measures: mu moves on from the restored values, not from 1.0
    latest = resumed.storage.latest()
    phi = {m: latest[f"grad_var/{m}"][0] for m in mu}
    assert latest["agvm_mu/rpn"][1] == 4
    assert resumed.stepper.optimizer.mu == pytest.approx(ref_update(mu, phi), rel=1e-12)


# ------------------------------------------------------------------------------------------------------
# non-finite Phi and steps GradScaler skips (float16 overflow)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_update_leaves_mu_unchanged_for_a_non_finite_phi(bad, caplog):
    agvm = sgd_agvm(TinyDetector(), interval=1)
    agvm.update({"backbone": 0.5, "rpn": 0.2, "box_head": 0.1})
    before = dict(agvm.mu)
    with caplog.at_level("WARNING", logger="largebatch"):
        mu = agvm.update({"backbone": 0.5, "rpn": bad, "box_head": 0.1})
        assert mu["rpn"] == before["rpn"] and all(math.isfinite(v) for v in mu.values())
        assert mu["box_head"] == pytest.approx(ref_update(before, {"backbone": 0.5, "box_head": 0.1})["box_head"])
        mu = agvm.update({"backbone": 0.5, "rpn": bad, "box_head": 0.1})
    assert mu["rpn"] == before["rpn"]
    assert len([r for r in caplog.records if "non-finite gradient variance of rpn" in r.message]) == 1  # once
    # a non-finite anchor: eq. 4 has no reference, every part keeps its mu
    assert agvm.update({"backbone": bad, "rpn": 0.2, "box_head": 0.1}) == agvm.mu == mu


def test_a_step_gradscaler_skips_is_not_measured_and_leaves_mu():
    """AMP overflow on a measurement iteration: GradScaler skips the step, and nothing of it reaches AGVM or
    the gradient-variance record (before the fix: mu became NaN for the rest of the run)."""
    model = TinyDetector(dtype=torch.float32)
    optimizer = sgd_agvm(model, interval=1)
    batches = [[{k: v.float() for k, v in d.items()} for d in rank_batch(i, 0, n=4)] for i in range(3)]
    stepper, captured = make_stepper(model, optimizer, batches, amp=True, device_type="cpu")
    stepper.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    weight = model.backbone[0].weight
    weight.register_hook(lambda g: torch.full_like(g, float("inf")) if stepper.iter == 1 else g)
    with EventStorage(0) as storage:
        stepper.iter = storage.iter = 0
        stepper.run_step()
        mu, phi = dict(optimizer.mu), dict(stepper.last_phi)
        assert mu["rpn"] != 1.0 and all(math.isfinite(v) for v in mu.values())
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        stepper.iter = storage.iter = 1
        stepper.run_step()
        assert optimizer.mu == mu and stepper.last_phi == phi  # no measurement, no update
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # the step was skipped
        assert storage.latest()["grad_var/rpn"][1] == 0 and storage.latest()["agvm_mu/rpn"][1] == 0
        assert stepper.grad_scaler.get_scale() < 2.0**10  # and the scaler backed off
        stepper.iter = storage.iter = 2
        stepper.run_step()
    assert all(math.isfinite(v) for v in optimizer.mu.values()) and optimizer.mu != mu
    assert len(captured) == 2  # iterations 0 and 2 were measured, the skipped one was not


class _NaNLossOnRank1(TinyDetector):
    """A loss term without gradient that is NaN on rank 1 at iteration 1: a rank-local divergence that leaves
    the (all-reduced) gradients finite."""

    def forward(self, batch):
        losses = super().forward(batch)
        bad = self.rank == 1 and self.iteration == 1
        losses["loss_aux"] = torch.tensor(float("nan") if bad else 0.0, dtype=torch.float64)
        return losses


def _rank_local_divergence_worker(rank, world_size):
    torch.manual_seed(0)
    model = _NaNLossOnRank1().double()
    model.rank = rank
    stepper, _ = make_stepper(model, sgd_agvm(model, interval=5), [rank_batch(i, rank) for i in range(3)])
    with EventStorage(0) as storage:
        for iteration in range(3):
            model.iteration = stepper.iter = storage.iter = iteration
            try:
                stepper.run_step()
            except FloatingPointError as e:
                return iteration, str(e)
    return None


def test_a_rank_local_non_finite_loss_stops_every_worker_with_one_message():
    """Before the fix, rank 1 raised alone and rank 0 waited in the next all-reduce for the collective timeout."""
    results = run_workers(_rank_local_divergence_worker, 2, timeout=60)
    assert results[0] == results[1], results
    iteration, message = results[0]
    assert iteration == 1 and "non-finite losses rank 1: loss_aux=nan" in message, message
    assert "rank 0" not in message and "Stopped on every worker" in message
