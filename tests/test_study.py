"""The large-batch study (bench/large_batch_study.py runs it, largebatch.analysis.study reads it): the study arms
resolve to the documented recipes, the report marks divergence, the gradient-variance records are read and drawn,
and a real ``--quick`` run of the script (two runs, 3 iterations each, 2 workers, its own data and pre-trained
backbone) writes parsed tables and both figures."""
import json
import os

import pytest

from helpers import REPO, run_python
from largebatch.analysis import study
from largebatch.analysis.plots import plot_grad_variance, plot_study

STUDY_CONFIGS = os.path.join(REPO, "configs", "shapes", "study")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(arm):
    return os.path.join(STUDY_CONFIGS, arm + ".yaml")


@pytest.fixture(autouse=True)
def _datasets(monkeypatch):
    monkeypatch.setenv("LARGEBATCH_DATASETS", os.environ.get("LARGEBATCH_DATASETS", os.path.join(REPO, "datasets")))


# arm -> (optimizer, total batch, resolved LR, iterations for 5 epochs of the embedded 1024 images)
EXPECTED = {
    "sgd_b4": ("SGD", 4, 0.005, 1280),
    "sgd_b64_linear": ("SGD", 64, 0.08, 80),
    "agvm_sgd_b64": ("SGD + AGVM (tau 10)", 64, 0.08, 80),
    "lars_b64": ("LARS (eta 1)", 64, 0.0008, 80),
    "lamb_b64": ("LAMB", 64, 0.00096, 80),
    "pmdlamb_b64": ("PMDLAMB (alpha 0.012, T 25)", 64, 0.08, 80),
    "agvm_adamw_b64": ("ADAMW + AGVM (tau 10)", 64, 0.0004, 80),
    "sgd_b256_linear": ("SGD", 256, 0.32, 20),
    "sgd_b256_sqrt": ("SGD", 256, 0.02 * 8 * 2 ** 0.5, 20),
    "lars_b256": ("LARS (eta 1)", 256, 0.0008, 20),
    "sgd_b64_linear_bn": ("SGD", 64, 0.08, 80),
}
KNOWN = ("sgd_b4", "sgd_b64_linear", "agvm_sgd_b64", "pmdlamb_b64", "lars_b64", "lamb_b64", "agvm_adamw_b64",
         "sgd_b256_linear", "sgd_b256_sqrt", "lars_b256", "sgd_b64_linear_bn")


def test_every_study_arm_resolves_to_its_documented_recipe():
    found = {f[: -len(".yaml")] for f in os.listdir(STUDY_CONFIGS) if f.endswith(".yaml")}
    assert found == set(EXPECTED) | {"Base-Study"}
    opts = study.arm_overrides(epochs=5)
    for arm, (optimizer, batch, lr, iters) in EXPECTED.items():
        info = study.resolve_arm(arm, _config(arm), opts, 2)
        assert (info["optimizer"], info["total_batch"], info["max_iter"]) == (optimizer, batch, iters), arm
        assert info["lr"] == pytest.approx(lr), arm
    # the study's own split (3200 images, 5 epochs): every batch-64 arm takes >= 250 optimizer steps, 16x batch 4
    for arm in KNOWN[1:7]:
        assert 5 * 3200 // EXPECTED[arm][1] >= 250 and EXPECTED[arm][1] == 16 * EXPECTED["sgd_b4"][1], arm


