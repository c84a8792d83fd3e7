#!/usr/bin/env bash
# tools/gpu_check.sh OUTDIR [--dry-run]
#
# The GPU check of issue 10 ("GPU-ready"): validates largebatch's CUDA paths on ONE GPU in under 8 minutes.
# Every step runs under its own `timeout` (and within an overall budget), logs to OUTDIR/<step>.log, and the
# script ends with a table (also in OUTDIR/summary.txt): step, PASS / FAIL / SKIP, seconds, a one-line note.
# Exit status 1 if any step failed (or was not run for lack of time or of a GPU), else 0.
#
#   a_env        python -m largebatch.collect_env; CUDA device, NCCL / gloo; generates the shapes dataset once
#   b_pytest     pytest -m cuda tests/test_cuda.py: optimizer parity on CUDA, no host sync in step(),
#                AGVM + GradScaler overflow, a few trainer iterations with AMP
#   c_bench      bench/optim_step.py --device cuda (its table stays in the log)
#   d_demo       train_net.py on the shapes demo (AGVM, monitor, SyncBN, AMP): train, --resume further,
#                --eval-only on CUDA and on CPU; the bbox APs must agree within 0.5 AP
#   e_torchrun   python -m torch.distributed.run --nproc-per-node 1 train_net.py ... (NCCL, one rank)
#   f_two_ranks  tools/gpu_check_two_ranks.py: 2 gloo ranks sharing the GPU (NCCL refuses two ranks on one
#                device): DDP, GroupSyncBatchNorm, HalfGroupReducer, AGVM, GradScaler; weights bitwise equal
#   g_lazy       train_net.py on configs/lazy/shapes_mask_rcnn_LSJ_lamb_agvm.py (a LazyConfig) on CUDA with AMP
#
# --dry-run: everything that needs no GPU (files and commands exist, step a, test collection, --help and
# syntax checks, the AP parser on a sample log); the GPU commands and the checks of their results are
# printed, not run, and those steps are SKIP. It exits 0 on a machine without a GPU.
#
# Environment: PYTHON (default .venv/bin/python, else python3), GPU_CHECK_BUDGET (seconds for all steps,
# default 470), LARGEBATCH_DATASETS (default ./datasets).
set -u -o pipefail

usage() { echo "usage: $0 OUTDIR [--dry-run]" >&2; exit 2; }
OUT="" DRY=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY=1 ;;
        -*) usage ;;
        *) [ -z "$OUT" ] || usage; OUT=$arg ;;
    esac
done
[ -n "$OUT" ] || usage

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
PY=${PYTHON:-.venv/bin/python}
command -v "$PY" >/dev/null 2>&1 || PY=python3  # as `make` would run it, or whatever python is at hand
# largebatch is installed by `make setup` (make gpu-check runs it first); the dataset where the tests expect it
export LARGEBATCH_DATASETS=${LARGEBATCH_DATASETS:-$REPO/datasets}
BUDGET=${GPU_CHECK_BUDGET:-470}
DEMO=configs/shapes/demo.yaml
LAZY=configs/lazy/shapes_mask_rcnn_LSJ_lamb_agvm.py
export OUT DRY REPO PY DEMO LAZY
exec 3>&1  # the console: the steps log to files and echo their commands here too

# ---------------------------------------------------------------------------------------------------------
# helpers for the steps (each step runs in its own `bash -c` under `timeout`, with STEP set)

