"""The large-batch study (bench/large_batch_study.py runs it, largebatch.analysis.study reads it): the study arms
resolve to the documented recipes, the report marks divergence, and a tiny real run of the script (one arm,
2 iterations, 1 worker) writes a parsed table and a PNG."""
import json
import os

import pytest

from helpers import REPO, run_python
from largebatch.analysis import study
from largebatch.analysis.plots import plot_study

STUDY_CONFIGS = os.path.join(REPO, "configs", "shapes", "study")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(arm):
    return os.path.join(STUDY_CONFIGS, arm + ".yaml")


@pytest.fixture(autouse=True)
def _datasets(monkeypatch):
    monkeypatch.setenv("LARGEBATCH_DATASETS", os.environ.get("LARGEBATCH_DATASETS", os.path.join(REPO, "datasets")))


# arm -> (optimizer, total batch, resolved LR, iterations for 6 epochs of 1024 images)
EXPECTED = {
    "sgd_b8": ("SGD", 8, 0.01, 768),
    "sgd_b64_linear": ("SGD", 64, 0.08, 96),
    "lars_b64": ("LARS (eta 1)", 64, 0.0008, 96),
    "lamb_b64": ("LAMB", 64, 0.00096, 96),
    "pmdlamb_b64": ("PMDLAMB (alpha 0.012, T 16)", 64, 0.08, 96),
    "agvm_sgd_b64": ("SGD + AGVM (tau 10)", 64, 0.08, 96),
}


def test_every_study_arm_resolves_to_its_documented_recipe():
    assert {f[: -len(".yaml")] for f in os.listdir(STUDY_CONFIGS) if f.endswith(".yaml")} == set(EXPECTED)
    opts = study.arm_overrides(epochs=6)
    for arm, (optimizer, batch, lr, iters) in EXPECTED.items():
        info = study.resolve_arm(arm, _config(arm), opts, 2)
        assert (info["optimizer"], info["total_batch"], info["max_iter"]) == (optimizer, batch, iters), arm
        assert info["lr"] == pytest.approx(lr), arm


@pytest.mark.slow
def test_unknown_arm_is_one_error_that_lists_the_arms():
    result = run_python("bench/large_batch_study.py", "--arms", "sgd_b8,nope", "--report-only", timeout=60)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.endswith(f"--arms: unknown arm(s) nope; known: {', '.join(EXPECTED)}"), result.stderr


