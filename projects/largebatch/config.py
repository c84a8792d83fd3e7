"""The config of largebatch: its keys, each documented where it is added, their validation and loading.

``add_largebatch_config(cfg)`` adds every key the project reads; ``validate(cfg)`` (the one validator) checks
the values before anything is built, so a bad value fails at once with one line naming the key, the value and
what is allowed; ``load_config(file, overrides, num_workers)`` is get_cfg + these keys + the file + the
overrides, validated. The detector parts are ``largebatch.optim.groups.DETECTOR_PARTS`` (re-exported here).
"""
import difflib
import logging
import os
import re

import yaml
from detectron2.config import CfgNode as CN

from .norm import groups_divide
from .optim.build import OPTIMIZERS
from .optim.groups import DETECTOR_PARTS

LR_SCHEDULERS = ("WarmupMultiStepLR", "WarmupCosineLR", "WarmupCosineRestartsLR", "WarmupPolyLR")
LR_SCALING_RULES = ("none", "linear", "sqrt", "linear_then_sqrt")
SCHEDULE_UNITS = ("iter", "epoch")
#: the image formats detectron2's loader and models take (detectron2.data.detection_utils.read_image)
INPUT_FORMATS = ("BGR", "RGB", "YUV-BT.601", "L")
DEVICE_KINDS = ("cuda", "cpu")


logger = logging.getLogger("largebatch")


class ConfigError(ValueError):
    """A config key holds a value that is not allowed: the message is one line naming key, value and choices."""


def add_largebatch_config(cfg):
    """Add largebatch's keys (with their defaults) to a detectron2 config, in place."""
    _C = cfg

    # ---------------------------------------------------------------------------------------------------------
    # Optimizers (largebatch/optim). SOLVER.BASE_LR, MOMENTUM, WEIGHT_DECAY, WEIGHT_DECAY_NORM and
    # WEIGHT_DECAY_BIAS keep detectron2's meaning for every optimizer.
    # ---------------------------------------------------------------------------------------------------------
    # One of SGD, ADAMW, LARS, LAMB, PMDLAMB (case-insensitive).
    _C.SOLVER.OPTIMIZER = "SGD"
    # Use the multi-tensor (torch._foreach_*) step; False selects the readable per-tensor reference loop.
    _C.SOLVER.FOREACH = True
    # torch.compile the optimizer's update (largebatch.optim.compile_step): a few fused kernels instead of many
    # small ones; clipping, AGVM and AMP stay around it as they are. Compiling costs tens of seconds at the first
    # iteration (README, "Optimizer speed" says what it saves per step).
    _C.SOLVER.COMPILE_STEP = False
    # Apply the layer-wise trust ratio (LARS/LAMB/PMD-LAMB) to biases / norm-layer parameters. The papers
    # exclude them (ratio 1.0), as do most implementations; this is separate from their weight decay.
    _C.SOLVER.ADAPT_BIAS = False
    _C.SOLVER.ADAPT_NORM = False

    _C.SOLVER.ADAMW = CN()
    # torch.optim.AdamW's (beta1, beta2) and eps (its defaults).
    _C.SOLVER.ADAMW.BETAS = (0.9, 0.999)
    _C.SOLVER.ADAMW.EPS = 1e-8

    _C.SOLVER.LARS = CN()
    # eta in You et al. 2017 eq. 6: local_lr = eta * ||w|| / (||g|| + wd * ||w|| + eps).
    _C.SOLVER.LARS.TRUST_COEFFICIENT = 0.001
    # Added to the denominator of the local LR; 0 as in the paper (zero norms give a ratio of 1 anyway).
    _C.SOLVER.LARS.EPS = 0.0
    # Upper bound of the local LR; 0 disables the cap.
    _C.SOLVER.LARS.TRUST_CLIP = 0.0

    _C.SOLVER.LAMB = CN()
    # (beta1, beta2) and eps of You et al. 2020, Algorithm 2.
    _C.SOLVER.LAMB.BETAS = (0.9, 0.999)
    _C.SOLVER.LAMB.EPS = 1e-6
    # Adam's bias correction of m and v (Algorithm 2 has it; some BERT recipes turn it off).
    _C.SOLVER.LAMB.BIAS_CORRECTION = True
    # Upper bound of the trust ratio ||w|| / ||u||; 0 disables the cap.
    _C.SOLVER.LAMB.TRUST_CLIP = 0.0

    _C.SOLVER.PMDLAMB = CN()
    # LargeDet Algorithm 1: beta1 = 0.9, beta2 = 0.999, eps, T = 200 (cycle of the moments decay, eq. 3)
    # and alpha = 0.012 (the scale multiplied into every update). Set SOLVER.WEIGHT_DECAY 5e-4 as the paper.
    _C.SOLVER.PMDLAMB.BETAS = (0.9, 0.999)
    _C.SOLVER.PMDLAMB.EPS = 1e-6
    _C.SOLVER.PMDLAMB.CYCLE = 200
    _C.SOLVER.PMDLAMB.SCALE = 0.012

    # ---------------------------------------------------------------------------------------------------------
    # AGVM (Xue et al. 2022): per-module LR multipliers from the gradient variance of the detector's parts.
    # ---------------------------------------------------------------------------------------------------------
    _C.SOLVER.AGVM = CN()
    # Wrap the optimizer chosen by SOLVER.OPTIMIZER (any of them) in AGVM.
    _C.SOLVER.AGVM.ENABLED = False
    # The module whose LR is left as it is (eq. 4; the paper's Table 7 picks the backbone).
    _C.SOLVER.AGVM.ANCHOR = "backbone"
    # alpha of the moving average of mu (eq. 5).
    _C.SOLVER.AGVM.MOMENTUM = 0.97
    # tau: measure the gradient variance and update mu every this many iterations (5 above batch 1K).
    _C.SOLVER.AGVM.INTERVAL = 10
    # First iteration at which mu is measured and applied; -1 = at the end of the warm-up.
    _C.SOLVER.AGVM.START_ITER = -1
    # Bounds of Phi_anchor / Phi_i before the square root (the official code's 0.5 and 10).
    _C.SOLVER.AGVM.CLAMP = (0.5, 10.0)

    # ---------------------------------------------------------------------------------------------------------
    # LR schedules (largebatch/schedule.py); SOLVER.LR_SCHEDULER_NAME is one of WarmupMultiStepLR,
    # WarmupCosineLR, WarmupCosineRestartsLR, WarmupPolyLR. Warm-up: detectron2's WARMUP_FACTOR/WARMUP_ITERS/
    # WARMUP_METHOD.
    # ---------------------------------------------------------------------------------------------------------
    # WarmupMultiStepLR: one multiplier per SOLVER.STEPS entry (MegDet's long policy: 0.1, 0.1, 0.5);
    # empty = SOLVER.GAMMA at every step.
    _C.SOLVER.STEP_GAMMAS = []
    # WarmupPolyLR (semantic segmentation's schedule, mmsegmentation's "poly"): the power of (1 - iter / MAX_ITER).
    _C.SOLVER.POLY_POWER = 0.9
    # The LR that cosine and poly schedules end at (detectron2 0.6 lacks this key; main has it).
    if "BASE_LR_END" not in _C.SOLVER:
        _C.SOLVER.BASE_LR_END = 0.0
    _C.SOLVER.RESTARTS = CN()
    # SGDR (Loshchilov & Hutter): length of the first cosine cycle after warm-up, in SCHEDULE_UNITs.
    _C.SOLVER.RESTARTS.CYCLE_ITERS = 2000
    # Each cycle is this many times longer than the one before (SGDR's T_mult).
    _C.SOLVER.RESTARTS.CYCLE_MULT = 1.0
    # The peak LR is multiplied by this at every restart (CoolDet uses 0.5).
    _C.SOLVER.RESTARTS.GAMMA = 0.5

    _C.SOLVER.LR_SCALING = CN()
    # How BASE_LR follows the total batch: none, linear (MegDet), sqrt, linear_then_sqrt (AGVM: linear up to
    # SQRT_ABOVE images, square root beyond). Applied once at set-up and logged.
    _C.SOLVER.LR_SCALING.RULE = "none"
    # The total batch (images per optimizer step) that BASE_LR was tuned for.
    _C.SOLVER.LR_SCALING.REFERENCE_BATCH = 16
    # linear_then_sqrt: the batch above which the square-root rule takes over.
    _C.SOLVER.LR_SCALING.SQRT_ABOVE = 128

    # Units of MAX_ITER, STEPS, WARMUP_ITERS, RESTARTS.CYCLE_ITERS, CHECKPOINT_PERIOD and TEST.EVAL_PERIOD:
    # "iter", or "epoch" (converted with the training set size and the total batch, and logged).
    _C.SOLVER.SCHEDULE_UNIT = "iter"
    # Stretches all of the above (LargeDet's "1.4x" schedules); applied after the unit conversion.
    _C.SOLVER.SCHEDULE_MULT = 1.0
    # One optimizer step from this many micro-batches of IMS_PER_BATCH images (no DDP all-reduce on the
    # first k-1): the total batch is IMS_PER_BATCH * ACCUMULATE_STEPS.
    _C.SOLVER.ACCUMULATE_STEPS = 1
    # Images per worker (per micro-batch) the recipe was written for: its memory use and its BN size assume it
    # (the COCO recipes: 8). With more (fewer GPUs than the recipe), a warning at start-up names the
    # IMS_PER_BATCH / ACCUMULATE_STEPS that keep the recipe's total batch. 0 = no assumption.
    _C.SOLVER.RECIPE_IMS_PER_WORKER = 0
    # Keep only the last this many periodic checkpoints (model_XXXXXXX.pth) this run writes, deleting older ones
    # (detectron2's PeriodicCheckpointer max_to_keep); 0 keeps all, as detectron2 does. model_final.pth, the
    # checkpoint last_checkpoint names and files this run did not write are never deleted. To get past a divergence
    # keep a few: --resume picks the last one written before the explosion guard saw trouble (README).
    _C.SOLVER.CHECKPOINTS_TO_KEEP = 0

    # ---------------------------------------------------------------------------------------------------------
    # Cross-GPU BatchNorm (MegDet's CGBN, LargeDet's SyncBN), largebatch/norm.py.
    # ---------------------------------------------------------------------------------------------------------
    _C.MODEL.SYNC_BN = CN()
    # Replace BatchNorm2d (and FrozenBatchNorm2d with CONVERT_FROZEN) by NaiveSyncBatchNorm.
    _C.MODEL.SYNC_BN.ENABLED = False
    # Statistics are shared within consecutive groups of this many workers; 0 = all workers, 1 = plain BN.
    # The "BN size" of MegDet is GROUP_SIZE * images per worker.
    _C.MODEL.SYNC_BN.GROUP_SIZE = 0
    # NaiveSyncBatchNorm's stats_mode: "" (mean of per-worker statistics) or "N" (weighted by batch size).
    _C.MODEL.SYNC_BN.STATS_MODE = ""
    # Also convert FrozenBatchNorm2d into trainable SyncBN starting from its stored statistics (LargeDet G2).
    _C.MODEL.SYNC_BN.CONVERT_FROZEN = False
    # Which detector parts to convert (names of MODEL.MODULE_PARTITION's parts); empty = every part.
    _C.MODEL.SYNC_BN.PARTS = []

    # Extra rules mapping parameter names to detector parts, tried before the built-in ones: a list of
    # [part, regex] pairs, e.g. [["head", "^roi_heads\\.box_predictor\\."]]; the first match wins.
    _C.MODEL.MODULE_PARTITION = []

    # Blocks in res2..res5 of build_small_resnet_fpn_backbone (largebatch/modeling/backbone.py), the narrow
    # ResNet-FPN of the CPU-sized shapes configs; its widths start at RESNETS.RES2_OUT_CHANNELS and double.
    _C.MODEL.RESNETS.SMALL_BLOCKS_PER_STAGE = [1, 1, 1, 1]

    # ---------------------------------------------------------------------------------------------------------
    # Monitoring (largebatch/monitor.py, engine/hooks.py).
    # ---------------------------------------------------------------------------------------------------------
    _C.MONITOR = CN()
    # Record trust ratios / gradient variance every PERIOD iterations.
    _C.MONITOR.ENABLED = True
    _C.MONITOR.PERIOD = 20
    # trust_ratio/<part> and local_lr/<part> (mean, min, max); LARS/LAMB/PMD-LAMB report the ratios they
    # used, SGD/AdamW ||w|| / ||g||.
    _C.MONITOR.TRUST_RATIO = True
    # grad_var/<part> = 1 - cos(G1, G2) of the two halves of the workers (of the batch on one worker).
    _C.MONITOR.GRAD_VARIANCE = True
    # Append per-layer values to OUTPUT_DIR/layer_stats.jsonl (main process only).
    _C.MONITOR.PER_LAYER = True
    # Stop when a part's gradient norm or trust ratio grows more than this factor between two records
    # (0 disables the jump check; non-finite losses and gradients always stop training).
    _C.MONITOR.DIVERGENCE_FACTOR = 1e4
    # Stop, every iteration and before the step, when the total loss or the global gradient norm exceeds this many
    # times its median over the previous EXPLOSION_WINDOW iterations: a divergence caught while the weights are
    # still healthy (measured: healthy runs stay below 2.5x; see largebatch/engine/divergence.py). 0 disables.
    # Works whether MONITOR.ENABLED or not.
    _C.MONITOR.EXPLOSION_FACTOR = 10.0
    _C.MONITOR.EXPLOSION_WINDOW = 20
    # The gradient noise scale B_simple per part (McCandlish et al. 2018; largebatch/noise_scale.py), measured on
    # the gradient-variance iterations (the monitor's PERIOD, or AGVM's INTERVAL): noise_scale/<part> and its terms.
    _C.MONITOR.NOISE_SCALE = True
    # Its two terms are averaged over measurements with this decay (0.9: about the last 10 measurements, 200
    # iterations at PERIOD 20) before their ratio is taken. In [0, 1).
    _C.MONITOR.NOISE_SCALE_DECAY = 0.9

    # ---------------------------------------------------------------------------------------------------------
    # The embedded synthetic dataset (largebatch/data/shapes.py).
    # ---------------------------------------------------------------------------------------------------------
    _C.DATASETS.SHAPES_ROOT = ""  # "" = $LARGEBATCH_DATASETS/shapes, else ./datasets/shapes
    # Your own COCO-format datasets, registered under new names for DATASETS.TRAIN / TEST: a list of
    # [name, json_file, image_root] triples, e.g. [["my_train", "/data/train.json", "/data/train_images"]].
    # Checked at set-up: the files exist, the json parses, its categories fit MODEL.ROI_HEADS.NUM_CLASSES.
    _C.DATASETS.COCO_JSON = []
    # Before training, check every image of DATASETS.TRAIN / TEST: it exists, its header is an image's and a JPEG or
    # PNG is not truncated (a few hundred bytes read per image; largebatch/data/catalog.py). False skips it.
    _C.DATASETS.CHECK_IMAGES = True
    return cfg