say() { echo "$*"; echo "  [$STEP] $*" >&3; }
note() { echo "$*" >"$OUT/$STEP.note"; echo "note: $*"; }
# run CMD...: always (dry run too); a failure ends the step with FAIL, the command's last output line as note
run() {
    say "+ $*"
    "$@" 2>&1 | tee "$OUT/.$STEP.last"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        note "failed (exit $rc): $(basename "$1") ${2:-}: $(grep -v '^[[:space:]]*$' "$OUT/.$STEP.last" | tail -n1 | cut -c1-200)"
        exit 1
    fi
}
# gpu CMD...: needs the GPU: in a dry run printed, not run
gpu() {
    if [ "$DRY" = 1 ]; then say "would run: $*"; return 0; fi
    run "$@"
}
# check CMD...: verifies what a gpu command left behind: in a dry run printed, not run
check() {
    if [ "$DRY" = 1 ]; then say "would check: $*"; return 0; fi
    run "$@"
}
dry_skip() {  # where a step ends in a dry run
    if [ "$DRY" = 1 ]; then note "dry run: ${1:-GPU commands printed, not run}"; exit 3; fi
}
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# load_config falls back to CPU (with a warning) when torch sees no GPU: such a run checks nothing here
no_cpu_fallback() {
    if grep -q "no GPU is available: training on CPU" "$1"; then echo "MODEL.DEVICE cuda fell back to CPU: $1"; return 1; fi
}
# bbox_ap LOG: the last bbox AP that detectron2's COCOEvaluator printed ("copypaste:" lines) in LOG
bbox_ap() {
    "$PY" - "$1" <<'PYEOF'
import sys

lines = open(sys.argv[1], errors="replace").read().splitlines()
ap = None
for i, line in enumerate(lines):
    if line.rstrip().endswith("copypaste: Task: bbox") and i + 2 < len(lines):
        names = lines[i + 1].split("copypaste: ")[-1].strip().split(",")
        values = lines[i + 2].split("copypaste: ")[-1].strip().split(",")
        ap = dict(zip(names, values)).get("AP")
if ap is None:
    sys.exit(f"no bbox AP in {sys.argv[1]}")
print(float(ap))
PYEOF
}
# demo_trained DIR LAST: the resumed demo run trained up to iteration LAST, with finite losses and the monitor's
# and AGVM's records
demo_trained() {
    "$PY" - "$1" "$2" <<'PYEOF'
import json, math, os, sys

out, expected = sys.argv[1], int(sys.argv[2])
rows = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
losses = [r["total_loss"] for r in rows if "total_loss" in r]
last = max(r["iteration"] for r in rows if "total_loss" in r)
keys = set().union(*rows)
problems = []
if last != expected:
    problems.append(f"last training iteration {last}, expected {expected}")
if not losses or not all(math.isfinite(x) for x in losses):
    problems.append("non-finite total_loss")
for key in ("agvm_mu/rpn", "grad_var/backbone", "trust_ratio/backbone", "bbox/AP"):
    if key not in keys:
        problems.append(f"no {key} in metrics.json")
if not os.path.exists(os.path.join(out, "layer_stats.jsonl")):
    problems.append("no layer_stats.jsonl")
print(f"iterations up to {last}, final total_loss {losses[-1]:.3f}" if losses else "no losses")
sys.exit("; ".join(problems) or None)
PYEOF
}
# demo_aps DIR: the bbox AP at the end of training (metrics.json) and of --eval-only on CUDA and on CPU agree
# within 0.5 AP (CUDA, with TF32 convolutions, and CPU differ by rounding only), and the model learned something
demo_aps() {
    local train cuda cpu
    train=$("$PY" -c 'import json, sys; print([r for r in map(json.loads, open(sys.argv[1])) if "bbox/AP" in r][-1]["bbox/AP"])' \
        "$1/metrics.json") && cuda=$(bbox_ap "$1/eval_cuda/log.txt") && cpu=$(bbox_ap "$1/eval_cpu/log.txt") || return 1
    echo "bbox AP train $train / eval-only cuda $cuda / eval-only cpu $cpu (256 iterations at batch 32, AMP)" \
        | tee "$OUT/.demo_aps"
    "$PY" - "$train" "$cuda" "$cpu" <<'PYEOF'
import sys

train, cuda, cpu = map(float, sys.argv[1:4])
problems = []
if not abs(cuda - cpu) <= 0.5:
    problems.append(f"--eval-only cuda {cuda} vs cpu {cpu}: more than 0.5 AP apart")
if not abs(cuda - train) <= 0.5:
    problems.append(f"--eval-only cuda {cuda} vs end of training {train}: more than 0.5 AP apart")
# an untrained model scores ~0; these commands on CPU (float32) gave 12.8 after the first run, 30.8 at the end
if not cuda >= 10.0:
    problems.append(f"AP {cuda} after 256 iterations (expected >= 10): the model did not learn")
sys.exit("; ".join(problems) or None)
PYEOF
}
export -f say note run gpu check dry_skip free_port no_cpu_fallback bbox_ap demo_trained demo_aps

