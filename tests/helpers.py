"""What the tests share: a tiny detector, a config factory, loading a script by path, running a script.

Plain functions and classes, importable by a test module (``from helpers import TinyDetector``) and by the
functions that ``distributed.run_workers`` runs in its worker processes (a fixture cannot be pickled into a
worker). ``conftest.py`` exposes the same things as fixtures: ``tiny_detector``, ``make_config``, ``free_port``
and ``run_workers``. ``tests/`` is on ``sys.path`` because pytest imports ``conftest.py`` from it (rootdir
conftest, "prepend" import mode); ``largebatch`` is installed (editable) by ``make``.
"""
import importlib.util
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES_CONFIG = "configs/shapes/sgd.yaml"  # the small-batch baseline on the embedded shapes data

# the first name of a TinyDetector parameter -> the detector part ModulePartition gives it
PARTS = {"backbone": "backbone", "proposal_generator": "rpn", "roi_heads": "box_head"}


# ---------------------------------------------------------------------------------------------------------------
# a tiny detector
# ---------------------------------------------------------------------------------------------------------------
def _mlp(widths):
    """Linear layers through ``widths``, Tanh between them."""
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Tanh()] if i else []
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class TinyDetector(nn.Module):
    """forward(list of dicts) -> loss dict, like a detectron2 meta-architecture; losses are means over the batch.

    Its parameters have an R-CNN's names (``backbone.*``, ``proposal_generator.*``, ``roi_heads.box_head.*``),
    so that ``ModulePartition`` maps them to backbone / rpn / box_head (``PARTS``, ``part_of``), and are small
    enough for float64 references computed by hand.

    backbone: widths of an MLP (Linear layers, Tanh between) from the input ``x`` to the features f.
    rpn: outputs of ``proposal_generator`` (one Linear on f); ``loss_rpn`` = MSE to the image's ``rpn`` target.
    box_head: widths of the MLP ``roi_heads.box_head`` on tanh(f); ``loss_box`` = MSE to the ``box`` target.
        None: no ``roi_heads`` (a backbone + rpn detector).
    tanh_features: f = tanh(backbone(x)) instead of backbone(x).
    feature_loss: add ``loss_feature`` = mean |f|.
    dtype: of the parameters; forward casts the inputs to the parameters' dtype (also after ``.float()``).
    seed: ``torch.manual_seed(seed)`` before the layers are built; None leaves the global generator alone.

    ``make_batch(seed, n, **model.sizes)`` makes inputs that fit a model.
    """

    def __init__(self, backbone=(4, 8, 6), rpn=3, box_head=(5, 2), *, tanh_features=False, feature_loss=False,
                 dtype=torch.float64, seed=0):
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.tanh_features, self.feature_loss = tanh_features, feature_loss
        self.backbone = _mlp(backbone)
        self.proposal_generator = nn.Linear(backbone[-1], rpn)
        self.sizes = {"x": backbone[0], "rpn": rpn}
        if box_head:
            self.roi_heads = nn.Module()
            self.roi_heads.box_head = _mlp((backbone[-1], *box_head))
            self.sizes["box"] = box_head[-1]
        self.to(dtype)

    def forward(self, batch):
        dtype = self.proposal_generator.weight.dtype

        def stacked(key):
            return torch.stack([d[key] for d in batch]).to(dtype)

        f = self.backbone(stacked("x"))
        if self.tanh_features:
            f = torch.tanh(f)
        losses = {"loss_rpn": F.mse_loss(self.proposal_generator(f), stacked("rpn"))}
        if "box" in self.sizes:
            losses["loss_box"] = F.mse_loss(self.roi_heads.box_head(torch.tanh(f)), stacked("box"))
        if self.feature_loss:
            losses["loss_feature"] = f.abs().mean()
        return losses


def make_batch(seed, n, x=4, rpn=3, box=2):
    """n images of deterministic float64 data for a TinyDetector (every process can rebuild every rank's
    batch): per image ``x``, ``rpn`` and ``box`` (omitted when ``box`` is None), drawn in that order."""
    g = torch.Generator().manual_seed(seed)
    sizes = {"x": x, "rpn": rpn, **({"box": box} if box else {})}
    return [{k: torch.randn(size, generator=g, dtype=torch.float64) for k, size in sizes.items()} for _ in range(n)]


def part_of(name):
    """The detector part of a TinyDetector parameter name."""
    return PARTS[name.split(".")[0]]


# ---------------------------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------------------------
def make_config(*opts, config=SHAPES_CONFIG, register=False, num_workers=1):
    """A config for a test: ``opts`` are KEY VALUE pairs as on the command line (``"SOLVER.BASE_LR", "0.1"``;
    Python values such as ``0.1`` or ``(50, 100)`` work too).

    config: a YAML file, relative to the repository (default ``configs/shapes/sgd.yaml``) or absolute:
        ``largebatch.config.load_config(config, opts, num_workers)``, validated as train_net.py does.
        None: detectron2's defaults + largebatch's keys with ``opts`` merged, not validated (for tests that
        hand the code under test a bad value on purpose).
    register: ``largebatch.data.register_datasets(cfg)`` (the shapes data, generated on first use).
    """
    if config is None:
        from detectron2.config import get_cfg

        from largebatch.config import add_largebatch_config

        cfg = add_largebatch_config(get_cfg())
        cfg.merge_from_list(list(opts))
    else:
        from largebatch.config import load_config

        cfg = load_config(os.path.join(REPO, config), list(opts), num_workers)
    if register:
        from largebatch.data import register_datasets

        register_datasets(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------------------
def read_json(path):
    with open(path) as f:
        return json.load(f)


def tree_bytes(root):
    """{path relative to ``root``: the file's bytes} of every file below ``root``."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


# ---------------------------------------------------------------------------------------------------------------
# scripts: imported by path, or run in a subprocess
# ---------------------------------------------------------------------------------------------------------------
def import_script(path):
    """Import a script of the repository (``"train_net.py"``, ``"tools/plot_metrics.py"``) by its path, without
    putting its folder on sys.path; imported once, then the same module object (``sys.modules``, by file stem)."""
    path = os.path.join(REPO, path)
    name = os.path.splitext(os.path.basename(path))[0]
    module = sys.modules.get(name)
    if module is not None and os.path.abspath(getattr(module, "__file__", "") or "") == os.path.abspath(path):
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as `import` does: the script's own classes and functions pickle by reference
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def script_env(**overrides):
    """The environment of a script the tests start: one OpenMP thread per process (workers share 2 cores), the
    repository's datasets folder unless LARGEBATCH_DATASETS says otherwise; ``overrides`` set (None: unset)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("LARGEBATCH_DATASETS", os.path.join(REPO, "datasets"))
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_python(*args, timeout=600, env=None):
    """``python ARGS...`` in the repository, with ``script_env()`` unless ``env`` is given; the CompletedProcess
    (text stdout / stderr captured)."""
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env or script_env(), capture_output=True,
                          text=True, timeout=timeout)