def fail(key, value, allowed):
    """Raise the one-line ConfigError: ``KEY = value is not allowed: allowed``."""
    raise ConfigError(f"{key} = {value!r} is not allowed: {allowed}")


def class_count_keys(cfg):
    """The config keys that size the model's classifiers, each with the dataset metadata field whose classes it
    must hold, for the config's meta-architecture: the R-CNNs' ROI_HEADS, RetinaNet's RETINANET, SemanticSegmentor's
    SEM_SEG_HEAD (stuff_classes: every class of its per-pixel labels), PanopticFPN's ROI_HEADS for the things and
    SEM_SEG_HEAD for the stuff (whose first class is "things")."""
    arch = cfg.MODEL.META_ARCHITECTURE
    things = ("MODEL.RETINANET.NUM_CLASSES" if arch == "RetinaNet" else "MODEL.ROI_HEADS.NUM_CLASSES", "thing_classes")
    stuff = ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "stuff_classes")
    return {"SemanticSegmentor": [stuff], "PanopticFPN": [things, stuff]}.get(arch, [things])


def config_value(cfg, key: str):
    """The value of a dotted key (``MODEL.ROI_HEADS.NUM_CLASSES``)."""
    node = cfg
    for name in key.split("."):
        node = node[name]
    return node


def describe_error(error: BaseException, limit: int = 120) -> str:
    """``Type: the first line of its message`` (cut at ``limit`` characters): what a one-line error quotes of the
    exception behind it."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:limit] if lines else ''}"


def choice(cfg_value, key, choices, case_insensitive=False):
    """``cfg_value`` (upper-cased when ``case_insensitive``) if it is one of ``choices``, else ConfigError."""
    value = cfg_value.upper() if case_insensitive and isinstance(cfg_value, str) else cfg_value
    if value not in choices:
        fail(key, cfg_value, "expected one of " + ", ".join(choices))
    return value


def device_kind(device) -> str:
    """"cuda" or "cpu" for a MODEL.DEVICE value ("cuda", "cuda:1", "cpu"); ConfigError for anything else."""
    kind = str(device).split(":")[0]
    if kind not in DEVICE_KINDS:
        fail("MODEL.DEVICE", device, "expected cuda, cuda:N or cpu")
    return kind


def validate(cfg, num_workers=None):
    """Check every value largebatch reads; raise ConfigError (one line) on the first bad one.

    The one validator: ``load_config`` calls it before anything is built, ``prepare_solver`` and the schedule
    builders call it on the configs they are given. ``num_workers`` (when known) adds the checks that depend on
    the number of workers."""
    s = cfg.SOLVER
    device = device_kind(cfg.MODEL.DEVICE)
    choice(s.OPTIMIZER, "SOLVER.OPTIMIZER", OPTIMIZERS, case_insensitive=True)
    if s.COMPILE_STEP and str(s.OPTIMIZER).upper() == "ADAMW" and device == "cpu":
        # torch's compiled AdamW takes a tensor LR only on GPUs: on the CPU every new LR value is a new graph
        fail("SOLVER.COMPILE_STEP", s.COMPILE_STEP, "not with SOLVER.OPTIMIZER ADAMW on MODEL.DEVICE cpu (torch's "
             "compiled AdamW recompiles at every new LR there); set it False, or train on cuda")
    choice(s.LR_SCHEDULER_NAME, "SOLVER.LR_SCHEDULER_NAME", LR_SCHEDULERS)
    choice(s.LR_SCALING.RULE, "SOLVER.LR_SCALING.RULE", LR_SCALING_RULES)
    choice(s.SCHEDULE_UNIT, "SOLVER.SCHEDULE_UNIT", SCHEDULE_UNITS)
    choice(s.WARMUP_METHOD, "SOLVER.WARMUP_METHOD", ("linear", "constant"))
    choice(cfg.MODEL.SYNC_BN.STATS_MODE, "MODEL.SYNC_BN.STATS_MODE", ("", "N"))
    positive = {
        "SOLVER.IMS_PER_BATCH": s.IMS_PER_BATCH,
        "SOLVER.MAX_ITER": s.MAX_ITER,
        "SOLVER.ACCUMULATE_STEPS": s.ACCUMULATE_STEPS,
        "SOLVER.SCHEDULE_MULT": s.SCHEDULE_MULT,
        "SOLVER.LR_SCALING.REFERENCE_BATCH": s.LR_SCALING.REFERENCE_BATCH,
        "SOLVER.LR_SCALING.SQRT_ABOVE": s.LR_SCALING.SQRT_ABOVE,
        "SOLVER.LARS.TRUST_COEFFICIENT": s.LARS.TRUST_COEFFICIENT,
        "SOLVER.PMDLAMB.CYCLE": s.PMDLAMB.CYCLE,
        "SOLVER.PMDLAMB.SCALE": s.PMDLAMB.SCALE,
        "SOLVER.AGVM.INTERVAL": s.AGVM.INTERVAL,
        "SOLVER.RESTARTS.CYCLE_ITERS": s.RESTARTS.CYCLE_ITERS,
        "MONITOR.PERIOD": cfg.MONITOR.PERIOD,
        "MONITOR.EXPLOSION_WINDOW": cfg.MONITOR.EXPLOSION_WINDOW,
        "SOLVER.GAMMA": s.GAMMA,  # 0 would make the LR 0 at the first step for good
        "INPUT.MAX_SIZE_TRAIN": cfg.INPUT.MAX_SIZE_TRAIN,
        "INPUT.MAX_SIZE_TEST": cfg.INPUT.MAX_SIZE_TEST,
    }
    if s.CLIP_GRADIENTS.ENABLED:
        choice(s.CLIP_GRADIENTS.CLIP_TYPE, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", ("value", "norm"))
        positive["SOLVER.CLIP_GRADIENTS.CLIP_VALUE"] = s.CLIP_GRADIENTS.CLIP_VALUE
        positive["SOLVER.CLIP_GRADIENTS.NORM_TYPE"] = s.CLIP_GRADIENTS.NORM_TYPE
    for key, value in positive.items():
        if not value > 0:
            fail(key, value, "expected a number > 0")
    non_negative = {
        "SOLVER.BASE_LR": s.BASE_LR,
        "SOLVER.BASE_LR_END": s.BASE_LR_END,
        "SOLVER.WEIGHT_DECAY": s.WEIGHT_DECAY,
        "SOLVER.MOMENTUM": s.MOMENTUM,
        "SOLVER.WARMUP_ITERS": s.WARMUP_ITERS,
        "SOLVER.LARS.EPS": s.LARS.EPS,
        "SOLVER.LARS.TRUST_CLIP": s.LARS.TRUST_CLIP,
        "SOLVER.LAMB.TRUST_CLIP": s.LAMB.TRUST_CLIP,
        "SOLVER.ADAMW.EPS": s.ADAMW.EPS,
        "SOLVER.LAMB.EPS": s.LAMB.EPS,
        "SOLVER.PMDLAMB.EPS": s.PMDLAMB.EPS,
        "SOLVER.RESTARTS.GAMMA": s.RESTARTS.GAMMA,
        "SOLVER.RECIPE_IMS_PER_WORKER": s.RECIPE_IMS_PER_WORKER,
        "MODEL.SYNC_BN.GROUP_SIZE": cfg.MODEL.SYNC_BN.GROUP_SIZE,
        "MONITOR.DIVERGENCE_FACTOR": cfg.MONITOR.DIVERGENCE_FACTOR,
        "MONITOR.EXPLOSION_FACTOR": cfg.MONITOR.EXPLOSION_FACTOR,
        "DATALOADER.NUM_WORKERS": cfg.DATALOADER.NUM_WORKERS,
        "INPUT.MIN_SIZE_TEST": cfg.INPUT.MIN_SIZE_TEST,  # 0: no resizing at test time (detectron2)
    }
    for key, value in non_negative.items():
        if not value >= 0:
            fail(key, value, "expected a number >= 0")
    for key in ("ADAMW", "LAMB", "PMDLAMB"):
        betas = s[key].BETAS
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            fail(f"SOLVER.{key}.BETAS", tuple(betas), "expected two numbers in [0, 1)")
    if s.LR_SCALING.RULE == "linear_then_sqrt" and s.LR_SCALING.REFERENCE_BATCH > s.LR_SCALING.SQRT_ABOVE:
        fail("SOLVER.LR_SCALING.REFERENCE_BATCH", s.LR_SCALING.REFERENCE_BATCH,
              f"linear_then_sqrt needs it <= SOLVER.LR_SCALING.SQRT_ABOVE ({s.LR_SCALING.SQRT_ABOVE})")
    if not s.POLY_POWER > 0:
        fail("SOLVER.POLY_POWER", s.POLY_POWER, "expected a number > 0")
    if s.RESTARTS.CYCLE_MULT < 1:
        fail("SOLVER.RESTARTS.CYCLE_MULT", s.RESTARTS.CYCLE_MULT, "expected a number >= 1")
    if not 0 <= s.WARMUP_FACTOR <= 1:
        fail("SOLVER.WARMUP_FACTOR", s.WARMUP_FACTOR, "expected a number in [0, 1]")
    if not 0 <= s.MOMENTUM < 1:
        fail("SOLVER.MOMENTUM", s.MOMENTUM, "expected a number in [0, 1)")
    if not s.CHECKPOINT_PERIOD > 0:
        fail("SOLVER.CHECKPOINT_PERIOD", s.CHECKPOINT_PERIOD, "expected a number > 0 (iterations, or epochs)")
    if not (isinstance(s.CHECKPOINTS_TO_KEEP, int) and s.CHECKPOINTS_TO_KEEP >= 0):
        fail("SOLVER.CHECKPOINTS_TO_KEEP", s.CHECKPOINTS_TO_KEEP, "expected a whole number >= 0 (0: keep all)")
    sizes = cfg.INPUT.MIN_SIZE_TRAIN
    if isinstance(sizes, int):
        sizes = (sizes,)
    if not sizes or not all(isinstance(v, int) and v > 0 for v in sizes):
        fail("INPUT.MIN_SIZE_TRAIN", cfg.INPUT.MIN_SIZE_TRAIN, "expected sizes > 0 in pixels, e.g. (640, 800)")
    choice(cfg.INPUT.FORMAT, "INPUT.FORMAT", INPUT_FORMATS)
    choice(cfg.INPUT.RANDOM_FLIP, "INPUT.RANDOM_FLIP", ("none", "horizontal", "vertical"))
    mean, std = tuple(cfg.MODEL.PIXEL_MEAN), tuple(cfg.MODEL.PIXEL_STD)
    if not std or len(std) != len(mean) or not all(v > 0 for v in std):
        fail("MODEL.PIXEL_STD", std, f"expected one number > 0 per MODEL.PIXEL_MEAN entry ({len(mean)})")
    if not cfg.TEST.EVAL_PERIOD >= 0:
        fail("TEST.EVAL_PERIOD", cfg.TEST.EVAL_PERIOD, "expected a number >= 0 (0: evaluate at the end only)")
    if os.path.exists(cfg.OUTPUT_DIR) and not os.path.isdir(cfg.OUTPUT_DIR):
        fail("OUTPUT_DIR", cfg.OUTPUT_DIR, "expected a folder (or a path to create one at), not a file")
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        fail("MODEL.WEIGHTS", weights, "expected an existing file, a URL, or empty (from scratch)")
    if not 0 <= s.AGVM.MOMENTUM < 1:
        fail("SOLVER.AGVM.MOMENTUM", s.AGVM.MOMENTUM, "expected a number in [0, 1)")
    lo_hi = tuple(s.AGVM.CLAMP)
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
        fail("SOLVER.AGVM.CLAMP", lo_hi, "expected (low, high) with 0 < low <= high")
    if not 0 <= cfg.MONITOR.NOISE_SCALE_DECAY < 1:
        fail("MONITOR.NOISE_SCALE_DECAY", cfg.MONITOR.NOISE_SCALE_DECAY, "expected a number in [0, 1)")
    if s.AGVM.START_ITER < -1:
        fail("SOLVER.AGVM.START_ITER", s.AGVM.START_ITER, "expected -1 (end of warm-up) or an iteration >= 0")
    choice(s.AGVM.ANCHOR, "SOLVER.AGVM.ANCHOR", DETECTOR_PARTS)
    for part in cfg.MODEL.SYNC_BN.PARTS:
        choice(part, "MODEL.SYNC_BN.PARTS", DETECTOR_PARTS)
    for rule in cfg.MODEL.MODULE_PARTITION:
        if len(rule) != 2:
            fail("MODEL.MODULE_PARTITION", rule, "expected [part, regex] pairs")
        choice(rule[0], "MODEL.MODULE_PARTITION", DETECTOR_PARTS)
        try:
            re.compile(rule[1])
        except (re.error, TypeError) as e:
            fail("MODEL.MODULE_PARTITION", tuple(rule), f"{rule[1]!r} is not a regular expression ({e})")
    for entry in cfg.DATASETS.COCO_JSON:
        if len(entry) != 3 or not all(isinstance(v, str) and v for v in entry):
            fail("DATASETS.COCO_JSON", entry, "expected [name, json_file, image_root] triples of non-empty strings")
    if s.STEP_GAMMAS and (len(s.STEP_GAMMAS) != len(s.STEPS) or not all(g > 0 for g in s.STEP_GAMMAS)):
        fail("SOLVER.STEP_GAMMAS", tuple(s.STEP_GAMMAS),
              f"expected one number > 0 per SOLVER.STEPS entry ({len(s.STEPS)}), or empty for SOLVER.GAMMA")
    if list(s.STEPS) != sorted(s.STEPS):
        fail("SOLVER.STEPS", tuple(s.STEPS), "expected increasing iterations")
    if s.BASE_LR > 0 and s.BASE_LR_END > s.BASE_LR:
        fail("SOLVER.BASE_LR_END", s.BASE_LR_END, f"expected a number <= SOLVER.BASE_LR ({s.BASE_LR})")
    reference = s.REFERENCE_WORLD_SIZE
    if reference and s.IMS_PER_BATCH % reference:
        fail("SOLVER.IMS_PER_BATCH", s.IMS_PER_BATCH,
             f"expected a multiple of SOLVER.REFERENCE_WORLD_SIZE ({reference})")
    if num_workers is not None:
        if not reference and s.IMS_PER_BATCH % num_workers:  # with a reference, auto-scaling sets the batch
            raise ConfigError(
                f"SOLVER.IMS_PER_BATCH = {s.IMS_PER_BATCH} is not allowed on {num_workers} workers: expected a "
                "multiple of the number of workers (--num-gpus x --num-machines), every worker takes the same share"
            )
        measures_variance = s.AGVM.ENABLED or (cfg.MONITOR.ENABLED and cfg.MONITOR.GRAD_VARIANCE)
        if num_workers == 1 and measures_variance and s.IMS_PER_BATCH < 2:
            raise ConfigError(
                f"SOLVER.IMS_PER_BATCH = {s.IMS_PER_BATCH} is not allowed on one worker with gradient variance "
                "(AGVM or MONITOR.GRAD_VARIANCE): expected >= 2 images, split in two halves"
            )
    return cfg


def validate_training(cfg, num_workers: int) -> None:
    """What training needs beyond ``validate`` (evaluation does not): a training dataset, and BN groups that
    split the workers evenly (``--eval-only`` takes any number of workers: its BN layers do not communicate)."""
    if not cfg.DATASETS.TRAIN:
        fail("DATASETS.TRAIN", tuple(cfg.DATASETS.TRAIN), "expected at least one dataset to train on")
    group = cfg.MODEL.SYNC_BN.GROUP_SIZE
    if cfg.MODEL.SYNC_BN.ENABLED and not groups_divide(group, num_workers):
        fail("MODEL.SYNC_BN.GROUP_SIZE", group,
             f"expected a divisor of the {num_workers} workers (equal BN groups), or 0 for all of them")


def load_config(config_file: str, opts=(), num_workers: int = 1):
    """get_cfg() + largebatch keys + the YAML file + KEY VALUE overrides, validated for ``num_workers`` workers.

    Raises ConfigError with one line for a missing file, an unknown key or a bad value. Shared by train_net.py,
    the tools, the benchmarks and the tests.
    """
    import torch
    from detectron2.config import get_cfg

    from . import modeling  # noqa: F401  (registers build_small_resnet_fpn_backbone, which configs may name)

    if not config_file:
        raise ConfigError("--config-file is required: e.g. --config-file configs/shapes/demo.yaml")
    if not os.path.isfile(config_file):
        raise ConfigError(f"--config-file {config_file!r}: no such file")
    flags = [o for o in opts if str(o).startswith("--")]
    if flags:  # argparse hands everything after the first KEY VALUE pair to the overrides
        raise ConfigError(
            f"{flags[0]!r} is an argument, not a config key: put arguments before the KEY VALUE overrides"
        )
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs, got an odd list: {' '.join(map(str, opts))}")
    cfg = LargeBatchCfgNode(add_largebatch_config(get_cfg()))  # every node of that class: yacs compares node types
    for source, merge in ((config_file, lambda: cfg.merge_from_file(config_file)),
                          ("command line", lambda: cfg.merge_from_list(_whole_numbers_as_floats(cfg, opts)))):
        try:
            merge()
        except (KeyError, AssertionError, ValueError, TypeError, AttributeError, OSError, yaml.YAMLError) as e:
            message = str(e.args[0] if e.args else e).splitlines()[0]
            if "Non-existent" in message:  # yacs, for files (KeyError) and for KEY VALUE lists (AssertionError)
                raise ConfigError(_unknown_key_message(cfg, source, message.split(":")[-1].strip())) from None
            if isinstance(e, OSError):  # a _BASE_ file that is not there
                message = describe_error(e)
            elif isinstance(e, (AttributeError, TypeError)) and "Type mismatch" not in message:
                # an empty file (None) or a list where yacs expects "KEY: value" lines
                message = f"expected KEY: value lines of config keys ({describe_error(e)})"
            raise ConfigError(f"{source}: {message}") from None
    if device_kind(cfg.MODEL.DEVICE) == "cuda" and not torch.cuda.is_available():
        # not silent: said in the log and shown in the saved config
        logger.warning("MODEL.DEVICE=%s but no GPU is available: training on CPU, %d gloo worker(s)",
                       cfg.MODEL.DEVICE, num_workers)
        cfg.MODEL.DEVICE = "cpu"
    validate(cfg, num_workers)
    if cfg.SOLVER.BASE_LR == 0:  # allowed on purpose (README): a run that measures without changing the weights
        logger.warning("SOLVER.BASE_LR is 0: the weights will not change (BatchNorm statistics still do)")
    return cfg


#: a ``_BASE_`` that starts with this names a file of detectron2's model zoo (``detectron2/model_zoo/configs/``)
MODEL_ZOO_PREFIX = "model_zoo://"


def resolve_model_zoo_base(path: str) -> str:
    """The file a config path names: ``model_zoo://COCO-Detection/retinanet_R_50_FPN_1x.yaml`` (also as fvcore
    joins it to the including file's folder, ``configs/x/model_zoo://...``) is that file of the installed
    detectron2's model zoo, through ``detectron2.model_zoo.get_config_file``; any other path is itself."""
    if MODEL_ZOO_PREFIX not in path:
        return path
    from detectron2 import model_zoo

    name = path.split(MODEL_ZOO_PREFIX, 1)[1]
    try:
        return model_zoo.get_config_file(name)
    except RuntimeError:  # detectron2's "... not available in Model Zoo!"
        raise ConfigError(f"_BASE_ {MODEL_ZOO_PREFIX}{name} is not a config of detectron2's model zoo (the files "
                          "under detectron2/model_zoo/configs/, e.g. model_zoo://COCO-Detection/"
                          "retinanet_R_50_FPN_1x.yaml)") from None


