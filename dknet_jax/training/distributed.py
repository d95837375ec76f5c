"""Multi-host data parallelism with ``jax.distributed``: start-up, the global mesh, the
global batch, and host-side agreement between processes.

One Python process per host (``scripts/train.py --num_processes ...``), each driving its
local devices. Every process runs the same loop on the same global arrays (SPMD):

- **Data**: each process builds only its share of every global batch
  (``pipeline.TrainIterator(num_shards=P, shard_index=p)``: the same batch plan and
  augmentation as one process with the same seed and global batch size). Before a step
  the processes agree on the block capacities (:func:`global_batch`: a small all-gather
  of each block's bucket; the largest wins, so every process pads to the same shape and
  the jitted step compiles once per shape everywhere), pad and re-id their block
  (``batching.place_block``) and ``jax.make_array_from_process_local_data`` assembles
  the global ``PointBatch``: point rows split over all devices, instance slots and
  scenes split over processes (replicated on a process's own devices).
- **State**: parameters, optimiser state and BatchNorm statistics are replicated on every
  device (:func:`replicate`); XLA's SPMD partitioner inserts the collectives, so the
  gradient and the BatchNorm statistics are those of the whole global batch.
- **Host side**: logging, evaluation and the progress bar run on process 0; every
  process takes part in orbax saves and restores (orbax writes each file once, from the
  primary process) and values that steer all processes (the validation metric that picks
  ``best/``) are broadcast from process 0 (:func:`broadcast`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dknet_jax.cli import UserError
from dknet_jax.data.batching import place_block
from dknet_jax.types import PointBatch

# PointBatch fields with one row per point (split over all devices); the others have one
# entry per instance slot or scene (split over processes)
POINT_FIELDS = ("xyz", "feats", "vox", "batch_id", "valid", "semantic", "instance", "superpoint")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
) -> bool:
    """Start ``jax.distributed`` when asked; returns whether it was started.

    Explicit ``coordinator_address``/``num_processes``/``process_id`` (all three, or
    ``auto`` with any subset) start it with those values; ``auto`` alone lets JAX detect
    the cluster (the installed JAX knows SLURM, Open MPI, mpi4py, Kubernetes and Cloud
    TPU; ``JAX_COORDINATOR_ADDRESS`` may stand in for the address). Nothing given: a
    single process, no start-up. Must run before any JAX computation."""
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if not auto and all(v is None for v in given.values()):
        return False
    missing = [k for k, v in given.items() if v is None]
    if not auto and missing:
        raise UserError(
            f"multi-host training needs --coordinator_address, --num_processes and "
            f"--process_id together (missing: {', '.join('--' + k for k in missing)}); or "
            f"pass --distributed to let JAX detect the cluster"
        )
    if num_processes is not None and num_processes < 1:
        raise UserError(f"--num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise UserError(f"--process_id must be in 0..{num_processes - 1}, got {process_id}")
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
    return True


def is_primary() -> bool:
    """Process 0: the one that logs, evaluates and prints."""
    return jax.process_index() == 0


def global_mesh() -> Mesh | None:
    """The training mesh: None for one process on one device; else a 1-D ``data`` mesh over
    the local devices (one process) or a 2-D ``(proc, data)`` mesh over every device of
    every process, row ``p`` holding process ``p``'s devices (multi-host)."""
    if jax.process_count() == 1:
        devices = jax.local_devices()
        return Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    per = jax.local_device_count()
    if len(devices) != per * jax.process_count():
        raise RuntimeError(
            f"{len(devices)} devices over {jax.process_count()} processes with "
            f"{per} local devices each: every process must drive the same number of devices"
        )
    return Mesh(np.array(devices).reshape(jax.process_count(), per), ("proc", "data"))


def replicate(tree, mesh: Mesh | None):
    """Put a pytree of (host) arrays on every device of ``mesh`` (all processes must pass
    equal values: parameters built from the same seed or restored from one checkpoint)."""
    if mesh is None:
        return tree
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), rep), tree)


def to_host(tree):
    """Numpy copies of replicated (possibly multi-process) arrays."""
    return jax.tree.map(np.asarray, tree)


def broadcast(value: float) -> float:
    """Process 0's ``value`` on every process (identity for one process)."""
    if jax.process_count() == 1:
        return value
    return float(multihost_utils.broadcast_one_to_all(np.float32(value)))


def agree_capacities(block: PointBatch) -> tuple[int, int]:
    """The (points, instance slots) capacity of a block on every process: the largest any
    process needs for its share of this global batch. A collective: every process calls
    it once per batch, in the same order."""
    mine = np.array([block.xyz.shape[0], block.instance_class.shape[0]], np.int32)
    if jax.process_count() == 1:
        return int(mine[0]), int(mine[1])
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
    return int(every[:, 0].max()), int(every[:, 1].max())


def global_batch(block: PointBatch, mesh: Mesh) -> PointBatch:
    """This process's block of the global batch -> the global ``PointBatch`` on ``mesh``
    (a ``global_mesh()`` of several processes). Point rows are split over all devices,
    instance slots and scenes over processes."""
    n, g = agree_capacities(block)
    count = jax.process_count()
    placed = place_block(
        block,
        index=jax.process_index(),
        count=count,
        point_capacity=n,
        instance_capacity=g,
    )
    pts = NamedSharding(mesh, PartitionSpec(("proc", "data")))
    per_process = NamedSharding(mesh, PartitionSpec("proc"))
    if n % mesh.shape["data"]:
        raise ValueError(
            f"point bucket {n} does not divide over the {mesh.shape['data']} local devices "
            f"of each process; use buckets that are multiples of it (config.data.point_buckets)"
        )

    def put(name):
        x = np.asarray(getattr(placed, name))
        sharding = pts if name in POINT_FIELDS else per_process
        shape = (count * x.shape[0],) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return PointBatch(**{name: put(name) for name in PointBatch.__dataclass_fields__})
