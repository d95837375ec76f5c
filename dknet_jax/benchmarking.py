"""Shared code of the benchmark scripts (``scripts/bench_train.py``, ``bench_infer.py``).

Place in the data flow: outside it. The benchmarks measure the library on synthetic rooms;
this module gives them their data (the synthetic-room cache), the machine and memory
numbers they report, and the ``--config`` default of their command lines. It is the last
layer of the package (docs/design.md, "Layers"): it may import anything, nothing in the
package imports it.

Synthetic-room cache (`synthetic_scenes`): room i is ``generate_scene(default_rng([seed,
i]), size, "scannet")``, as ``scripts/make_synthetic.py`` draws it. Its prepared scene
comes through the real path: the room is written as raw ScanNet files (``synthetic.
write_scannet_scene`` + ``write_label_table``) into a temporary folder, prepared by
``data.scannet.prepare_scannet_scene`` (the one home of the label rules) and saved with
``data.preparation.save_prepared`` as ``<cache>/scene<NNNN>_00.npz``; the raw files are
then deleted. So a cached scene equals what ``make_synthetic.py`` + ``prepare_scannet.py``
give for the same seed and index (``tests/test_benchmarking.py``). Each npz is written
atomically (temporary file + rename), so an interrupted run never leaves a half scene
that a later run would take as cached; rooms are generated in parallel in ``spawn``
processes (never a fork of a process that may hold JAX).
"""

from __future__ import annotations

import glob
import gzip
import json
import multiprocessing
import os
import platform
import re
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from dknet_jax.cli import UserError

GiB = 1024.0**3
# the repository root (an editable install: the configs/ folder sits next to dknet_jax/)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------
# command line
def with_default_config(argv: Sequence[str], default: str) -> list[str]:
    """``argv`` with ``--config=<default>`` added when it names no config file.

    ``default`` and a relative ``--config`` path that is not a file from the current
    folder are taken relative to the repository root, so the benchmarks run from
    anywhere. ``--config.<key>=<value>`` overrides are left as they are."""

    def resolve(spec: str) -> str:
        path, sep, arg = spec.partition(":")
        if not os.path.isabs(path) and not os.path.isfile(path):
            candidate = os.path.join(REPO, path)
            if os.path.isfile(candidate):
                path = candidate
        return path + sep + arg

    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            out[i] = "--config=" + resolve(a[len("--config=") :])
            return out
        if a == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
            return out
    return out[:1] + [f"--config={resolve(default)}"] + out[1:]


def bench_config(config_flag, own: dict) -> tuple:
    """The config of an absl ``DEFINE_config_file`` flag (``flags.FLAGS["config"]``, with
    its ``--config.<key>`` overrides), then the script's own settings ``own``
    (``{"section.key": value}``), validated; and every override as ``key=value`` text
    for the report.

    Raises:
      ConfigError: a value `config.validate` rejects (it names the key).
    """
    import copy

    from ml_collections import config_flags

    from dknet_jax.config import validate

    config = copy.deepcopy(config_flag.value)
    given = config_flags.get_override_values(config_flag)
    overrides = [f"{k}={v}" for k, v in given.items()]
    for key, value in own.items():
        node, parts = config, key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value
        overrides.append(f"{key}={value}")
    return validate(config), overrides


def flag_given(argv: Sequence[str], name: str) -> bool:
    """Whether the boolean flag ``--name`` is switched on in ``argv`` (before absl parses
    it: ``--name``, ``--name=true``/``1``; the last mention wins)."""
    on = False
    for a in argv[1:]:
        if a == f"--{name}":
            on = True
        elif a == f"--no{name}":
            on = False
        elif a.startswith(f"--{name}="):
            on = a.split("=", 1)[1].lower() in ("true", "1", "t", "yes")
    return on


