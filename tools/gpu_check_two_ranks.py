#!/usr/bin/env python
"""Two ranks sharing one GPU: the distributed GPU paths of the trainer on a one-GPU machine (step f of
tools/gpu_check.sh).

NCCL refuses two ranks on one device ("Duplicate GPU detected"), gloo does not, and torch's gloo backend runs
all_reduce, broadcast and all_gather on CUDA tensors (staged through host memory), which is all that DDP,
GroupSyncBatchNorm, HalfGroupReducer and broadcast_from_main use. So two processes, each with a small conv + BN
"detector" on cuda:0, run for real:

- GroupSyncBatchNorm over both ranks (group_size 2, the backbone) and per rank (group_size 1, the box head);
- HalfGroupReducer + ModuleLayout, checked once by hand: G1 / G2 are the two ranks' own gradients and every
  p.grad becomes their mean;
- DDP(device_ids=[0]) + AGVM(LARS) + float16 autocast + GradScaler through LargeBatchStepper, 8 iterations,
  AGVM measuring every 2nd; an inf in one rank's gradient at a measurement iteration (half-group path) and at a
  plain DDP iteration: both ranks must skip both steps;
- at the end the weights are bitwise equal on both ranks, mu is finite, equal on both and has moved, the
  synced BN statistics are equal and the per-rank ones differ.

The script first checks that gloo's collectives accept CUDA tensors in this torch build; where they do not, or
where there is no GPU, it says why and exits 3 (gpu_check.sh marks the step SKIP). Exit 0: pass, 1: fail.
``--device cpu`` runs the same on CPU (bfloat16 autocast), to test this script on a machine without a GPU.

    python tools/gpu_check_two_ranks.py [--steps 8] [--device cpu]
"""
import argparse
import inspect
import json
import math
import os
import socket
import sys
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

SKIP = 3
WORLD = 2
INF_AT = {2: 1, 3: 0}  # iteration -> the rank whose gradient overflows (2: a measurement iteration, 3: plain DDP)


class TinyConvDetector(nn.Module):
    """forward(list of dicts) -> loss dict, with detectron2's parameter names, so that ModulePartition maps them
    to backbone / rpn / box_head."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.proposal_generator = nn.Conv2d(16, 4, 1)
        self.roi_heads = nn.Module()
        self.roi_heads.box_head = nn.Sequential(
            nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
            nn.Linear(8 * 8 * 8, 3),
        )

    def forward(self, batch):
        device = self.proposal_generator.weight.device
        x = torch.stack([d["image"] for d in batch]).to(device)
        f = self.backbone(x)
        rpn = torch.stack([d["rpn"] for d in batch]).to(device)
        labels = torch.stack([d["label"] for d in batch]).to(device)
        return {
            "loss_rpn": F.mse_loss(self.proposal_generator(f).float(), rpn),
            "loss_cls": F.cross_entropy(self.roi_heads.box_head(f).float(), labels),
        }


def make_batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(3, 16, 16, generator=g), "rpn": torch.randn(4, 8, 8, generator=g),
             "label": torch.randint(0, 3, (), generator=g)} for _ in range(n)]


def gloo_preflight(rank, device):
    """The collectives the run uses, on tensors of ``device``; raises if this build's gloo cannot do them."""
    t = torch.full((5,), float(rank + 1), device=device)
    dist.all_reduce(t)
    assert t.tolist() == [3.0] * 5, t
    b = torch.full((3,), float(rank + 7), device=device, dtype=torch.float64)
    dist.broadcast(b, src=0)
    assert b.tolist() == [7.0] * 3, b
    parts = [torch.empty(2, device=device) for _ in range(WORLD)]
    dist.all_gather(parts, torch.full((2,), float(rank), device=device))
    assert [p.tolist() for p in parts] == [[0.0, 0.0], [1.0, 1.0]], parts


def gather_cpu(t):
    """All ranks' copies of a tensor (on CPU: the comparison itself must not depend on CUDA collectives)."""
    t = t.detach().to("cpu").contiguous()
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t)
    return out


def check_reducer(model, layout, reducer, rank):
    """HalfGroupReducer by hand: with 2 ranks, G1 / G2 are rank 0's / rank 1's local gradients and p.grad
    becomes their mean."""
    model.zero_grad(set_to_none=True)
    losses = model(make_batch(500 + rank))
    sum(losses.values()).backward()
    local = layout.flat_grads()
    every = gather_cpu(local)
    g1, g2 = reducer.reduce(layout)[:2]
    # G_other = (sum - own) / 1: one float32 rounding of the sum away from the exact value
    torch.testing.assert_close(g1.cpu(), every[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g2.cpu(), every[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layout.flat_grads().cpu(), (every[0] + every[1]) / 2, rtol=1e-6, atol=1e-7)
    model.zero_grad(set_to_none=True)


def train(rank, steps, device):
    from detectron2.utils.events import EventStorage
    from torch.nn.parallel import DistributedDataParallel

    from largebatch.engine.stepper import LargeBatchStepper
    from largebatch.norm import GroupSyncBatchNorm, convert_sync_batchnorm
    from largebatch.optim import AGVM, LARS
    from largebatch.optim.groups import build_param_groups
    from largebatch.probe import HalfGroupReducer, ModuleLayout

    torch.manual_seed(0)  # the same initial weights on both ranks
    model = TinyConvDetector().to(device)
    model = convert_sync_batchnorm(model, group_size=2, include=lambda name: name.startswith("backbone"))
    model = convert_sync_batchnorm(model, group_size=1, include=lambda name: name.startswith("roi_heads"))
    bns = {n: m for n, m in model.named_modules() if isinstance(m, GroupSyncBatchNorm)}
    assert sorted(m.group_size for m in bns.values()) == [1, 2, 2], bns

    groups = build_param_groups(model, base_lr=0.05, weight_decay=1e-4)
    assert {g["module"] for g in groups} == {"backbone", "rpn", "box_head"}
    agvm = AGVM(LARS(groups, lr=0.05, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02),
                interval=2, start_iter=0)

    check_reducer(model, ModuleLayout(agvm), HalfGroupReducer(WORLD), rank)

    # as LargeBatchTrainer.wrap_model: no buffer broadcast in forward (BN statistics are per SyncBN group)
    kwargs = {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel).parameters else {"broadcast_buffers": False}
    ddp = DistributedDataParallel(model, device_ids=[0] if device == "cuda" else None, **kwargs)
    batches = [make_batch(1000 * it + rank) for it in range(steps)]
    stepper = LargeBatchStepper(ddp, iter(batches), agvm, amp=True, device_type=device)
    assert stepper.reducer is not None and stepper.grad_scaler is not None
    stepper.grad_scaler = torch.amp.GradScaler(device, init_scale=1024.0)  # no overflow of its own at first
    inject = {"on": False}

    def poison(grad):  # a float16 overflow in this rank's local gradient
        if inject["on"]:
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
        return grad

    model.proposal_generator.weight.register_hook(poison)
    skipped = []
    with EventStorage(0) as storage:
        for it in range(steps):
            storage.iter = stepper.iter = it
            inject["on"] = INF_AT.get(it) == rank
            before = [p.detach().clone() for p in model.parameters()]
            mu_before = dict(agvm.mu)
            stepper.run_step()
            unchanged = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            if it in INF_AT:
                assert unchanged, f"iteration {it}: the step with an overflow on rank {INF_AT[it]} was applied"
                assert agvm.mu == mu_before, f"iteration {it}: mu changed in a skipped step"
                skipped.append(it)
            else:
                assert not unchanged, f"iteration {it}: the weights did not move"
            assert all(math.isfinite(v) for v in agvm.mu.values()), (it, agvm.mu)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    every = gather_cpu(flat)
    synced = {n: gather_cpu(m.running_mean) for n, m in bns.items()}
    return {
        "weights_bitwise_equal": torch.equal(every[0], every[1]),
        "weights_finite": bool(torch.isfinite(flat).all()),
        "mu": dict(agvm.mu),
        "scale": stepper.grad_scaler.get_scale(),
        "skipped": skipped,
        "bn_equal": {n: torch.equal(v[0], v[1]) for n, v in synced.items()},
        "bn_group_size": {n: m.group_size for n, m in bns.items()},
    }


def worker(rank, port, out_dir, steps, device):
    result = {"rank": rank}
    try:
        if device == "cuda":
            torch.cuda.set_device(0)  # both ranks on the one GPU
        else:
            torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                 timeout=timedelta(seconds=120))
        try:
            gloo_preflight(rank, device)
        except Exception as e:  # noqa: BLE001 - any failure here means "cannot run on this build"
            result["skip"] = f"gloo collectives on {device} tensors fail in torch {torch.__version__}: " \
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            result.update(train(rank, steps, device))
    except Exception:  # noqa: BLE001 - reported by the parent
        result["error"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="training iterations (>= 5: the overflows are at 2 and 3)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: test this script without a GPU")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("SKIP: no CUDA GPU")
        return SKIP
    if not dist.is_gloo_available():
        print("SKIP: this torch build has no gloo backend")
        return SKIP
    where = f"{torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s)" if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}; {WORLD} gloo ranks on {args.device}{':0' * (args.device == 'cuda')}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(worker, args=(port, out_dir, args.steps, args.device), nprocs=WORLD, join=True)
        except Exception as e:  # noqa: BLE001 - a rank died without writing its result
            print(f"FAIL: a rank crashed: {e}")
        results = []
        for rank in range(WORLD):
            path = os.path.join(out_dir, f"rank{rank}.json")
            results.append(json.load(open(path)) if os.path.exists(path) else {"rank": rank, "error": "no result"})
    for r in results:
        if "error" in r:
            print(f"FAIL: rank {r['rank']}:\n{r['error']}")
    if any("error" in r for r in results):
        return 1
    if any("skip" in r for r in results):
        print("SKIP:", next(r["skip"] for r in results if "skip" in r))
        return SKIP
    r0, r1 = results
    print(json.dumps(r0, indent=1))
    problems = []
    if not (r0["weights_bitwise_equal"] and r0["weights_finite"]):
        problems.append("weights differ between the ranks or are not finite")
    if r0["mu"] != r1["mu"] or not all(math.isfinite(v) for v in r0["mu"].values()) or r0["mu"]["rpn"] == 1.0:
        problems.append(f"mu: rank 0 {r0['mu']}, rank 1 {r1['mu']} (expected equal, finite and moved)")
    if r0["skipped"] != sorted(INF_AT) or r1["skipped"] != sorted(INF_AT):
        problems.append(f"skipped steps {r0['skipped']} / {r1['skipped']}, expected {sorted(INF_AT)}")
    for name, equal in r0["bn_equal"].items():
        synced = r0["bn_group_size"][name] == 2
        if equal != synced:
            problems.append(f"BN {name} (group_size {r0['bn_group_size'][name]}): running_mean "
                            f"{'equal' if equal else 'different'} on the two ranks")
    for p in problems:
        print("FAIL:", p)
    if not problems:
        print(f"PASS: weights bitwise equal on both ranks, mu {r0['mu']}, steps {r0['skipped']} skipped on both, "
              "synced BN equal, per-rank BN different")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