def _fake_arm(root, arm, metrics, returncode, log):
    d = os.path.join(root, arm)
    os.makedirs(d)
    with open(os.path.join(d, "metrics.json"), "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)
    with open(os.path.join(d, "train.log"), "w") as f:
        f.write(log)
    result = {"returncode": returncode, "diverged": returncode != 0 and "diverged" in log, "wall_s": 75.0,
              "cpu_s": 140.0, "load_avg": 2.1, "overrides": [], "num_workers": 2}
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump(result, f)
    return d


def test_report_marks_a_diverged_arm_with_ap_zero(tmp_path):
    info = {"arm": "x", "config": "", "optimizer": "LARS", "total_batch": 64, "lr": 0.0008, "max_iter": 32,
            "iters_per_epoch": 16.0, "train_images": 1024}
    ok = _fake_arm(tmp_path, "ok", [
        {"iteration": 15, "total_loss": 1.5}, {"iteration": 15, "bbox/AP": 10.0, "bbox/AP50": 20.0},
        {"iteration": 31, "total_loss": 1.2}, {"iteration": 32, "bbox/AP": 30.5, "bbox/AP50": 55.25},
    ], 0, "BASE_LR 0.02 -> 0.08 (rule linear, total batch 64, reference 16, factor 4)\n")
    bad = _fake_arm(tmp_path, "bad", [{"iteration": 19, "total_loss": 7.5}], 1,
                    "FloatingPointError: Training diverged at iteration 20: non-finite losses total_loss=nan\n")
    d2_nan = _fake_arm(tmp_path, "d2_nan", [{"iteration": 19, "total_loss": 1.1}, {"iteration": 23, "total_loss": 1.2}],
                       1, "FloatingPointError: Predicted boxes or scores contain Inf/NaN. Training has diverged.\n")
    rows = [study.summarize_arm(ok, dict(info, arm="ok")), study.summarize_arm(bad, dict(info, arm="bad"))]
    nan_row = study.summarize_arm(d2_nan, dict(info, arm="d2_nan"))  # detectron2's own check names no iteration
    assert nan_row["diverged"] and nan_row["diverged_at"] == 23 and nan_row["ap50"] == 0.0
    assert rows[0]["finished"] and not rows[0]["diverged"] and rows[0]["lr"] == 0.08
    assert rows[0]["ap_curve"] == [(1.0, 10.0, 20.0), (2.0, 30.5, 55.25)]
    assert rows[1]["diverged"] and rows[1]["ap"] == 0.0 and rows[1]["diverged_at"] == 20
    text = study.table(rows)
    assert "| ok | LARS | 64 | 32 | 0.08 | 30.50 | 55.25 | 1.200 | 1:15 | 2:20 | 2.1 | no |" in text
    assert "| bad | LARS | 64 | 32 | 0.0008 | 0.00 | 0.00 | 7.500 |" in text and "yes (iteration 20)" in text
    png = os.path.join(tmp_path, "study.png")
    plot_study(rows, png)
    with open(png, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    # finished / diverged runs with the same settings are reused, an unfinished one is not
    assert study.is_done(ok, dict(info, arm="ok"), [], 2) and study.is_done(bad, info, [], 2)
    assert not study.is_done(ok, dict(info, arm="ok"), ["SOLVER.MAX_ITER", "3"], 2)
    assert not study.is_done(ok, dict(info, max_iter=64), [], 2)


@pytest.mark.slow
def test_tiny_study_run_writes_a_parsed_table_and_a_png(tmp_path):
    out = str(tmp_path / "study")
    result = run_python("bench/large_batch_study.py", "--arms", "sgd_b8", "--max-iter", "2", "--num-workers", "1",
                        "--output", out, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(os.path.join(out, "study.md")) as f:
        md = f.read()
    row = next(line for line in md.splitlines() if line.startswith("| sgd_b8 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:5] == ["sgd_b8", "SGD", "8", "2", "0.01"], row
    ap, ap50, loss = float(cells[5]), float(cells[6]), float(cells[7])
    assert ap >= 0 and ap50 >= 0 and loss > 0, row
    assert cells[-1] == "no", row
    with open(os.path.join(out, "study.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC
    # the run is reusable: same settings -> done
    opts = study.arm_overrides(max_iter=2, opts=["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    assert study.is_done(os.path.join(out, "sgd_b8"), study.resolve_arm("sgd_b8", _config("sgd_b8"), opts, 1), opts, 1)


def test_evaluations_missing_from_metrics_json_are_read_from_the_log():
    # epoch = 16 iterations < detectron2's writer period (20): metrics.json keeps the evaluation at 79, not 63
    info = {"max_iter": 96, "eval_period": 16}
    assert study.eval_iterations(info) == [15, 31, 47, 63, 79, 96]
    log = "".join(f"[t] d2.evaluation.testing INFO: copypaste: AP,AP50,AP75,APs,APm,APl\n"
                  f"[t] d2.evaluation.testing INFO: copypaste: {ap:.4f},{2 * ap:.4f},0.0,0.0,0.0,nan\n"
                  for ap in (1, 2, 3, 4, 5, 6))
    metrics = [{"iteration": it, "bbox/AP": ap + 0.00001, "bbox/AP50": 2 * ap} for it, ap in
               ((15, 1), (31, 2), (47, 3), (79, 5), (96, 6))]
    evals = study.merge_evals(metrics, log, study.eval_iterations(info))
    assert [it for it, *_ in evals] == [15, 31, 47, 63, 79, 96]
    assert evals[3] == (63, 4.0, 8.0) and evals[4] == (79, 5.00001, 10)
