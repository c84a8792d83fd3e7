#!/usr/bin/env python
"""Optimizer step time on the parameter shapes of Faster R-CNN R50-FPN (189 tensors, 41.75M parameters:
the trainable params with BN in the backbone and FREEZE_AT=0, as LargeDet trains it with SyncBN).

Side by side in one process: torch SGD(momentum 0.9) and AdamW in each of torch's variants (for-loop, foreach,
fused where the build has it, and torch.compile'd) against largebatch's LARS, LAMB and PMD-LAMB (multi-tensor
path, compiled with ``largebatch.optim.compile_step`` as SOLVER.COMPILE_STEP does, and the per-tensor loop for
reference). Rounds are interleaved (round-robin over the optimizers) after a warm-up, which for a compiled row
includes its compilation (reported as "compile s"); the table shows medians over rounds of the mean step time
within a round. Each row is compared with the FASTEST eager torch variant of its algorithm measured in this run
(LARS with SGD, LAMB and PMD-LAMB with AdamW; the median of per-round ratios, which holds up on a machine whose
load drifts), with torch's fused kernel, and with the fastest torch variant of all (fused and compiled included).

The memory-traffic floor: this machine's memory bandwidth is measured once (in-place elementwise updates of
tensors as large as all parameters, see ``memory_bandwidth``), and each step's floor is the bytes it must read
and write over that bandwidth, one fused pass each
(n = parameters, in the parameters' dtype): SGD(momentum) reads w, g, buf and writes w, buf: 5n; AdamW reads
w, g, m, v and writes w, m, v: 7n; LARS needs ||w|| and ||g|| before its update: 2n more, 7n; LAMB / PMD-LAMB
need ||w|| and ||u|| before theirs (u from the new moments): a pass reading g, m, v, w and writing m, v, then a
pass reading m, v, w and writing w: 10n. Every optimizer has its own copy of the params; the gradients are
shared (no optimizer here writes to them).

    python bench/optim_step.py --device cpu --steps 5 --rounds 7
    python bench/optim_step.py --no-compile                           # eager rows only (compiling takes minutes)
    python bench/optim_step.py --device cpu --threads 1 --clock cpu   # on a shared, loaded machine
    python bench/optim_step.py --device cuda --steps 50 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import statistics
import time

import harness
import torch

from largebatch.optim.compile import compile_step
from largebatch.optim.lamb import LAMB, PMDLAMB
from largebatch.optim.lars import LARS


def r50_fpn_shapes_hardcoded():
    """Trainable param shapes of detectron2's Faster R-CNN R50-FPN (BN, FREEZE_AT=0, 80 classes)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]  # stem conv + norm
    in_ch = 64
    for n_blocks, bottleneck, out_ch in ((3, 64, 256), (4, 128, 512), (6, 256, 1024), (3, 512, 2048)):
        for b in range(n_blocks):
            if b == 0:
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]  # shortcut
            shapes += [(bottleneck, in_ch if b == 0 else out_ch, 1, 1), (bottleneck,), (bottleneck,)]
            shapes += [(bottleneck, bottleneck, 3, 3), (bottleneck,), (bottleneck,)]
            shapes += [(out_ch, bottleneck, 1, 1), (out_ch,), (out_ch,)]
        in_ch = out_ch
    for c in (256, 512, 1024, 2048):  # FPN lateral + output convs (with bias)
        shapes += [(256, c, 1, 1), (256,), (256, 256, 3, 3), (256,)]
    shapes += [(256, 256, 3, 3), (256,), (3, 256, 1, 1), (3,), (12, 256, 1, 1), (12,)]  # RPN head
    shapes += [(1024, 256 * 7 * 7), (1024,), (1024, 1024), (1024,), (81, 1024), (81,), (320, 1024), (320,)]
    return shapes


def r50_fpn_shapes_detectron2():
    import logging

    logging.disable(logging.WARNING)
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()  # the default is R50-C4: switch every key that makes it R50-FPN
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32], [64], [128], [256], [512]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    model = build_model(cfg)
    return [tuple(p.shape) for p in model.parameters() if p.requires_grad]


