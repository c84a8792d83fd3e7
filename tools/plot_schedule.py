#!/usr/bin/env python
"""Plot the learning rate of a largebatch config over its whole run, as the trainer will see it.

    python tools/plot_schedule.py --config-file configs/X.yaml [--num-gpus N] [--num-machines M]
        [--num-train-images K] [--output lr.png] [KEY VALUE ...]

The config goes through ``largebatch.schedule.prepare_solver`` (REFERENCE_WORLD_SIZE auto-scaling for
N x M workers, the LR scaling rule, epoch units, SCHEDULE_MULT) and the curve comes from the trainer's own
LRMultiplier (``largebatch.schedule.lr_curve``). The training set size (needed with SOLVER.SCHEDULE_UNIT
"epoch") is --num-train-images when given, else the size of the registered DATASETS.TRAIN.
"""
import argparse
import logging
import os
import sys

try:
    import largebatch  # noqa: F401
except ImportError:  # a bare checkout: the package lives in projects/
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "projects"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Plot the LR schedule of a largebatch config.")
    p.add_argument("--config-file", required=True, metavar="FILE", help="path to the YAML config")
    p.add_argument("--num-gpus", type=int, default=1, help="workers per machine (default 1)")
    p.add_argument("--num-machines", type=int, default=1, help="machines (default 1)")
    p.add_argument("--num-train-images", type=int, default=None, help="training set size (for epoch units)")
    p.add_argument("--output", default="lr.png", help="PNG to write (default lr.png)")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")
    return p.parse_args(argv)


def load_config(path, opts):
    from detectron2.config import get_cfg

    from largebatch.config import add_largebatch_config

    cfg = get_cfg()
    add_largebatch_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def resolve_num_train_images(cfg, flag):
    if flag is not None:
        return flag
    if cfg.SOLVER.SCHEDULE_UNIT != "epoch":
        return None
    try:  # registers the embedded dataset, if the package has it
        import largebatch.data  # noqa: F401
    except Exception:
        pass
    from largebatch.data import train_set_size

    try:
        return train_set_size(cfg)
    except Exception as e:  # a registered dataset whose files are missing, ...
        raise SystemExit(f"error: cannot count the images of DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}: {e}")


def plot(cfg, lrs, marks, output, num_train_images=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = cfg.SOLVER
    total = s.IMS_PER_BATCH * s.ACCUMULATE_STEPS
    batch = f"total batch {total}"
    if s.ACCUMULATE_STEPS > 1:
        batch += f" ({s.IMS_PER_BATCH} x {s.ACCUMULATE_STEPS} accumulation)"
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110, layout="constrained")
    ax.plot(range(len(lrs)), lrs, color="tab:blue", lw=1.6, label="learning rate")
    if marks["warmup_end"]:
        ax.axvline(marks["warmup_end"], color="tab:orange", ls="--", lw=1.1,
                   label=f"warm-up end ({marks['warmup_end']})")
    for i, x in enumerate(marks["steps"]):
        ax.axvline(x, color="tab:red", ls=":", lw=1.1, label="LR steps" if i == 0 else None)
    for i, x in enumerate(marks["restarts"]):
        ax.axvline(x, color="tab:green", ls=":", lw=1.1, label="restarts" if i == 0 else None)
    ax.set_xlim(0, max(len(lrs) - 1, 1))
    ax.set_ylim(bottom=0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("learning rate")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(alpha=0.3)
    fig.suptitle(f"{s.LR_SCHEDULER_NAME}: BASE_LR {s.BASE_LR:g}, {batch}, {s.MAX_ITER} iterations", fontsize=11)
    if num_train_images:
        per_epoch = num_train_images / total
        sec = ax.secondary_xaxis("top", functions=(lambda x: x / per_epoch, lambda e: e * per_epoch))
        sec.set_xlabel(f"epoch ({num_train_images} images)", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)

    from largebatch.files import save_figure

    output = os.path.abspath(output)
    try:
        save_figure(fig, output)
    finally:
        plt.close(fig)
    return output


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(args.config_file):
        print(f"error: config file not found: {args.config_file}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from largebatch.config import ConfigError
    from largebatch.schedule import lr_curve, schedule_marks
    from largebatch.solver import prepare_solver

    try:
        cfg = load_config(args.config_file, args.opts)
        num_images = resolve_num_train_images(cfg, args.num_train_images)
        if cfg.SOLVER.SCHEDULE_UNIT == "epoch" and num_images is None:
            print(
                f"error: SOLVER.SCHEDULE_UNIT is 'epoch' and DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)} is not "
                "registered: pass --num-train-images",
                file=sys.stderr,
            )
            return 2
        cfg = prepare_solver(cfg, args.num_gpus * args.num_machines, num_images)
        lrs = lr_curve(cfg)
        marks = schedule_marks(cfg)
    except (ConfigError, KeyError, ValueError, AssertionError) as e:
        msg = str(e).strip().splitlines()
        print(f"error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    print(plot(cfg, lrs, marks, args.output, num_images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
