"""largebatch.norm (GroupSyncBatchNorm, convert_sync_batchnorm, bn_size, build_sync_bn_from_cfg) and the
distributed test helper tests/distributed.py.

The distributed checks run in one 4-worker gloo process group: every worker returns what it computed and the
test compares it here with torch.nn.BatchNorm2d (float64) applied to each group's joint batch.
"""
import logging
import time

import pytest
import torch
import torch.distributed as dist
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm, ShapeSpec
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from torch import nn
from torch.nn import functional as F

from distributed import WorkerError
from helpers import make_config
from largebatch import norm
from largebatch.norm import GroupSyncBatchNorm, bn_size, build_sync_bn_from_cfg, convert_sync_batchnorm

C, H, W = 3, 4, 5
STEPS = 2
WORLD = 4
# (stats_mode, group_size, images per rank)
CONFIGS = [
    ("", 1, [2, 2, 2, 2]),
    ("", 2, [2, 2, 2, 2]),
    ("", 4, [2, 2, 2, 2]),
    ("", 0, [2, 2, 2, 2]),
    ("N", 1, [3, 1, 2, 2]),
    ("N", 2, [3, 1, 0, 2]),  # rank 2 has no image: the group (2, 3) is rank 3's batch alone
    ("N", 4, [3, 1, 0, 2]),
    ("N", 0, [3, 1, 0, 2]),
]


def _groups(group_size, world_size):
    size = world_size if group_size == 0 else group_size
    return [list(range(s, s + size)) for s in range(0, world_size, size)]


def _data_key(idx):
    """Configs with the same stats mode and batch sizes share data and initial parameters."""
    mode, _, batches = CONFIGS[idx]
    return min(i for i, (m, _, b) in enumerate(CONFIGS) if (m, b) == (mode, batches))


def _make_bn(idx, mode, group_size, momentum=0.1):
    torch.manual_seed(1000 + _data_key(idx))  # the same affine parameters on every rank and in the reference
    bn = GroupSyncBatchNorm(C, momentum=momentum, stats_mode=mode, group_size=group_size).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return bn


def _data(idx, rank, step, batch):
    g = torch.Generator().manual_seed(10000 * _data_key(idx) + 100 * rank + step)
    x = torch.randn(batch, C, H, W, generator=g, dtype=torch.float64) * (1 + rank) + rank
    w = torch.rand(batch, C, H, W, generator=g, dtype=torch.float64)  # a random per-rank weighting of the loss
    return x, w


def _sync_bn_worker(rank, world_size):
    out = {"configs": []}
    for idx, (mode, group_size, batches) in enumerate(CONFIGS):
        momentum = None if idx == 1 else 0.1  # one config with BatchNorm2d's cumulative average
        bn = _make_bn(idx, mode, group_size, momentum)
        steps = []
        for step in range(STEPS):
            x, w = _data(idx, rank, step, batches[rank])
            x.requires_grad_(True)
            y = bn(x)
            (y * w).sum().backward()
            steps.append({
                "out": y.detach(), "gx": x.grad, "gw": bn.weight.grad.clone(), "gb": bn.bias.grad.clone(),
                "rm": bn.running_mean.clone(), "rv": bn.running_var.clone(), "nbt": int(bn.num_batches_tracked),
            })
            bn.zero_grad()
        out["configs"].append(steps)

        if idx == 2 and rank == 0:
            # eval mode: running statistics, no communication (only rank 0 runs this, so a collective would hang)
            bn.eval()
            x, _ = _data(idx, rank, 99, 2)
            expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
            out["eval_diff"] = (bn(x) - expected).abs().max().item()

    # several layers (and several models) share one cached process group per group size
    out["same_group"] = norm.get_bn_group(2) is norm.get_bn_group(2)
    out["n_groups_cached"] = len(norm._GROUPS)
    model = convert_sync_batchnorm(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
        group_size=2,
    )
    # under DDP (as the trainer runs it): the BN all-reduces in the backward interleave with DDP's buckets
    ddp = nn.parallel.DistributedDataParallel(model)
    for _ in range(2):
        ddp(torch.randn(2, 3, 4, 4) + rank).sum().backward()
    out["n_groups_after_model"] = len(norm._GROUPS)
    out["model_grads"] = [p.grad.clone() for p in model.parameters()]

    # group sizes that do not divide the world size fail clearly, before any communication
    errors = []
    try:
        convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(2)), group_size=3)
    except ValueError as e:
        errors.append(str(e))
    bn = GroupSyncBatchNorm(2, group_size=8)
    try:
        bn(torch.randn(2, 2, 3, 3))
    except ValueError as e:
        errors.append(str(e))
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def sync_bn_results(run_workers):
    t0 = time.monotonic()
    results = run_workers(_sync_bn_worker, WORLD, timeout=120)
    return results, time.monotonic() - t0