# ---------------------------------------------------------------------------------------
# data: synthetic rooms -> raw ScanNet files -> prepared scenes
def _prepare_room(job: tuple[str, int, int, str]) -> str:
    """Write the prepared scene of room ``index`` to ``path`` unless it exists."""
    from dknet_jax.data.preparation import save_prepared
    from dknet_jax.data.scannet import LABEL_TABLE, prepare_scannet_scene, read_label_table
    from dknet_jax.synthetic import generate_scene, write_label_table, write_scannet_scene

    path, seed, index, size = job
    if os.path.isfile(path):
        return path
    scene_id = f"scene{index:04d}_00"
    mesh = generate_scene(np.random.default_rng([seed, index]), size, "scannet")
    with tempfile.TemporaryDirectory(prefix="dknet_bench_raw_") as raw:
        write_label_table(os.path.join(raw, LABEL_TABLE))
        folder = write_scannet_scene(mesh, raw, scene_id)
        table = read_label_table(os.path.join(raw, LABEL_TABLE))
        arrays, _ = prepare_scannet_scene(str(folder), scene_id, table)
    save_prepared(path, arrays)
    return path


def synthetic_scenes(
    out_dir: str, scenes: int, size: str, seed: int = 0, workers: int = 1
) -> list[str]:
    """Paths of the prepared scenes of synthetic rooms 0..scenes-1 under ``out_dir``
    (``scene<NNNN>_00.npz``), generating the missing ones (``workers`` processes)."""
    from dknet_jax.synthetic import SIZES

    if size not in SIZES:
        raise UserError(f"synthetic room size {size!r} is not one of {sorted(SIZES)}")
    if scenes < 1:
        raise UserError(f"the number of synthetic rooms must be >= 1, got {scenes}")
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(os.path.join(out_dir, f"scene{i:04d}_00.npz"), seed, i, size) for i in range(scenes)]
    missing = [j for j in jobs if not os.path.isfile(j[0])]
    if missing:
        print(
            f"generating {len(missing)} synthetic '{size}' rooms into {out_dir} "
            f"({workers} worker(s)) ...",
            flush=True,
        )
        t = time.perf_counter()
        if workers > 1 and len(missing) > 1:
            ctx = multiprocessing.get_context("spawn")  # never fork a process that holds jax
            with ProcessPoolExecutor(min(workers, len(missing)), mp_context=ctx) as pool:
                list(pool.map(_prepare_room, missing))
        else:
            for j in missing:
                _prepare_room(j)
        print(f"  done in {time.perf_counter() - t:.1f}s", flush=True)
    return [j[0] for j in jobs]


def bench_scenes(
    scenes: int,
    size: str,
    *,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    workers: int = 1,
) -> list[str]:
    """The scenes a benchmark runs on: the first ``scenes`` prepared scenes of
    ``data_dir`` (its ``train`` split when it has one), else synthetic rooms cached in
    ``cache_dir`` (default ``$TMP/dknet_bench/<size>_s0``)."""
    from dknet_jax.data.dataset import list_scenes

    if data_dir:
        has_train = os.path.isdir(os.path.join(data_dir, "train")) or os.path.isfile(
            os.path.join(data_dir, "train.txt")
        )
        paths = list_scenes(data_dir, "train" if has_train else None)[:scenes]
        if not paths:
            raise UserError(f"--data_dir {data_dir}: no prepared scenes (*.npz) found")
        return paths
    cache = cache_dir or os.path.join(tempfile.gettempdir(), "dknet_bench", f"{size}_s0")
    return synthetic_scenes(cache, scenes, size, seed=0, workers=workers)


# ---------------------------------------------------------------------------------------
# machine and memory
def device_line() -> str:
    """One line naming the devices, JAX version, host CPU and the load at the start."""
    import jax

    d = jax.local_devices()
    host = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
    return (
        f"{len(d)} x {d[0].device_kind} ({d[0].platform}), jax {jax.__version__}; host {host}; "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )


def host_peak_gib() -> float:
    """Peak resident set of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (GiB if sys.platform == "darwin" else 1024.0**2)


def device_peak_gib() -> float | None:
    """Peak device memory in use (``memory_stats()["peak_bytes_in_use"]``); None where the
    backend does not report it (CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / GiB


def available_gib() -> float:
    """Memory the next allocation can use: device ``bytes_limit`` - in use, else the host's
    MemAvailable (inf when neither is known)."""
    import jax

    stats = jax.local_devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) / GiB
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0**2
    except OSError:
        pass
    return float("inf")


def compiled_gib(compiled) -> float | None:
    """Arguments + outputs - aliased + temporaries of a compiled executable (XLA's
    ``memory_analysis()``); None where the backend does not implement it."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    ) / GiB


def cache_size(jitted) -> int | None:
    """Number of executables a jit function holds (private JAX API; None if absent)."""
    fn = getattr(jitted, "_cache_size", None)
    return fn() if callable(fn) else None


def table(rows: Sequence[tuple[str, str]], title: str) -> str:
    """``(name, value)`` rows as an aligned two-column text table under ``title``."""
    w = max(len(r[0]) for r in rows)
    lines = [title, "-" * len(title)] + [f"{k:<{w}}  {v}" for k, v in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# kernel time by named scope (jax.profiler trace of a compiled function)

_CONTROL_FLOW = ("conditional(", "while(", "call(")


def _kernel_scopes(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its ``op_name`` (the traced scopes), for the instructions
    that are kernels: control flow (while, conditional, call) is left out, as its trace
    events contain its body's kernels."""
    out = {}
    pattern = r'^\s*(?:ROOT )?%?([\w.\-]+) = ([^\n]*?)metadata=\{[^}]*op_name="([^"]+)"'
    for m in re.finditer(pattern, hlo_text, re.M):
        if not any(c in m.group(2) for c in _CONTROL_FLOW):
            out[m.group(1)] = m.group(3)
    return out


def _unwrap(part: str) -> str:
    """``transpose(jvp(backbone))`` -> ``backbone``; other names as they are."""
    while part.startswith(("jvp(", "transpose(")) and part.endswith(")"):
        part = part[part.index("(") + 1 : -1]
    return part


def scope_times(trace_dir: str, hlo_text: str, calls: int, depth: int = 1) -> list[tuple]:
    """Kernel time per call of a compiled function, summed by named scope.

    ``trace_dir``: a ``jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)``
    folder holding ``calls`` calls of the function whose ``compiled.as_text()`` is
    ``hlo_text``. Each kernel's trace events are matched to its HLO instruction, whose
    ``op_name`` gives the scopes (``jax.named_scope``: ``backbone``, ``heads``, ...);
    ``depth`` scopes are kept, and the pass: ``"bwd"`` under ``transpose(...)``, else
    ``"fwd"``. Returns ``[(scope, pass, ms per call, trace events per call)]``, largest
    first (a kernel inside a loop gives an event per iteration, and XLA:CPU records some
    kernels as two events, a short launch and the run). Kernels on the two cores
    overlap, so the sum can exceed the wall time of a call."""
    files = sorted(
        glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    )
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    with gzip.open(files[-1]) as f:
        events = json.load(f)["traceEvents"]
    scopes = _kernel_scopes(hlo_text)
    total, count = Counter(), Counter()
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") != "X" or op not in scopes:
            continue
        name = scopes[op]
        parts = [_unwrap(p) for p in name.split("/")[1:]]
        parts = [p for p in parts if p]
        key = ("/".join(parts[:depth]) or "-", "bwd" if "transpose(" in name else "fwd")
        total[key] += e["dur"] / 1e3
        count[key] += 1
    return [
        (s, p, total[(s, p)] / calls, count[(s, p)] / calls)
        for (s, p) in sorted(total, key=total.get, reverse=True)
    ]
