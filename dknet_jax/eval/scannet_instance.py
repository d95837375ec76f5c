"""ScanNet v2 instance-segmentation AP, equal to the benchmark's own script.

Place in the data flow: post-processed instance masks (per scene, in mesh-vertex order)
-> ``ScanNetInstanceEvaluator.add_scene`` (host-side numpy: per-scene sizes and
intersections) -> ``compute()`` (greedy GT-first matching per IoU threshold and class, AP
over the whole set) -> ``format_table`` / ``results_to_json``.

Protocol (``evaluate_semantic_instance.py`` of the ScanNet benchmark, see
docs/contracts.md section 6): 18 instance classes given by nyu40 ids; GT ids per vertex are
``nyu40 * 1000 + instance`` (every distinct non-zero id whose label is an instance class is
one GT instance, including ``label * 1000``); GT instances and predictions with fewer than
100 vertices are ignored / dropped; a match needs IoU strictly above the threshold
(thresholds ``np.arange(0.5, 0.95, 0.05)`` plus 0.25, as floats exactly as the script makes
them); GT instances are visited in order and each takes the first unused overlapping
prediction (file order) above the threshold, scored with the highest confidence among its
candidates, the other candidates becoming false positives that stay available; unused
predictions without any same-class GT (small GT included) above the threshold are false
positives unless the share of their vertices on void area or on small same-class GT
exceeds the threshold; AP is the script's step integral without precision envelope; NaN
for classes without GT (left out of the means), 0 for classes with GT but no predictions
and for an empty curve (where the script itself crashes).
"""

from __future__ import annotations

import math

import numpy as np

from dknet_jax.data.labels import (
    IGNORE_LABEL,
    SCANNET_INSTANCE_CLASSES,
    SCANNET_INSTANCE_NYU40_IDS,
    SCANNET_NYU40_IDS,
)

CLASS_NAMES = tuple(SCANNET_INSTANCE_CLASSES)
CLASS_IDS = np.asarray(SCANNET_INSTANCE_NYU40_IDS, dtype=np.int64)
MIN_REGION_SIZE = 100
# Same float values as the script: 0.5, 0.55, 0.6000000000000001, ..., 0.9000000000000004.
MAP_OVERLAPS = np.arange(0.5, 0.95, 0.05)
OVERLAPS = np.append(MAP_OVERLAPS, 0.25)

_ID_TO_CLASS = {int(nyu): c for c, nyu in enumerate(CLASS_IDS)}