@pytest.mark.parametrize("idx", range(len(CONFIGS)), ids=[f"mode{m or '_'}-g{g}" for m, g, _ in CONFIGS])
def test_group_sync_bn_matches_joint_batch_bn(sync_bn_results, idx):
    results, _ = sync_bn_results
    mode, group_size, batches = CONFIGS[idx]
    momentum = None if idx == 1 else 0.1
    for group in _groups(group_size, WORLD):
        ranks = [r for r in group if batches[r] > 0]
        ref = nn.BatchNorm2d(C, momentum=momentum).double()  # the same initial parameters as the workers'
        ref.load_state_dict(_make_bn(idx, mode, group_size, momentum).state_dict())
        for step in range(STEPS):
            data = [_data(idx, r, step, batches[r]) for r in ranks]
            x = torch.cat([d[0] for d in data]).requires_grad_(True)
            w = torch.cat([d[1] for d in data])
            y = ref(x)
            (y * w).sum().backward()
            offsets = [0]
            for r in ranks:
                offsets.append(offsets[-1] + batches[r])
            for i, r in enumerate(ranks):
                got = results[r]["configs"][idx][step]
                sl = slice(offsets[i], offsets[i + 1])
                torch.testing.assert_close(got["out"], y.detach()[sl], rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(got["gx"], x.grad[sl], rtol=1e-9, atol=1e-9)
            for r in group:  # every worker of the group, including one without images, holds the same stats
                got = results[r]["configs"][idx][step]
                torch.testing.assert_close(got["rm"], ref.running_mean, rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(got["rv"], ref.running_var, rtol=1e-9, atol=1e-9)
                assert got["nbt"] == int(ref.num_batches_tracked)
            # each worker's affine grads are its own term: DDP's sum over the group is the joint-batch grad
            gw = sum(results[r]["configs"][idx][step]["gw"] for r in group)
            gb = sum(results[r]["configs"][idx][step]["gb"] for r in group)
            torch.testing.assert_close(gw, ref.weight.grad, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(gb, ref.bias.grad, rtol=1e-9, atol=1e-9)
            ref.zero_grad()
            x.grad = None
        if len(ranks) < len(group):  # the worker without images gets an empty output and gradient
            for r in set(group) - set(ranks):
                assert results[r]["configs"][idx][0]["out"].shape == (0, C, H, W)
                assert results[r]["configs"][idx][0]["gx"].shape == (0, C, H, W)


def test_group_size_zero_is_all_workers(sync_bn_results):
    results, _ = sync_bn_results
    for all_idx, zero_idx in ((2, 3), (6, 7)):
        for r in range(WORLD):
            for a, b in zip(results[r]["configs"][all_idx], results[r]["configs"][zero_idx]):
                for key in ("out", "gx", "gw", "gb", "rm", "rv"):
                    torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-12)


def test_distributed_eval_groups_and_errors(sync_bn_results):
    results, _ = sync_bn_results
    assert results[0]["eval_diff"] < 1e-12
    for r in range(WORLD):
        assert results[r]["same_group"]
        assert results[r]["n_groups_cached"] == 1  # group size 2 only; 0, 1 and 4 need no group of their own
        assert results[r]["n_groups_after_model"] == 1
        for g0, g in zip(results[0]["model_grads"], results[r]["model_grads"]):  # DDP: the same everywhere
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, g0)
        assert len(results[r]["errors"]) == 2
        assert "group_size=3 does not divide the world size 4" in results[r]["errors"][0]
        assert "group_size=8 does not divide the world size 4" in results[r]["errors"][1]


def test_process_group_start_is_cheap(sync_bn_results):
    _, seconds = sync_bn_results
    print(f"4-worker SyncBN run (fork, all configs): {seconds:.2f}s")
    assert seconds < 60


# ---------------------------------------------------------------------------------------------------------------
# one process
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [0, 1, 4])
@pytest.mark.parametrize("stats_mode", ["", "N"])
def test_world_size_one_is_batchnorm2d(group_size, stats_mode):
    assert not (dist.is_available() and dist.is_initialized())
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(C)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.normal_()
    bn = GroupSyncBatchNorm(C, group_size=group_size, stats_mode=stats_mode)
    bn.load_state_dict(ref.state_dict())
    for step in range(3):
        x = torch.randn(4, C, H, W) * 3 + 1
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = ref(x1), bn(x2)
        assert torch.equal(y1, y2)
        (y1 * x).sum().backward()
        (y2 * x).sum().backward()
        assert torch.equal(x1.grad, x2.grad)
        assert torch.equal(ref.weight.grad, bn.weight.grad) and torch.equal(ref.bias.grad, bn.bias.grad)
    for key, value in ref.state_dict().items():
        assert torch.equal(value, bn.state_dict()[key]), key
    ref.eval()
    bn.eval()  # eval: the running statistics
    x = torch.randn(2, C, H, W)
    assert torch.equal(ref(x), bn(x))
    expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(bn(x), expected)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="stats_mode"):
        GroupSyncBatchNorm(3, stats_mode="X")
    with pytest.raises(ValueError, match="group_size"):
        GroupSyncBatchNorm(3, group_size=-1)
    with pytest.raises(ValueError, match="stats_mode"):
        convert_sync_batchnorm(nn.BatchNorm2d(3), stats_mode="mean")
    with pytest.raises(ValueError, match="does not divide the world size 8"):
        bn_size(3, 8, 2)


