"""Prediction on a user's own scan: file in, instance segmentation files and pictures out.

Data flow: ``readers.read_scan`` (PLY / NPZ / TXT) -> superpoints (``segment_mesh`` when
the file has faces, else ``segment_points``) -> ``transforms.prepare_eval`` +
``batching.pack_batch`` (one scene, padded to a point bucket) -> the jit-compiled
``predictor.make_predict_fn`` (DKNet forward + post-processing) -> ``predictor.split_scenes``
-> :func:`write_outputs`: ScanNet submission files, PLYs coloured by instance and by
class, a JSON summary and a PNG (``render``).

The model and its config come from a training work dir (``predictor.load_model``): the config
saved in the checkpoint's meta (merged into ``config.base_config()``) unless the caller
passes one. Scans with more points than the largest point bucket are an error by default
(the message names the fixes); with ``subsample=True`` the model runs on a fixed random
subset that fits and every point takes the prediction of its nearest inferred point.
Coordinates are taken as metres with z up (ScanNet's convention).

Map coordinates: a scan in georeferenced coordinates (e.g. a double-precision PLY with
offsets like 5e5 / 4e6 m) is read in float64 and, when any coordinate lies beyond 1 km,
shifted by a per-scan origin (the whole-metre floor of its bounding-box minimum, float64)
before anything is cast to float32, so the model sees centimetres, not float32's 0.25 m
steps at 4e6 m (``readers.scan_origin``). The outputs are in the input's coordinates: the
PLYs carry the coordinates exactly as read (float64 when the input's are doubles that
float32 cannot hold), the summary's boxes are computed in float64, and the summary records
``scene.origin``. A scan larger than a room (over 100 m in x or y, or 20 m in z: wrong
units, or a whole site) is predicted with a warning in the log and the summary.

Output names: the ScanNet submission list ``<scene>.txt`` and its masks
``predicted_masks/<scene>_NNN.txt`` are named by the scene id (``scene_id``, else the
``scene<4 digits>_<2 digits>`` prefix of the input's name, else its stem with whitespace replaced by
``_``) so ``scripts/eval_scannet.py`` pairs them with the GT ``<scene>.txt``; the PLYs, PNG
and summary JSON keep the input's stem (``<stem>_instances.ply``, ...). No output may
replace the input: :func:`predict_file` checks every output path (real paths) before
inference and stops with an error naming the clash.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable

import ml_collections
import numpy as np

from dknet_jax import io_atomic
from dknet_jax.data.labels import (
    NYU40_PALETTE,
    S3DIS_CLASSES,
    S3DIS_PALETTE,
    SCANNET_CLASSES,
    SCANNET_NYU40_IDS,
)
from dknet_jax.data.ply import write_ply
from dknet_jax.data.readers import read_scan
from dknet_jax.inference import render as R
from dknet_jax.inference.predictor import LoadedModel, load_model, run_model

__all__ = [
    "Prediction",
    "ScanOutputs",
    "class_names",
    "compute_superpoints",
    "instance_colors",
    "instance_per_point",
    "predict_file",
    "render_picture",
    "scene_id_for",
    "semantic_colors",
    "show_viewer",
    "summarise",
    "write_outputs",
]

# the colour of each class: ScanNet's nyu40 palette at the 20 benchmark classes' ids
_SCANNET20_COLORS = NYU40_PALETTE[list(SCANNET_NYU40_IDS)]


# ---------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------
# labels and colours


def class_names(config) -> tuple[str, ...]:
    """Class names of the config's label space (ScanNet 20 or S3DIS 13)."""
    return SCANNET_CLASSES if config.data.dataset == "scannet" else S3DIS_CLASSES


def semantic_colors(config) -> np.ndarray:
    """u8[S, 3] fixed colour per semantic class (ScanNet: the benchmark's nyu40 palette)."""
    return _SCANNET20_COLORS if config.data.dataset == "scannet" else S3DIS_PALETTE


# ---------------------------------------------------------------------------------------
# superpoints and inference


def compute_superpoints(
    xyz: np.ndarray, faces: np.ndarray | None, voxel_size: float | None = None
) -> np.ndarray:
    """i32[N] superpoint ids 0..P-1: ScanNet's mesh segmentation when there are faces,
    else the kNN point-cloud variant (on ``voxel_size`` cells when given, which bounds the
    cost on dense scans)."""
    from dknet_jax.data.superpoints import compact_ids, segment_mesh, segment_points

    if faces is not None and len(faces):
        seg = segment_mesh(xyz, faces)
    else:
        seg = segment_points(xyz, voxel_size=voxel_size)
    return compact_ids(seg)


