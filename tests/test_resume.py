"""Exact resume: the data stream continues where it stopped (aspect-ratio groups included), each image's
augmentation depends only on its place in the stream, and ``--resume`` from a checkpoint ends with the weights of
the uninterrupted run (2 CPU workers; SGD, LAMB and AGVM)."""
import os
import shutil

import numpy as np
import pytest
import torch
from detectron2.data.samplers import TrainingSampler

from helpers import REPO, import_script, run_python
from largebatch.data.resumable import ResumableTrainingSampler, SeededMapDataset, stream_loader, stream_position


def start_and_wait_for_iteration(argv, output_dir, iteration=2, timeout=300):
    """Start the training command ``argv`` (run in the repository) in the background, and return its Popen once
    ``output_dir``'s layer_stats.jsonl records ``iteration`` (or the process ended, or ``timeout`` passed)."""
    import json
    import subprocess
    import time

    from helpers import REPO, script_env

    proc = subprocess.Popen(argv, cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    records = output_dir / "layer_stats.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if records.exists() and any(json.loads(line).get("iter", -1) >= iteration
                                    for line in records.read_text().splitlines()[1:] if line.endswith("}")):
            break
        time.sleep(0.5)
    return proc


def _sizes(n, seed=0):
    """n images, landscape or portrait at random (the two aspect-ratio buckets)."""
    rng = np.random.RandomState(seed)
    return [{"image_id": i, "width": 640 if wide else 480, "height": 480 if wide else 640}
            for i, wide in enumerate(rng.rand(n) < 0.5)]


def _augment(d):
    """A mapper with randomness, as detectron2's flips and resizes: a draw of numpy's, python's and torch's."""
    import random

    return {**d, "draw": (float(np.random.rand()), random.random(), float(torch.rand(1)))}


def _batches(dicts, seed, count, batch_size=3, skip=0, num_workers=0):
    sampler = ResumableTrainingSampler(len(dicts), seed=seed)
    if skip:
        landscape = [d["width"] > d["height"] for d in dicts]
        sampler.set_position(*stream_position(sampler, landscape, batch_size, skip, grouping=True))
    loader = stream_loader(SeededMapDataset(dicts, _augment, seed), sampler, batch_size, True, num_workers)
    out = []
    for batch in loader:
        out.append([(d["image_id"], d["draw"]) for d in batch])
        if len(out) == count:
            return out


def test_the_stream_is_detectron2s_training_sampler_stream():
    ours = ResumableTrainingSampler(10, seed=3)
    theirs = TrainingSampler(10, seed=3)
    a = [i for _, (_, i) in zip(range(35), iter(ours))]
    b = [i for _, i in zip(range(35), iter(theirs))]
    assert a == b
    assert [p for _, (p, _) in zip(range(5), iter(ours))] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_stream_gives_the_batches_the_uninterrupted_one_gives(num_workers):
    """Aspect-ratio grouping holds images back across batches: the resumed stream replays them first. The
    augmentation of every image is the same whichever data-loader worker maps it."""
    dicts = _sizes(23)
    whole = _batches(dicts, seed=7, count=12)
    for k in (1, 5, 9):
        assert _batches(dicts, seed=7, count=12 - k, skip=k, num_workers=num_workers) == whole[k:]
    assert _batches(dicts, seed=7, count=12, num_workers=num_workers) == whole
    assert _batches(dicts, seed=8, count=12) != whole  # the seed is what the checkpoint keeps


def test_seeded_mapping_leaves_the_callers_generators_alone():
    dataset = SeededMapDataset(_sizes(4), _augment, seed=1)
    torch.manual_seed(0)
    np.random.seed(0)
    expected = (torch.rand(1), np.random.rand())
    torch.manual_seed(0)
    np.random.seed(0)
    assert dataset[(5, 2)] == dataset[(5, 2)] != dataset[(6, 2)]
    assert (torch.rand(1), np.random.rand()) == expected


def _train(out, *opts, resume=False):
    args = ["train_net.py", "--num-gpus", "2", "--dist-url", "auto", *(["--resume"] if resume else []),
            "--config-file", "configs/shapes/sgd.yaml", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "8",
            "SOLVER.CHECKPOINT_PERIOD", "4", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "(6,)",
            "DATASETS.TEST", "()", "MONITOR.PERIOD", "2", "OUTPUT_DIR", str(out), *opts]
    result = run_python(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("opts", [
    ("SOLVER.OPTIMIZER", "SGD", "DATALOADER.NUM_WORKERS", "2"),
    ("SOLVER.OPTIMIZER", "LAMB", "SOLVER.BASE_LR", "0.002"),
    ("SOLVER.OPTIMIZER", "SGD", "SOLVER.AGVM.ENABLED", "True", "SOLVER.AGVM.INTERVAL", "2",
     "SOLVER.AGVM.START_ITER", "0"),
], ids=["sgd", "lamb", "agvm"])
def test_resume_from_a_checkpoint_ends_with_the_uninterrupted_runs_weights(tmp_path, opts):
    """As after a kill -9 right after the checkpoint of iteration 4 of 8: its folder holds that checkpoint only."""
    whole = _train(tmp_path / "whole", *opts)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "whole" / "model_0000003.pth", resumed_dir)
    (resumed_dir / "last_checkpoint").write_text("model_0000003.pth")
    resumed = _train(resumed_dir, *opts, resume=True)
    assert resumed.keys() == whole.keys()
    diff = max((resumed[k].double() - whole[k].double()).abs().max().item() for k in whole)
    assert diff <= 1e-6, diff


@pytest.mark.slow
def test_sigterm_makes_every_worker_checkpoint_and_exit_and_resume_continues(tmp_path):
    """What SLURM / Kubernetes send before stopping a job, sent to the launcher only (it forwards it)."""
    import signal
    import sys

    common = ["train_net.py", "--num-gpus", "2", "--dist-url", "auto", "--config-file", "configs/shapes/sgd.yaml",
              "SOLVER.IMS_PER_BATCH", "4", "SOLVER.CHECKPOINT_PERIOD", "1000", "DATASETS.TEST", "()",
              "MONITOR.PERIOD", "1", "OUTPUT_DIR", str(tmp_path)]
    proc = start_and_wait_for_iteration([sys.executable, *common, "SOLVER.MAX_ITER", "500"], tmp_path)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, log[-3000:]
    assert "run the same command with --resume" in log
    last = (tmp_path / "last_checkpoint").read_text().strip()
    iteration = torch.load(tmp_path / last, map_location="cpu", weights_only=False)["iteration"]
    assert 2 <= iteration < 499 and len(torch.load(tmp_path / last, weights_only=False)["rng_states"]) == 2
    resumed = run_python("train_net.py", "--resume", *common[1:], "SOLVER.MAX_ITER", str(iteration + 3))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Starting training from iteration {iteration + 1}" in resumed.stdout + resumed.stderr


