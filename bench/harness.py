"""What the benchmarks in bench/ share: their common arguments, the launch of their CPU workers, and the A/B
driver that runs two trainers side by side, one iteration at a time, through public APIs only.

A script run as ``python bench/x.py`` has bench/ on sys.path, so ``import harness`` needs nothing else; the
package itself (``largebatch``) is installed.

    add_config_args / add_threads_arg / add_json_arg / add_overrides   the common flags, one spelling each:
                        --config-file, --num-workers, --threads, --json PATH, KEY VALUE overrides
    launch_workers      ``worker(args, out_root, *extra)`` on every worker (largebatch.launch, on the config's
                        MODEL.DEVICE), with a temporary OUTPUT_DIR root that is removed afterwards
    train_net           one ``train_net.py`` run in a subprocess, its log in OUTPUT_DIR/train.log
    Run                 one LargeBatchTrainer driven as TrainerBase.train drives it, one iteration per call,
                        keeping the wall and CPU seconds of every iteration
    build_runs          the two (or more) Runs of an A/B comparison: same config, same seed, same data order
    interleave          one iteration of each Run, in turn, the order flipped on demand
    CallTimer           adds up the time spent in chosen public methods of chosen objects (a hook's after_step,
                        the stepper's measure_variance, ...)
    markdown_table, write_json, median
"""
import argparse
import functools
import json
import logging
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "shapes", "sgd.yaml")

# a run that only trains: no evaluation, no checkpoint, an end far away
TRAIN_ONLY = ["SOLVER.MAX_ITER", "1000000", "SOLVER.CHECKPOINT_PERIOD", "100000000", "DATASETS.TEST", "()",
              "TEST.EVAL_PERIOD", "0"]

median = statistics.median


# ---------------------------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------------------------
def add_config_args(parser: argparse.ArgumentParser, num_workers: int) -> None:
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE",
                        help=f"the training config (default {os.path.relpath(DEFAULT_CONFIG, REPO)})")
    parser.add_argument("--num-workers", type=int, default=num_workers,
                        help=f"CPU worker processes (gloo; default {num_workers})")


def add_threads_arg(parser: argparse.ArgumentParser, default=None) -> None:
    parser.add_argument("--threads", type=int, default=default,
                        help="torch threads per process (default: torch's; the launcher gives each of N workers "
                             "cores / N)")


def add_json_arg(parser: argparse.ArgumentParser, what: str = "the raw timings") -> None:
    parser.add_argument("--json", default="", metavar="PATH", help=f"also write {what} to this JSON file")


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """KEY VALUE config overrides: the last argument (everything after the options)."""
    parser.add_argument("opts", nargs=argparse.REMAINDER, metavar="KEY VALUE", help="config overrides")


def set_threads(threads) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def config_name(path: str) -> str:
    return os.path.relpath(path, REPO)


# ---------------------------------------------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------------------------------------------
def launch_workers(worker: Callable, args, *extra) -> None:
    """``worker(args, out_root, *extra)`` on ``args.num_workers`` workers (in this process for one), on the
    device the config names; ``out_root`` is a temporary directory for the runs' OUTPUT_DIRs."""
    os.environ.setdefault("LARGEBATCH_DATASETS", os.path.join(REPO, "datasets"))
    from largebatch import launch
    from largebatch.config import load_config

    device = load_config(args.config_file, args.opts, args.num_workers).MODEL.DEVICE
    with tempfile.TemporaryDirectory(prefix="largebatch_bench_") as out_root:
        launch(worker, args.num_workers, dist_url="auto", args=(args, out_root, *extra), device=device)