def instance_per_point(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """i32[N]: for each point the index of the highest-scoring mask that covers it (ties:
    the lower index), -1 for none. masks bool[K, N], scores f[K]."""
    masks = np.asarray(masks, bool)
    n = masks.shape[1] if masks.ndim == 2 else 0
    if masks.shape[0] == 0:
        return np.full(n, -1, np.int32)
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, np.float64)))
    ranked = masks[order]
    has = ranked.any(axis=0)
    first = np.argmax(ranked, axis=0)
    return np.where(has, order[first], -1).astype(np.int32)


@dataclasses.dataclass
class Prediction:
    """Predictions for every point of one scan (instances sorted by score, highest first).

    Attributes:
      name: scene name (the input file's stem); names the PLYs, PNG and summary.
      xyz: f32[N, 3] coordinates the model saw: the input's minus ``origin``;
        rgb: u8[N, 3]; faces: i32[F, 3] or None.
      masks: bool[K, N] instance masks; labels: i32[K] class indices; scores: f32[K].
      sem_pred: i32[N] class index per point.
      instance: i32[N] instance of each point (highest score wins), -1 for none.
      superpoint: i32[N] superpoint ids, or None when the vote was skipped.
      inferred: number of points the network saw (< N when subsampled).
      bucket: the point capacity the scan was padded to.
      warnings: messages about the run (subsampling, exhausted candidate pool).
      scene_id: names the ScanNet submission list and masks; "" means
        ``scene_id_for(name)``.
      origin: f64[3] subtracted from the input's coordinates (None: 0).
      xyz_input: the input's coordinates exactly as read (f32 or f64), or None for
        ``xyz + origin``; the PLYs and the summary use :meth:`coords`.
    """

    name: str
    xyz: np.ndarray
    rgb: np.ndarray
    faces: np.ndarray | None
    masks: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    sem_pred: np.ndarray
    instance: np.ndarray
    superpoint: np.ndarray | None
    inferred: int
    bucket: int
    warnings: list
    scene_id: str = ""
    origin: np.ndarray | None = None
    xyz_input: np.ndarray | None = None

    def coords(self) -> np.ndarray:
        """[N, 3] the input's coordinates: ``xyz_input`` as read, else ``xyz + origin``
        in float64."""
        if self.xyz_input is not None:
            return np.asarray(self.xyz_input)
        xyz = np.asarray(self.xyz, np.float64)
        return xyz if self.origin is None else xyz + np.asarray(self.origin, np.float64)

    def origin_list(self) -> list[float]:
        return [0.0] * 3 if self.origin is None else np.asarray(self.origin, np.float64).tolist()


# ---------------------------------------------------------------------------------------
# outputs


def _box(points: np.ndarray) -> dict:
    lo, hi = points.min(axis=0), points.max(axis=0)
    return {
        "min": lo.tolist(),
        "max": hi.tolist(),
        "centre": ((lo + hi) / 2).tolist(),
        "size": (hi - lo).tolist(),
    }


def summarise(
    pred: Prediction, config, timings: dict | None = None, extra: dict | None = None
) -> dict:
    """JSON-ready summary: per instance (id, class, nyu40 id, score, point count, box
    min/max/centre/size in the input's coordinates, in float64) and scene statistics,
    with ``scene.origin`` (subtracted before the model, see the module docstring)."""
    names = class_names(config)
    scannet = config.data.dataset == "scannet"
    world = pred.coords().astype(np.float64)
    instances = []
    for k in range(len(pred.labels)):
        pts = world[pred.masks[k]]
        cls = int(pred.labels[k])
        instances.append(
            {
                "id": k,
                "class": names[cls],
                "class_index": cls,
                "nyu40_id": int(SCANNET_NYU40_IDS[cls]) if scannet else None,
                "score": float(pred.scores[k]),
                "points": int(pred.masks[k].sum()),
                "points_assigned": int(np.sum(pred.instance == k)),
                "box": _box(pts) if len(pts) else None,
            }
        )
    counts = np.bincount(pred.sem_pred, minlength=len(names))
    per_class: dict[str, int] = {}
    for inst in instances:
        per_class[inst["class"]] = per_class.get(inst["class"], 0) + 1
    scene = {
        "points": int(len(pred.xyz)),
        "faces": int(len(pred.faces)) if pred.faces is not None else 0,
        "inferred_points": int(pred.inferred),
        "point_bucket": int(pred.bucket),
        "superpoints": int(pred.superpoint.max()) + 1
        if pred.superpoint is not None and len(pred.superpoint)
        else None,
        "instances": len(instances),
        "instances_per_class": per_class,
        "unassigned_points": int(np.sum(pred.instance < 0)),
        "semantic_points": {names[i]: int(c) for i, c in enumerate(counts) if c},
        "box": _box(world),
        "origin": pred.origin_list(),
    }
    out = {
        "name": pred.name,
        "dataset": config.data.dataset,
        "classes": list(names),
        "scene": scene,
        "instances": instances,
        "warnings": list(pred.warnings),
        "timings_s": dict(timings or {}),
    }
    out.update(extra or {})
    return out


