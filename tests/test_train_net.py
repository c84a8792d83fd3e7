"""End to end through train_net.py, as a user runs it: set-up check, CLI errors, 2-worker CPU training,
resume, eval-only and a two-"machine" launch on 127.0.0.1 (all on the embedded shapes dataset)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, import_script, run_python, script_env
from helpers import SHAPES_CONFIG as CONFIG

# a few tiny iterations; score threshold 0 so that even an untrained model has detections to evaluate
TINY = [
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
    "SOLVER.STEPS", "(3,)", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MONITOR.PERIOD", "2",
]


def train_net(*args, timeout=600):
    return run_python("train_net.py", *args, timeout=timeout)


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def _last_evaluation(output_dir):
    """The metrics.json record of the last evaluation during training."""
    return [m for m in _metrics(output_dir) if "bbox/AP50" in m][-1]


def _copypaste_values(log):
    """The numbers of the last "copypaste: AP,AP50,..." values line detectron2's evaluation logs."""
    line = [x for x in log.splitlines() if "copypaste: " in x and "," in x.split("copypaste: ")[1]][-1]
    return [float(v) for v in line.split("copypaste: ")[1].split(",")]


def test_collect_env_reports_versions(monkeypatch):
    from detectron2.utils import comm

    from largebatch.collect_env import collect_env

    text = collect_env()
    for key in ("torch", "torchvision", "detectron2", "detectron2 compiled ops", torch.__version__):
        assert key in text
    # detectron2 main still calls itself 0.6: told apart by an API only main has
    if hasattr(comm, "create_local_process_group"):
        monkeypatch.delattr(comm, "create_local_process_group")
    assert "0.6, v0.6 release" in collect_env()
    monkeypatch.setattr(comm, "create_local_process_group", lambda n: None, raising=False)
    assert "main (post-v0.6)" in collect_env()