def train_net(out: str, config: str, opts: Sequence[str], num_workers: int, python: str = sys.executable,
              stop_when: Optional[Callable[[], bool]] = None, poll_s: float = 2.0) -> Tuple[int, str]:
    """``train_net.py --num-gpus W --dist-url auto --config-file CONFIG OPTS OUTPUT_DIR out`` in a subprocess
    (one OpenMP thread per worker), into a fresh ``out``, its output in ``out/train.log`` after the command
    line; returns the exit status and the log. ``stop_when``: asked every ``poll_s`` seconds; once it returns
    True the run gets SIGTERM (every worker finishes its step, checkpoints and exits with code 75)."""
    if os.path.isdir(out):
        shutil.rmtree(out)  # a stale metrics.json / layer_stats.jsonl would be appended to
    os.makedirs(out)
    cmd = [python, "train_net.py", "--num-gpus", str(num_workers), "--dist-url", "auto", "--config-file", config,
           *opts, "OUTPUT_DIR", out]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    path = os.path.join(out, "train.log")
    with open(path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            stopped = False
            while proc.poll() is None:
                try:
                    proc.wait(timeout=poll_s)
                except subprocess.TimeoutExpired:
                    if stop_when is not None and not stopped and stop_when():
                        proc.send_signal(signal.SIGTERM)
                        stopped = True
        except BaseException:  # Ctrl-C / kill of the bench: do not leave the run behind
            proc.kill()
            raise
        returncode = proc.wait()
    with open(path) as f:
        return returncode, f.read()


def quiet() -> None:
    """No INFO logs: the trainers' set-up (the model, twice per worker) and metrics are not the point."""
    logging.disable(logging.INFO)


# ---------------------------------------------------------------------------------------------------------------
# the A/B driver
# ---------------------------------------------------------------------------------------------------------------
class Run:
    """One LargeBatchTrainer driven as ``TrainerBase.train`` drives it (``before_train`` once, then
    ``before_step``, ``run_step``, ``after_step``), one iteration per :meth:`step`, with its own EventStorage.
    Without hooks an iteration is ``run_step`` plus the LR scheduler's step (the loop without its hooks).
    ``wall`` / ``cpu``: seconds of every iteration (time.perf_counter / time.process_time of this process)."""

    def __init__(self, cfg, hooks: bool = True, trainer_class=None):
        import numpy as np
        import torch
        from detectron2.utils.events import EventStorage

        from largebatch import LargeBatchTrainer

        # same weights and same data order for every Run of a config (detectron2's sampler seeds from numpy)
        torch.manual_seed(cfg.SEED)
        np.random.seed(cfg.SEED)
        self.trainer = (trainer_class or LargeBatchTrainer)(cfg)
        self.trainer.resume_or_load(resume=False)
        self.trainer.iter = self.trainer.start_iter = 0
        self.hooks = hooks
        self.storage = EventStorage(0)
        self.started = False
        self.wall: Dict[int, float] = {}
        self.cpu: Dict[int, float] = {}

    @property
    def stepper(self):
        return self.trainer.stepper

    def step(self) -> int:
        """One iteration; returns its number."""
        t = self.trainer
        with self.storage:
            t.storage = self.storage
            if self.hooks and not self.started:
                t.before_train()
            self.started = True
            it = t.iter
            start, start_cpu = time.perf_counter(), time.process_time()
            if self.hooks:
                t.before_step()
                t.run_step()
                t.after_step()
            else:
                self.storage.iter = it
                t.run_step()
                t.scheduler.step()
            self.wall[it] = time.perf_counter() - start
            self.cpu[it] = time.process_time() - start_cpu
            t.iter += 1
        return it


def build_runs(args, out_root: str, variants: Dict[str, Sequence[str]], common: Sequence[str] = (),
               hooks: bool = True, trainer_class=None) -> Dict[str, Run]:
    """One Run per variant: ``args.config_file`` + TRAIN_ONLY + ``common`` + ``args.opts`` + the variant's
    overrides, each with its own OUTPUT_DIR under ``out_root``."""
    from largebatch.config import load_config
    from largebatch.data import register_datasets

    runs = {}
    for name, extra in variants.items():
        opts = [*TRAIN_ONLY, *common, *args.opts, *extra, "OUTPUT_DIR", os.path.join(out_root, name)]
        cfg = load_config(args.config_file, opts, args.num_workers)
        register_datasets(cfg)
        runs[name] = Run(cfg, hooks=hooks, trainer_class=trainer_class)
    return runs


def interleave(runs: Dict[str, Run], flip: bool = False) -> Dict[str, int]:
    """One iteration of each Run in turn (reversed order when ``flip``), all workers in step before each, so
    that the load of a shared machine hits every Run alike. Returns the iteration each ran."""
    from detectron2.utils import comm

    names = list(runs)[::-1] if flip else list(runs)
    done = {}
    for name in names:
        comm.synchronize()
        done[name] = runs[name].step()
    return done


class CallTimer:
    """Adds up the seconds spent in chosen public methods of chosen objects, wrapped on those instances:
    ``timer.wrap(hook, "after_step")``; :meth:`take` returns the sum since the last take."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.spent = 0.0

    def wrap(self, owner, name: str) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def timed(*a, **k):
            start = self.clock()
            try:
                return fn(*a, **k)
            finally:
                self.spent += self.clock() - start

        setattr(owner, name, timed)

    def take(self) -> float:
        spent, self.spent = self.spent, 0.0
        return spent


# ---------------------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------------------
def markdown_table(header: Sequence[str], rows: Sequence[Sequence], right: Sequence[int] = ()) -> str:
    """A markdown table; ``right``: the indices of the right-aligned (number) columns."""
    align = ["---:" if i in right else "---" for i in range(len(header))]
    return "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in [header, align, *rows])


def on_off_table(runs: Dict[str, "Run"], timed: Sequence[int], period: int, what: str) -> str:
    """Seconds per iteration of ``runs["off"]`` and ``runs["on"]`` over the ``timed`` iterations (wall clock and
    CPU of this process; the median of the periods and all iterations), with the ratio on / off, as markdown."""
    rows = []
    for kind, label in (("wall", "wall clock"), ("cpu", "CPU (rank 0)")):
        per_period = {n: means([getattr(r, kind)[j] for j in timed], period) for n, r in runs.items()}
        a, b = median(per_period["off"]), median(per_period["on"])
        rows.append([f"{label}, median of the periods", f"{a:.4f}", f"{b:.4f}", f"{b / a:.4f}x"])
        a, b = (sum(getattr(runs[n], kind)[j] for j in timed) / len(timed) for n in ("off", "on"))
        rows.append([f"{label}, all {len(timed)} iterations", f"{a:.4f}", f"{b:.4f}", f"**{b / a:.4f}x**"])
    return markdown_table(["s / iteration", f"{what} off", f"{what} on", "on / off"], rows, right=(1, 2, 3))


def write_json(path: str, data) -> None:
    """Write ``data`` as JSON (atomically) when ``path`` is set."""
    if path:
        from largebatch.files import atomic_write

        atomic_write(path, lambda f: json.dump(data, f))


def means(values: List[float], size: int) -> List[float]:
    """The means of consecutive chunks of ``size`` values."""
    return [statistics.mean(values[i:i + size]) for i in range(0, len(values) - size + 1, size)]