def instance_colors(pred: Prediction) -> np.ndarray:
    """u8[N, 3]: a distinct colour per instance, grey for points in none."""
    palette = R.distinct_colors(len(pred.labels))
    cols = np.empty((len(pred.xyz), 3), np.uint8)
    cols[:] = R.GREY
    on = pred.instance >= 0
    cols[on] = palette[pred.instance[on]]
    return cols


def _ply(path: str, pred: Prediction, colors: np.ndarray) -> None:
    x = pred.coords()  # the input's coordinates; float64 unless float32 holds them exactly
    if x.dtype != np.float64 or np.array_equal(x.astype(np.float32), x):
        x = x.astype(np.float32)
    vertex = {
        "x": x[:, 0],
        "y": x[:, 1],
        "z": x[:, 2],
        "red": colors[:, 0],
        "green": colors[:, 1],
        "blue": colors[:, 2],
        "instance": pred.instance.astype(np.int32),
        "semantic": pred.sem_pred.astype(np.int32),
    }
    io_atomic.write_atomic(
        path,
        lambda fh: write_ply(fh, vertex, faces=pred.faces, comments=("dknet-jax prediction",)),
        "wb",
    )


def render_picture(pred: Prediction, config, size=(1280, 520)) -> np.ndarray:
    """u8[H, W, 3]: top + perspective views coloured by instance, with a legend."""
    cols = instance_colors(pred)
    show = np.ones(len(pred.xyz), bool)
    if config.data.dataset == "s3dis":  # a ceiling hides the room from above
        show &= pred.sem_pred != S3DIS_CLASSES.index("ceiling")
    if not show.any():
        show[:] = True
    img = R.render_views(pred.xyz[show], cols[show], size=size, shade=True)
    names = class_names(config)
    palette = R.distinct_colors(len(pred.labels))
    entries = [
        (f"{k} {names[int(c)]} {s:.2f}", tuple(palette[k]))
        for k, (c, s) in enumerate(zip(pred.labels, pred.scores, strict=True))
    ]
    title = (
        f"{pred.name}: {len(pred.xyz)} points, {len(pred.labels)} instances "
        f"(left: top view, right: perspective; grey = no instance)"
    )
    return R.add_legend(img, entries, title=title)


_SCANNET_SCENE = re.compile(r"scene\d{4}_\d{2}")


def scene_id_for(input_path: str, scene_id: str | None = None) -> str:
    """The scene id that names the ScanNet submission files of ``input_path``:
    ``scene_id`` when given (checked: no whitespace or path separators), else the
    ``scene<4 digits>_<2 digits>`` prefix of the file name (``scene0000_00_vh_clean_2.ply`` ->
    ``scene0000_00``), else the file stem with each run of whitespace replaced by ``_``."""
    if scene_id is not None:
        if (
            not scene_id
            or scene_id in (".", "..")
            or re.search(r"\s", scene_id)
            or "/" in scene_id
            or os.sep in scene_id
        ):
            raise ValueError(
                f"invalid scene id {scene_id!r}: it names the submission files, "
                f"so it needs no whitespace or '/', e.g. --scene_id=scene0000_00"
            )
        return scene_id
    stem = os.path.splitext(os.path.basename(input_path))[0]
    m = _SCANNET_SCENE.match(stem)
    if m:
        return m.group(0)
    return re.sub(r"\s+", "_", stem) or "scan"


def _output_paths(out_dir: str, pred_name: str, scene_id: str, scannet: bool) -> dict:
    """{kind: path} of the files :func:`write_outputs` writes (the mask files under
    ``"masks"`` as a pattern: ``<out>/predicted_masks/<scene>_NNN.txt``)."""
    from dknet_jax.eval.scannet_io import DEFAULT_MASK_DIR

    paths = {}
    if scannet:
        paths["submission"] = os.path.join(out_dir, f"{scene_id}.txt")
        paths["masks"] = os.path.join(out_dir, DEFAULT_MASK_DIR, f"{scene_id}_NNN.txt")
    paths["instances_ply"] = os.path.join(out_dir, f"{pred_name}_instances.ply")
    paths["semantic_ply"] = os.path.join(out_dir, f"{pred_name}_semantic.ply")
    paths["png"] = os.path.join(out_dir, f"{pred_name}.png")
    paths["summary"] = os.path.join(out_dir, f"{pred_name}_summary.json")
    return paths


def _check_no_clash(paths: dict, inputs: list[str]) -> None:
    """ValueError (one line) when an output path is an input file (compared as real paths,
    so symlinked folders count); ``paths["masks"]`` is matched as a pattern."""
    real_inputs = {os.path.realpath(p): p for p in inputs}
    for kind, path in paths.items():
        if kind == "masks":
            folder, pattern = os.path.split(path)
            rx = re.compile(re.escape(pattern[: -len("NNN.txt")]) + r"\d{3,}\.txt")
            hits = [
                p
                for r, p in real_inputs.items()
                if os.path.dirname(r) == os.path.realpath(folder)
                and rx.fullmatch(os.path.basename(r))
            ]
        else:
            hits = [real_inputs[r] for r in (os.path.realpath(path),) if r in real_inputs]
        if hits:
            raise ValueError(
                f"output {path} ({kind}) would overwrite the input {hits[0]}; pass another "
                f"--out folder (or rename the input)"
            )


@dataclasses.dataclass
class ScanOutputs:
    """What :func:`write_outputs` and :func:`predict_file` return.

    Attributes:
      paths: {kind: path} of every file written (``submission``, ``instances_ply``,
        ``semantic_ply``, ``png``, ``summary``).
      summary: the JSON summary's content.
      prediction: the :class:`Prediction` the files were written from.
      config: the config the model ran with.
    """

    paths: dict
    summary: dict
    prediction: Prediction
    config: ml_collections.ConfigDict


def write_outputs(
    out_dir: str, pred: Prediction, config, timings: dict | None = None, extra: dict | None = None
) -> ScanOutputs:
    """Write every output file; returns the paths and the summary (:class:`ScanOutputs`).

    Files: ``<scene>.txt`` + ``predicted_masks/<scene>_NNN.txt`` (ScanNet submission;
    ScanNet label space only; ``<scene>`` is ``pred.scene_id`` or ``scene_id_for(name)``),
    ``<name>_instances.ply``, ``<name>_semantic.ply``, ``<name>_summary.json``,
    ``<name>.png``."""
    from dknet_jax import eval as E

    os.makedirs(out_dir, exist_ok=True)
    name = pred.name
    scene_id = pred.scene_id or scene_id_for(name)
    paths = _output_paths(out_dir, name, scene_id, config.data.dataset == "scannet")
    paths.pop("masks", None)
    if "submission" in paths:
        paths["submission"] = E.write_prediction(
            out_dir, scene_id, pred.masks, E.semantic_to_nyu40(pred.labels), pred.scores
        )
    _ply(paths["instances_ply"], pred, instance_colors(pred))
    _ply(paths["semantic_ply"], pred, semantic_colors(config)[pred.sem_pred])
    image = render_picture(pred, config)
    io_atomic.write_atomic(paths["png"], lambda fh: R.save_png(fh, image), "wb")
    summary = summarise(pred, config, timings, extra)
    if "submission" in paths:
        summary["scene_id"] = scene_id
    io_atomic.write_json(paths["summary"], summary)
    return ScanOutputs(paths, summary, pred, config)


# ---------------------------------------------------------------------------------------
# the whole thing