def test_one_machine_runs_pick_a_free_port_unless_told(monkeypatch):
    """detectron2's default --dist-url port depends on the user only: two runs of one user would collide."""
    monkeypatch.chdir(REPO)
    cli_module = import_script("train_net.py")
    urls = []
    monkeypatch.setattr(cli_module, "launch", lambda *a, dist_url=None, **k: urls.append(dist_url))
    monkeypatch.setattr(cli_module, "hide_gpus", lambda: None)  # would hide GPUs from the rest of this process
    cli_module.cli(["--num-gpus", "2", "--config-file", CONFIG])
    cli_module.cli(["--num-gpus", "2", "--dist-url", "tcp://127.0.0.1:12345", "--config-file", CONFIG])
    assert urls == ["auto", "tcp://127.0.0.1:12345"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config-file", "configs/shapes/nope.yaml"], "no such file"),
        (["--config-file", CONFIG, "SOLVER.NOT_A_KEY", "1"], "unknown config key 'SOLVER.NOT_A_KEY'"),
        (["--config-file", CONFIG, "SOLVER.OPTIMIZER", "adam"], "SOLVER.OPTIMIZER = 'adam' is not allowed"),
        (["--config-file", CONFIG, "SOLVER.LR_SCHEDULER_NAME", "Step"], "expected one of WarmupMultiStepLR"),
        (["--config-file", CONFIG, "--eval-only"], "--eval-only: MODEL.WEIGHTS"),
        (["--config-file", CONFIG, "SOLVER.IMS_PER_BATCH", "1"],
         "SOLVER.IMS_PER_BATCH = 1 is not allowed on one worker"),
        (["--config-file", CONFIG, "SOLVER.MAX_ITER", "5", "--resume"], "'--resume' is an argument, not a config key"),
        (["--num-gpus", "3", "--config-file", CONFIG, "SOLVER.IMS_PER_BATCH", "4"],
         "SOLVER.IMS_PER_BATCH = 4 is not allowed on 3 workers: expected a multiple of the number of workers"),
        (["--config-file", CONFIG, "MODEL.DEVICE", "tpu"], "MODEL.DEVICE = 'tpu' is not allowed: expected cuda"),
        (["--num-gpus", "0", "--config-file", CONFIG], "--num-gpus 0 is not allowed: expected a number >= 1"),
        (["--config-file", CONFIG, "SOLVER.MOMENTUM", "1.5"], "SOLVER.MOMENTUM = 1.5 is not allowed: expected"),
        (["--config-file", CONFIG, "SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD = 0 is not allowed"),
        (["--config-file", CONFIG, "MODEL.WEIGHTS", "/nope/R-50.pkl"],
         "MODEL.WEIGHTS = '/nope/R-50.pkl' is not allowed: expected an existing file"),
        (["--config-file", "tests/data/bad_syntax.yaml"], "tests/data/bad_syntax.yaml: "),
        (["--config-file", CONFIG, "OUTPUT_DIR", "README.md"], "OUTPUT_DIR = 'README.md' is not allowed: expected a"),
        (["--config-file", CONFIG, "MODEL.ROI_HEADS.NUM_CLASSES", "2"],
         "MODEL.ROI_HEADS.NUM_CLASSES = 2 is not allowed: 'shapes_train' has 3 thing classes: expected >= 3"),
        (["--config-file", "configs/shapes/retinanet.yaml", "MODEL.RETINANET.NUM_CLASSES", "2"],
         "MODEL.RETINANET.NUM_CLASSES = 2 is not allowed: 'shapes_train' has 3 thing classes: expected >= 3"),
        (["--config-file", "configs/shapes/semantic_fpn.yaml", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3"],
         "MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3 is not allowed: 'shapes_sem_seg_train' has 4 stuff classes: expected"),
        (["--config-file", "configs/shapes/panoptic_fpn.yaml", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "1"],
         "MODEL.SEM_SEG_HEAD.NUM_CLASSES = 1 is not allowed: 'shapes_panoptic_train_separated' has 2 stuff classes"),
        (["--config-file", "tests/data/unknown_model_zoo_base.yaml"],
         "_BASE_ model_zoo://COCO-Detection/retinanet_R_5_FPN_1x.yaml is not a config of detectron2's model zoo"),
        (["--machine-rank", "2", "--num-machines", "2", "--config-file", CONFIG],
         "--machine-rank 2 is not allowed with --num-machines 2: expected 0 to 1"),
        (["--dist-timeout", "0", "--config-file", CONFIG], "--dist-timeout 0.0 is not allowed: expected minutes > 0"),
        (["--heartbeat-timeout", "0.5", "--config-file", CONFIG],
         "--heartbeat-timeout 0.5 is not allowed: expected seconds >= 1"),
        (["--config-file", CONFIG, "DATASETS.TEST", "('shapes_vall',)"],
         "DATASETS.TEST = ('shapes_vall',) is not allowed: 'shapes_vall' is not a registered dataset"),
        (["--config-file", CONFIG, "DATASETS.TRAIN", "()"], "DATASETS.TRAIN = () is not allowed: expected at least"),
        (["--config-file", CONFIG, "DATALOADER.NUM_WORKERS", "-1"], "DATALOADER.NUM_WORKERS = -1 is not allowed"),
        (["--config-file", CONFIG, "INPUT.MIN_SIZE_TRAIN", "(0,)"], "INPUT.MIN_SIZE_TRAIN = (0,) is not allowed"),
        (["--config-file", CONFIG, "INPUT.FORMAT", "XYZ"], "INPUT.FORMAT = 'XYZ' is not allowed: expected one of BGR"),
        (["--config-file", CONFIG, "SOLVER.GAMMA", "0"], "SOLVER.GAMMA = 0.0 is not allowed: expected a number > 0"),
        (["--config-file", CONFIG, "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "-1"],
         "SOLVER.CLIP_GRADIENTS.CLIP_VALUE = -1.0 is not allowed: expected a number > 0"),
        (["--num-gpus", "2", "--config-file", CONFIG, "MODEL.SYNC_BN.ENABLED", "True", "MODEL.SYNC_BN.GROUP_SIZE", "3"],
         "MODEL.SYNC_BN.GROUP_SIZE = 3 is not allowed: expected a divisor of the 2 workers"),
        (["--config-file", CONFIG, "OUTPUT_DIR", "/proc/largebatch"],
         "OUTPUT_DIR = '/proc/largebatch' is not allowed: it cannot be created (FileNotFoundError"),
        (["--num-gpus", "2", "--dist-url", "localhost:1234", "--config-file", CONFIG],
         "--dist-url localhost:1234 is not allowed: expected tcp://HOST:PORT"),
        (["--num-gpus", "2", "--dist-url", "tcp://127.0.0.1:99999", "--config-file", CONFIG],
         "--dist-url tcp://127.0.0.1:99999 is not allowed"),
        (["--num-machines", "2", "--dist-url", "auto", "--config-file", CONFIG],
         "--dist-url auto is not allowed with --num-machines 2: expected tcp://HOST:PORT of machine 0"),
        (["--num-gpus", "two", "--config-file", CONFIG], "error: argument --num-gpus: invalid int value: 'two'"),
        (["--config-file", "tests/data/missing_base.yaml"], "tests/data/missing_base.yaml: FileNotFoundError: "),
        (["--config-file", "tests/data/not_a_mapping.yaml"],
         "tests/data/not_a_mapping.yaml: expected KEY: value lines of config keys"),
        (["--config-file", CONFIG, "MODEL.BACKBONE.NAME", "build_nope_backbone"],
         "MODEL: the detector cannot be built from this config (KeyError: \"No object named 'build_nope_backbone'"),
        (["--config-file", CONFIG, "MODEL.PIXEL_STD", "[0.0, 1.0, 1.0]"],
         "MODEL.PIXEL_STD = (0.0, 1.0, 1.0) is not allowed: expected one number > 0 per MODEL.PIXEL_MEAN entry"),
        (["--config-file", CONFIG, "INPUT.RANDOM_FLIP", "diagonal"], "INPUT.RANDOM_FLIP = 'diagonal' is not allowed"),
    ],
)
def test_bad_arguments_fail_at_once_with_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    cli_module = import_script("train_net.py")

    with pytest.raises(SystemExit) as exit_info:
        cli_module.cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.slow
def test_bad_config_key_in_a_real_process_prints_no_traceback():
    result = train_net("--config-file", CONFIG, "SOLVER.OPTIMIZER", "nadam", timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: SOLVER.OPTIMIZER = 'nadam' is not allowed: expected one of SGD, ADAMW, LARS, LAMB, PMDLAMB"
    ]


@pytest.fixture(scope="module")
def two_worker_run(tmp_path_factory):
    """4 iterations on 2 CPU workers, then --resume to 6: the fixture the following tests read."""
    out = str(tmp_path_factory.mktemp("two_workers"))
    first = train_net("--num-gpus", "2", "--dist-url", "auto", "--config-file", CONFIG, *TINY,
                      "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", out)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint_4 = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    resumed = train_net("--num-gpus", "2", "--dist-url", "auto", "--resume", "--config-file", CONFIG, *TINY,
                        "SOLVER.MAX_ITER", "6", "OUTPUT_DIR", out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out, first, resumed, checkpoint_4


@pytest.mark.slow
def test_two_cpu_workers_train_with_gloo_and_ddp(two_worker_run):
    out, first, _, checkpoint = two_worker_run
    log = first.stdout + first.stderr
    assert "World size: 2" in log
    metrics = _metrics(out)
    losses = [m["total_loss"] for m in metrics if "total_loss" in m]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    # the monitor's records from the inner loop reach metrics.json
    assert any("grad_var/backbone" in m for m in metrics)
    assert any("trust_ratio/backbone" in m for m in metrics)
    # the checkpoint holds model, optimizer, scheduler and iteration (detectron2 0.6 drops the optimizer)
    assert checkpoint["iteration"] == 3
    trainer_state = checkpoint["trainer"]
    assert trainer_state["_trainer"]["optimizer"]["state"], "optimizer state missing from the checkpoint"
    assert "LRScheduler" in trainer_state["hooks"] and "MonitorHook" in trainer_state["hooks"]
    assert "bbox" in json.dumps(list(metrics[-1])) or any("bbox/AP" in m for m in metrics)


@pytest.mark.slow
def test_resume_continues_the_iteration_count_and_lr_curve(two_worker_run):
    out, _, resumed, checkpoint_4 = two_worker_run
    assert "Loading scheduler from state_dict" in resumed.stdout + resumed.stderr
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert final["iteration"] == 5
    # the scheduler went on from where it stopped: 4 steps before, 2 after
    assert checkpoint_4["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 4
    assert final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 6
    lrs = {m["iteration"]: m["lr"] for m in _metrics(out) if "lr" in m}
    assert sorted(lrs)[-1] == 5


@pytest.mark.slow
def test_eval_only_reproduces_the_ap_of_training(two_worker_run):
    out, _, resumed, _ = two_worker_run
    trained = _last_evaluation(out)
    result = train_net("--eval-only", "--config-file", CONFIG, *TINY,
                       "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "OUTPUT_DIR", out + "/eval")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    values = _copypaste_values(log)
    # the copypaste line prints 4 decimals
    assert values[1] == pytest.approx(trained["bbox/AP50"], abs=5e-5, nan_ok=True)
    assert values[0] == pytest.approx(trained["bbox/AP"], abs=5e-5, nan_ok=True)


@pytest.mark.slow
def test_eval_only_works_on_a_world_size_the_syncbn_group_does_not_divide(two_worker_run):
    """A recipe with BN groups of 4 evaluated on 2 workers: evaluation never synchronizes BN."""
    out, _, _, _ = two_worker_run
    trained = _last_evaluation(out)
    result = train_net("--eval-only", "--num-gpus", "2", "--dist-url", "auto", "--config-file", CONFIG, *TINY,
                       "MODEL.SYNC_BN.ENABLED", "True", "MODEL.SYNC_BN.GROUP_SIZE", "4",
                       "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "OUTPUT_DIR", out + "/eval_group4")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    ap = _copypaste_values(log)[0]
    assert ap == pytest.approx(trained["bbox/AP"], abs=5e-5, nan_ok=True)


@pytest.mark.slow
def test_two_machines_on_localhost_train_together(tmp_path, free_port):
    url = f"tcp://127.0.0.1:{free_port}"
    common = ["--num-gpus", "1", "--num-machines", "2", "--dist-url", url, "--config-file", CONFIG, *TINY,
              "SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]
    procs = [
        subprocess.Popen(
            [sys.executable, "train_net.py", "--machine-rank", str(rank), *common,
             "OUTPUT_DIR", str(tmp_path / str(rank))],
            cwd=REPO, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "Rank of current process: 0. World size: 2" in logs[0]
    with open(tmp_path / "1" / "log.txt.rank1") as f:  # detectron2 logs other ranks to files only
        assert "Rank of current process: 1. World size: 2" in f.read()
    # only the global main process writes checkpoints and metrics
    assert os.path.exists(tmp_path / "0" / "model_final.pth")
    assert not os.path.exists(tmp_path / "1" / "model_final.pth")


@pytest.mark.slow
def test_torchrun_workers_join_its_process_group(tmp_path, free_port):
    """Started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK set), train_net.py joins that group instead of spawning."""
    result = run_python(
        "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(free_port), "train_net.py", "--config-file", CONFIG, *TINY,
        "SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Rank of current process: 0. World size: 2" in result.stdout + result.stderr
    with open(tmp_path / "log.txt.rank1") as f:
        assert "Rank of current process: 1. World size: 2" in f.read()
    assert os.path.exists(tmp_path / "model_final.pth")


def test_a_shapes_root_holding_the_users_files_is_refused_and_left_alone(tmp_path, capsys, monkeypatch):
    """DATASETS.SHAPES_ROOT pointed at a folder with the user's own COCO data: refused, nothing deleted."""
    monkeypatch.chdir(REPO)
    users = tmp_path / "train"
    (users / "images").mkdir(parents=True)
    (users / "instances_train.json").write_text('{"images": [], "annotations": [], "categories": []}')
    (users / "images" / "0001.jpg").write_bytes(b"not ours")
    cli_module = import_script("train_net.py")
    with pytest.raises(SystemExit) as exit_info:
        cli_module.cli(["--config-file", CONFIG, "DATASETS.SHAPES_ROOT", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was not written by largebatch's shapes generator" in err, err
    assert (users / "images" / "0001.jpg").read_bytes() == b"not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]


def _shapes_files():
    from largebatch.data.shapes import prepare_shapes

    return prepare_shapes()  # the embedded data, in COCO format: stands in for the user's own


def test_a_users_coco_json_dataset_from_the_config_trains(tmp_path):
    """DATASETS.COCO_JSON registers the user's COCO-format files under a new name; train_net needs no Python."""
    from helpers import make_config
    from largebatch import LargeBatchTrainer

    files = _shapes_files()["shapes_train"]
    cfg = make_config("DATASETS.COCO_JSON", [["my_train", files["json_file"], files["image_root"]]],
                      "DATASETS.TRAIN", "('my_train',)", "DATASETS.TEST", "()", "SOLVER.MAX_ITER", 1,
                      "SOLVER.IMS_PER_BATCH", 2, "MONITOR.ENABLED", False, "OUTPUT_DIR", str(tmp_path),
                      register=True)
    trainer = LargeBatchTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == 1 and os.path.exists(tmp_path / "model_final.pth")


@pytest.mark.parametrize("entry, opts, message", [
    (["my_x", "/nope/train.json", "{images}"], (), "'/nope/train.json' is not a file"),
    (["my_x", "{json}", "/nope/images"], (), "'/nope/images' is not a folder"),
    (["my_x", "{broken}", "{images}"], (), "broken.json' is not valid JSON at line 1, column 13 (Expecting value)"),
    (["my_x", "{no_categories}", "{images}"], (), 'no_categories.json\' is not a COCO file: no "categories" list'),
    (["my_x", "{a_list}", "{images}"], (), "a_list.json' is not a COCO file: a JSON list, expected an object"),
    (["my_x", "{no_annotations}", "{images}"], ("DATASETS.TRAIN", "('my_x',)"),
     "no_annotations.json' has no annotations (no non-crowd object in any of its 128 images): nothing to train on"),
    (["my_x", "{json}", "{images}"], ("MODEL.ROI_HEADS.NUM_CLASSES", "2"),
     "MODEL.ROI_HEADS.NUM_CLASSES = 2 is not allowed: 'my_x' (DATASETS.COCO_JSON) has 3 categories"),
    (["coco_2017_train", "{json}", "{images}"], (), "'coco_2017_train' is already a registered dataset"),
    (["my_x", "{json}"], (), "DATASETS.COCO_JSON = ['my_x',"),
    (["my_x", "{json}", "{empty}"], (), "128 of its 128 images are not files under"),
])
def test_a_bad_coco_json_entry_fails_at_once_with_one_line(entry, opts, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    files = _shapes_files()["shapes_val"]
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    (tmp_path / "empty").mkdir()
    with open(files["json_file"]) as f:
        coco = json.load(f)
    jsons = {"no_categories": {k: v for k, v in coco.items() if k != "categories"}, "a_list": [coco],
             "no_annotations": {**coco, "annotations": []}}
    for name, content in jsons.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    entry = [v.format(json=files["json_file"], images=files["image_root"], broken=broken, empty=tmp_path / "empty",
                      **{name: tmp_path / f"{name}.json" for name in jsons}) for v in entry]
    cli_module = import_script("train_net.py")
    with pytest.raises(SystemExit) as exit_info:
        cli_module.cli(["--config-file", CONFIG, "DATASETS.COCO_JSON", repr([entry]), "DATASETS.TEST", "('my_x',)",
                        *opts])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.slow
@pytest.mark.parametrize("machine_rank, message", [
    (0, "rank(s) [1] (machine(s) [1] of --num-machines 2) did not join"),
    (1, "rank 1 could not reach machine 0 at 127.0.0.1:"),
])
def test_a_machine_that_never_joins_is_named_and_the_wait_ends(machine_rank, message, free_port):
    """Two machines, one started: it gives up after --dist-timeout with one line naming what is missing."""
    result = run_python("train_net.py", "--num-gpus", "1", "--num-machines", "2", "--machine-rank", str(machine_rank),
                        "--dist-url", f"tcp://127.0.0.1:{free_port}", "--dist-timeout", "0.2",
                        "--config-file", CONFIG, timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_dist_url_port_in_use_is_one_line_at_once():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_python("train_net.py", "--num-gpus", "2", "--dist-url", f"tcp://127.0.0.1:{port}",
                            "--config-file", CONFIG, timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"rank 0 could not open 127.0.0.1:{port}" in errors[0], result.stderr[-2000:]
    assert "address already in use" in errors[0] and "Traceback" not in result.stderr


def _model_state(*opts):
    """The state dict of the shapes config's model (its initial weights), with ``opts`` applied."""
    from helpers import make_config
    from largebatch import LargeBatchTrainer

    return LargeBatchTrainer.build_model(make_config(*opts), for_training=False).state_dict()


def test_a_truncated_weights_file_fails_at_once_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    good = tmp_path / "good.pth"
    torch.save({"model": _model_state()}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:200])
    cli_module = import_script("train_net.py")
    monkeypatch.setattr(cli_module, "launch", lambda *a, **k: None)
    monkeypatch.setattr(cli_module, "hide_gpus", lambda: None)
    cli_module.cli(["--config-file", CONFIG, "MODEL.WEIGHTS", str(good)])  # a readable file passes
    with pytest.raises(SystemExit) as exit_info:
        cli_module.cli(["--config-file", CONFIG, "MODEL.WEIGHTS", str(truncated)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "it cannot be read as a checkpoint" in err, err


@pytest.mark.parametrize("name, damage, message", [
    ("my_garbage", lambda data: b"not an image", "not an image (UnidentifiedImageError"),
    ("my_truncated", lambda data: data[: len(data) // 2], "truncated (no JPEG end marker)"),
])
def test_a_corrupt_image_fails_before_training_with_one_line(name, damage, message, tmp_path, capsys, monkeypatch):
    """DATASETS.TEST of the user's COCO json (a copy of shapes_val) with one damaged image: said at set-up, not at
    the final evaluation; DATASETS.CHECK_IMAGES False skips the check."""
    import shutil

    monkeypatch.chdir(REPO)
    files = _shapes_files()["shapes_val"]
    images = tmp_path / "images"
    shutil.copytree(files["image_root"], images)
    bad = images / "000005.jpg"
    bad.write_bytes(damage(bad.read_bytes()))
    cli_module = import_script("train_net.py")
    monkeypatch.setattr(cli_module, "launch", lambda *a, **k: None)
    monkeypatch.setattr(cli_module, "hide_gpus", lambda: None)
    argv = ["--config-file", CONFIG, "DATASETS.COCO_JSON", repr([[name, files["json_file"], str(images)]]),
            "DATASETS.TEST", f"('{name}',)"]
    with pytest.raises(SystemExit) as exit_info:
        cli_module.cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: DATASETS.TEST = ('{name}',) is not allowed: 1 of "
                                                         f"the 128 images of '{name}' cannot be used (first: "), err
    assert f"000005.jpg': {message}" in err, err
    cli_module.cli(argv + ["DATASETS.CHECK_IMAGES", "False"])


def test_an_image_of_another_size_than_its_annotations_fails_before_training(tmp_path, capsys, monkeypatch):
    """detectron2 compares each image with the width / height of its json entry when it reads it, and stops a
    running training with a SizeMismatchError; the set-up check reads the header already and says it first."""
    monkeypatch.chdir(REPO)
    files = _shapes_files()["shapes_val"]
    with open(files["json_file"]) as f:
        coco = json.load(f)
    coco["images"][3]["width"] += 8
    moved = tmp_path / "resized.json"
    moved.write_text(json.dumps(coco))
    cli_module = import_script("train_net.py")
    monkeypatch.setattr(cli_module, "launch", lambda *a, **k: None)
    with pytest.raises(SystemExit) as exit_info:
        cli_module.cli(["--config-file", CONFIG, "DATASETS.COCO_JSON", repr([["my_sized", str(moved),
                                                                                files["image_root"]]]),
                        "DATASETS.TRAIN", "('my_sized',)"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    name, (w, h) = coco["images"][3]["file_name"], (coco["images"][3]["width"], coco["images"][3]["height"])
    assert len(err.splitlines()) == 1 and err.startswith("error: DATASETS.TRAIN = ('my_sized',) is not allowed: 1 of "
                                                         "the 128 images of 'my_sized' cannot be used"), err
    assert f"{name}': {w - 8}x{h} pixels where its annotations say {w}x{h} (width x height)" in err, err


@pytest.mark.parametrize("key, value, message", [
    ("DATASETS.SHAPES_ROOT", "{file}/shapes", "DATASETS.SHAPES_ROOT = '{file}/shapes' is not allowed: '{file}' is a "
                                              "file, not a folder"),
    ("MODEL.MODULE_PARTITION", '[["head", "roi_heads.(box"]]',
     "MODEL.MODULE_PARTITION = ('head', 'roi_heads.(box') is not allowed: 'roi_heads.(box' is not a regular "
     "expression (missing ), unterminated subpattern at position 10)"),
])
def test_a_bad_path_or_pattern_fails_at_once_with_one_line(key, value, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    file = tmp_path / "a_file"
    file.write_text("the user's")
    cli_module = import_script("train_net.py")
    with pytest.raises(SystemExit) as exit_info:
        cli_module.cli(["--config-file", CONFIG, key, value.format(file=file)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err == "error: " + message.format(file=file), err
    assert file.read_text() == "the user's"


@pytest.mark.slow
def test_missing_images_of_a_builtin_dataset_fail_before_training(tmp_path):
    """detectron2's coco_2017_val under DETECTRON2_DATASETS (here the shapes files under COCO's names), one image
    gone; and the same name without its annotation file."""
    import shutil

    files = _shapes_files()["shapes_val"]
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    with open(files["json_file"]) as f:
        val = json.load(f)  # shapes' category ids 1-3 are COCO ids too
    val["categories"] = [{"id": c["id"], "name": c["name"]} for c in COCO_CATEGORIES if c["isthing"]]
    with open(coco / "annotations" / "instances_val2017.json", "w") as f:
        json.dump(val, f)
    shutil.copytree(files["image_root"], coco / "val2017")
    os.remove(coco / "val2017" / "000007.jpg")
    argv = [os.path.join(REPO, "train_net.py"), "--config-file", os.path.join(REPO, CONFIG),
            "DATASETS.TEST", "('coco_2017_val',)", "MODEL.ROI_HEADS.NUM_CLASSES", "80"]
    for root, message in ((tmp_path, "1 of the 128 images of 'coco_2017_val' cannot be used (first: '"
                                     f"{coco / 'val2017' / '000007.jpg'}': no such file"),
                          (tmp_path / "nothing", "'coco_2017_val' cannot be loaded (")):
        result = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                                env=script_env(DETECTRON2_DATASETS=str(root)))
        assert result.returncode == 2, result.stderr[-3000:]
        errors = result.stderr.strip().splitlines()
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("weights, eval_only, refused, message", [
    # another architecture: refused with one line
    (lambda: _model_state("MODEL.RESNETS.RES2_OUT_CHANNELS", 64), False, True,
     "59 of its tensors have other shapes than this model's (first: backbone.fpn_lateral2.weight (64, 64, 1, 1) in "
     "the file, (64, 32, 1, 1) in the model): weights of another architecture"),
    (lambda: {"layer1.0.conv1.weight": torch.zeros(64, 64, 3, 3), "fc.weight": torch.zeros(1000, 2048)}, False, True,
     "it holds none of this model's backbone tensors (0 of its"),
    (lambda: {k: v for k, v in _model_state().items() if "res5" not in k}, False, True,
     "it lacks 9 of the backbone's 36 tensors (first: backbone.bottom_up.res5."),
    (lambda: {k: v for k, v in _model_state().items() if k.startswith("backbone.bottom_up.")}, True, True,
     "every weight of the model is needed; 30 are not in it (first: backbone.fpn_lateral2.weight)"),
    # accepted, and said why
    (lambda: {k: v for k, v in _model_state().items() if k.startswith("backbone.bottom_up.")}, False, False,
     "tensors of the fpn, rpn, box_head are not in it and start from their initialisation (a backbone-only"),
    (lambda: _model_state("MODEL.ROI_HEADS.NUM_CLASSES", 80), False, False,
     "fine-tuning: 4 class-count tensors have other shapes (roi_heads.box_predictor.cls_score.weight (81, "),
    (lambda: _model_state(), True, False, None),
], ids=["wider", "no-shared-keys", "shallower", "eval-only-backbone", "backbone-only", "other-classes", "same"])
def test_weights_of_another_architecture_fail_before_training(weights, eval_only, refused, message, tmp_path, capsys,
                                                              monkeypatch):
    """detectron2 loads any of these with warnings only; a train_net run refuses another architecture with one line
    (exit 2) and says why it accepts the cases detectron2 users rely on."""
    monkeypatch.chdir(REPO)
    path = tmp_path / "weights.pth"
    torch.save({"model": weights()}, path)
    cli_module = import_script("train_net.py")
    monkeypatch.setattr(cli_module, "launch", lambda *a, **k: None)
    monkeypatch.setattr(cli_module, "hide_gpus", lambda: None)
    argv = ["--config-file", CONFIG, *(["--eval-only"] if eval_only else []), "MODEL.WEIGHTS", str(path)]
    if not refused:
        cli_module.cli(argv)
        said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("MODEL.WEIGHTS = ")]
        if message is None:
            assert said == [], said
        else:
            assert len(said) == 1 and message in said[0], said
        return
    with pytest.raises(SystemExit) as exit_info:
        cli_module.cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: MODEL.WEIGHTS = {str(path)!r} is not allowed: ")
    assert message in err, err


def test_base_lr_0_is_accepted_and_said(make_config, caplog):
    """Allowed on purpose (README: runs that measure with the weights fixed), but never silently."""
    with caplog.at_level("WARNING", logger="largebatch"):
        assert make_config("SOLVER.BASE_LR", 0.0).SOLVER.BASE_LR == 0
    assert "SOLVER.BASE_LR is 0: the weights will not change" in caplog.text


def test_resume_from_a_folder_of_another_run_fails_before_training(tmp_path, capsys, monkeypatch):
    """--resume on an OUTPUT_DIR whose last_checkpoint names a file that is gone, or a checkpoint of another
    architecture (the folder of another config): one line each, before any worker starts."""
    monkeypatch.chdir(REPO)
    cli_module = import_script("train_net.py")
    monkeypatch.setattr(cli_module, "launch", lambda *a, **k: None)
    monkeypatch.setattr(cli_module, "hide_gpus", lambda: None)
    argv = ["--resume", "--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path)]
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    torch.save({"model": _model_state("MODEL.RESNETS.RES2_OUT_CHANNELS", 64), "iteration": 9},
               tmp_path / "model_0000004.pth")
    for message in (f"--resume: {tmp_path / 'last_checkpoint'} names 'model_0000009.pth', which is not a file",
                    f"--resume: the last checkpoint = '{tmp_path / 'model_0000004.pth'}' is not allowed: 59 of its "
                    "tensors have other shapes than this model's"):
        with pytest.raises(SystemExit) as exit_info:
            cli_module.cli(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: {message}"), err
        (tmp_path / "last_checkpoint").write_text("model_0000004.pth")
    torch.save({"model": _model_state(), "iteration": 4}, tmp_path / "model_0000004.pth")
    cli_module.cli(argv)  # the run's own checkpoint


def test_a_whole_number_for_a_float_key_is_that_float(make_config):
    """yacs refuses an int for a float key as a type mismatch: ``MONITOR.EXPLOSION_FACTOR 0`` (the README's
    "0: off") or ``SOLVER.BASE_LR 1`` are what users type, and mean the float. Other types still fail."""
    from largebatch.config import ConfigError

    cfg = make_config("MONITOR.EXPLOSION_FACTOR", "0", "SOLVER.BASE_LR", "1", "SOLVER.MAX_ITER", "7")
    assert (cfg.MONITOR.EXPLOSION_FACTOR, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (0.0, 1.0, 7)
    assert [type(v) for v in (cfg.MONITOR.EXPLOSION_FACTOR, cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER)] == [
        float, float, int]
    with pytest.raises(ConfigError, match=r"^command line: Type mismatch .* SOLVER.BASE_LR"):
        make_config("SOLVER.BASE_LR", "'fast'")


def test_training_into_an_earlier_runs_folder_says_what_it_overwrites(tmp_path, capsys, monkeypatch):
    """detectron2 trains into an OUTPUT_DIR with an earlier run's checkpoints and overwrites the files of the same
    names; kept (re-running a config is common), but said before anything starts, with the way to continue it."""
    monkeypatch.chdir(REPO)
    cli_module = import_script("train_net.py")
    monkeypatch.setattr(cli_module, "launch", lambda *a, **k: None)
    monkeypatch.setattr(cli_module, "hide_gpus", lambda: None)
    (tmp_path / "last_checkpoint").write_text("model_0000004.pth")
    cli_module.cli(["--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"warning: OUTPUT_DIR '{tmp_path}' holds an earlier run's checkpoints" in err and "--resume" in err, err
    cli_module.cli(["--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path / "new")])
    assert "warning" not in capsys.readouterr().err


def test_weights_of_a_diverged_run_fail_before_training(tmp_path, capsys, monkeypatch):
    """A checkpoint holding NaN / inf (written after the weights blew up) is refused by --resume and MODEL.WEIGHTS
    alike, naming the part, instead of a run that stops at its first iteration."""
    monkeypatch.chdir(REPO)
    cli_module = import_script("train_net.py")
    monkeypatch.setattr(cli_module, "launch", lambda *a, **k: None)
    monkeypatch.setattr(cli_module, "hide_gpus", lambda: None)
    state = _model_state()
    state["roi_heads.box_head.fc1.weight"][0, 0] = float("inf")
    torch.save({"model": state, "iteration": 9}, tmp_path / "model_0000009.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    for argv in (["--resume", "--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path)],
                 ["--config-file", CONFIG, "MODEL.WEIGHTS", str(tmp_path / "model_0000009.pth"), "OUTPUT_DIR",
                  str(tmp_path / "new")]):
        with pytest.raises(SystemExit) as exit_info:
            cli_module.cli(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert ("is not allowed: it holds non-finite values (1 tensors of the box_head; first: "
                "roi_heads.box_head.fc1.weight): the weights of a diverged run") in err, err