def get_shapes(source: str):
    if source in ("auto", "detectron2"):
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return r50_fpn_shapes_detectron2(), "detectron2 build_model"
        except ImportError:
            if source == "detectron2":
                raise
    return r50_fpn_shapes_hardcoded(), "hard-coded list"


def make_params(shapes, grads, device, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape, grad in zip(shapes, grads):
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device=device, dtype=dtype))
        p.grad = grad
        params.append(p)
    return params


def split_groups(params):
    """Weights adapt; 1-D tensors (biases, norms) do not and have no weight decay (the same groups for the
    torch baselines, which ignore "adapt")."""
    return [
        {"params": [p for p in params if p.ndim > 1]},
        {"params": [p for p in params if p.ndim <= 1], "adapt": False, "weight_decay": 0.0},
    ]


# the torch variants of each algorithm: the eager ones (the fastest is the baseline), the fused one, and all
EAGER = {"sgd": ("torch SGD for-loop", "torch SGD foreach"), "adamw": ("torch AdamW for-loop", "torch AdamW foreach")}
FUSED = {"sgd": "torch SGD fused", "adamw": "torch AdamW fused"}
ALL_TORCH = {kind: EAGER[kind] + (FUSED[kind], f"torch {name} compiled") for kind, name in (("sgd", "SGD"),
                                                                                          ("adamw", "AdamW"))}
# tensors of n elements each step must read + write at least (see the module doc)
TRAFFIC = {"torch SGD": 5, "torch AdamW": 7, "LARS": 7, "LAMB": 10, "PMD-LAMB": 10}


def _factory(cls, compiled=False, **kwargs):
    """params -> ``cls`` over split_groups(params), LR 1e-3; ``compiled``: its step through ``compile_step``."""
    if compiled:
        return lambda ps: compile_step(cls(split_groups(ps), lr=1e-3, **kwargs))
    return lambda ps: cls(split_groups(ps), lr=1e-3, **kwargs)


def candidates(args):
    """(name, kind, factory(params) -> optimizer); kind marks the baseline each row is compared with."""
    sgd, adamw = torch.optim.SGD, torch.optim.AdamW
    c = [
        ("torch SGD for-loop", "sgd", _factory(sgd, momentum=0.9, weight_decay=1e-4, foreach=False)),
        ("torch AdamW for-loop", "adamw", _factory(adamw, weight_decay=1e-4, foreach=False)),
        ("torch SGD foreach", "sgd", _factory(sgd, momentum=0.9, weight_decay=1e-4, foreach=True)),
        ("torch AdamW foreach", "adamw", _factory(adamw, weight_decay=1e-4, foreach=True)),
        ("torch SGD fused", "sgd", _factory(sgd, momentum=0.9, weight_decay=1e-4, fused=True)),
        ("torch AdamW fused", "adamw", _factory(adamw, weight_decay=1e-4, fused=True)),
        ("LARS foreach", "sgd", _factory(LARS, weight_decay=1e-4, foreach=True)),
        ("LAMB foreach", "adamw", _factory(LAMB, weight_decay=1e-4, foreach=True)),
        ("PMD-LAMB foreach", "adamw", _factory(PMDLAMB, foreach=True)),
    ]
    if not args.no_compile:
        c += [
            ("torch SGD compiled", "sgd", _factory(sgd, compiled=True, momentum=0.9, weight_decay=1e-4, foreach=True)),
            ("torch AdamW compiled", "adamw", _factory(adamw, compiled=True, weight_decay=1e-4, foreach=True)),
            ("LARS compiled", "sgd", _factory(LARS, compiled=True, weight_decay=1e-4, foreach=True)),
            ("LAMB compiled", "adamw", _factory(LAMB, compiled=True, weight_decay=1e-4, foreach=True)),
            ("PMD-LAMB compiled", "adamw", _factory(PMDLAMB, compiled=True, foreach=True)),
        ]
    if not args.no_single:
        c += [
            ("LARS per-tensor", "sgd", _factory(LARS, weight_decay=1e-4, foreach=False)),
            ("LAMB per-tensor", "adamw", _factory(LAMB, weight_decay=1e-4, foreach=False)),
            ("PMD-LAMB per-tensor", "adamw", _factory(PMDLAMB, foreach=False)),
        ]
    if args.only:
        keep = [s.strip().lower() for s in args.only.split(",")]
        torch_rows = {name for names in ALL_TORCH.values() for name in names}
        c = [x for x in c if any(k in x[0].lower() for k in keep) or x[0] in torch_rows]
    return c