# ---------------------------------------------------------------------------------------------------------
# the steps

step_a_env() {
    run "$PY" -m largebatch.collect_env
    run "$PY" - <<'PYEOF'
import os

import torch
import torch.distributed as dist

print("torch", torch.__version__, "| CUDA build", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
nccl = "-"
if dist.is_nccl_available():
    v = torch.cuda.nccl.version()
    nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
print("nccl available:", dist.is_nccl_available(), "| version:", nccl, "| gloo available:", dist.is_gloo_available())
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
with open(os.path.join(os.environ["OUT"], ".env_summary"), "w") as f:  # the line for the table
    f.write(f"{device}, torch {torch.__version__}, NCCL {nccl}")
PYEOF
    # the embedded dataset, once, before steps b, d and e read it (deterministic; ~3 s, nothing if present)
    run "$PY" -m largebatch.data.shapes
    local summary
    summary=$(cat "$OUT/.env_summary")
    if [ "$DRY" = 0 ]; then
        if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
            note "torch sees no CUDA GPU ($summary)"; exit 1
        fi
        touch "$OUT/.cuda_ok"
    fi
    note "$summary"
}

step_b_pytest() {
    run "$PY" -m pytest -q --collect-only -m cuda tests/test_cuda.py
    local collected summary
    collected=$(grep -c "^tests/test_cuda.py::" "$OUT/.$STEP.last")
    if [ "$collected" -eq 0 ]; then note "no test collected"; exit 1; fi
    gpu "$PY" -m pytest -q -rs -m cuda tests/test_cuda.py --basetemp "$OUT/pytest_tmp"
    dry_skip "$collected tests collected, not run"
    summary=$(grep -E "(passed|failed|error|skipped)" "$OUT/.$STEP.last" | tail -n1 | tr -d '=' | sed 's/^ *//;s/ *$//')
    # with a GPU nothing may be skipped: a skip means pytest saw no CUDA
    if grep -q "skipped" <<<"$summary"; then note "$summary (tests skipped: no GPU seen by pytest?)"; exit 1; fi
    note "$summary"
}

step_c_bench() {
    run "$PY" bench/optim_step.py --help
    # R50-FPN's 41.75M params, float32; 5 rounds x 20 steps: well under a minute on one GPU
    gpu "$PY" bench/optim_step.py --device cuda --steps 20 --rounds 5 --warmup 5
    dry_skip
    # the line for the table: our multi-tensor rows, ms/step and the median paired ratio to torch's foreach
    note "$(grep -E '^\| (LARS|LAMB|PMD-LAMB) foreach' "$OUT/.$STEP.last" \
        | awk -F'|' '{sub(/^ +/, "", $2); sub(/ foreach +$/, "", $2); gsub(/ /, "", $3); gsub(/ /, "", $6);
                     printf "%s%s %s ms/step (%s torch)", sep, $2, $3, $6; sep="; "}')"
}

