"""``AtomicCheckpointer``: detectron2's checkpointer whose files never exist half-written."""
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..files import atomic_write

__all__ = ["AtomicCheckpointer"]


class AtomicCheckpointer(DetectionCheckpointer):
    """A DetectionCheckpointer whose files are written under a temporary name and then renamed, so a
    crash or a stop never leaves a truncated checkpoint (or a `last_checkpoint` naming one)."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        self.logger.info(f"Saving checkpoint to {os.path.join(self.save_dir, basename)}")
        atomic_write(os.path.join(self.save_dir, basename), lambda f: torch.save(data, f), "wb")
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write(os.path.join(self.save_dir, "last_checkpoint"), lambda f: f.write(last_filename_basename), "w")
