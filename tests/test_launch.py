"""How workers start, from the config's device and the scheduler's environment (CUDA / NCCL paths checked on CPU).

A machine whose torch reports a GPU is faked by ``fake_gpu_machine.py`` (it raises on any real CUDA call); the
CUDA code paths themselves run in ``test_cuda.py`` on a GPU (tools/gpu_check.sh)."""
import json
import os
import subprocess

import pytest
import torch

from helpers import REPO, run_python, script_env

FAKE = os.path.join(REPO, "tests", "fake_gpu_machine.py")


def _run_on_fake_gpu_machine(*args, timeout=300):
    return run_python(FAKE, *args, timeout=timeout, env=script_env(CUDA_VISIBLE_DEVICES=None))


@pytest.mark.slow
def test_cpu_config_trains_on_two_workers_where_torch_reports_a_gpu(tmp_path):
    """MODEL.DEVICE cpu on a 1-GPU machine, --num-gpus 2: two gloo workers train and evaluate, no CUDA call."""
    result = _run_on_fake_gpu_machine(
        "train_net", "--num-gpus", "2", "--dist-url", "auto", "--config-file", "configs/shapes/sgd.yaml",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "0", "SOLVER.STEPS", "()",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "OUTPUT_DIR", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "World size: 2" in log and "copypaste: AP,AP50" in log
    # the run's last word on scaling: iteration 0 measured the gradient noise scale
    assert "Gradient noise scale (B_simple, McCandlish et al. 2018; 1 measurement): " in log
    assert "this run's batch 4 images; per part: backbone " in log
    assert os.path.exists(tmp_path / "model_final.pth")


@pytest.mark.slow
def test_launch_of_a_cpu_device_uses_gloo_workers_that_see_no_gpu(tmp_path):
    result = _run_on_fake_gpu_machine("launch", str(tmp_path), "cpu", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    views = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert all(v == {"backend": "gloo", "cuda_available": False, "world_size": 2, "CUDA_VISIBLE_DEVICES": ""}
               for v in views), views
    assert "CUDA_VISIBLE_DEVICES after launch: <unset>" in result.stdout  # the parent's environment is restored


def test_launch_of_a_cuda_device_wants_a_gpu_per_worker(monkeypatch):
    from largebatch import launch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="--num-gpus 2 is more than the 1 GPUs of this machine"):
        launch(print, 2, dist_url="auto", device="cuda")
    with pytest.raises(Exception, match="MODEL.DEVICE = 'tpu' is not allowed: expected cuda, cuda:N or cpu"):
        launch(print, 2, dist_url="auto", device="tpu")


@pytest.mark.parametrize("visible, local_rank, expected", [(1, 0, 0), (1, 5, 0), (4, 3, 3), (2, 3, None), (0, 0, None)])
def test_local_cuda_device(monkeypatch, visible, local_rank, expected):
    """One visible GPU is the task's own whatever its LOCAL_RANK (SLURM --gpus-per-task 1); several are indexed
    by LOCAL_RANK; too few is a clear error, not 'invalid device ordinal'."""
    from largebatch.engine.launch import local_cuda_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    if expected is None:
        with pytest.raises(RuntimeError, match="GPU"):
            local_cuda_device(local_rank)
    else:
        assert local_cuda_device(local_rank) == expected


def _local_size_worker(rank, world_size, env):
    from largebatch.engine.launch import _torchrun_local_size

    os.environ.pop("LOCAL_WORLD_SIZE", None)
    os.environ.update(env[rank])
    try:
        return _torchrun_local_size(int(os.environ["LOCAL_RANK"]))
    except RuntimeError as e:
        return str(e)


@pytest.mark.parametrize("env, expected", [
    ([{"LOCAL_RANK": "0"}, {"LOCAL_RANK": "1"}], [2, 2]),  # no LOCAL_WORLD_SIZE: counted from the host names
    ([{"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}], [1, 1]),
    ([{"LOCAL_RANK": "0"}, {"LOCAL_RANK": "0"}], "expected the same number of workers on every machine"),
])
def test_torchrun_local_world_size(env, expected, run_workers):
    sizes = run_workers(_local_size_worker, 2, env, timeout=60)
    if isinstance(expected, str):
        assert any(expected in str(s) for s in sizes), sizes
    else:
        assert sizes == expected


def test_ddp_gets_the_current_gpu_not_the_local_rank(monkeypatch):
    """With one visible GPU per task the local rank is not a device ordinal: DDP gets the device the launcher set."""
    from detectron2.config import get_cfg

    from largebatch.engine import trainer as trainer_module

    seen = {}
    monkeypatch.setattr(trainer_module.comm, "get_world_size", lambda: 8)
    monkeypatch.setattr(trainer_module.comm, "get_local_rank", lambda: 5)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(trainer_module, "DistributedDataParallel", lambda model, **kw: seen.update(kw) or model)
    cfg = get_cfg()
    cfg.MODEL.DEVICE = "cuda"
    trainer_module.LargeBatchTrainer.wrap_model(cfg, torch.nn.Linear(1, 1))
    assert seen["device_ids"] == [0]
    cfg.MODEL.DEVICE = "cpu"
    trainer_module.LargeBatchTrainer.wrap_model(cfg, torch.nn.Linear(1, 1))
    assert seen["device_ids"] is None


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_here(tmp_path):
    """tools/gpu_check.sh --dry-run: what needs no GPU runs (environment, collecting the cuda tests, the commands'
    syntax); the GPU steps are listed as SKIP."""
    import sys

    result = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path), "--dry-run"], cwd=REPO,
                            env=script_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    table = (tmp_path / "summary.txt").read_text()
    assert "a_env        PASS" in table and "b_pytest     SKIP" in table and "tests collected" in table, table
