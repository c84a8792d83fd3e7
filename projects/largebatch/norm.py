"""Cross-GPU BatchNorm over groups of workers: MegDet's CGBN and its "BN size", LargeDet's SyncBN (G2).

MegDet (Peng et al. 2018, Sec. 3.3 and Table 3) computes the BN statistics over the images of several GPUs
and calls the number of images that share one set of statistics the *BN size*; 32 worked best, 64 was worse.
At a large total batch that means synchronizing within groups of workers rather than across all of them:
with 8 images per worker, ``group_size=4`` gives a BN size of 32 whatever the number of workers.
LargeDet (guideline G2) replaces the frozen BN that detectors inherit from ImageNet by trainable SyncBN:
``convert_frozen=True`` turns detectron2's ``FrozenBatchNorm2d`` into trainable layers that start from the
stored statistics.

``GroupSyncBatchNorm`` subclasses detectron2's ``NaiveSyncBatchNorm`` (so ``isinstance`` checks and
checkpoint names are unchanged: weight, bias, running_mean, running_var, num_batches_tracked) and differs from
it only in what it synchronizes over and in a few details, each chosen to match ``torch.nn.BatchNorm2d`` on the
group's joint batch exactly:

- the statistics are summed over the worker's group (``group_size`` consecutive ranks) with an all-reduce
  whose backward all-reduces the gradient over the same group, so gradients flow across the group;
- ``running_var`` is updated with the *unbiased* variance (n / (n - 1), n = values per channel in the whole
  group), as BatchNorm2d does (NaiveSyncBatchNorm uses the biased one);
- ``num_batches_tracked`` is counted, and ``momentum=None`` (cumulative average) works, as in BatchNorm2d;
- stats_mode "N" weights each worker by its number of values N * H * W (NaiveSyncBatchNorm: by N), which is the
  same for equal H, W and the joint batch's exact statistics otherwise.

With one worker, ``group_size=1`` or in eval mode the layer *is* BatchNorm2d (its forward is called).

FREEZE_AT: detectron2 freezes the first stages by setting their conv weights' ``requires_grad`` to False and
turning their BN into FrozenBatchNorm2d. ``convert_frozen=True`` converts *every* FrozenBatchNorm2d, including
those of frozen stages, into trainable BN (weight/bias ``requires_grad=True``, statistics updated in training);
the conv weights of those stages stay frozen. Use MODEL.BACKBONE.FREEZE_AT 0 to train them too.

DDP: the groups' running statistics differ; DDP's ``broadcast_buffers=True`` would overwrite them with rank 0's
before every forward (harmless for training, but then only group 0's statistics survive). detectron2's trainer
passes ``broadcast_buffers=False``. Every worker of a group must run every converted layer in every iteration
(the all-reduce is collective), as with any SyncBN.
"""
import logging
import numbers

import torch
import torch.distributed as dist
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from torch import nn

__all__ = [
    "GroupSyncBatchNorm",
    "convert_sync_batchnorm",
    "bn_size",
    "build_sync_bn_from_cfg",
    "group_all_reduce",
    "get_bn_group",
    "groups_divide",
]

logger = logging.getLogger("largebatch")

# (world_size, group_size) -> (the default process group it was made under, this rank's group or None = WORLD)
_GROUPS = {}


def _dist_world_size():
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def groups_divide(group_size: int, world_size: int) -> bool:
    """Whether BN groups of ``group_size`` consecutive workers (0: all of them) split ``world_size`` workers into
    groups of equal size; a single worker always is its own group."""
    return group_size == 0 or world_size <= 1 or world_size % group_size == 0


def _check_group_size(group_size, world_size):
    if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool) or group_size < 0:
        raise ValueError(f"SyncBN group_size must be an integer >= 0 (0 = all workers), got {group_size!r}")
    if not groups_divide(group_size, world_size):
        raise ValueError(
            f"SyncBN group_size={group_size} does not divide the world size {world_size}: the workers must split "
            f"into groups of equal size (choose a divisor of {world_size}, or 0 for all workers)"
        )


def _effective_group_size(group_size, world_size):
    """Workers that share statistics; a single worker is its own group whatever group_size says (so a config
    written for many workers still evaluates and debugs in one process)."""
    _check_group_size(group_size, world_size)
    return world_size if group_size == 0 or world_size == 1 else group_size


def get_bn_group(group_size):
    """This rank's process group for BN groups of ``group_size`` consecutive ranks.

    None when the group is the whole world (group_size 0 or the world size; use the default group), and also
    when there is nothing to synchronize (one worker, group_size 1: GroupSyncBatchNorm does not communicate).

    Creating the groups is collective: every rank calls ``dist.new_group`` for every group, in the same order.
    The result is cached per (world_size, group_size), so all BN layers share one process group; the cache is
    rebuilt if the default process group was destroyed and re-created.
    """
    world_size = _dist_world_size()
    size = _effective_group_size(group_size, world_size)
    if size >= world_size or size == 1:
        return None  # the default group / no communication at all
    key = (world_size, size)
    world = dist.group.WORLD
    cached = _GROUPS.get(key)
    if cached is not None and cached[0] is world:
        return cached[1]
    rank = dist.get_rank()
    mine = None
    for start in range(0, world_size, size):
        ranks = list(range(start, start + size))
        group = dist.new_group(ranks)  # collective: all ranks create all groups
        if rank in ranks:
            mine = group
    _GROUPS[key] = (world, mine)
    return mine


class _GroupAllReduce(torch.autograd.Function):
    """Sum over a process group; the backward sums the gradient over the same group."""

    @staticmethod
    def forward(ctx, input, group):
        ctx.group = group
        output = input.clone().contiguous()
        dist.all_reduce(output, group=group)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.clone().contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def group_all_reduce(input, group=None):
    """Differentiable ``dist.all_reduce`` (sum) within ``group`` (None = all workers); identity on one worker."""
    if _dist_world_size() == 1:
        return input
    return _GroupAllReduce.apply(input, group)