@pytest.mark.slow
def test_workers_die_with_a_killed_launcher(tmp_path):
    """kill -9 of train_net.py: its CPU workers do not train on as orphans."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import REPO, script_env

    proc = subprocess.Popen(
        [sys.executable, "train_net.py", "--num-gpus", "2", "--dist-url", "auto", "--config-file",
         "configs/shapes/sgd.yaml", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "500", "DATASETS.TEST", "()",
         "MONITOR.PERIOD", "1", "OUTPUT_DIR", str(tmp_path)],
        cwd=REPO, env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def children():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == proc.pid:
                        found.append(int(pid))
            except (OSError, IndexError, ValueError):
                pass
        return found

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (tmp_path / "layer_stats.jsonl").exists():
        time.sleep(0.5)
    workers = children()
    assert len(workers) >= 2, workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if os.path.exists(f"/proc/{pid}") and
                 open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
        time.sleep(0.2)
    assert not alive, f"workers {alive} outlived the launcher"


def test_resume_applies_a_lowered_base_lr_and_says_so(tmp_path, caplog):
    """--resume with a lowered SOLVER.BASE_LR (to recover from a divergence): the config's LR, not the checkpoint's."""
    from helpers import make_config
    from largebatch import LargeBatchTrainer

    torch.set_num_threads(1)
    opts = ["SOLVER.MAX_ITER", 2, "SOLVER.IMS_PER_BATCH", 2, "SOLVER.WARMUP_ITERS", 0, "SOLVER.STEPS", "()",
            "DATASETS.TEST", "()", "MONITOR.ENABLED", False, "OUTPUT_DIR", str(tmp_path)]
    first = LargeBatchTrainer(make_config(*opts, "SOLVER.BASE_LR", 0.02, register=True))
    first.resume_or_load(resume=False)
    first.train()
    before = [g["lr"] for g in first.stepper.optimizer.param_groups]
    resumed = LargeBatchTrainer(make_config(*opts[2:], "SOLVER.MAX_ITER", 4, "SOLVER.BASE_LR", 0.01, register=True))
    with caplog.at_level("WARNING", logger="largebatch"):
        resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    groups = resumed.stepper.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([lr / 2 for lr in before], rel=1e-12)
    assert resumed.scheduler.base_lrs == pytest.approx([g["initial_lr"] for g in groups], rel=1e-12)
    assert any("initial_lr 0.02 -> 0.01" in r.message for r in caplog.records), caplog.text


def test_interrupted_checkpoint_writes_are_cleaned_up_when_a_run_starts(tmp_path):
    from largebatch.engine.checkpoint import AtomicCheckpointer

    left = [tmp_path / ".model_0000003.pth.k2j3h4.tmp", tmp_path / ".last_checkpoint.x7y8.tmp"]
    kept = [tmp_path / "model_0000003.pth", tmp_path / ".hidden_user_file.tmp", tmp_path / "notes.tmp"]
    for path in left + kept:
        path.write_bytes(b"x")
    AtomicCheckpointer(torch.nn.Linear(1, 1), str(tmp_path))
    assert not any(p.exists() for p in left) and all(p.exists() for p in kept)


def test_no_checkpoint_is_tagged_while_the_guard_sees_trouble_and_the_last_n_are_kept(tmp_path):
    """Checkpoint every iteration, keep 3: a gradient norm above half the explosion factor x its median writes no
    periodic checkpoint (and the final one untagged), so last_checkpoint names one from before; the rotation deletes
    only checkpoints this run wrote."""
    from types import SimpleNamespace

    from largebatch.engine.checkpoint import AtomicCheckpointer, PeriodicCheckpointer
    from largebatch.engine.divergence import ExplosionGuard

    earlier = tmp_path / "model_0000100.pth"
    earlier.write_bytes(b"a checkpoint of an earlier run")
    guard = ExplosionGuard(factor=10, window=20, min_history=3)
    checkpointer = AtomicCheckpointer(torch.nn.Linear(2, 2), str(tmp_path), trouble=guard.trouble)
    trainer = SimpleNamespace(iter=0, max_iter=12, checkpointer=checkpointer)
    hook = PeriodicCheckpointer(checkpointer, 1, max_to_keep=3)
    hook.trainer = trainer
    hook.before_train()
    grad_norms = [1.0] * 7 + [6.0, 1.0, 1.0, 8.0, 9.0]  # 6x, 8x, 9x: rising, below the factor of 10
    for iteration, grad_norm in enumerate(grad_norms):
        trainer.iter = iteration
        guard.check(iteration, 1.0, grad_norm)
        hook.after_step()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == [
        "model_0000006.pth", "model_0000008.pth", "model_0000009.pth", "model_0000100.pth", "model_final.pth"]
    assert earlier.read_bytes() == b"a checkpoint of an earlier run"
    assert torch.load(tmp_path / "model_final.pth", weights_only=False)["iteration"] == 11


def test_checkpoints_to_keep_is_checked(make_config):
    from largebatch.config import ConfigError

    assert make_config("SOLVER.CHECKPOINTS_TO_KEEP", 3).SOLVER.CHECKPOINTS_TO_KEEP == 3
    with pytest.raises(ConfigError, match=r"SOLVER.CHECKPOINTS_TO_KEEP = -1 is not allowed: expected a whole number"):
        make_config("SOLVER.CHECKPOINTS_TO_KEEP", -1)


def test_resume_after_an_explosion_starts_from_a_checkpoint_before_the_trouble(tmp_path, monkeypatch):
    """The README's recovery, constructed so that it holds on any CPU (a real divergence takes another path on each
    CPU model): the guard reads gradient norms of 6x and 7x their median at iterations 9 and 10 (trouble: above half
    the factor of 10, not enough to stop) and 50x at 11, where it stops. The checkpoints of 9 and 10 would hold the
    weights those steps made: they are not written, last_checkpoint names iteration 8's, and train_net --resume with a
    lower BASE_LR continues from 9. One worker, in this process (train_net's launch runs one worker in place)."""
    import statistics

    from largebatch.engine.divergence import ExplosionGuard

    spikes = {9: 6.0, 10: 7.0, 11: 50.0}
    check = ExplosionGuard.check

    def injected(guard, iteration, loss, grad_norm):
        if iteration in spikes:
            grad_norm = spikes[iteration] * statistics.median(h[1] for h in guard.history)
        return check(guard, iteration, loss, grad_norm)

    monkeypatch.chdir(REPO)
    cli = import_script("train_net.py").cli
    args = ["--config-file", "configs/shapes/sgd.yaml", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0",
            "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.CHECKPOINTS_TO_KEEP", "3",
            "DATASETS.TEST", "()", "MONITOR.PERIOD", "5", "MONITOR.DIVERGENCE_FACTOR", "0.0",
            "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path)]
    monkeypatch.setattr(ExplosionGuard, "check", injected)
    with pytest.raises(FloatingPointError) as info:
        cli([*args, "SOLVER.MAX_ITER", "20"])
    log = (tmp_path / "log.txt").read_text()
    assert str(info.value).startswith("Training diverged at iteration 11: the gradient norm ") and "is 50x" in str(
        info.value), info.value
    kept = sorted(p.name for p in tmp_path.glob("model_*.pth"))
    assert kept == ["model_0000006.pth", "model_0000007.pth", "model_0000008.pth"], kept
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000008.pth"
    for iteration, ratio in ((9, 6), (10, 7)):
        assert (f"No checkpoint after iteration {iteration}: the gradient norm was {ratio}x its median at the last "
                "iteration, above half MONITOR.EXPLOSION_FACTOR (10)") in log
    monkeypatch.setattr(ExplosionGuard, "check", check)
    cli(["--resume", *args, "SOLVER.BASE_LR", "0.005", "SOLVER.MAX_ITER", "12"])
    resumed = (tmp_path / "log.txt").read_text()[len(log):]
    assert "Starting training from iteration 9" in resumed
    assert "initial_lr 0.02 -> 0.005" in resumed
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 11 and all(bool(torch.isfinite(v).all()) for v in final["model"].values()
                                            if v.is_floating_point())


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_within_its_shutdown_timeout(tmp_path, free_port):
    """torchrun forwards SIGTERM to its workers and kills them --shutdown-timeout seconds later (default 30): the
    workers finish their step, write a checkpoint and exit within it, and --resume continues."""
    import signal
    import sys

    common = ["--config-file", "configs/shapes/sgd.yaml", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.CHECKPOINT_PERIOD",
              "1000", "DATASETS.TEST", "()", "MONITOR.PERIOD", "1", "OUTPUT_DIR", str(tmp_path)]
    proc = start_and_wait_for_iteration([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                         "--master-addr", "127.0.0.1", "--master-port", str(free_port),
                                         "train_net.py", *common, "SOLVER.MAX_ITER", "500"], tmp_path)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert "Stopped by a stop signal (SIGTERM / SIGUSR1) after iteration" in log, log[-3000:]
    assert "forcefully exiting" not in log, log[-3000:]  # torchrun did not have to kill them after its grace period
    iteration = torch.load(tmp_path / (tmp_path / "last_checkpoint").read_text().strip(), map_location="cpu",
                           weights_only=False)["iteration"]
    resumed = run_python("train_net.py", "--num-gpus", "2", "--dist-url", "auto", "--resume", *common,
                         "SOLVER.MAX_ITER", str(iteration + 2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Starting training from iteration {iteration + 1}" in resumed.stdout + resumed.stderr