step_d_demo() {
    local D="$OUT/demo"
    # what the demo turns on, resolved through _BASE_ and the defaults (needs no GPU)
    run "$PY" - "$DEMO" <<'PYEOF'
import sys

from largebatch.config import load_config

cfg = load_config(sys.argv[1])
on = {"SOLVER.AGVM.ENABLED": cfg.SOLVER.AGVM.ENABLED, "MONITOR.ENABLED": cfg.MONITOR.ENABLED,
      "MONITOR.GRAD_VARIANCE": cfg.MONITOR.GRAD_VARIANCE, "MODEL.SYNC_BN.ENABLED": cfg.MODEL.SYNC_BN.ENABLED}
print(on, "| optimizer", cfg.SOLVER.OPTIMIZER, "| batch", cfg.SOLVER.IMS_PER_BATCH, "| unit", cfg.SOLVER.SCHEDULE_UNIT)
sys.exit(0 if all(on.values()) else f"expected all of {list(on)} on in {sys.argv[1]}")
PYEOF
    # the AP parser, on a sample of detectron2's output
    printf '%s\n' "[d2.evaluation.testing]: copypaste: Task: bbox" \
        "[d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl" \
        "[d2.evaluation.testing]: copypaste: 42.1950,61.2108,49.0161,30.1,45.2,50.3" >"$OUT/.ap_sample.log"
    run test "$(bbox_ap "$OUT/.ap_sample.log")" = 42.195
    [ "$DRY" = 1 ] || rm -rf "$D"
    # 1 GPU, batch 32, AMP: 4 epochs (128 iterations), then --resume to 8 epochs, the demo's length (with the
    # cosine schedule stretched at the resume); data loading in 4 processes (the config's 0 starves a GPU)
    local opts=(MODEL.DEVICE cuda SOLVER.AMP.ENABLED True DATALOADER.NUM_WORKERS 4 OUTPUT_DIR "$D")
    gpu "$PY" train_net.py --num-gpus 1 --config-file "$DEMO" "${opts[@]}" SOLVER.MAX_ITER 4
    check no_cpu_fallback "$D/log.txt"
    check test -f "$D/model_final.pth"
    gpu "$PY" train_net.py --num-gpus 1 --resume --config-file "$DEMO" "${opts[@]}" SOLVER.MAX_ITER 8
    check demo_trained "$D" 255
    gpu "$PY" train_net.py --num-gpus 1 --eval-only --config-file "$DEMO" MODEL.DEVICE cuda \
        DATALOADER.NUM_WORKERS 4 MODEL.WEIGHTS "$D/model_final.pth" OUTPUT_DIR "$D/eval_cuda"
    check no_cpu_fallback "$D/eval_cuda/log.txt"
    gpu "$PY" train_net.py --num-gpus 1 --eval-only --config-file "$DEMO" MODEL.DEVICE cpu \
        DATALOADER.NUM_WORKERS 4 MODEL.WEIGHTS "$D/model_final.pth" OUTPUT_DIR "$D/eval_cpu"
    check demo_aps "$D"
    dry_skip
    note "$(cat "$OUT/.demo_aps")"
}

step_e_torchrun() {
    run "$PY" -c "import torch.distributed.run"
    local T="$OUT/torchrun" port
    port=$(free_port)
    [ "$DRY" = 1 ] || rm -rf "$T"
    # one rank over NCCL, joined through RANK / WORLD_SIZE / LOCAL_RANK; AGVM measures every 2nd iteration
    gpu "$PY" -m torch.distributed.run --nproc-per-node 1 --master-addr 127.0.0.1 --master-port "$port" \
        train_net.py --config-file "$DEMO" MODEL.DEVICE cuda SOLVER.AMP.ENABLED True \
        SOLVER.SCHEDULE_UNIT iter SOLVER.MAX_ITER 10 SOLVER.WARMUP_ITERS 2 SOLVER.IMS_PER_BATCH 8 \
        SOLVER.CHECKPOINT_PERIOD 1000 SOLVER.AGVM.INTERVAL 2 SOLVER.AGVM.START_ITER 0 MONITOR.PERIOD 2 \
        DATASETS.TEST "()" DATALOADER.NUM_WORKERS 2 OUTPUT_DIR "$T"
    check no_cpu_fallback "$T/log.txt"
    check grep -q "World size: 1" "$T/log.txt"
    check test -f "$T/model_final.pth"
    dry_skip
    note "10 iterations on NCCL, world size 1"
}