class LargeBatchCfgNode(CN):
    """detectron2's CfgNode whose YAML loader resolves ``model_zoo://`` bases (``resolve_model_zoo_base``): a config
    can start from detectron2's own model-zoo YAML and add only the largebatch keys. fvcore's loader recurses
    through ``load_yaml_with_base``, so bases of bases are resolved too; everything else (version upgrades, the
    model zoo's unsafe YAML for anchor sizes, merging) is detectron2's."""

    @classmethod
    def load_yaml_with_base(cls, filename, allow_unsafe=False):
        return super().load_yaml_with_base(resolve_model_zoo_base(filename), allow_unsafe=allow_unsafe)


def _whole_numbers_as_floats(cfg, opts) -> list:
    """KEY VALUE overrides, a whole number given for a float key (``MONITOR.EXPLOSION_FACTOR 0``, ``SOLVER.BASE_LR
    1``) made that float: yacs refuses it as a type mismatch, which is never what the user meant."""
    opts = list(opts)
    for i in range(0, len(opts) - 1, 2):
        node = cfg
        for name in str(opts[i]).split("."):
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, float) and isinstance(opts[i + 1], str) and opts[i + 1].strip().lstrip("+-").isdigit():
            opts[i + 1] = str(float(opts[i + 1]))
    return opts


def _all_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _all_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _unknown_key_message(cfg, source, key):
    close = difflib.get_close_matches(key, list(_all_keys(cfg)), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else " (see largebatch/config.py and detectron2's defaults)"
    return f"{source}: unknown config key {key!r}{hint}"