def test_bn_size():
    assert bn_size(0, 8, 2) == 16  # all workers
    assert bn_size(4, 16, 8) == 32  # MegDet's best BN size
    assert bn_size(1, 16, 2) == 2  # plain BN
    assert bn_size(4, 1, 2) == 2  # one worker is its own group


def test_convert_plain_modules():
    # the root itself: a new module is returned, with the same parameters and buffers
    bn = nn.BatchNorm2d(5, eps=1e-3, momentum=0.2).double()
    bn.eval()
    new = convert_sync_batchnorm(bn, group_size=2, stats_mode="N")
    assert type(new) is GroupSyncBatchNorm and isinstance(new, NaiveSyncBatchNorm)
    assert new.weight is bn.weight and new.running_var is bn.running_var
    assert (new.eps, new.momentum, new.group_size, new.stats_mode, new.training) == (1e-3, 0.2, 2, "N", False)
    assert new.weight.dtype == torch.float64
    # torch's SyncBatchNorm (detectron2's "SyncBN"), detectron2's NaiveSyncBatchNorm; in place
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), NaiveSyncBatchNorm(4), nn.BatchNorm1d(4))
    params = list(model.parameters())
    assert convert_sync_batchnorm(model) is model
    assert [type(m).__name__ for m in model] == ["Conv2d", "GroupSyncBatchNorm", "GroupSyncBatchNorm", "BatchNorm1d"]
    assert list(model.parameters()) == params  # an optimizer built before the conversion still works
    # a GroupSyncBatchNorm is re-configured
    convert_sync_batchnorm(model, group_size=1)
    assert model[1].group_size == 1
    model.train()
    model[:3](torch.randn(2, 3, 4, 4)).sum().backward()


def _resnet_cfg(norm_name="BN", freeze_at=2):
    return make_config("MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
                       "MODEL.RESNETS.NORM", norm_name, "MODEL.RESNETS.OUT_FEATURES", ["res5"],
                       "MODEL.BACKBONE.FREEZE_AT", freeze_at, config=None)


def _resnet(cfg):
    torch.manual_seed(0)
    model = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    with torch.no_grad():  # non-trivial statistics, to see that they are carried over
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model


def _count(model, cls):
    return sum(type(m) is cls for m in model.modules())


# ResNet-18: stem 1 BN, res2 4 (frozen at FREEZE_AT=2, with the stem), res3..res5 5 each (one in the shortcut)
N_FROZEN, N_BN = 5, 15


def test_convert_detectron2_resnet(one_thread):
    cfg = _resnet_cfg()
    model = _resnet(cfg)
    assert _count(model, FrozenBatchNorm2d) == N_FROZEN and _count(model, nn.BatchNorm2d) == N_BN
    original = {k: v.clone() for k, v in model.state_dict().items()}

    converted = convert_sync_batchnorm(_resnet(cfg), group_size=2)
    assert _count(converted, GroupSyncBatchNorm) == N_BN and _count(converted, FrozenBatchNorm2d) == N_FROZEN
    assert set(converted.state_dict()) == set(original)  # checkpoints keep their names
    converted.load_state_dict(original, strict=True)

    # include: only res5
    partial = convert_sync_batchnorm(_resnet(cfg), include=lambda name: name.startswith("res5."))
    assert _count(partial, GroupSyncBatchNorm) == 5
    assert all(type(m) is GroupSyncBatchNorm
               for n, m in partial.named_modules() if n.startswith("res5.") and "norm" in n)
    assert type(partial.res4[0].conv1.norm) is nn.BatchNorm2d

    # convert_frozen: FrozenBN -> trainable GroupSyncBatchNorm from its statistics; FREEZE_AT's convs stay frozen
    full = convert_sync_batchnorm(_resnet(cfg), convert_frozen=True)
    assert _count(full, GroupSyncBatchNorm) == N_FROZEN + N_BN and _count(full, FrozenBatchNorm2d) == 0
    stem_bn = full.stem.conv1.norm
    assert stem_bn.weight.requires_grad and stem_bn.bias.requires_grad
    assert not full.stem.conv1.weight.requires_grad and not full.res2[0].conv1.weight.requires_grad
    for key in ("weight", "bias", "running_mean", "running_var"):
        torch.testing.assert_close(getattr(stem_bn, key), original["stem.conv1.norm." + key], rtol=0, atol=0)
    # the unconverted checkpoint (FrozenBN: no num_batches_tracked) loads strictly; so does a Caffe2-era one
    full.load_state_dict(original, strict=True)
    caffe2 = {k: v for k, v in original.items() if not k.startswith("stem.conv1.norm.running")}  # no metadata
    full.load_state_dict(caffe2, strict=True)
    assert torch.equal(stem_bn.running_mean, torch.zeros(64)) and torch.equal(stem_bn.running_var, torch.ones(64))
    full.load_state_dict(original, strict=True)
    # it trains: the stem BN collects statistics and gets gradients
    full.train()
    full(torch.randn(2, 3, 32, 32))["res5"].sum().backward()
    assert stem_bn.weight.grad is not None and int(stem_bn.num_batches_tracked) == 1
    assert not torch.equal(stem_bn.running_mean, original["stem.conv1.norm.running_mean"])
    # eval output of the converted model before training equals the frozen model's
    a, b = _resnet(cfg), convert_sync_batchnorm(_resnet(cfg), convert_frozen=True)
    a.eval()
    b.eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(a(x)["res5"], b(x)["res5"], rtol=1e-5, atol=1e-5)


def test_convert_syncbn_norm():
    cfg = _resnet_cfg("SyncBN", freeze_at=0)
    model = convert_sync_batchnorm(_resnet(cfg))
    assert _count(model, GroupSyncBatchNorm) == N_FROZEN + N_BN


