"""Run train_net.py (or ``launch``) as on a machine whose torch reports one GPU, on a machine that has none.

    python tests/fake_gpu_machine.py train_net ARGS...        # train_net.cli(ARGS)
    python tests/fake_gpu_machine.py launch OUT_DIR DEVICE N  # launch(report, N, device=DEVICE) -> OUT_DIR/rank*.json

torch.cuda.is_available() / device_count() say 1 GPU, unless CUDA_VISIBLE_DEVICES is "" (as real CUDA: the
variable hides the GPUs); every call that would really use the GPU raises "CUDA touched". The fake is installed
when this module is imported, so the workers that ``torch.multiprocessing.spawn`` starts (they re-import the
main module) run on the same fake machine.
"""
import importlib.util
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _visible_gpus():
    return 0 if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else 1


def _touched(name):
    def touched(*args, **kwargs):  # one function per name: torch's dynamo refuses one object under two names
        raise RuntimeError(f"CUDA touched by a CPU run: torch.cuda.{name}")

    return touched


torch.cuda.is_available = lambda: _visible_gpus() > 0
torch.cuda.device_count = _visible_gpus
for _name in ("set_device", "synchronize", "init", "current_device", "get_device_name", "get_device_properties",
              "get_device_capability", "mem_get_info", "memory_allocated", "max_memory_allocated"):
    setattr(torch.cuda, _name, _touched(_name))
# train_net.py by its path (the launched workers re-import this module, so they find it too, to unpickle main)
_spec = importlib.util.spec_from_file_location("train_net", os.path.join(REPO, "train_net.py"))
train_net = sys.modules["train_net"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_net)


def report(out_dir):
    """A launched worker's view: its backend and whether it sees a GPU."""
    import torch.distributed as dist

    rank = dist.get_rank()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"backend": dist.get_backend(), "cuda_available": torch.cuda.is_available(),
                   "world_size": dist.get_world_size(),
                   "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}, f)


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "train_net":
        train_net.cli(rest)
    else:
        from largebatch import launch

        out_dir, device, workers = rest
        launch(report, int(workers), dist_url="auto", args=(out_dir,), device=device)
        print("CUDA_VISIBLE_DEVICES after launch:", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