def predict_file(
    checkpoint: str,
    input_path: str,
    out_dir: str,
    *,
    config: ml_collections.ConfigDict | None = None,
    superpoints: str = "auto",
    subsample: bool = False,
    log: Callable[[str], None] = print,
    model: LoadedModel | None = None,
    scene_id: str | None = None,
) -> dict:
    """Read ``input_path``, predict with the model in ``checkpoint`` (or ``model``), write
    the outputs to ``out_dir``. Returns :class:`ScanOutputs`.

    superpoints: "auto" (compute them; mesh segmentation when the file has faces) or
    "none" (skip the superpoint vote). scene_id: names the submission files (default
    :func:`scene_id_for` of the input). Raises ValueError, before inference, when an output
    would overwrite the input."""
    if superpoints not in ("auto", "none"):
        raise ValueError(f"superpoints must be 'auto' or 'none', got {superpoints!r}")
    sid = scene_id_for(input_path, scene_id)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    read_notes: list[str] = []

    def reader_warning(message: str) -> None:
        read_notes.append(message)
        log("warning: " + message)

    scan = read_scan(input_path, warn=reader_warning)
    name = os.path.splitext(os.path.basename(input_path))[0]
    xyz, rgb, faces = scan["xyz"], scan["rgb"], scan["faces"]  # xyz: f32, minus origin
    origin = scan["origin"]
    timings["load_s"] = time.perf_counter() - t0
    log(
        f"loaded {input_path}: {len(xyz)} points"
        + (f", {len(faces)} faces" if faces is not None else "")
        + (
            f", coordinates relative to the origin {origin.tolist()} (map coordinates)"
            if np.any(origin)
            else ""
        )
        + f" ({timings['load_s']:.2f} s)"
    )

    t0 = time.perf_counter()
    if model is None:
        model = load_model(checkpoint, config, log=log)
    timings["restore_s"] = time.perf_counter() - t0
    log(f"restored step {model.step} from {model.source} ({timings['restore_s']:.2f} s)")
    _check_no_clash(
        _output_paths(out_dir, name, sid, model.config.data.dataset == "scannet"), [input_path]
    )

    sp = None
    if superpoints == "auto" and not model.config.test.use_superpoints:
        log("superpoints: skipped (config.test.use_superpoints is off)")
    elif superpoints == "auto":
        t0 = time.perf_counter()
        sp = compute_superpoints(
            xyz, faces, voxel_size=None if faces is not None else model.config.data.voxel_size
        )
        timings["superpoints_s"] = time.perf_counter() - t0
        kind = "mesh" if faces is not None and len(faces) else "point-cloud"
        log(f"superpoints ({kind}): {int(sp.max()) + 1} ({timings['superpoints_s']:.2f} s)")

    scene, subset, notes = run_model(
        model, xyz, rgb, sp, name=name, subsample=subsample, timings=timings, log=log
    )
    log(
        f"inference: compile {timings['compile_s']:.2f} s, run {timings['inference_s']:.2f} s"
        f" (bucket {scene.bucket} points)"
    )

    order = np.lexsort((np.arange(len(scene.scores)), -scene.scores))
    masks = scene.masks[order]
    scores = scene.scores[order].astype(np.float32)
    pred = Prediction(
        name=name,
        xyz=xyz,
        rgb=rgb,
        faces=faces,
        masks=masks,
        labels=scene.labels[order].astype(np.int32),
        scores=scores,
        sem_pred=scene.sem_pred.astype(np.int32),
        instance=instance_per_point(masks, scores),
        superpoint=sp,
        inferred=len(xyz) if subset is None else len(subset),
        bucket=scene.bucket,
        warnings=read_notes + notes,
        scene_id=sid,
        origin=origin,
        xyz_input=scan["xyz_input"],
    )

    t0 = time.perf_counter()
    out = write_outputs(
        out_dir,
        pred,
        model.config,
        timings,
        extra={
            "checkpoint": {"source": model.source, "step": model.step},
            "input": os.path.abspath(input_path),
        },
    )
    timings["write_s"] = time.perf_counter() - t0
    out.summary["timings_s"] = dict(timings)
    io_atomic.write_json(out.paths["summary"], out.summary)
    log(
        f"wrote {len(out.paths)} outputs to {out_dir} ({timings['write_s']:.2f} s): "
        f"{len(pred.labels)} instances"
    )
    return out


def show_viewer(pred: Prediction, config, port: int = 8080) -> None:
    """Interactive browser viewer (optional ``viser`` package): the scan coloured by
    instance, by class, or in its own colours; blocks until Ctrl+C. Raises ImportError
    with the install hint when viser is missing."""
    try:
        import viser
    except ImportError as e:
        raise ImportError(
            "--viewer needs the optional 'viser' package (pip install viser); "
            "the PNG and PLY outputs were written without it"
        ) from e
    server = viser.ViserServer(port=port)
    scene = getattr(server, "scene", server)  # viser >= 0.2 puts scene calls on .scene
    xyz = (pred.xyz - pred.xyz.mean(axis=0)).astype(np.float32)
    spacing = max(R.surface_spacing(xyz), 1e-3)
    layers = {
        "instance": instance_colors(pred),
        "class": semantic_colors(config)[pred.sem_pred],
        "input": pred.rgb,
    }
    handles = {
        k: scene.add_point_cloud(f"/{k}", points=xyz, colors=c, point_size=spacing)
        for k, c in layers.items()
    }
    for k, h in handles.items():
        h.visible = k == "instance"
    choice = server.gui.add_dropdown("colour by", options=tuple(layers), initial_value="instance")

    @choice.on_update
    def _(_event) -> None:
        for k, h in handles.items():
            h.visible = k == choice.value

    print(f"viewer running at http://localhost:{port} (Ctrl+C to stop)", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