step_f_two_ranks() {
    run "$PY" -m py_compile tools/gpu_check_two_ranks.py
    run "$PY" tools/gpu_check_two_ranks.py --help
    if [ "$DRY" = 1 ]; then say "would run: $PY tools/gpu_check_two_ranks.py"; dry_skip; fi
    say "+ $PY tools/gpu_check_two_ranks.py"
    "$PY" tools/gpu_check_two_ranks.py
    local rc=$?
    # its verdict line (PASS / FAIL / SKIP: ...) is the note; exit 3 = cannot run on this machine (SKIP)
    note "$(grep -E '^(PASS|FAIL|SKIP)' "$OUT/$STEP.log" | tail -n1 | cut -c1-200)"
    exit $rc
}
step_g_lazy() {
    local T="$OUT/lazy"
    [ "$DRY" = 1 ] || rm -rf "$T"
    run "$PY" train_net.py --help
    # the LazyConfig path on CUDA: detectron2's LSJ baseline (shapes-sized) with LAMB + AGVM, AMP on, one GPU
    gpu "$PY" train_net.py --num-gpus 1 --config-file "$LAZY" train.device=cuda train.amp.enabled=True \
        train.max_iter=6 train.checkpointer.period=1000 largebatch.monitor.period=2 optimizer.interval=2 \
        optimizer.start_iter=0 "train.output_dir=$T"
    check grep -q "Starting training from iteration 0" "$T/log.txt"
    check test -f "$T/model_final.pth"
    check grep -q "agvm_mu/mask_head" "$T/metrics.json"
    dry_skip
    note "6 iterations of the LSJ LazyConfig on CUDA with AMP, LAMB + AGVM"
}
export -f step_a_env step_b_pytest step_c_bench step_d_demo step_e_torchrun step_f_two_ranks step_g_lazy

# ---------------------------------------------------------------------------------------------------------
# the driver

START=$SECONDS
ROWS=()
FAILED=0
record() {  # record STEP STATUS SECONDS NOTE
    ROWS+=("$(printf '%-12s %-6s %7s  %s' "$1" "$2" "$3" "$4")")
    echo "  -> $2 ($3 s) $4"
}

# run_step NAME LIMIT NEEDS_GPU: step_NAME under `timeout`, within what is left of the budget
run_step() {
    local name=$1 limit=$2 needs_gpu=$3
    local left=$((BUDGET - (SECONDS - START)))
    echo "== $name"
    if [ "$needs_gpu" = 1 ] && [ "$DRY" = 0 ] && [ ! -f "$OUT/.cuda_ok" ]; then
        record "$name" SKIP 0 "not run: no CUDA GPU (step a)"; FAILED=1; return
    fi
    if [ "$left" -lt 20 ]; then
        record "$name" SKIP 0 "not run: the ${BUDGET}s budget is spent"; FAILED=1; return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "   limit ${limit}s (${left}s of the budget left), log $OUT/$name.log"
    rm -f "$OUT/$name.note"
    local t0=$SECONDS rc status msg
    STEP=$name timeout --kill-after=10 "$limit" bash -c "step_$name" >"$OUT/$name.log" 2>&1
    rc=$?
    msg=$(head -n1 "$OUT/$name.note" 2>/dev/null)
    case $rc in
        0) status=PASS ;;
        3) status=SKIP ;;
        124|137) status=FAIL; msg="timed out after ${limit}s${msg:+; $msg}" ;;
        *) status=FAIL; msg=${msg:-"exit $rc, see $name.log"} ;;
    esac
    [ "$status" != FAIL ] || FAILED=1
    record "$name" "$status" $((SECONDS - t0)) "$msg"
}

rm -f "$OUT/.cuda_ok"
echo "gpu_check: $PY, output in $OUT$([ "$DRY" = 1 ] && echo ', dry run')"
for f in train_net.py "$DEMO" "$LAZY" tests/test_cuda.py bench/optim_step.py tools/gpu_check_two_ranks.py; do
    [ -f "$f" ] || { echo "missing file: $f" >&2; exit 1; }
done
for c in timeout tee grep awk; do
    command -v "$c" >/dev/null || { echo "missing command: $c" >&2; exit 1; }
done

run_step a_env 60 0
run_step b_pytest 180 1
run_step c_bench 90 1
run_step d_demo 300 1
run_step e_torchrun 120 1
run_step f_two_ranks 120 1
run_step g_lazy 90 1

{
    echo
    printf '%-12s %-6s %7s  %s\n' step status seconds note
    printf '%s\n' "${ROWS[@]}"
    echo "total $((SECONDS - START)) s; logs in $OUT"
} | tee "$OUT/summary.txt"
exit $FAILED