class GroupSyncBatchNorm(NaiveSyncBatchNorm):
    """BatchNorm2d whose batch statistics are shared by consecutive groups of ``group_size`` workers.

    group_size: 0 = all workers, 1 = plain per-worker BN; must divide the world size (ValueError otherwise).
    stats_mode: "" = mean of the per-worker statistics (the joint batch's statistics when all workers have the
    same N, H, W; a worker may not have 0 images), "N" = weighted by each worker's number of values N * H * W
    (the joint batch's statistics for any N, H, W; a worker with 0 images contributes nothing and still has to
    run the layer, as every worker of the group must take part in each all-reduce).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, stats_mode="", group_size=0):
        if stats_mode not in ("", "N"):
            raise ValueError(f'SyncBN stats_mode must be "" or "N", got {stats_mode!r}')
        _check_group_size(group_size, 1)  # the type/sign; divisibility is checked against the world size in use
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype,
                         stats_mode=stats_mode)
        self.group_size = int(group_size)

    @property
    def stats_mode(self):
        return self._stats_mode

    def extra_repr(self):
        return super().extra_repr() + f", group_size={self.group_size}, stats_mode={self._stats_mode!r}"

    def forward(self, input):
        if not self.training:
            return nn.BatchNorm2d.forward(self, input)  # running statistics, no communication
        size = _effective_group_size(self.group_size, _dist_world_size())
        if size == 1:
            return nn.BatchNorm2d.forward(self, input)
        self._check_input_dim(input)
        return self._group_forward(input, get_bn_group(self.group_size), size)

    def _group_forward(self, input, group, size):
        B, C = input.shape[0], input.shape[1]
        in_dtype = input.dtype
        if in_dtype in (torch.float16, torch.bfloat16):
            input = input.float()  # the reductions need more precision than half
        per_channel = input.numel() // max(C, 1)  # B * H * W
        count = torch.full((1,), float(per_channel), device=input.device, dtype=input.dtype)

        if self._stats_mode == "":
            if B == 0:
                raise ValueError('GroupSyncBatchNorm(stats_mode="") does not support an empty batch; use "N"')
            mean = torch.mean(input, dim=[0, 2, 3])
            meansqr = torch.mean(input * input, dim=[0, 2, 3])
            vec = group_all_reduce(torch.cat([mean, meansqr, count]), group)
            mean, meansqr = torch.split(vec[: 2 * C] * (1.0 / size), C)
            total = vec[-1].detach()
        else:
            if per_channel == 0:
                # nothing to contribute; input.sum() (= 0) keeps the graph connected so that backward runs the
                # group's gradient all-reduce on this worker too
                vec = torch.zeros(2 * C + 1, device=input.device, dtype=input.dtype) + input.sum()
            else:
                sums = torch.sum(input, dim=[0, 2, 3])
                sqrsums = torch.sum(input * input, dim=[0, 2, 3])
                vec = torch.cat([sums, sqrsums, count])
            vec = group_all_reduce(vec, group)
            total = vec[-1].detach()
            mean, meansqr = torch.split(vec[: 2 * C] / total.clamp(min=1), C)

        var = (meansqr - mean * mean).clamp(min=0)
        invstd = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = self.weight * invstd
            bias = self.bias - mean * scale
        else:
            scale = invstd
            bias = -mean * scale

        if self.track_running_stats:
            # without a host sync (float(total) would stall a GPU): an empty group batch (total 0, "N" mode)
            # leaves the statistics as they are
            with torch.no_grad():
                seen = total > 0
                self.num_batches_tracked.add_(seen.to(self.num_batches_tracked.dtype))
                if self.momentum is None:  # cumulative moving average, as BatchNorm2d
                    momentum = 1.0 / self.num_batches_tracked.clamp(min=1).to(total.dtype)
                else:
                    momentum = torch.full_like(total, self.momentum)
                momentum = momentum * seen.to(total.dtype)
                # the unbiased variance of the group's joint batch, as BatchNorm2d stores (n values per channel)
                unbiased = var.detach() * torch.where(total > 1, total / (total - 1).clamp(min=1), 1.0)
                self.running_mean.add_((momentum * (mean.detach() - self.running_mean)).to(self.running_mean.dtype))
                self.running_var.add_((momentum * (unbiased - self.running_var)).to(self.running_var.dtype))

        out = input * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)
        return out.to(in_dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint of the unconverted model may hold a FrozenBatchNorm2d here: it has no num_batches_tracked
        # (and, before its version 2, no running statistics); fill them in as FrozenBatchNorm2d itself does.
        if self.track_running_stats and prefix + "weight" in state_dict:
            if prefix + "num_batches_tracked" not in state_dict:
                state_dict[prefix + "num_batches_tracked"] = torch.zeros_like(self.num_batches_tracked)
            if prefix + "running_mean" not in state_dict and prefix + "running_var" not in state_dict:
                version = local_metadata.get("version", None)
                if version is None or version < 2:
                    state_dict[prefix + "running_mean"] = torch.zeros_like(self.running_mean)
                    state_dict[prefix + "running_var"] = torch.ones_like(self.running_var)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm)  # detectron2's BatchNorm2d and NaiveSyncBatchNorm included


def _from_bn(bn, group_size, stats_mode):
    """A GroupSyncBatchNorm that takes over ``bn``'s parameters and buffers (the same tensors)."""
    ref = bn.weight if bn.affine else bn.running_mean
    new = GroupSyncBatchNorm(
        bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None,
        stats_mode=stats_mode, group_size=group_size,
    )
    with torch.no_grad():
        if bn.affine:
            new.weight = bn.weight  # the same Parameter objects: an optimizer built before still holds them
            new.bias = bn.bias
        new.running_mean = bn.running_mean
        new.running_var = bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    new.train(bn.training)
    return new


def _from_frozen(frozen, group_size, stats_mode):
    """A trainable GroupSyncBatchNorm starting from a FrozenBatchNorm2d's weight, bias and statistics."""
    new = GroupSyncBatchNorm(
        frozen.num_features, eps=frozen.eps, affine=True, track_running_stats=True,
        device=frozen.weight.device, dtype=frozen.weight.dtype, stats_mode=stats_mode, group_size=group_size,
    )
    with torch.no_grad():
        new.weight.copy_(frozen.weight)
        new.bias.copy_(frozen.bias)
        new.running_mean.copy_(frozen.running_mean)
        new.running_var.copy_(frozen.running_var)
    new.weight.requires_grad_(True)
    new.bias.requires_grad_(True)
    new.train(frozen.training)
    return new


def _convert(module, name, group_size, stats_mode, convert_frozen, include, counts):
    wanted = include is None or include(name)
    if wanted and isinstance(module, _BN_TYPES):
        counts["bn"] += 1
        return _from_bn(module, group_size, stats_mode)
    if wanted and convert_frozen and isinstance(module, FrozenBatchNorm2d):
        counts["frozen"] += 1
        return _from_frozen(module, group_size, stats_mode)
    for child_name, child in module.named_children():
        qualified = f"{name}.{child_name}" if name else child_name
        new_child = _convert(child, qualified, group_size, stats_mode, convert_frozen, include, counts)
        if new_child is not child:
            module.add_module(child_name, new_child)
    return module


def _convert_with_counts(module, group_size=0, stats_mode="", convert_frozen=False, include=None, groups=True):
    if stats_mode not in ("", "N"):
        raise ValueError(f'SyncBN stats_mode must be "" or "N", got {stats_mode!r}')
    _check_group_size(group_size, _dist_world_size() if groups else 1)
    counts = {"bn": 0, "frozen": 0}
    module = _convert(module, "", group_size, stats_mode, convert_frozen, include, counts)
    if groups and counts["bn"] + counts["frozen"] and _dist_world_size() > 1:
        get_bn_group(group_size)  # create the groups now, while every rank is building the same model
    return module, counts


def convert_sync_batchnorm(module, group_size=0, stats_mode="", convert_frozen=False, include=None):
    """Replace BatchNorm2d layers of ``module`` by GroupSyncBatchNorm; return the module (a new one if it is a BN).

    Converts every ``torch.nn.BatchNorm2d`` (detectron2's "BN", "naiveSyncBN" and an earlier GroupSyncBatchNorm,
    re-configured) and ``torch.nn.SyncBatchNorm`` (detectron2's "SyncBN"); they keep their parameters and
    buffers (the same tensors), momentum, eps, affine, device, dtype and training flag. With ``convert_frozen``
    also every detectron2 ``FrozenBatchNorm2d``, into a trainable layer initialized from its weight, bias and
    running statistics (LargeDet G2; conv weights of stages frozen by FREEZE_AT stay frozen).

    group_size: workers per group sharing statistics (0 = all, 1 = per-worker BN); must divide the world size.
    stats_mode: "" or "N" as NaiveSyncBatchNorm. include: optional ``callable(qualified_name) -> bool`` (names as
    in ``module.named_modules()``, "" for the root); layers it rejects are left as they are.
    When torch.distributed is initialized, the process groups are created here (collectively: call this on
    every rank, as when every rank builds the model).
    """
    return _convert_with_counts(module, group_size, stats_mode, convert_frozen, include)[0]


def bn_size(group_size, world_size, images_per_worker):
    """MegDet's BN size: images that share one set of BN statistics = workers per group x images per worker."""
    size = _effective_group_size(group_size, world_size)
    return size * images_per_worker


def build_sync_bn_from_cfg(cfg, model, include=None, for_training=True):
    """Apply MODEL.SYNC_BN.{ENABLED, GROUP_SIZE, STATS_MODE, CONVERT_FROZEN} to ``model``; return the model.

    ``include`` restricts the conversion by qualified module name (the trainer builds it from
    MODEL.SYNC_BN.PARTS and the module partition). Logs the number of converted layers and the BN size.
    ``for_training=False`` (evaluation): the layers are converted, so that checkpoints load as they were saved,
    but no process group is made and GROUP_SIZE need not divide the world size: in eval mode the layers use
    their running statistics and never communicate (a recipe with BN groups of 4 evaluates on any number of
    workers). Such a model refuses to train on a world size its group size does not divide.
    """
    sync = cfg.MODEL.SYNC_BN
    if not sync.ENABLED:
        return model
    world_size = _dist_world_size()
    group_size = int(sync.GROUP_SIZE)
    model, counts = _convert_with_counts(
        model, group_size, sync.STATS_MODE, bool(sync.CONVERT_FROZEN), include, groups=for_training
    )
    converted = counts["bn"] + counts["frozen"]
    if not for_training:
        logger.info("SyncBN: converted %d BatchNorm layers for evaluation (running statistics, no communication)",
                    converted)
        return model
    images_per_worker = cfg.SOLVER.IMS_PER_BATCH // world_size
    size = _effective_group_size(group_size, world_size)
    logger.info(
        "SyncBN: converted %d BatchNorm layers (%d of them FrozenBatchNorm2d, now trainable) to "
        "GroupSyncBatchNorm(group_size=%d, stats_mode=%r); BN size = %d images (%d workers x %d images per worker)",
        converted, counts["frozen"], group_size, sync.STATS_MODE,
        bn_size(group_size, world_size, images_per_worker), size, images_per_worker,
    )
    return model
