"""``python -m largebatch.collect_env``: the versions largebatch runs on and what detectron2 can do."""
import importlib.util
import os
import sys


def detectron2_compiled_ops() -> bool:
    """Whether detectron2._C is a compiled extension (False for a source-only install of v0.6)."""
    spec = importlib.util.find_spec("detectron2._C")
    return spec is not None and spec.origin is not None and not spec.origin.endswith(".py")


def detectron2_flavour() -> str:
    """"v0.6 release" or "main (post-v0.6)": main still calls itself 0.6, so tell them apart by an API that only
    main has (``comm.create_local_process_group``, added after the v0.6 release)."""
    from detectron2.utils import comm

    return "main (post-v0.6)" if hasattr(comm, "create_local_process_group") else "v0.6 release"


def collect_env() -> str:
    import detectron2
    import torch
    import torchvision

    import largebatch

    compiled = detectron2_compiled_ops()
    rows = [
        ("python", sys.version.split()[0]),
        ("largebatch", f"{largebatch.__version__} @ {os.path.dirname(largebatch.__file__)}"),
        ("torch", torch.__version__),
        ("torchvision", torchvision.__version__),
        ("detectron2", f"{detectron2.__version__}, {detectron2_flavour()} @ {os.path.dirname(detectron2.__file__)}"),
        ("detectron2 compiled ops", "yes" if compiled else
         "no (deformable conv, rotated boxes and the fast COCO evaluator are unavailable; pycocotools is used)"),
        ("CUDA available", f"{torch.cuda.is_available()} ({torch.cuda.device_count()} GPUs)"),
        ("distributed backends", ", ".join(
            name for name, ok in (("gloo", torch.distributed.is_gloo_available()),
                                  ("nccl", torch.distributed.is_nccl_available())) if ok)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


if __name__ == "__main__":
    print(collect_env())
