#!/usr/bin/env bash
# Installs what largebatch needs into the Python given as $1 (idempotent).
#
# detectron2: an importable installation (an official build) is used as it is. Otherwise detectron2 v0.6's
# Python sources are installed from the registry package `pb1-detectron2==0.6` (a copy of v0.6 without its
# C++ sources, so `pip install` of it cannot build): its `detectron2/` folder is copied into site-packages
# with a `detectron2/_C` module that raises a clear ImportError when a compiled op is used.
set -euo pipefail
PY=${1:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1"
  pip_install torch==2.14.1 torchvision==0.29.1
fi

if "$PY" -c "import detectron2" 2>/dev/null; then
  echo "[setup] using the detectron2 already installed: $("$PY" -c 'import detectron2, os; print(detectron2.__version__, os.path.dirname(detectron2.__file__))')"
  # what largebatch itself needs beyond detectron2's own requirements (pytest, ruff: `make test`, `make lint`)
  # setuptools<81: detectron2.model_zoo (model_zoo:// bases, LazyConfig recipes) imports pkg_resources; timm: the
  # ViT of detectron2 main (configs/lazy/agvm_adamw_vitdet_*.py)
  pip_install pycocotools matplotlib tensorboard pytest "ruff==0.17.6" shapely "setuptools<81" timm
else
  echo "[setup] no detectron2 importable: installing pb1-detectron2==0.6 (detectron2 v0.6 Python sources)"
  # the pins v0.6 needs: np.bool (numpy<1.24), Image.LINEAR (Pillow<10), fvcore/iopath versions from its setup.py
  pip_install "numpy<1.24" "Pillow<10" "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" pycocotools yacs \
    tabulate termcolor cloudpickle tqdm tensorboard matplotlib omegaconf hydra-core "setuptools<81" pytest "ruff==0.17.6" \
    shapely
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-build-isolation -d "$tmp" pb1-detectron2==0.6
  tar -xzf "$tmp"/pb1*detectron2-0.6.tar.gz -C "$tmp"
  site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  src=$(find "$tmp" -maxdepth 2 -type d -name '*detectron2-0.6' | head -n 1)
  rm -rf "$site/detectron2.partial"
  cp -r "$src/detectron2" "$site/detectron2.partial"
  cat > "$site/detectron2.partial/_C.py" <<'PYEOF'
"""Stand-in for detectron2's compiled ops, written by largebatch's tools/setup_env.sh: this detectron2 v0.6
was installed from its Python sources only. Importing works; using a compiled op raises ImportError."""


def get_compiler_version():  # read by detectron2.utils.collect_env
    return "none: detectron2 installed from Python sources (no compiled ops)"


def get_cuda_version():
    return "none"


def has_cuda():
    return False


def __getattr__(name):
    raise ImportError(
        f"detectron2._C.{name} is a compiled op, and this detectron2 was installed without them: deformable "
        "conv, rotated boxes and the fast COCO evaluator are unavailable (use COCOEvaluator(use_fast_impl=False)). "
        "Install an official detectron2 build to use them."
    )
PYEOF
  rm -rf "$site/detectron2"
  mv "$site/detectron2.partial" "$site/detectron2"
  # the model zoo's configs live outside the package in the source tree; detectron2 expects them here
  if [ -d "$src/configs" ]; then cp -r "$src/configs" "$site/detectron2/model_zoo/configs"; fi
fi
# panopticapi (PQ for Panoptic FPN, through detectron2's COCOPanopticEvaluator): the registry's copy of COCO's
# panopticapi; its evaluation needs only numpy and PIL, and its declared pins (Pillow>=10, numpy<2) would clash with
# detectron2 v0.6's, so without its dependencies
if ! "$PY" -c "import panopticapi.evaluation" 2>/dev/null; then
  pip_install --no-deps "panopticapi-lite==0.2.0"
fi
"$PY" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e "$(dirname "$0")/.."
"$PY" -m largebatch.collect_env
