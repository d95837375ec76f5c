"""Training and evaluation iterators over prepared scenes, with background prefetch.

Data flow: split (list of npz paths) -> **pipeline** [per batch: ``dataset.load_scene`` ->
``transforms.augment`` (train) / ``prepare_eval`` (eval) -> ``batching.pack_batch``] ->
numpy ``PointBatch`` (optionally moved to device by ``transfer``) -> train/eval step.

Determinism: an epoch's batch plan is a pure function of (seed, epoch) and each scene's
augmentation draws from a generator seeded by (seed, epoch, scene index in the split), so
batch k of epoch e is the same whatever the number of worker threads, the prefetch depth,
or the order in which workers finish. Resuming: ``state()`` is a small JSON-serialisable
dict (seed, epoch, position = batches already *consumed* in the epoch); ``restore(state)``
(or ``state=`` at construction) continues with exactly the batches an uninterrupted run
would have produced next.

Prefetch: a ``ThreadPoolExecutor`` builds up to ``prefetch`` batches ahead; results are
taken in submission order. Threads suffice because the heavy parts (npz decompression,
numpy/scipy array ops) release the GIL, and they avoid pickling 150k-point scenes between
processes. We do not use ``grain``: it is not a dependency of this project (one more
install for every user), and what it would give us here — per-record seeded random
transforms, checkpointable iterator state, worker prefetch — is a few dozen lines given
that our batching step (bucketed packing of whole scenes, size-greedy eval batches) is
custom anyway; its multiprocess workers would also copy whole scenes through shared
memory for no gain on a 2-core host.

Training batches: scenes shuffled per epoch (optionally grouped by size inside a window
of shuffled scenes to reduce padding), the last incomplete batch dropped
(``drop_remainder``) or padded with empty scenes. Each scene is cropped to
``max_points``; if ``batch_size * max_points`` exceeds the largest point bucket, the crop
is lowered to ``largest_bucket // batch_size`` with a warning, so training never fails on
an unlucky batch (``max_points=None`` disables the crop: an oversized batch is then an
error naming its scenes). Evaluation batches: every scene exactly once, in split order, greedily
grouping consecutive scenes while they fit the largest bucket (at most ``batch_size``);
the remaining slots are empty scenes (``scene_valid`` False); names come with each batch.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dknet_jax.data.batching import pack_batch
from dknet_jax.data.dataset import load_scene, scene_name, scene_num_points
from dknet_jax.data.transforms import (
    VOXEL_ORIGINS,
    AugmentConfig,
    augment,
    prepare_eval,
    released_test_matrices,
)

_PLAN_TAG, _SCENE_TAG = 0, 1


def scene_rng(seed: int, epoch: int, scene: int) -> np.random.Generator:
    """The augmentation generator of scene ``scene`` (index in the split) in ``epoch``."""
    return np.random.default_rng(np.random.SeedSequence([seed, _SCENE_TAG, epoch, scene]))


class _Ready:
    """A finished 'future' for synchronous mode (num_workers=0): computes on demand."""

    def __init__(self, fn, *args):
        self._fn, self._args = fn, args

    def result(self):
        return self._fn(*self._args)

    def cancel(self):
        return True


class _BatchIterator:
    """Ordered prefetching over a plan: plan(epoch) -> list of batches (scene indices)."""

    def __init__(self, *, num_epochs, num_workers, prefetch, transfer):
        if num_workers < 0 or prefetch < 1:
            raise ValueError(
                f"need num_workers >= 0 and prefetch >= 1, got {num_workers}, {prefetch}"
            )
        self._num_epochs = num_epochs
        self._pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self._depth = prefetch if num_workers > 0 else 1
        self._transfer = transfer
        self._queue: collections.deque = collections.deque()
        self._plans: dict[int, list] = {}
        self._epoch, self._position = 0, 0
        self._next_job: tuple[int, int] | None = (0, 0)

    # subclasses: _plan(epoch) -> list[list[int]], _make(epoch, indices) -> item
    def _plan_cached(self, epoch: int) -> list:
        if epoch not in self._plans:
            if len(self._plans) > 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = self._plan(epoch)
        return self._plans[epoch]

    def _advance(self, epoch: int, position: int) -> tuple[int, int] | None:
        if position + 1 < len(self._plan_cached(epoch)):
            return epoch, position + 1
        if self._num_epochs is not None and epoch + 1 >= self._num_epochs:
            return None
        return epoch + 1, 0

    def _job(self, epoch: int, indices: list[int]):
        item = self._make(epoch, indices)
        return self._transfer(item) if self._transfer is not None else item

    def _fill(self) -> None:
        while self._next_job is not None and len(self._queue) < self._depth:
            epoch, pos = self._next_job
            indices = self._plan_cached(epoch)[pos]
            if self._pool is None:
                fut = _Ready(self._job, epoch, indices)
            else:
                fut = self._pool.submit(self._job, epoch, indices)
            self._queue.append(((epoch, pos), fut))
            self._next_job = self._advance(epoch, pos)

    def __iter__(self):
        return self

    def __next__(self):
        self._fill()
        if not self._queue:
            raise StopIteration
        (epoch, pos), fut = self._queue.popleft()
        item = fut.result()
        nxt = self._advance(epoch, pos)
        self._epoch, self._position = nxt if nxt is not None else (epoch + 1, 0)
        self._fill()
        return item

    def _drain(self) -> None:
        while self._queue:
            _, fut = self._queue.popleft()
            if not fut.cancel():
                try:
                    fut.result()
                except Exception:  # a dropped prefetch; its error resurfaces if re-run
                    pass

    def _seek(self, epoch: int, position: int) -> None:
        self._drain()
        if position < 0 or epoch < 0:
            raise ValueError(f"invalid iterator state epoch={epoch}, position={position}")
        if position >= len(self._plan_cached(epoch)):
            raise ValueError(
                f"iterator state position {position} is past the end of epoch {epoch} "
                f"({len(self._plan_cached(epoch))} batches); the split or batch size changed?"
            )
        self._epoch, self._position = epoch, position
        done = self._num_epochs is not None and epoch >= self._num_epochs
        self._next_job = None if done else (epoch, position)

    def close(self) -> None:
        """Drop prefetched work and stop the worker threads."""
        self._drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._next_job = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            try:
                pool.shutdown(wait=False, cancel_futures=True)
            except Exception:  # interpreter shutdown: the queue module may be gone already
                pass


@dataclasses.dataclass(frozen=True)
class _Packing:
    buckets: tuple[int, ...]
    instance_buckets: tuple[int, ...]
    num_classes: int
    voxel_size: float
    batch_size: int
    voxel_origin: str = "centre"

    def pack(self, samples):
        return pack_batch(
            samples,
            buckets=self.buckets,
            instance_buckets=self.instance_buckets,
            num_classes=self.num_classes,
            voxel_size=self.voxel_size,
            batch_size=self.batch_size,
            voxel_origin=self.voxel_origin,
        )


def _checked_origin(voxel_origin: str) -> str:
    if voxel_origin not in VOXEL_ORIGINS:
        raise ValueError(
            f"voxel_origin {voxel_origin!r} is not one of {VOXEL_ORIGINS} (config "
            f"data.voxel_origin: 'centre' = ours, 'scene_min' = the released grid)"
        )
    return voxel_origin


class TrainIterator(_BatchIterator):
    """Shuffled, augmented, packed training batches (numpy ``PointBatch``), resumable.

    Args:
      paths: the split's npz files (index in this list = scene index for the RNG).
      batch_size: B scenes per batch.
      seed: base seed (non-negative int).
      voxel_size, num_classes, buckets, instance_buckets, voxel_origin: see
        ``batching.pack_batch``.
      augment_config: ``transforms.AugmentConfig`` (its ``max_points`` is the crop);
        None = no augmentation and no crop (only centring).
      drop_remainder: drop the last incomplete batch of an epoch (else pad it with empty
        scenes).
      size_window: 0 = plain shuffle; W > 0 = sort each run of W*B shuffled scenes by
        point count, cut it into batches and shuffle the batches (less padding).
      num_epochs: None = endless.
      num_workers: worker threads (0 = build batches synchronously in ``next``).
      prefetch: batches built ahead.
      transfer: optional fn applied to each batch in the worker (e.g. ``jax.device_put``).
      state: a ``state()`` dict to resume from.
      num_shards, shard_index: multi-host data parallelism. The batch plan is that of the
        global batch (``batch_size`` scenes, the same for any number of shards), and this
        iterator loads and packs only its ``batch_size // num_shards`` scenes of each
        batch: shard ``i`` takes slots ``i*b .. (i+1)*b - 1`` of the global batch
        (``batching.place_block`` then makes its ids global). ``batch_size`` must divide
        by ``num_shards``; the last incomplete batch must be dropped (``drop_remainder``).
    """

    def __init__(
        self,
        paths: Sequence[str],
        *,
        batch_size: int,
        seed: int,
        voxel_size: float,
        num_classes: int,
        buckets: Sequence[int],
        instance_buckets: Sequence[int],
        augment_config: AugmentConfig | None,
        drop_remainder: bool = True,
        size_window: int = 0,
        num_epochs: int | None = None,
        num_workers: int = 2,
        prefetch: int = 4,
        transfer: Callable | None = None,
        state: dict | None = None,
        voxel_origin: str = "centre",
        num_shards: int = 1,
        shard_index: int = 0,
    ):
        super().__init__(
            num_epochs=num_epochs, num_workers=num_workers, prefetch=prefetch, transfer=transfer
        )
        self._paths = [str(p) for p in paths]
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ValueError(f"need 0 <= shard_index < num_shards, got {shard_index}, {num_shards}")
        if batch_size % num_shards:
            raise ValueError(
                f"the global batch size {batch_size} (config.data.batch_size) does not divide "
                f"by the {num_shards} processes: each process loads an equal share of every "
                f"batch; set config.data.batch_size to a multiple of {num_shards}"
            )
        if num_shards > 1 and not drop_remainder:
            raise ValueError(
                "multi-host training needs drop_remainder=True (a padded last batch would "
                "leave some processes without scenes)"
            )
        self._shards, self._shard = int(num_shards), int(shard_index)
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if drop_remainder and len(self._paths) < batch_size:
            raise ValueError(
                f"{len(self._paths)} training scenes < batch_size {batch_size} with "
                f"drop_remainder: no batch would be produced"
            )
        if not self._paths:
            raise ValueError("no training scenes")
        self._seed, self._batch_size = int(seed), int(batch_size)
        self._drop, self._window = drop_remainder, int(size_window)
        self._packing = _Packing(
            tuple(sorted(buckets)),
            tuple(sorted(instance_buckets)),
            num_classes,
            voxel_size,
            batch_size // num_shards,
            _checked_origin(voxel_origin),
        )
        cfg = augment_config
        cap = max(buckets) // batch_size
        if cfg is not None and cfg.max_points is not None and cfg.max_points > cap:
            warnings.warn(
                f"training crop max_points={cfg.max_points} x batch_size {batch_size} can "
                f"exceed the largest point bucket {max(buckets)}; cropping each scene to "
                f"{cap} points instead (add a bucket >= batch_size * max_points to keep it)",
                stacklevel=2,
            )
            cfg = dataclasses.replace(cfg, max_points=cap)
        self._augment = cfg
        self._sizes = None
        if state is not None:
            self.restore(state)

    def _scene_sizes(self) -> np.ndarray:
        if self._sizes is None:
            self._sizes = np.array([scene_num_points(p) for p in self._paths])
        return self._sizes

    def _plan(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng(np.random.SeedSequence([self._seed, _PLAN_TAG, epoch]))
        order = rng.permutation(len(self._paths))
        b = self._batch_size
        if self._window > 0:
            sizes = self._scene_sizes()
            batches = []
            for start in range(0, len(order), self._window * b):
                chunk = order[start : start + self._window * b]
                chunk = chunk[np.argsort(sizes[chunk], kind="stable")]
                batches += [chunk[i : i + b] for i in range(0, len(chunk), b)]
            full = [x for x in batches if len(x) == b]
            part = [x for x in batches if len(x) < b]
            batches = [full[i] for i in rng.permutation(len(full))] + part
        else:
            batches = [order[i : i + b] for i in range(0, len(order), b)]
        if self._drop:
            batches = [x for x in batches if len(x) == b]
        return [[int(i) for i in x] for x in batches]

    def _make(self, epoch: int, indices: list[int]):
        b = self._batch_size // self._shards
        samples = []
        for i in indices[self._shard * b : (self._shard + 1) * b]:
            sample = load_scene(self._paths[i], num_classes=self._packing.num_classes)
            if self._augment is None:
                sample = prepare_eval(sample)
            else:
                sample = augment(sample, scene_rng(self._seed, epoch, i), self._augment)
            samples.append(sample)
        return self._packing.pack(samples)

    def batches_per_epoch(self, epoch: int = 0) -> int:
        return len(self._plan_cached(epoch))

    def state(self) -> dict:
        """JSON-serialisable position: the next batch ``next`` will return."""
        return {
            "seed": self._seed,
            "epoch": int(self._epoch),
            "position": int(self._position),
            "num_scenes": len(self._paths),
            "batch_size": self._batch_size,
        }

    def restore(self, state: dict) -> None:
        """Continue from a ``state()`` dict (drops prefetched batches)."""
        for key, have in (("num_scenes", len(self._paths)), ("batch_size", self._batch_size)):
            if key in state and int(state[key]) != have:
                raise ValueError(
                    f"iterator state was saved with {key}={state[key]} but this iterator has "
                    f"{have}; cannot resume the same batch sequence"
                )
        self._seed = int(state["seed"])
        self._plans.clear()
        self._seek(int(state["epoch"]), int(state["position"]))


class EvalIterator(_BatchIterator):
    """Every scene once, in order, unaugmented (centred only): yields
    ``(PointBatch, names)`` with ``names`` a list of B scene names (None for the empty
    padding scenes, whose ``scene_valid`` is False). Consecutive scenes share a batch
    while their points fit the largest bucket (at most ``batch_size`` of them); a single
    scene larger than the largest bucket is an error naming it. ``released_aug_seed``
    (config ``test.released_aug``): scene i of ``paths`` gets the released test-time
    flip + rotation ``transforms.released_test_matrices(seed, len(paths))[i]`` (``paths``
    in sorted-name order, as ``dataset.list_scenes`` and the released loader give them).
    ``voxel_origin`` (config ``data.voxel_origin``): see ``batching.pack_batch``."""

    def __init__(
        self,
        paths: Sequence[str],
        *,
        batch_size: int,
        voxel_size: float,
        num_classes: int,
        buckets: Sequence[int],
        instance_buckets: Sequence[int],
        require_labels: bool = True,
        num_workers: int = 2,
        prefetch: int = 4,
        transfer: Callable | None = None,
        released_aug_seed: int | None = None,
        voxel_origin: str = "centre",
    ):
        super().__init__(
            num_epochs=1, num_workers=num_workers, prefetch=prefetch, transfer=transfer
        )
        self._paths = [str(p) for p in paths]
        self._matrices = (
            None
            if released_aug_seed is None
            else released_test_matrices(released_aug_seed, len(self._paths))
        )
        self._packing = _Packing(
            tuple(sorted(buckets)),
            tuple(sorted(instance_buckets)),
            num_classes,
            voxel_size,
            batch_size,
            _checked_origin(voxel_origin),
        )
        self._require_labels = require_labels
        self._groups = self._group(batch_size, max(buckets))
        if not self._groups:
            self._next_job = None

    def _group(self, batch_size: int, cap: int) -> list[list[int]]:
        groups, cur, total = [], [], 0
        for i, p in enumerate(self._paths):
            n = scene_num_points(p)
            if n > cap:
                raise ValueError(
                    f"{p}: {n} points exceed the largest point bucket {cap}; evaluation does "
                    f"not crop, so add a larger entry to config.data.point_buckets"
                )
            if cur and (len(cur) == batch_size or total + n > cap):
                groups.append(cur)
                cur, total = [], 0
            cur.append(i)
            total += n
        if cur:
            groups.append(cur)
        return groups

    def _plan(self, epoch: int) -> list[list[int]]:
        return self._groups

    def _job(self, epoch: int, indices: list[int]):
        batch, names = self._make(epoch, indices)
        return (self._transfer(batch) if self._transfer is not None else batch), names

    def _make(self, epoch: int, indices: list[int]):
        samples = [
            prepare_eval(
                load_scene(
                    self._paths[i],
                    num_classes=self._packing.num_classes,
                    require_labels=self._require_labels,
                ),
                None if self._matrices is None else self._matrices[i],
            )
            for i in indices
        ]
        names = [scene_name(self._paths[i]) for i in indices]
        names += [None] * (self._packing.batch_size - len(names))
        return self._packing.pack(samples), names

    def __len__(self) -> int:
        return len(self._groups)


def augment_from_config(data_config) -> AugmentConfig | None:
    """``config.data`` -> the training augmentation (None when ``data.augment`` is off):
    the released settings scaled to ``voxel_size``, ``max_points`` as the crop,
    ``color_noise``, and no elastic distortion when ``data.elastic`` is off."""
    d = data_config
    if not d.augment:
        return None
    return AugmentConfig.for_voxel_size(
        d.voxel_size,
        max_points=d.max_points,
        color_noise=d.color_noise,
        **({} if d.elastic else {"elastic": ()}),
    )


def train_iterator(paths: Sequence[str], config, **kwargs) -> TrainIterator:
    """The training iterator a full config describes (batch size, seed, voxel size, classes,
    buckets, augmentation); ``kwargs`` go to :class:`TrainIterator` (``num_workers``,
    ``prefetch``, ``num_epochs``, ``state``, ...)."""
    d = config.data
    return TrainIterator(
        paths,
        batch_size=d.batch_size,
        seed=config.seed,
        voxel_size=d.voxel_size,
        num_classes=config.model.num_classes,
        buckets=d.point_buckets,
        instance_buckets=d.instance_buckets,
        augment_config=augment_from_config(d),
        voxel_origin=d.voxel_origin,
        **kwargs,
    )