# issue 11's goals: (row, baseline: "eager" = the fastest eager torch variant of its algorithm, "fused" = torch's
# fused kernel, the most it may take); LAMB's floor is ~1.4x AdamW's (10 against 7 tensor passes)
GOALS = [
    ("LARS foreach", "eager", 1.2), ("LAMB foreach", "eager", 1.2), ("PMD-LAMB foreach", "eager", 1.2),
    ("LARS compiled", "fused", 1.2), ("LAMB compiled", "fused", 2.0), ("PMD-LAMB compiled", "fused", 2.0),
]


def memory_bandwidth(n, device, dtype, sync, repeats=7) -> float:
    """Bytes per second this machine moves through memory in an in-place elementwise update of n-element tensors,
    as an optimizer step does: the best of ``a += b`` (reads a, b, writes a) and ``a += b * c`` (reads a, b, c,
    writes a), each the median of ``repeats`` runs. (An out-of-place copy is slower: its writes first read the
    destination.) An estimate: a fused kernel that overlaps more streams can beat it somewhat."""
    a, b, c = (torch.randn(n, device=device).to(dtype) for _ in range(3))
    best = 0.0
    for update, streams in ((lambda: a.add_(b, alpha=1e-7), 3), (lambda: a.addcmul_(b, c, value=1e-7), 4)):
        update()  # first touch
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            update()
            sync()
            times.append(time.perf_counter() - t0)
        best = max(best, streams * n * a.element_size() / statistics.median(times))
    return best