def ap_from_curve(y_true: np.ndarray, y_score: np.ndarray, num_missed: int) -> float:
    """Average precision as the benchmark integrates it (no precision envelope).

    Args:
      y_true: f64[E] 1 for a true positive, 0 for a false positive.
      y_score: f64[E] confidence of each entry.
      num_missed: GT instances that found no match (hard false negatives).

    Returns the AP; 0.0 for an empty curve (E == 0).

    Every distinct score u (ascending) is an operating point with
    tp(u) = #true with score >= u, precision = tp / #(score >= u),
    recall = tp / (#true + num_missed); an artificial point (recall 0, precision 1)
    closes the curve. AP = sum_i precision_i * (recall_{i-1} - recall_{i+1}) / 2 with
    recall_{-1} := recall_0 and recall past the end := 0.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.size == 0:
        return 0.0
    order = np.argsort(y_score, kind="stable")
    s_sorted = y_score[order]
    t_sorted = y_true[order]
    levels = np.unique(s_sorted)
    first = np.searchsorted(s_sorted, levels, side="left")  # first index at each level
    true_below = np.concatenate([[0.0], np.cumsum(t_sorted)])[first]
    num_true = t_sorted.sum()
    tp = num_true - true_below
    at_or_above = s_sorted.size - first
    precision = np.append(tp / at_or_above, 1.0)
    recall = np.append(tp / (num_true + num_missed), 0.0)
    prev = np.concatenate([recall[:1], recall[:-1]])
    nxt = np.append(recall[1:], 0.0)
    return float(np.sum(precision * 0.5 * (prev - nxt)))


def semantic_to_nyu40(labels) -> np.ndarray:
    """Benchmark semantic indices (int[...] 0..19, -100 ignore) -> nyu40 ids (0 for -100).

    Instance classes predicted as semantic indices 2..19 map to the 18 instance nyu40 ids.
    """
    labels = np.asarray(labels)
    bad = (labels != IGNORE_LABEL) & ((labels < 0) | (labels >= len(SCANNET_NYU40_IDS)))
    if np.any(bad):
        raise ValueError(
            f"semantic labels must be 0..{len(SCANNET_NYU40_IDS) - 1} or "
            f"{IGNORE_LABEL}, got {np.unique(labels[bad])[:5].tolist()}"
        )
    table = np.asarray((0,) + tuple(SCANNET_NYU40_IDS), dtype=np.int64)
    return table[np.where(labels == IGNORE_LABEL, 0, labels + 1)]


def instance_class_to_nyu40(classes) -> np.ndarray:
    """Instance-class indices (int[K] 0..17, benchmark order) -> nyu40 ids."""
    classes = np.asarray(classes)
    if np.any((classes < 0) | (classes >= CLASS_IDS.size)):
        raise ValueError(
            f"instance classes must be 0..{CLASS_IDS.size - 1}, got "
            f"{np.unique(classes[(classes < 0) | (classes >= CLASS_IDS.size)]).tolist()}"
        )
    return CLASS_IDS[classes]


def gt_ids_from_labels(semantic, instance) -> np.ndarray:
    """Benchmark GT ids ``nyu40 * 1000 + instance`` from prepared labels.

    Args:
      semantic: int[N] 0..19 or -100; instance: int[N] 0..G-1 or -100.
    Returns i64[N]: 0 where semantic is -100; ``nyu40 * 1000 + instance + 1`` on instance
    points; ``nyu40 * 1000`` on labelled points without instance (as ScanNet's own export
    writes them).
    """
    semantic = np.asarray(semantic)
    instance = np.asarray(instance)
    if semantic.shape != instance.shape:
        raise ValueError(f"semantic {semantic.shape} and instance {instance.shape} must match")
    nyu = semantic_to_nyu40(semantic)
    inst = np.where(instance == IGNORE_LABEL, 0, instance.astype(np.int64) + 1)
    if np.any(inst > 999) or np.any(inst < 0):
        raise ValueError("instance ids must be -100 or 0..998 to fit nyu40*1000+instance")
    return np.where(nyu == 0, 0, nyu * 1000 + inst).astype(np.int64)


class _SceneClass:
    """Statistics of one class in one scene (host numpy, small).

    gt_size: i64[G] vertex counts of the scene's GT instances of the class (all sizes).
    pred_size: i64[K] vertex counts of the kept predictions of the class (file order).
    conf: f64[K]; void: i64[K] vertices on void area; inter: i64[K, G] intersections.
    """

    __slots__ = ("gt_size", "pred_size", "conf", "void", "inter")

    def __init__(self, gt_size, pred_size, conf, void, inter):
        self.gt_size, self.pred_size, self.conf = gt_size, pred_size, conf
        self.void, self.inter = void, inter


def _match_scene_class(s: _SceneClass, th: float):
    """Greedy GT-first matching of one scene/class at IoU threshold ``th``.

    Returns (tp_scores list, fp_scores list, num_missed).
    """
    keep = s.gt_size >= MIN_REGION_SIZE
    inter = s.inter
    union = s.gt_size[None, :] + s.pred_size[:, None] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(inter > 0, inter / np.maximum(union, 1), 0.0)
    over = iou > th  # [K, G]
    used = np.zeros(s.pred_size.shape[0], dtype=bool)
    tp_scores, fp_scores, missed = [], [], 0
    for g in np.flatnonzero(keep):
        best = None
        for k in np.flatnonzero(over[:, g]):
            if used[k]:
                continue
            c = float(s.conf[k])
            if best is None:
                best = c
                used[k] = True
            else:  # a second candidate: the lower score becomes a false positive
                fp_scores.append(min(best, c))
                best = max(best, c)
        if best is None:
            missed += 1
        else:
            tp_scores.append(best)
    # predictions with no same-class GT (small ones included) above the threshold
    lonely = ~over.any(axis=1)
    if lonely.any():
        ignored = s.void + inter[:, ~keep].sum(axis=1)
        share = ignored / s.pred_size
        fp_scores.extend(float(c) for c in s.conf[lonely & (share <= th)])
    return tp_scores, fp_scores, missed


class ScanNetInstanceEvaluator:
    """Accumulates scenes, then computes the benchmark's AP table.

    Usage::

        ev = ScanNetInstanceEvaluator()
        for scene in scenes:
            ev.add_scene(gt_ids, pred_masks, pred_label_ids, pred_scores)
        results = ev.compute()
        print(format_table(results))
    """

    def __init__(self):
        self._scenes: list[dict[int, _SceneClass]] = []

    @property
    def num_scenes(self) -> int:
        return len(self._scenes)

    def add_scene(self, gt_ids, pred_masks, pred_label_ids, pred_scores) -> None:
        """Adds one scene.

        Args:
          gt_ids: i64[N] per mesh vertex ``nyu40_id * 1000 + instance_id`` (0 = none).
          pred_masks: bool[K, N] predicted instance masks (non-zero = member).
          pred_label_ids: int[K] nyu40 id of each prediction; ids that are not one of the
            18 instance classes are skipped, as the benchmark script does.
          pred_scores: float[K] confidence of each prediction.
        """
        gt_ids = np.asarray(gt_ids)
        if gt_ids.ndim != 1 or not np.issubdtype(gt_ids.dtype, np.integer):
            raise ValueError(
                f"gt_ids must be a 1-D integer array (nyu40*1000+instance per vertex), got "
                f"dtype {gt_ids.dtype} shape {gt_ids.shape}"
            )
        gt_ids = gt_ids.astype(np.int64)
        n = gt_ids.shape[0]
        masks = np.asarray(pred_masks)
        if masks.size == 0:
            masks = masks.reshape(0, n)
        if masks.ndim != 2 or masks.shape[1] != n:
            raise ValueError(
                f"pred_masks must be [K, N] with N = {n} (len(gt_ids)), got shape {masks.shape}"
            )
        masks = masks != 0
        k = masks.shape[0]
        labels = np.asarray(pred_label_ids).reshape(-1)
        scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
        if labels.shape[0] != k or scores.shape[0] != k:
            raise ValueError(
                f"pred_label_ids ({labels.shape[0]}) and pred_scores ({scores.shape[0]}) need "
                f"one entry per mask ({k})"
            )
        if np.any(np.isnan(scores)):  # +-inf rank as in the official script's np.argsort
            raise ValueError(
                "pred_scores contain NaN; the official ranking of NaN is "
                "ill-defined, give numbers (+-inf are accepted)"
            )

        # GT instances: distinct non-zero ids whose label is an instance class
        uniq, inverse, counts = np.unique(gt_ids, return_inverse=True, return_counts=True)
        uniq_cls = np.array(
            [_ID_TO_CLASS.get(int(u // 1000), -1) if u != 0 else -1 for u in uniq], dtype=np.int64
        )
        is_inst = uniq_cls >= 0
        void = ~np.isin(gt_ids // 1000, CLASS_IDS)  # [N] label not an instance class
        inst_uniq = np.flatnonzero(is_inst)  # positions in `uniq`
        g_total = inst_uniq.size
        slot_of_uniq = np.full(uniq.size, g_total, dtype=np.int64)
        slot_of_uniq[inst_uniq] = np.arange(g_total)
        point_slot = slot_of_uniq[inverse]  # [N] GT slot, g_total for none

        pred_cls = np.array([_ID_TO_CLASS.get(int(lb), -1) for lb in labels], dtype=np.int64)
        sizes = masks.sum(axis=1).astype(np.int64)
        kept = np.flatnonzero((pred_cls >= 0) & (sizes >= MIN_REGION_SIZE))
        # intersections of kept predictions with every GT slot (+ none) and void area
        km, pts = np.nonzero(masks[kept])
        inter = np.bincount(
            km * (g_total + 1) + point_slot[pts], minlength=kept.size * (g_total + 1)
        ).reshape(kept.size, g_total + 1)
        void_inter = np.bincount(km[void[pts]], minlength=kept.size)

        scene: dict[int, _SceneClass] = {}
        for c in range(len(CLASS_NAMES)):
            g_idx = np.flatnonzero(uniq_cls[inst_uniq] == c)  # GT slots, ascending id
            p_idx = np.flatnonzero(pred_cls[kept] == c)  # kept rows, file order
            if g_idx.size == 0 and p_idx.size == 0:
                continue
            scene[c] = _SceneClass(
                gt_size=counts[inst_uniq[g_idx]].astype(np.int64),
                pred_size=sizes[kept[p_idx]],
                conf=scores[kept[p_idx]],
                void=void_inter[p_idx].astype(np.int64),
                inter=inter[np.ix_(p_idx, g_idx)].astype(np.int64),
            )
        self._scenes.append(scene)

    def gt_instance_sizes(self) -> np.ndarray:
        """i64[G] vertex counts of every GT instance added (before the 100-vertex minimum)."""
        sizes = [p.gt_size for s in self._scenes for p in s.values()]
        return np.concatenate(sizes) if sizes else np.zeros(0, np.int64)

    def undefined_note(self) -> str | None:
        """Why every AP is undefined (NaN) when no GT instance counts; None otherwise."""
        sizes = self.gt_instance_sizes()
        if np.any(sizes >= MIN_REGION_SIZE):
            return None
        if sizes.size == 0:
            return (
                "every AP is nan: no GT vertex has an instance-class id (nyu40_id*1000 + "
                f"instance with a nyu40 id in {CLASS_IDS.tolist()})"
            )
        return (
            f"every AP is nan: all {sizes.size} GT instance(s) have fewer than "
            f"{MIN_REGION_SIZE} vertices (largest {int(sizes.max())}), and the benchmark "
            f"ignores smaller ones; GT files need one id per vertex of the full mesh"
        )

    def compute_ap_matrix(self) -> np.ndarray:
        """f64[18, 10] AP per class (rows in benchmark order) and overlap ``OVERLAPS``."""
        ap = np.zeros((len(CLASS_NAMES), OVERLAPS.size), dtype=np.float64)
        for c in range(len(CLASS_NAMES)):
            parts = [s[c] for s in self._scenes if c in s]
            has_gt = any(bool(np.any(p.gt_size >= MIN_REGION_SIZE)) for p in parts)
            has_pred = any(p.pred_size.size > 0 for p in parts)
            if not has_gt:
                ap[c] = math.nan
                continue
            if not has_pred:
                continue
            for oi, th in enumerate(OVERLAPS):
                tps, fps, missed = [], [], 0
                for p in parts:
                    t, f, m = _match_scene_class(p, float(th))
                    tps += t
                    fps += f
                    missed += m
                y_true = np.concatenate([np.ones(len(tps)), np.zeros(len(fps))])
                ap[c, oi] = ap_from_curve(y_true, np.asarray(tps + fps, np.float64), missed)
        return ap

    def compute(self) -> dict:
        """Returns ``{"all_ap", "all_ap_50%", "all_ap_25%", "classes": {name: {"ap",
        "ap50%", "ap25%"}}}`` with floats (NaN where undefined)."""
        return summarize(self.compute_ap_matrix())


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def summarize(ap: np.ndarray) -> dict:
    """Means of an AP matrix f64[18, 10] (columns ``OVERLAPS``) as the benchmark reports them:
    mAP over the nine 0.50:0.90 columns, AP50, AP25; nanmean over classes."""
    i50 = int(np.flatnonzero(np.isclose(OVERLAPS, 0.5))[0])
    i25 = int(np.flatnonzero(np.isclose(OVERLAPS, 0.25))[0])
    cols = np.flatnonzero(~np.isclose(OVERLAPS, 0.25))
    out = {
        "all_ap": _nanmean(ap[:, cols]),
        "all_ap_50%": _nanmean(ap[:, i50]),
        "all_ap_25%": _nanmean(ap[:, i25]),
        "classes": {},
    }
    for c, name in enumerate(CLASS_NAMES):
        row = ap[c, cols]
        out["classes"][name] = {
            "ap": math.nan if np.isnan(row).any() else float(row.mean()),
            "ap50%": float(ap[c, i50]),
            "ap25%": float(ap[c, i25]),
        }
    return out


def results_to_json(results: dict) -> dict:
    """The results dict with NaN replaced by None (JSON null)."""
    fix = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else v
    return {
        "all_ap": fix(results["all_ap"]),
        "all_ap_50%": fix(results["all_ap_50%"]),
        "all_ap_25%": fix(results["all_ap_25%"]),
        "classes": {n: {k: fix(v) for k, v in d.items()} for n, d in results["classes"].items()},
    }


def format_table(results: dict) -> str:
    """A readable table: one row per class (AP, AP50, AP25), then the averages."""
    fmt = lambda v: "nan" if v is None or math.isnan(v) else f"{v:.3f}"
    lines = [f"{'class':<16}{'AP':>8}{'AP50':>8}{'AP25':>8}", "-" * 40]
    for name, d in results["classes"].items():
        lines.append(f"{name:<16}{fmt(d['ap']):>8}{fmt(d['ap50%']):>8}{fmt(d['ap25%']):>8}")
    lines.append("-" * 40)
    lines.append(
        f"{'average':<16}{fmt(results['all_ap']):>8}{fmt(results['all_ap_50%']):>8}"
        f"{fmt(results['all_ap_25%']):>8}"
    )
    return "\n".join(lines)
