"""The dense-prediction pipelines AGVM covers, end to end on 2 CPU workers: RetinaNet, Semantic FPN and Panoptic FPN
(configs/shapes/{retinanet,semantic_fpn,panoptic_fpn}.yaml) train with SyncBN, AGVM and the monitor, resume exactly
from a checkpoint (as after a kill -9), and ``--eval-only`` of the final weights reproduces the task's metric of the
end of training (COCO box AP, mIoU, PQ); detectron2's own model-zoo RetinaNet YAML plus largebatch keys trains with
LAMB + AGVM (configs/shapes/retinanet_model_zoo.yaml)."""
import json
import os
import shutil

import pytest
import torch

from helpers import run_python

#: config -> (the evaluation's metric as metrics.json names it, its copypaste task, the parts AGVM modulates)
PIPELINES = {
    "retinanet": ("bbox/AP50", "bbox", {"backbone", "fpn", "head"}),
    "semantic_fpn": ("sem_seg/mIoU", "sem_seg", {"backbone", "fpn", "sem_seg_head"}),
    "panoptic_fpn": ("panoptic_seg/PQ", "panoptic_seg",
                     {"backbone", "fpn", "rpn", "box_head", "mask_head", "sem_seg_head"}),
}
# 6 iterations of batch 4 (2 per worker), a checkpoint every 2, AGVM and the monitor from iteration 0 every 2
SHORT = ["SOLVER.SCHEDULE_UNIT", "iter", "SOLVER.MAX_ITER", "6", "SOLVER.IMS_PER_BATCH", "4",
         "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.AGVM.START_ITER", "0",
         "SOLVER.AGVM.INTERVAL", "2", "MONITOR.PERIOD", "2"]


def _train(name, out, *opts, resume=False):
    result = run_python("train_net.py", "--num-gpus", "2", "--dist-url", "auto", *(["--resume"] if resume else []),
                        "--config-file", f"configs/shapes/{name}.yaml", *SHORT, "OUTPUT_DIR", str(out), *opts)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def _copypaste(log, task):
    """The numbers of detectron2's copypaste lines for ``task`` (``Task: bbox`` then the names, then the values)."""
    lines = [line.split("copypaste: ", 1)[1] for line in log.splitlines() if "copypaste: " in line]
    i = lines.index(f"Task: {task}")
    return dict(zip(lines[i + 1].split(","), map(float, lines[i + 2].split(","))))


@pytest.fixture(scope="module", params=sorted(PIPELINES))
def pipeline_run(request, tmp_path_factory):
    """One pipeline trained 6 iterations (evaluated at the end), then from its checkpoint of iteration 4 (as a kill
    -9 after it leaves it) resumed to the end in another folder."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    whole = root / "whole"
    _train(name, whole)
    resumed = root / "resumed"
    resumed.mkdir()
    shutil.copy(whole / "model_0000003.pth", resumed)
    (resumed / "last_checkpoint").write_text("model_0000003.pth")
    log = _train(name, resumed, "DATASETS.TEST", "()", resume=True)
    return name, whole, resumed, log.stdout + log.stderr


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


@pytest.mark.slow
def test_each_pipeline_trains_with_agvm_and_the_monitor_per_part(pipeline_run):
    name, whole, _, _ = pipeline_run
    metric, _, parts = PIPELINES[name]
    metrics = _metrics(whole)
    logged = set().union(*metrics)
    for kind in ("agvm_mu", "grad_var", "trust_ratio"):
        assert {k.split("/")[1] for k in logged if k.startswith(kind + "/")} == parts, (kind, sorted(logged))
    assert "explosion_ratio_max" in logged and "noise_scale/all" in logged
    assert all(torch.isfinite(torch.tensor(m["total_loss"])) for m in metrics if "total_loss" in m)
    assert metric in metrics[-1], sorted(metrics[-1])  # evaluated with its task's evaluator at the end


@pytest.mark.slow
def test_each_pipeline_resumes_to_the_uninterrupted_runs_weights(pipeline_run):
    _, whole, resumed, log = pipeline_run
    assert "Starting training from iteration 4" in log
    a, b = _weights(whole / "model_final.pth"), _weights(resumed / "model_final.pth")
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff <= 1e-6, diff


@pytest.mark.slow
def test_each_pipeline_evaluates_with_eval_only_as_at_the_end_of_training(pipeline_run):
    name, whole, _, _ = pipeline_run
    metric, task, _ = PIPELINES[name]
    result = run_python("train_net.py", "--eval-only", "--num-gpus", "2", "--dist-url", "auto", "--config-file",
                        f"configs/shapes/{name}.yaml", "MODEL.WEIGHTS", str(whole / "model_final.pth"),
                        "OUTPUT_DIR", str(whole / "eval"))
    assert result.returncode == 0, result.stderr[-3000:]
    values = _copypaste(result.stdout + result.stderr, task)
    trained = _metrics(whole)[-1][metric]
    assert values[metric.split("/")[1]] == pytest.approx(trained, abs=5e-5, nan_ok=True)  # copypaste: 4 decimals


@pytest.mark.slow
def test_a_model_zoo_retinanet_yaml_trains_with_lamb_and_agvm(tmp_path):
    """detectron2's COCO-Detection/retinanet_R_50_FPN_1x.yaml (a `model_zoo://` _BASE_) + largebatch keys: R50-FPN
    RetinaNet with LAMB + AGVM, 2 iterations on 2 workers; AGVM's mu and the trust ratios per part are logged."""
    result = run_python("train_net.py", "--num-gpus", "2", "--dist-url", "auto", "--config-file",
                        "configs/shapes/retinanet_model_zoo.yaml", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "0",
                        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.AGVM.START_ITER", "0", "SOLVER.AGVM.INTERVAL", "1",
                        "MONITOR.PERIOD", "1", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "retinanet_R_50_FPN_1x.yaml" in log and "LAMB at SOLVER.BASE_LR" in log
    logged = set().union(*_metrics(tmp_path))
    for kind in ("agvm_mu", "trust_ratio", "grad_var"):
        assert {k.split("/")[1] for k in logged if k.startswith(kind + "/")} == {"backbone", "fpn", "head"}, kind
    config = (tmp_path / "config.yaml").read_text()
    assert "RetinaNet" in config and "build_retinanet_resnet_fpn_backbone" in config and "DEPTH: 50" in config