def floor_ms(name, n, itemsize, bandwidth):
    for prefix, tensors in TRAFFIC.items():
        if name.startswith(prefix):
            return tensors * n * itemsize / bandwidth * 1e3
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per optimizer per round")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first")
    harness.add_threads_arg(ap)
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: time.perf_counter; cpu: time.process_time, this process's CPU time (all threads), which "
        "holds up on a shared, loaded machine (use with --threads 1; CPU device only)",
    )
    ap.add_argument("--shapes", default="auto", choices=["auto", "detectron2", "hardcoded"])
    ap.add_argument("--only", default="", help="comma-separated substrings of optimizer names to run")
    ap.add_argument("--no-single", action="store_true", help="skip the per-tensor (foreach=False) rows")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd rows")
    harness.add_json_arg(ap, "every optimizer's ms/step of every round")
    args = ap.parse_args(argv)

    harness.set_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.clock == "cpu" and device.type != "cpu":
        ap.error("--clock cpu measures host CPU time: use it with --device cpu")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    shapes, source = get_shapes(args.shapes)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    print(f"shapes: {len(shapes)} tensors, {n_params:,} parameters ({n_params / 1e6:.2f}M) from {source}")
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{args.warmup} warm-up steps, {args.rounds} interleaved rounds x {args.steps} steps, {args.clock} clock\n")

    g = torch.Generator(device="cpu").manual_seed(0)
    grads = [(torch.randn(s, generator=g) * 1e-3).to(device=device, dtype=dtype) for s in shapes]

    runs = []
    for seed, (name, kind, factory) in enumerate(candidates(args)):
        params = make_params(shapes, grads, device, dtype, seed + 1)
        try:
            opt = factory(params)
            t0 = time.perf_counter()
            opt.step()  # a compiled row compiles here
            sync()
            first = time.perf_counter() - t0
            for _ in range(args.warmup):
                opt.step()
            sync()
        except (RuntimeError, TypeError, ValueError) as e:  # e.g. fused not built for this device/dtype
            print(f"skip {name}: {str(e).splitlines()[0]}")
            continue
        runs.append({"name": name, "kind": kind, "opt": opt, "times": [], "first_step_s": first})

    for _ in range(args.rounds):
        for r in runs:  # round-robin: every optimizer sees the same machine conditions
            sync()
            t0 = clock()
            for _ in range(args.steps):
                r["opt"].step()
            sync()
            r["times"].append((clock() - t0) / args.steps * 1e3)

    bandwidth = memory_bandwidth(n_params, device, dtype, sync)
    itemsize = torch.empty((), dtype=dtype).element_size()
    by_name = {r["name"]: r for r in runs}

    def paired(r, baseline):  # per-round ratio against the baseline's time in the same round, median over rounds
        if baseline is None:
            return "-"
        return f"{statistics.median(t / u for t, u in zip(r['times'], baseline['times'])):.2f}x"

    rows = []
    for r in runs:
        med = statistics.median(r["times"])
        eager = [by_name[n] for n in EAGER[r["kind"]] if n in by_name]
        fastest = min(eager, key=lambda b: statistics.median(b["times"])) if eager else None
        every = [by_name[n] for n in ALL_TORCH[r["kind"]] if n in by_name]
        fastest_any = min(every, key=lambda b: statistics.median(b["times"])) if every else None
        floor = floor_ms(r["name"], n_params, itemsize, bandwidth)
        compile_s = r["first_step_s"] - med / 1e3 if "compiled" in r["name"] else None
        rows.append([r["name"], f"{med:.1f}", f"{min(r['times']):.1f}", paired(r, fastest),
                     fastest["name"] if fastest else "-", paired(r, by_name.get(FUSED[r["kind"]])),
                     paired(r, fastest_any), fastest_any["name"] if fastest_any else "-",
                     f"{floor:.1f}" if floor else "-", f"{med / floor:.1f}x" if floor else "-",
                     f"{compile_s:.0f}" if compile_s is not None else "-"])
    print(f"memory bandwidth: {bandwidth / 1e9:.1f} GB/s (in-place updates of {n_params * itemsize / 1e6:.0f} MB "
          "tensors)\n")
    print(harness.markdown_table(
        ["optimizer", "median ms/step", "min ms/step", "vs fastest eager torch", "(that is)", "vs torch fused",
         "vs fastest torch", "(that is)", "floor ms", "x floor", "compile s"], rows, right=(1, 2, 3, 5, 6, 8, 9, 10)))
    print("\ngoals (issue 11):")
    for name, against, limit in GOALS:
        r = by_name.get(name)
        if r is None:
            continue
        if against == "eager":
            peers = [by_name[n] for n in EAGER[r["kind"]] if n in by_name]
            baseline = min(peers, key=lambda b: statistics.median(b["times"])) if peers else None
        else:
            baseline = by_name.get(FUSED[r["kind"]])
        if baseline is None:
            continue
        ratio = statistics.median(t / u for t, u in zip(r["times"], baseline["times"]))
        floor_ratio = floor_ms(name, 1, 1, 1) / floor_ms(baseline["name"], 1, 1, 1)
        verdict = "met" if ratio <= limit else f"missed by {ratio / limit - 1:.0%}"
        print(f"  {name} <= {limit}x {baseline['name']}: {ratio:.2f}x, {verdict} (memory floors: {floor_ratio:.2f}x)")
    harness.write_json(args.json, {"device": args.device, "dtype": args.dtype, "clock": args.clock,
                                   "memory_bandwidth_bytes_per_s": bandwidth,
                                   "steps": args.steps, "ms_per_step": {r["name"]: r["times"] for r in runs},
                                   "first_step_s": {r["name"]: r["first_step_s"] for r in runs}})


if __name__ == "__main__":
    main()