def test_build_sync_bn_from_cfg():
    cfg = _resnet_cfg()
    cfg.SOLVER.IMS_PER_BATCH = 8
    model = _resnet(cfg)
    assert build_sync_bn_from_cfg(cfg, model) is model
    assert _count(model, GroupSyncBatchNorm) == 0  # not ENABLED: untouched

    cfg.MODEL.SYNC_BN.ENABLED = True
    cfg.MODEL.SYNC_BN.CONVERT_FROZEN = True
    cfg.MODEL.SYNC_BN.STATS_MODE = "N"
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("largebatch")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        model = build_sync_bn_from_cfg(cfg, model, include=lambda name: not name.startswith("res5."))
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    assert _count(model, GroupSyncBatchNorm) == N_FROZEN + N_BN - 5
    assert all(m.stats_mode == "N" for m in model.modules() if isinstance(m, GroupSyncBatchNorm))
    message = "\n".join(r.getMessage() for r in records)
    assert "converted 15 BatchNorm layers (5 of them FrozenBatchNorm2d" in message
    assert "BN size = 8 images (1 workers x 8 images per worker)" in message


# ---------------------------------------------------------------------------------------------------------------
# tests/distributed.py
# ---------------------------------------------------------------------------------------------------------------
def _raise_on_rank1(rank, world_size):
    if rank == 1:
        raise KeyError("boom from rank 1")
    t = torch.ones(1)
    dist.all_reduce(t)  # rank 0 blocks here until it is killed
    return t.item()


def _conv_and_all_reduce(rank, world_size):
    x = torch.randn(8, 16, 32, 32)
    y = F.conv2d(x, torch.randn(16, 16, 3, 3)).sum() + torch.mm(torch.randn(300, 300), torch.randn(300, 300)).sum()
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"sum": t.item(), "threads": torch.get_num_threads(), "finite": bool(torch.isfinite(y))}


def test_run_workers_after_multithreaded_work_in_parent(run_workers):
    # the parent uses its OpenMP pool first (2 threads, whatever earlier tests set): forked workers must not hang
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.mm(torch.randn(500, 500), torch.randn(500, 500))
        F.conv2d(torch.randn(8, 16, 32, 32), torch.randn(16, 16, 3, 3))
        assert run_workers(_conv_and_all_reduce, 2, timeout=60) == [{"sum": 1.0, "threads": 1, "finite": True}] * 2
    finally:
        torch.set_num_threads(threads)


def test_run_workers_propagates_exceptions(run_workers):
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="boom from rank 1") as info:
        run_workers(_raise_on_rank1, 2, timeout=60)
    assert info.value.rank == 1
    assert "_raise_on_rank1" in str(info.value) and "KeyError" in str(info.value)  # the worker's traceback
    assert time.monotonic() - t0 < 30  # the blocked peer is killed, not waited for


def test_run_workers_fork_needs_one_thread(run_workers):
    with pytest.raises(ValueError, match="threads=1"):
        run_workers(_conv_and_all_reduce, 2, start_method="fork", threads=2)


def _hang(rank, world_size, collective):
    if rank == 0:
        time.sleep(60)  # never joins
    elif collective:
        dist.all_reduce(torch.ones(1))
    return rank


@pytest.mark.slow
def test_run_workers_timeout(run_workers):
    t0 = time.monotonic()
    # 6 s: the hung collective gives up at 0.8 x 6 s, which leaves its worker 1.2 s to report even on a loaded
    # machine (with 2 s, 0.4 s was not always enough)
    with pytest.raises(WorkerError, match="returned nothing within timeout=6"):  # no collective: the run's limit
        run_workers(_hang, 2, False, timeout=6)
    with pytest.raises(WorkerError, match="rank 1/2 raised") as info:  # a hung collective: the worker's trace
        run_workers(_hang, 2, True, timeout=6)
    assert "all_reduce" in str(info.value)
    assert time.monotonic() - t0 < 40
