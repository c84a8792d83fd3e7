"""A backbone pre-trained here, on a synthetic task, for the large-batch study (nothing is downloaded).

The papers fine-tune detectors from an ImageNet-pretrained ResNet-50; the study's CPU-sized detector has no such
weights. This trains the study's own narrow ResNet (``build_small_resnet_fpn_backbone``'s bottom-up part, built
from the same config, so the widths match) on a task that needs the same visual skills as detection without being
detection: semantic segmentation of the shapes generator's images (background / circle / square / triangle for
every pixel, at stride 4; a 1x1 convolution on each of res2..res5, upsampled and summed, so every stage is
trained). Its images come from the shapes generator with a seed of their own (``PRETRAIN_SEED``), so no training or
validation image of the study is seen. The stem, the stages and their BatchNorm statistics are kept; the
segmentation head is dropped. (A first version counted the shapes of each class from globally pooled res5
features: after 384 steps its held-out accuracy was 47% against 40% for always guessing the most frequent count,
too little to be a useful start; dense labels teach every stage in the same number of steps.)

The result is cached as a detectron2 checkpoint (``{"model": {"backbone.bottom_up.<name>": tensor}}``, loaded by
``MODEL.WEIGHTS``; FPN and heads start from their usual initialization) next to a json file that records how it
was made. :func:`ensure_pretrained_backbone` reuses a cached file made with the same settings.

    PYTHONPATH=projects python -m largebatch.modeling.pretrain --config-file configs/shapes/study/sgd_b4.yaml \
        --output datasets/pretrained/shapes_backbone.pth
"""
import argparse
import json
import logging
import math
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ..data.shapes import SHAPES_CLASSES, render_shapes_image
from ..data.shapes import _rasterize as rasterize_polygon
from ..files import atomic_write

__all__ = ["PRETRAIN_SEED", "pretrain_settings", "pretrain_backbone", "ensure_pretrained_backbone"]

logger = logging.getLogger("largebatch")

PRETRAIN_SEED = 1000  # the study's splits use seed 0; this keeps the pre-training images disjoint from them
_SPLIT_TRAIN, _SPLIT_HELD_OUT = 2, 3  # split ids beside the generator's train (0) / val (1)
_STRIDE = 4  # labels at res2's resolution


def pretrain_settings(cfg, num_images: int = 8192, epochs: int = 3, batch: int = 64, lr: float = 0.1,
                      generated_size: int = 128) -> dict:
    """What the cached file depends on: the backbone's config and the training recipe."""
    r = cfg.MODEL.RESNETS
    return {
        "format": 2,
        "stem": int(r.STEM_OUT_CHANNELS), "res2": int(r.RES2_OUT_CHANNELS),
        "blocks": [int(b) for b in r.SMALL_BLOCKS_PER_STAGE], "norm": r.NORM,
        "input_size": int(cfg.INPUT.MIN_SIZE_TRAIN[0]), "generated_size": int(generated_size),
        "pixel_mean": [float(v) for v in cfg.MODEL.PIXEL_MEAN], "pixel_std": [float(v) for v in cfg.MODEL.PIXEL_STD],
        "format_bgr": cfg.INPUT.FORMAT == "BGR",
        "num_images": int(num_images), "epochs": int(epochs), "batch": int(batch), "lr": float(lr),
        "seed": PRETRAIN_SEED,
    }


