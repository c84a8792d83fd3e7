"""SOLVER.ACCUMULATE_STEPS: k micro-batches make the gradient of one batch k times larger (float64, no BN),
on one worker and on 2 gloo workers under DDP (which all-reduces only the last micro-batch)."""
import torch
from detectron2.utils.events import EventStorage
from torch.nn.parallel import DistributedDataParallel

from helpers import TinyDetector, make_batch
from largebatch.engine.trainer import LargeBatchStepper
from largebatch.optim.groups import build_param_groups

IMAGES_PER_WORKER_STEP = 8  # per worker and optimizer step, in k micro-batches


def _model(dtype=torch.float64):
    """Per-image losses averaged over the batch, as detectron2's models do; two parts: backbone and rpn."""
    return TinyDetector(backbone=(5, 4), rpn=3, box_head=None, tanh_features=True, feature_loss=True, dtype=dtype)


def _samples(rank, n):
    return make_batch(100 + rank, n, x=5, rpn=3, box=None)


def _loader(samples, micro_batch):
    while True:
        for i in range(0, len(samples), micro_batch):
            yield samples[i : i + micro_batch]


def _accumulated_grads(model, samples, k, ddp=False, allreduce_calls=None):
    """Gradients after one run_step of k micro-batches (SGD with lr 0 leaves them in place)."""
    net = model
    if ddp:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        net = DistributedDataParallel(model)

        def counting_hook(state, bucket):  # DDP's own all-reduce, counted
            allreduce_calls.append(1)
            return allreduce_hook(state, bucket)

        net.register_comm_hook(None, counting_hook)
    groups = build_param_groups(model, base_lr=0.0, weight_decay=0.0)
    optimizer = torch.optim.SGD(groups, lr=0.0)
    stepper = LargeBatchStepper(net, _loader(samples, len(samples) // k), optimizer, accumulate_steps=k)
    with EventStorage(0):
        stepper.iter = 0
        stepper.run_step()
    return [p.grad.clone() for p in model.parameters()]


def _one_batch_grads(samples):
    model = _model()
    sum(model(samples).values()).backward()
    return [p.grad for p in model.parameters()]


def test_accumulation_equals_one_big_batch_on_one_worker():
    samples = _samples(0, IMAGES_PER_WORKER_STEP)
    expected = _one_batch_grads(samples)
    for k in (1, 2, 4):
        got = _accumulated_grads(_model(), samples, k)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def _ddp_worker(rank, world_size, k):
    calls = []
    got = _accumulated_grads(_model(), _samples(rank, IMAGES_PER_WORKER_STEP), k, ddp=True, allreduce_calls=calls)
    # every worker computes the reference itself: the mean over workers of each worker's big batch
    reference = [torch.zeros_like(g) for g in got]
    for r in range(world_size):
        for acc, g in zip(reference, _one_batch_grads(_samples(r, IMAGES_PER_WORKER_STEP))):
            acc += g / world_size
    return len(calls), [torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(got, reference)]


def test_accumulation_under_ddp_equals_the_global_big_batch(run_workers):
    results = run_workers(_ddp_worker, 2, 4)
    # one bucket all-reduced once: for the last of the 4 micro-batches only
    assert results == [(1, [True, True, True, True])] * 2


def test_amp_gradients_are_unscaled_before_anything_reads_them():
    """SOLVER.AMP.ENABLED (bfloat16 autocast on CPU): the finiteness check, the gradient variance, clipping
    inside the step and the monitor all see the true gradient, not the loss-scaled one."""
    from largebatch.optim import AGVM

    samples = _samples(0, IMAGES_PER_WORKER_STEP)
    reference = _model(torch.float32)  # the float64 samples are cast by the model
    sum(reference(samples).values()).backward()
    expected = [p.grad for p in reference.parameters()]

    model = _model(torch.float32)
    groups = build_param_groups(model, base_lr=0.0, weight_decay=0.0)
    optimizer = AGVM(torch.optim.SGD(groups, lr=0.0), interval=1)
    stepper = LargeBatchStepper(model, _loader(samples, 4), optimizer, accumulate_steps=2, amp=True,
                                device_type="cpu", variance_period=1)
    stepper.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    with EventStorage(0):
        stepper.iter = 0
        stepper.run_step()
    for p, e in zip(model.parameters(), expected):  # bfloat16 matmuls: ~1% agreement, and no factor 2**14
        torch.testing.assert_close(p.grad, e, rtol=5e-2, atol=5e-3)
    norms = torch.stack([p.grad.norm() for p in model.parameters()])
    torch.testing.assert_close(stepper.grad_norms, norms)
    assert set(stepper.last_phi) == {"backbone", "rpn"}
    assert all(0.0 <= phi <= 2.0 for phi in stepper.last_phi.values())