@pytest.mark.slow
def test_unknown_arm_is_one_error_that_lists_the_arms():
    result = run_python("bench/large_batch_study.py", "--arms", "sgd_b4,nope", "--report-only", timeout=60)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.endswith(f"--arms: unknown arm(s) nope; known: {', '.join(KNOWN)}"), result.stderr


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
        {"iteration": 31, "total_loss": 1.2, "explosion_ratio_max": 2.46}, {"iteration": 32, "bbox/AP": 30.5,
                                                                          "bbox/AP50": 55.25},
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
    assert "| ok | LARS | 64 | 32 | 0.08 | 30.50 | 55.25 | 1.200 | 2.5 | 1:15 | 2:20 | 2.1 | no |" in text
    assert "| bad | LARS | 64 | 32 | 0.0008 | 0.00 | 0.00 | 7.500 | - |" in text and "yes (iteration 20)" in text
    png = os.path.join(tmp_path, "study.png")
    plot_study(rows, png)
    with open(png, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    # finished / diverged runs with the same settings are reused, an unfinished one is not
    assert study.is_done(ok, dict(info, arm="ok"), [], 2) and study.is_done(bad, info, [], 2)
    assert not study.is_done(ok, dict(info, arm="ok"), ["SOLVER.MAX_ITER", "3"], 2)
    assert not study.is_done(ok, dict(info, max_iter=64), [], 2)


def test_grad_var_records_summary_and_figure(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    lines = [{"format": "largebatch.layer_stats/1", "names": ["a"], "parts": ["backbone"], "groups": [0]},
             {"iter": 0, "lr": [0.1], "trust_ratio": [1.0], "grad_var": {"backbone": 0.5, "fpn": 0.25}},
             {"iter": 5, "lr": [0.1], "trust_ratio": [1.0]},  # a record without a measurement
             {"iter": 10, "lr": [0.1], "trust_ratio": [1.0], "grad_var": {"backbone": 1.2, "fpn": 0.4}},
             {"iter": 15, "lr": [0.1], "trust_ratio": [1.0], "grad_var": {"backbone": 0.8, "fpn": None}}]
    (d / "layer_stats.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    records = study.grad_var_records(str(d))
    assert records == [(0, {"backbone": 0.5, "fpn": 0.25}), (10, {"backbone": 1.2, "fpn": 0.4}),
                       (15, {"backbone": 0.8})]
    row = {"arm": "run", "total_batch": 64, "iters_per_epoch": 10.0}
    summary = study.phi_summary(row, records, "SyncBN")  # after 1 epoch = 10 iterations: records 10 and 15
    assert summary["records"] == 2 and summary["backbone_above_1"] == "1 of 2"
    assert summary["mean"] == {"backbone": pytest.approx(1.0), "fpn": pytest.approx(0.4)}
    png = str(tmp_path / "grad_var.png")
    plot_grad_variance([dict(row, grad_var=records), dict(row, arm="other", total_batch=4, grad_var=[])], png)
    with open(png, "rb") as f:
        assert f.read(8) == PNG_MAGIC


@pytest.mark.slow
def test_quick_study_writes_parsed_tables_and_figures(tmp_path):
    out, data = str(tmp_path / "study"), str(tmp_path / "data")
    result = run_python("bench/large_batch_study.py", "--quick", "--arms", "sgd_b4,sgd_b64_linear", "--output", out,
                        "--data-root", data, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(os.path.join(out, "study.md")) as f:
        md = f.read()
    expected = {"sgd_b4": ["sgd_b4", "SGD", "4", "3", "0.005"], "sgd_b64_linear": ["sgd_b64_linear", "SGD", "64", "3",
                                                                                    "0.08"]}
    for arm, head in expected.items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {arm} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:5] == head, row
        ap, ap50, loss = float(cells[5]), float(cells[6]), float(cells[7])
        assert ap >= 0 and ap50 >= 0 and loss > 0 and cells[-1] == "no", row
        # the monitor measured grad_var (at iteration 0 at least: it records when iter % MONITOR.PERIOD == 0)
        assert study.grad_var_records(os.path.join(out, arm)), arm
    # its own split of the generator and the pre-trained backbone, passed to every arm
    assert "256 training / 64 validation images" in md and "pre-trained here" in md
    assert os.path.isfile(os.path.join(data, "pretrained", "shapes_backbone_512x1.pth"))
    with open(os.path.join(out, "sgd_b4", "train.log")) as f:
        log = f.read()
    assert "shapes_backbone_512x1.pth" in log and "shapes_study_train" in log
    for name in ("study.png", "grad_var.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == PNG_MAGIC
    # the runs are reusable: a second invocation reruns nothing
    again = run_python("bench/large_batch_study.py", "--quick", "--arms", "sgd_b4", "--output", out, "--data-root",
                       data, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", timeout=200)
    assert again.returncode == 0 and "finished run found" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    # make study's second command: Phi with SyncBN and per-worker BN at the study's weights, from its study.json
    phi = run_python("bench/syncbn_phi.py", "--study", out, "--iters", "2", timeout=400)
    assert phi.returncode == 0, phi.stdout[-3000:] + phi.stderr[-3000:]
    with open(os.path.join(out, "syncbn_phi", "syncbn_phi.json")) as f:
        runs = json.load(f)
    assert set(runs) == {"start_syncbn", "start_bn", "trained_syncbn", "trained_bn", "trained_split_syncbn",
                         "trained_split_bn"}
    assert all(len(run["records"]) == 2 for run in runs.values()), {k: len(r["records"]) for k, r in runs.items()}


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


# ---------------------------------------------------------------------------------------------------------------
# the sweep at the critical batch (bench/study_sweep.py)
# ---------------------------------------------------------------------------------------------------------------
def _sweep_info(arm, recipe, **overrides):
    from largebatch.config import load_config

    cfg = load_config(_config(recipe), study.arm_overrides(epochs=3), 2)
    steps = overrides.pop("steps")
    batch, mult = overrides.pop("batch"), overrides.pop("mult")
    opts = study.arm_overrides(epochs=3) + study.sweep_overrides(cfg, batch, mult, steps)
    return opts, study.resolve_arm(arm, _config(recipe), opts, 2)


def test_sweep_moves_each_recipe_by_its_own_rule():
    assert study.sweep_run_name("lamb_b64", 48, 0.5) == "lamb_b48_x0.5"
    assert study.sweep_run_name("sgd_b64_linear", 192, 2.0) == "sgd_linear_b192_x2"
    assert study.sweep_run_name("sgd_b4", 4, 1.0) == "sgd_b4_x1"
    # MegDet's linear rule at 192 x0.5, its warm-up from the batch-16 LR; ~20 monitor records
    opts, info = _sweep_info("a", "sgd_b64_linear", batch=192, mult=0.5, steps=24)
    assert info["total_batch"] == 192 and info["lr"] == pytest.approx(0.02 * 192 / 16 * 0.5)
    assert opts[opts.index("SOLVER.WARMUP_FACTOR") + 1] == repr(16 / 192)
    assert opts[opts.index("MONITOR.PERIOD") + 1] == "1"
    # AGVM's linear-then-sqrt above 128; no warm-up factor of its own (it warms up from 0.001x)
    opts, info = _sweep_info("a", "agvm_sgd_b64", batch=192, mult=1.0, steps=24)
    assert info["lr"] == pytest.approx(0.02 * 128 / 16 * (192 / 128) ** 0.5) and "SOLVER.WARMUP_FACTOR" not in opts
    # LARS: no scaling rule, the multiplier alone
    _, info = _sweep_info("a", "lars_b64", batch=48, mult=2.0, steps=96)
    assert info["total_batch"] == 48 and info["lr"] == pytest.approx(0.0016)
    # PMD-LAMB: T stays 10% of the run
    opts, info = _sweep_info("a", "pmdlamb_b64", batch=48, mult=1.0, steps=96)
    assert info["optimizer"] == "PMDLAMB (alpha 0.012, T 10)" and info["lr"] == pytest.approx(0.02 * 3)
    assert opts[opts.index("MONITOR.PERIOD") + 1] == "5"


def test_sweep_table_compares_each_recipes_best_with_the_baselines_best():
    def row(recipe, batch, mult, ap, diverged=False):
        return {"recipe": recipe, "total_batch": batch, "multiplier": mult, "ap": ap, "diverged": diverged}

    baseline = [row("sgd_b4", 4, 0.5, 30.0), row("sgd_b4", 4, 1.0, 32.0), row("sgd_b4", 4, 2.0, 31.0)]
    best = study.best_run(baseline)
    assert best["multiplier"] == 1.0
    rows = [row("lars_b64", 48, 0.5, 30.5), row("lars_b64", 48, 1.0, 31.5), row("lars_b64", 48, 2.0, 29.0),
            row("lars_b64", 192, 0.5, 12.0), row("lars_b64", 192, 1.0, 0.0, diverged=True),
            row("lars_b64", 192, 2.0, None)]
    text = study.sweep_table(rows, best, [48, 192], [0.5, 1.0, 2.0])
    line = next(x for x in text.splitlines() if x.startswith("| lars_b64 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:7] == ["30.50", "**31.50**", "29.00", "**12.00**", "0.00 (diverged)", "-"], line
    assert cells[7] == "keeps (-0.50 AP, x1)" and cells[8] == "loses (-20.00 AP, x0.5)", line


@pytest.mark.slow
def test_quick_sweep_runs_the_baseline_and_a_recipe_at_the_same_multipliers(tmp_path):
    out, data = str(tmp_path / "sweep"), str(tmp_path / "data")
    result = run_python("bench/study_sweep.py", "--quick", "--recipes", "lars_b64", "--batches", "8",
                        "--lr-multipliers", "2", "--output", out, "--data-root", data, "--from-scratch",
                        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))) == ["lars_b8_x2", "sgd_b4_x2"]
    with open(os.path.join(out, "sweep.md")) as f:
        md = f.read()
    assert "| recipe | B 8 x2 | best at B 8 against the baseline |" in md, md
    line = next(x for x in md.splitlines() if x.startswith("| lars_b64 |"))
    assert "AP, x2)" in line and ("keeps" in line or "loses" in line), line
    for run, lr in (("sgd_b4_x2", "| 0.01 |"), ("lars_b8_x2", "| 0.0016 |")):  # 0.005 x2, 0.0008 x2
        line = next(x for x in md.splitlines() if x.startswith(f"| {run} |"))
        assert lr in line and line.endswith("| no |"), line
    with open(os.path.join(out, "sweep.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC
