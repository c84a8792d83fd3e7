"""A training data stream that a resumed run continues exactly where the interrupted one stopped.

detectron2's training loader draws an infinite, seeded stream of dataset indices (``TrainingSampler``), maps each
with random augmentations in the data-loader workers (whose random generators depend on the main process's state
when the loader starts) and, with ASPECT_RATIO_GROUPING, batches images of one orientation together, so a batch
need not hold consecutive images of the stream. After a resume it starts the stream over. Here:

- ``ResumableTrainingSampler`` yields the same stream as ``TrainingSampler`` (same seed: same indices, the same
  shard per rank) as ``(position, index)`` pairs, and can start anywhere: at ``start``, after first replaying
  the ``replay`` positions (the images the grouping held back when the run stopped);
- ``SeededMapDataset`` maps an item with every random generator (python, numpy, torch) seeded from
  ``(seed, rank, position)``: an image's augmentation is a function of its place in the stream, whichever
  data-loader worker maps it and however often the run was resumed. The caller's generators are restored
  after each item, so the training step's own randomness is untouched;
- ``stream_position`` replays the aspect-ratio grouping on the images' sizes alone (no image is read) to find,
  after a number of batches, where the stream stands and which images wait in the buckets.

detectron2's own loader and ``AspectRatioGroupedDataset`` do the loading and batching (``stream_loader``: in the
sampler's order on detectron2 0.6 and main alike, whatever the number of data-loader workers).
"""
import itertools
import logging
import random
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import DatasetFromList, build_detection_train_loader
from detectron2.data.common import ToIterableDataset
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm
from torch.utils.data import Dataset, Sampler

__all__ = ["ResumableTrainLoader", "ResumableTrainingSampler", "SeededMapDataset", "stream_loader", "stream_position"]

logger = logging.getLogger("largebatch")


class ResumableTrainingSampler(Sampler):
    """detectron2's TrainingSampler stream as ``(position, index)`` pairs of this rank's shard, from ``start``.

    position counts this rank's items from 0 (the global stream's item ``rank + position * world_size``).
    ``set_position(start, replay)`` must be called before iteration begins; ``replay`` positions (< start)
    are yielded first, in order.
    """

    def __init__(self, size: int, shuffle: bool = True, seed: Optional[int] = None):
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"ResumableTrainingSampler(size=) expects a positive int, got {size!r}")
        self.size = size
        self.shuffle = shuffle
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.rank = comm.get_rank()
        self.world_size = comm.get_world_size()
        self.start = 0
        self.replay: List[int] = []

    def set_position(self, start: int, replay: Sequence[int] = ()) -> None:
        self.start = int(start)
        self.replay = sorted(int(p) for p in replay)
        if any(p >= self.start or p < 0 for p in self.replay):
            raise ValueError(f"replay positions must lie in [0, {self.start}): {self.replay}")

    def indices(self):
        """This rank's infinite stream of dataset indices, from position 0 (TrainingSampler's order)."""
        g = torch.Generator()
        g.manual_seed(self.seed)

        def infinite():
            while True:
                if self.shuffle:
                    yield from torch.randperm(self.size, generator=g).tolist()
                else:
                    yield from range(self.size)

        return itertools.islice(infinite(), self.rank, None, self.world_size)

    def __iter__(self):
        stream = enumerate(self.indices())
        wanted = set(self.replay)
        replayed = []
        if self.start > 0:
            for position, index in stream:
                if position in wanted:
                    replayed.append((position, index))
                if position == self.start - 1:
                    break
        yield from replayed
        yield from stream


class SeededMapDataset(Dataset):
    """``mapper(dataset_dicts[index])`` for a ``(position, index)`` key, with the random generators seeded from
    ``(seed, rank, position)`` and restored afterwards (see the module doc).

    A mapper that returns None (an image it cannot use) gets the next index of the dataset instead, as many
    times as needed (detectron2's MapDataset draws another one at random).
    """

    def __init__(self, dataset_dicts: Sequence[dict], mapper, seed: int):
        self.dataset_dicts = dataset_dicts
        self.mapper = mapper
        self.seed = int(seed)
        self.rank = comm.get_rank()

    def __len__(self):
        return len(self.dataset_dicts)

    def __getitem__(self, key: Tuple[int, int]):
        position, index = key
        item_seed = np.random.SeedSequence([self.seed, self.rank, position]).generate_state(1)[0]
        states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
        try:
            for attempt in range(len(self.dataset_dicts)):
                random.seed(int(item_seed) + attempt)
                np.random.seed((int(item_seed) + attempt) % 2**32)
                torch.default_generator.manual_seed(int(item_seed) + attempt)  # CPU only: CUDA RNG untouched
                mapped = self.mapper(self.dataset_dicts[(index + attempt) % len(self.dataset_dicts)])
                if mapped is not None:
                    return mapped
            raise RuntimeError("the dataset mapper returned None for every image of the training set")
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.set_rng_state(states[2])


def stream_position(sampler: ResumableTrainingSampler, landscape: Sequence[bool], batch_size: int,
                    batches: int, grouping: bool) -> Tuple[int, List[int]]:
    """Where this rank's stream stands after ``batches`` batches of ``batch_size`` images: (next position, the
    positions held back in the aspect-ratio buckets). ``landscape[i]``: image i is wider than high (detectron2's
    AspectRatioGroupedDataset puts width > height in one bucket, the rest in the other)."""
    if batches <= 0:
        return 0, []
    if not grouping:
        return batches * batch_size, []
    buckets: Tuple[List[int], List[int]] = ([], [])
    emitted = 0
    for position, index in enumerate(sampler.indices()):
        bucket = buckets[0 if landscape[index] else 1]
        bucket.append(position)
        if len(bucket) == batch_size:
            bucket.clear()
            emitted += 1
            if emitted == batches:
                return position + 1, sorted(buckets[0] + buckets[1])
    raise AssertionError("unreachable: the stream is infinite")