def _images(split_id: int, count: int, s: dict):
    """``count`` generator images resized as the detector's loader resizes them (bilinear, to input_size), in
    the channel order the detector reads (detectron2: BGR), as uint8 (N, 3, H, W), and their class maps at stride
    4 (N, H / 4, W / 4): 0 background, k the k-th class, later shapes on top (as drawn), sampled at pixel centres."""
    size, generated = s["input_size"], s["generated_size"]
    pixels = np.empty((count, 3, size, size), dtype=np.uint8)
    labels = np.zeros((count, size // _STRIDE, size // _STRIDE), dtype=np.int64)
    centres = ((np.arange(size // _STRIDE) + 0.5) * _STRIDE * generated / size).astype(np.int64)
    for i in range(count):
        img, objects = render_shapes_image(np.random.default_rng([s["seed"], split_id, i]), generated)
        if size != generated:
            img = img.resize((size, size), Image.BILINEAR)
        arr = np.asarray(img)
        if s["format_bgr"]:
            arr = arr[:, :, ::-1]
        pixels[i] = arr.transpose(2, 0, 1)
        full = np.zeros((generated, generated), dtype=np.int64)
        for o in objects:  # drawing order: a later shape covers an earlier one
            full[rasterize_polygon(o["polygon"], generated)] = o["category_id"]
        labels[i] = full[np.ix_(centres, centres)]
    return torch.from_numpy(pixels), torch.from_numpy(labels)


class _Segmenter(nn.Module):
    """The bottom-up ResNet + a 1x1 convolution on each stage, upsampled to res2 and summed: class logits."""

    def __init__(self, bottom_up, s: dict):
        super().__init__()
        self.bottom_up = bottom_up
        shapes = bottom_up.output_shape()
        self.heads = nn.ModuleDict({k: nn.Conv2d(v.channels, len(SHAPES_CLASSES) + 1, 1) for k, v in shapes.items()})
        self.register_buffer("mean", torch.tensor(s["pixel_mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(s["pixel_std"]).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixels):
        x = (pixels.float() - self.mean) / self.std  # the detector's own normalization
        feats = self.bottom_up(x)
        size = (pixels.shape[-2] // _STRIDE, pixels.shape[-1] // _STRIDE)
        return sum(F.interpolate(self.heads[k](f), size=size, mode="bilinear", align_corners=False)
                   for k, f in feats.items())


def _evaluate(model, pixels, labels, batch) -> dict:
    """Pixel accuracy and mean IoU over the 3 shape classes (BN in eval mode)."""
    model.eval()
    k = len(SHAPES_CLASSES) + 1
    confusion = torch.zeros(k, k, dtype=torch.int64)
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            pred = model(pixels[i:i + batch]).argmax(1)
            confusion += torch.bincount(labels[i:i + batch].flatten() * k + pred.flatten(), minlength=k * k).view(k, k)
    model.train()
    inter = confusion.diag().double()
    iou = inter / (confusion.sum(0) + confusion.sum(1) - confusion.diag()).double().clamp_min(1)
    return {"pixel_accuracy": float(inter.sum() / confusion.sum()), "shape_miou": float(iou[1:].mean()),
            "background_fraction": float(confusion[0].sum() / confusion.sum())}


def pretrain_backbone(cfg, output: str, settings: Optional[dict] = None) -> dict:
    """Train the counting task and write ``output`` (+ ``output``.json); returns the json's content."""
    from detectron2.layers import ShapeSpec

    from .backbone import build_small_resnet_fpn_backbone

    s = settings or pretrain_settings(cfg)
    t0 = time.perf_counter()
    torch.manual_seed(s["seed"])
    train_x, train_y = _images(_SPLIT_TRAIN, s["num_images"], s)
    test_x, test_y = _images(_SPLIT_HELD_OUT, max(256, s["num_images"] // 16), s)
    t_data = time.perf_counter() - t0
    bottom_up = build_small_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).bottom_up
    model = _Segmenter(bottom_up, s)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # biases, BN: no weight decay
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=s["lr"], momentum=0.9)
    steps_per_epoch = s["num_images"] // s["batch"]
    total = steps_per_epoch * s["epochs"]
    warmup = max(1, steps_per_epoch // 4)
    # linear warm-up then cosine: the usual ImageNet-style recipe, scaled to this run
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: (k + 1) / warmup if k < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, total - warmup))))
    generator = torch.Generator().manual_seed(s["seed"])
    losses = []
    model.train()
    for epoch in range(s["epochs"]):
        order = torch.randperm(s["num_images"], generator=generator)
        for k in range(steps_per_epoch):
            idx = order[k * s["batch"]:(k + 1) * s["batch"]]
            x, y = train_x[idx], train_y[idx]
            flip = torch.rand(len(idx), generator=generator) < 0.5  # the detector's horizontal flip
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            y = torch.where(flip.view(-1, 1, 1), y.flip(-1), y)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        logger.info(f"pretrain: epoch {epoch + 1}/{s['epochs']}, loss {np.mean(losses[-steps_per_epoch:]):.3f}")
    info = {
        "settings": s,
        "task": "semantic segmentation (background / circle / square / triangle at stride 4) of generator images "
                f"of seed {s['seed']} (split ids {_SPLIT_TRAIN} / {_SPLIT_HELD_OUT}); SGD 0.9, wd 1e-4, warm-up + "
                "cosine",
        "final_loss": float(np.mean(losses[-steps_per_epoch:])),
        "train": _evaluate(model, train_x[:1024], train_y[:1024], 256),
        "held_out": _evaluate(model, test_x, test_y, 256),
        "steps": total,
        "data_s": round(t_data, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    weights = {"backbone.bottom_up." + k: v.detach().clone() for k, v in model.bottom_up.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    atomic_write(output, lambda f: torch.save({"model": weights, "__author__": "largebatch.modeling.pretrain"}, f),
                 mode="wb")
    atomic_write(output + ".json", lambda f: json.dump(info, f, indent=1))
    return info


def ensure_pretrained_backbone(cfg, output: str, settings: Optional[dict] = None) -> dict:
    """The cached backbone at ``output`` when its json says it was made with these settings, else train it."""
    s = settings or pretrain_settings(cfg)
    try:
        with open(output + ".json") as f:
            info = json.load(f)
        if info.get("settings") == s and os.path.isfile(output):
            return info
    except (OSError, ValueError):
        pass
    return pretrain_backbone(cfg, output, s)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True, help="a config whose backbone / input size to pre-train")
    p.add_argument("--output", required=True, help="checkpoint to write (a .json beside it says how it was made)")
    p.add_argument("--num-images", type=int, default=8192)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--force", action="store_true", help="train even when a matching cached file exists")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config_file, args.opts, 1)
    s = pretrain_settings(cfg, num_images=args.num_images, epochs=args.epochs)
    info = pretrain_backbone(cfg, args.output, s) if args.force else ensure_pretrained_backbone(cfg, args.output, s)
    print(json.dumps({k: v for k, v in info.items() if k != "settings"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