def stream_loader(dataset: Dataset, sampler: Sampler, total_batch_size: int, aspect_ratio_grouping: bool,
                  num_workers: int):
    """detectron2's batched training loader over ``dataset`` in ``sampler``'s order, the order ``stream_position``
    replays: the stream is handed over as an iterable dataset whose data-loader workers take every N-th image
    (detectron2's ToIterableDataset with its default shard of one image), so that their merged output is the
    sampler's order. Given the map-style dataset and the sampler instead, detectron2 main shards the stream in
    chunks of a batch (0.6: per image), and the order the aspect-ratio grouping sees would depend on the version
    and on the number of data-loader workers."""
    return build_detection_train_loader(dataset=ToIterableDataset(dataset, sampler), mapper=None, sampler=None,
                                        total_batch_size=total_batch_size,
                                        aspect_ratio_grouping=aspect_ratio_grouping, num_workers=num_workers)


class ResumableTrainLoader:
    """detectron2's training loader for a config (``build_detection_train_loader``: its dataset, mapper, batch size,
    aspect-ratio grouping and workers) over a ``ResumableTrainingSampler`` and a ``SeededMapDataset``.

    Iterating it yields per-worker batches; the underlying loader, and its worker processes, start at the first
    ``next()``, so ``skip_to`` can still place the stream after a resume. ``state_dict()`` holds the stream's
    seed. cfg.SEED >= 0 fixes the seed; otherwise all workers share a random one, kept in the checkpoint.
    With a DATALOADER.SAMPLER_TRAIN other than TrainingSampler, detectron2's loader is used as it is, and a
    resume restarts its stream (said in the log).
    """

    def __init__(self, cfg):
        self._build(build_detection_train_loader.from_config(cfg), cfg.SEED if cfg.SEED >= 0 else None)

    @classmethod
    def from_arguments(cls, args: dict, seed: Optional[int] = None) -> "ResumableTrainLoader":
        """The same from ``build_detection_train_loader``'s arguments (``dataset`` a list of dicts, ``mapper``,
        ``total_batch_size`` and, optional, ``sampler``, ``aspect_ratio_grouping``, ``num_workers``), e.g. a
        LazyConfig's ``dataloader.train`` node instantiated argument by argument."""
        args = {"sampler": None, "aspect_ratio_grouping": True, "num_workers": 0, **args}
        loader = cls.__new__(cls)
        loader._build(args, seed)
        return loader

    def _build(self, args: dict, seed: Optional[int]) -> None:
        self.batch_size = args["total_batch_size"] // comm.get_world_size()
        self.grouping = bool(args["aspect_ratio_grouping"])
        if args["sampler"] is not None and type(args["sampler"]) is not TrainingSampler:  # None: a TrainingSampler's
            self.sampler = None
            self.loader = build_detection_train_loader(**args)
            return
        dicts = args["dataset"]
        sized = all("width" in d and "height" in d for d in dicts)
        self.landscape = [d["width"] > d["height"] for d in dicts] if sized else None
        self.sampler = ResumableTrainingSampler(len(dicts), seed=seed)
        self.dataset = SeededMapDataset(DatasetFromList(dicts, copy=False), args["mapper"], self.sampler.seed)
        self.loader = stream_loader(self.dataset, self.sampler, args["total_batch_size"], self.grouping,
                                    args["num_workers"])

    def __iter__(self):
        # a generator: nothing starts before the first next(). Starting a torch DataLoader draws its workers' base
        # seed from the global generator (unused here: SeededMapDataset seeds each image); the draw is undone,
        # so that the training step's random numbers do not depend on when the loader started (at a resume)
        batches = iter(self.loader)
        state = torch.random.get_rng_state()
        first = next(batches)
        torch.random.set_rng_state(state)
        yield first
        yield from batches

    def state_dict(self) -> dict:
        return {"seed": self.sampler.seed} if self.sampler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.sampler is not None and "seed" in state:
            self.sampler.seed = self.dataset.seed = int(state["seed"])

    def skip_to(self, batches: int) -> None:
        """Continue the stream after ``batches`` batches (of this worker) were consumed. Call before iterating."""
        if batches <= 0:
            return
        if self.sampler is None:
            logger.warning("DATALOADER.SAMPLER_TRAIN is not TrainingSampler: the resumed run starts its data stream "
                           "over (exact resume needs TrainingSampler)")
            return
        if self.grouping and self.landscape is None:
            logger.warning("the training images have no width / height in their dataset dicts: the resumed run "
                           "cannot rebuild the aspect-ratio groups and continues the stream after %d batches "
                           "without the images they held back", batches)
            self.sampler.set_position(batches * self.batch_size)
            return
        start, replay = stream_position(self.sampler, self.landscape, self.batch_size, batches, self.grouping)
        self.sampler.set_position(start, replay)
        logger.info("Data stream resumed after %d batches: at position %d of this worker's stream, %d held-back "
                    "image(s) first", batches, start, len(replay))
