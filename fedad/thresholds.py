"""Federated decision thresholds: the image and pixel thresholds ``fedad predict`` decides at,
calibrated on the sites' held-out normal images at a target false-positive rate
(``threshold-fpr``), from a histogram sketch: each site sends two ranges and counts per bin,
never an image nor its list of scores.

Once, after the last round, on the server skeleton of every method
(:meth:`fedad.server_run.ServerRun.finish`), in two exchanges with the sites:

1. :data:`SCORE_RANGE`: the server sends the last round's global model (what the method's
   scorer is built from, :func:`fedad.predict.scorers.scorer_checkpoint`); each site scores its
   held-out normal images (its ``val`` split, label good) with that scorer, the calibrated
   outputs ``fedad predict`` decides on, and replies the minimum and maximum of the image
   scores and of the map values, with its number of images. A site without held-out normal
   images abstains with a reason.
2. :data:`SCORE_HISTOGRAM`: the server fixes common bin edges, :data:`BINS` equal bins over the
   pooled range of each scale, and each site that sent a range replies its counts per bin
   (every image score; every pixel of every map).

The server adds the counts and takes, per scale, the smallest bin upper edge ``t`` at which the
pooled share of normal values ``>= t`` is ``<= threshold-fpr`` (:func:`fpr_threshold`), rounded
up to a float32 (the precision of the scores and maps it is compared with).

Error: let q be the exact pooled quantile, the ⌈(1 - fpr) N⌉-th smallest of the N pooled
normal values (``numpy.quantile(values, 1 - fpr, method="inverted_cdf")``) and w the bin width
(pooled max - min) / bins. Then q < t <= q + w + one float32 step at t, and the pooled
empirical false-positive rate at t is <= fpr: the bin that holds q is the first whose upper
tail is small enough, and t is its upper edge (above the pooled maximum for the last bin).

Both payloads are typed and checked like every payload (:func:`fedad.heads.payload.
payload_from_record`: kind, names, shapes, finite floats, example count; here also min <= max,
non-negative integer counts that add up to the site's images and pixels). A refused reply is
logged and left out, every reply is a row of the audit log, and the run fails with one line
when sites replied but none usably. When no site holds out normal images (``val-fraction=0``:
nothing is sent; or every site abstains) the run ends without thresholds.json, with one log
line, and ``fedad predict`` keeps 0.5.

``thresholds.json`` in the results folder holds both thresholds, the setting, the bins, the
error bound, what was pooled and, next to them, the test split's F1-max image threshold:
reported, never used to set them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedad.config import ExperimentConfig
from fedad.data import Sample
from fedad.device import cpu_numpy
from fedad.heads.payload import Payload, PayloadError, payload_from_record
from fedad.metrics import f1_max_threshold
from fedad.payloads import Query, audit_row
from fedad.results import atomic_write

if TYPE_CHECKING:
    from fedad.server_run import ServerRun

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThresholdSettings:
    """Run-config section of the federated decision thresholds (key ``threshold-fpr``)."""

    threshold_fpr: float = 0.01
    """Target false-positive rate of both thresholds on the held-out normal images, in (0, 1)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold_fpr < 1.0:
            raise ValueError(f"threshold-fpr={self.threshold_fpr}: must be in (0, 1)")


SCORE_RANGE = Query("threshold_range", "score-range")
"""Step 1: min and max of a site's calibrated normal image scores and map values."""
SCORE_HISTOGRAM = Query("threshold_histogram", "score-histogram")
"""Step 2: a site's counts of those values per bin of the server's common edges."""
QUERY_ACTIONS = (SCORE_RANGE.action, SCORE_HISTOGRAM.action)
"""The site actions of every method's sites (the registry adds them to each method's own)."""

SCALES = ("image", "pixel")
"""The payloads' array names: image scores, and every map value."""
BINS = 2048
"""Equal bins of the histogram sketch over the pooled range of each scale."""
THRESHOLDS_FILE = "thresholds.json"
"""The results folder's decision thresholds, read by :func:`fedad.predict.run.run_thresholds`."""

SCORER_RECORD = "scorer"
"""Array record of both queries: the global model's state dict (the scorer's checkpoint)."""
SCORER_META = "scorer-meta"
"""Config record of both queries: ``round`` and the scorer's ``strategy`` entries (JSON)."""
SKETCH = "sketch"
"""Config record of :data:`SCORE_HISTOGRAM`: ``<scale>-range`` [min, max] and ``bins``."""


def bin_edges(low: float, high: float, bins: int) -> np.ndarray:
    """The common edges [bins + 1] of a scale, float64; bin k is [e_k, e_k+1), the last one
    also holds ``high``. Server and sites compute them alike from the same three numbers."""
    return np.linspace(float(low), float(high), int(bins) + 1)


def histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts [B] (float64, integers) of ``values`` (any shape) in the bins of ``edges``
    [B + 1]; values outside [e_0, e_B] (a site that rescored a hair outside the range it
    reported) count in the first or last bin."""
    bins = len(edges) - 1
    index = np.searchsorted(edges, np.asarray(values, np.float64).ravel(), side="right") - 1
    return np.bincount(np.clip(index, 0, bins - 1), minlength=bins).astype(np.float64)


def fpr_threshold(counts: np.ndarray, edges: np.ndarray, fpr: float) -> tuple[float, float]:
    """(t, the share of values >= t): t the smallest bin upper edge with that share <=
    ``fpr``, from counts [B] of float32 values in the bins of ``edges`` [B + 1]; for the last
    bin, just above its (closed) upper edge. t is rounded up to a float32 (the scorers'
    precision): for float32 values v >= t decides alike in float32 (predict's masks) and in
    float64. The module docstring states the error."""
    total = counts.sum()
    tail = total - np.cumsum(counts)  # [B]: values in the bins above bin k, i.e. >= e_k+1
    k = int(np.argmax(tail <= fpr * total))  # the last entry is 0: always one
    edge = edges[k + 1] if k < len(counts) - 1 else np.nextafter(edges[-1], np.inf)
    rounded = np.float32(edge)
    if rounded < edge:
        rounded = np.nextafter(rounded, np.float32(np.inf))
    return float(rounded), float(tail[k] / total)


def range_payload(values: dict[str, np.ndarray], count: int) -> Payload:
    """A site's step-1 payload: [min, max] of each scale's ``values`` (image scores [N], maps
    [N, S, S]) of its ``count`` normal images."""
    return Payload(SCORE_RANGE.kind, {name: np.array([v.min(), v.max()], np.float64)
                                      for name, v in values.items()}, count)


def histogram_payload(values: dict[str, np.ndarray], count: int,
                      edges: dict[str, np.ndarray]) -> Payload:
    """A site's step-2 payload: the counts [B] of each scale's ``values`` in its ``edges``."""
    return Payload(SCORE_HISTOGRAM.kind, {name: histogram(v, edges[name])
                                          for name, v in values.items()}, count)


def check_range(payload: Payload) -> None:
    """PayloadError unless each scale's [min, max] has min <= max."""
    for name, (low, high) in payload.arrays.items():
        if low > high:
            raise PayloadError(f"{payload.kind} payload: {name} min {low:g} > max {high:g}")


def check_histogram(payload: Payload, count: int, pixels: int) -> None:
    """PayloadError unless the counts are non-negative integers adding up to the ``count``
    images (image) and ``count * pixels`` map values (pixel) of the site's range reply."""
    if payload.count != count:
        raise PayloadError(f"{payload.kind} payload: {payload.count} images, its range "
                           f"reply had {count}")
    expected = {"image": count, "pixel": count * pixels}
    for name, counts in payload.arrays.items():
        if (counts < 0).any() or (counts != np.round(counts)).any():
            raise PayloadError(f"{payload.kind} payload: {name} counts must be non-negative "
                               "integers")
        if counts.sum() != expected[name]:
            raise PayloadError(f"{payload.kind} payload: {name} counts add up to "
                               f"{counts.sum():g}, expected {expected[name]}")


def read_payload(content: RecordDict, query: Query, length: int) -> Payload:
    """The payload of ``query`` in a reply's content, with each scale's array of ``length``
    (2 for a range, the bins for a histogram); PayloadError saying why it is refused."""
    return payload_from_record(content, query.kind, {},
                               dict.fromkeys(SCALES, (length,)))


# --- site side ---------------------------------------------------------------------------


def scorer_content(cfg: ExperimentConfig, checkpoint: dict) -> RecordDict:
    """What both queries carry: the scorer's part of a round checkpoint (state dict as
    arrays; round and workflow entries as JSON)."""
    from fedad.predict.scorers import scorer_checkpoint

    part = scorer_checkpoint(cfg.method, checkpoint)
    return RecordDict({
        SCORER_RECORD: ArrayRecord(part["state_dict"]),
        SCORER_META: ConfigRecord({"round": int(part["round"]),
                                   "strategy": json.dumps(part["strategy"])})})


def _normal_values(cfg: ExperimentConfig, samples: Sequence[Sample],
                   content: RecordDict) -> tuple[dict[str, np.ndarray], int]:
    """The calibrated image scores [N] and maps [N, S, S] of ``samples`` under the scorer
    rebuilt from ``content`` (:func:`scorer_content`), and N."""
    from fedad.predict.inputs import read_batches
    from fedad.predict.scorers import build_scorer

    meta = content.config_records[SCORER_META]
    scorer = build_scorer(cfg, {
        "round": int(meta["round"]), "strategy": json.loads(str(meta["strategy"])),
        "state_dict": content.array_records[SCORER_RECORD].to_torch_state_dict()})
    skipped: list[str] = []
    scores, maps = [], []
    with torch.no_grad():
        for batch in read_batches([s.image_path for s in samples], scorer.image_size,
                                  cfg.batch_size, skipped):
            batch_scores, batch_maps = scorer(batch.images.to(scorer.device))
            scores.append(cpu_numpy(batch_scores.float()))
            maps.append(cpu_numpy(batch_maps.float()))
    for line in skipped:
        log.warning("thresholds: left out %s", line)
    if not scores:
        raise ValueError(f"none of the {len(samples)} held-out normal images could be read")
    return {"image": np.concatenate(scores), "pixel": np.concatenate(maps)}, sum(map(len, scores))


def site_sketch(query: Query, cfg: ExperimentConfig, samples: Sequence[Sample],
                content: RecordDict) -> RecordDict:
    """A site's reply to ``query`` (:data:`SCORE_RANGE` or :data:`SCORE_HISTOGRAM`) over its
    held-out normal ``samples``; an abstention (num-examples 0, with a reason) without any."""
    if not samples:
        return RecordDict({"metrics": MetricRecord({"num-examples": 0}), "meta": ConfigRecord(
            {"reason": f"no held-out normal images (val-fraction={cfg.val_fraction})"})})
    values, count = _normal_values(cfg, samples, content)
    if query == SCORE_RANGE:
        return range_payload(values, count).to_record()
    sketch = content.config_records[SKETCH]
    edges = {name: bin_edges(*sketch[f"{name}-range"], int(sketch["bins"])) for name in SCALES}
    return histogram_payload(values, count, edges).to_record()


# --- server side -------------------------------------------------------------------------


def _collect(run: ServerRun, query: Query, content: RecordDict, server_round: int,
             length: int, check: Callable[[int, Payload], None],
             nodes: Sequence[int] | None = None) -> tuple[dict[int, Payload], bool]:
    """Send ``query`` (to ``nodes``, default all); the accepted payloads by node (checked by
    ``check(node, payload)`` too), and whether every site abstained. Each reply is audited."""
    accepted: dict[int, Payload] = {}
    replies = run.broadcast(query.message, content, server_round, nodes)
    abstained = 0
    for reply in replies:
        node = reply.metadata.src_node_id
        row: dict[str, Any] = {"server_round": server_round, "node": node, "kind": query.kind}
        records = None if reply.has_error() else reply.content
        if records is None:
            row.update(accepted=False, reason=f"site error: {reply.error.reason}")
        elif ("head" not in records.array_records
              and records.metric_records.get("metrics", {}).get("num-examples") == 0):
            abstained += 1
            reason = records.config_records.get("meta", {}).get("reason", "")
            row.update(accepted=False, reason=f"abstained: {reason}")
        else:
            try:
                payload = read_payload(records, query, length)
                check(node, payload)
            except PayloadError as err:
                row.update(accepted=False, reason=str(err))
            else:
                accepted[node] = payload
                row.update(accepted=True, arrays=payload.arrays, count=payload.count)
        if not row["accepted"]:
            log.warning("thresholds: refused node %s (%s): %s", node, query.kind, row["reason"])
        run.audit.append(audit_row(**row))
    return accepted, bool(replies) and abstained == len(replies)


def pooled_range(payloads: Sequence[Payload]) -> dict[str, tuple[float, float]]:
    """Each scale's [min, max] over the sites' :data:`SCORE_RANGE` payloads."""
    return {name: (min(float(p.arrays[name][0]) for p in payloads),
                   max(float(p.arrays[name][1]) for p in payloads)) for name in SCALES}


def pooled_thresholds(payloads: Sequence[Payload], ranges: dict[str, tuple[float, float]],
                      bins: int, fpr: float) -> dict[str, dict[str, Any]]:
    """Per scale, from the sites' :data:`SCORE_HISTOGRAM` payloads over ``ranges``: the
    threshold, its error bound (the bin width), the range, the values pooled and their
    empirical false-positive rate at the threshold."""
    out = {}
    for name in SCALES:
        counts = np.sum([p.arrays[name] for p in payloads], axis=0)
        edges = bin_edges(*ranges[name], bins)
        threshold, normal_fpr = fpr_threshold(counts, edges, fpr)
        out[name] = {"threshold": threshold, "error_bound": float(edges[1] - edges[0]),
                     "range": list(ranges[name]), "normal_values": int(counts.sum()),
                     "normal_fpr": normal_fpr}
    return out


def f1_max_on_test(run: ServerRun, image_threshold: float) -> dict[str, float] | None:
    """The test split's F1-max image threshold and F1 (scores.npz of the last round), and the
    F1 at ``image_threshold``: reported next to the thresholds, never used to set them; None
    without scores or without a defective test image."""
    path = run.root / "scores.npz"
    if not path.is_file():
        return None
    saved = np.load(path)
    labels, scores = saved["labels"], saved["image_scores"]
    if not (labels > 0).any():
        return None
    threshold, f1 = f1_max_threshold(labels, scores)
    flagged, positive = scores >= image_threshold, labels > 0
    at = 2 * (flagged & positive).sum() / max(flagged.sum() + positive.sum(), 1)
    return {"image_threshold": threshold, "image_f1": f1, "image_f1_at_threshold": float(at)}


def federated_thresholds(run: ServerRun) -> dict[str, Any] | None:
    """The run's decision thresholds from its sites (the module's two exchanges) on the last
    round's checkpoint, written to thresholds.json and returned; None (no file, one log line)
    for ``val-fraction=0``, a method without a scorer, no finished round, or when every site
    abstained. RuntimeError when sites replied but none usably."""
    from fedad.predict.scorers import SCORERS

    path = run.root / THRESHOLDS_FILE
    path.unlink(missing_ok=True)  # a folder reused by a fresh run keeps no stale thresholds
    latest = run.results.checkpoints / "latest.pt"
    if not run.cfg.val_fraction:
        log.warning("thresholds: val-fraction=0 holds out no normal images; no %s (fedad "
                    "predict decides at 0.5)", THRESHOLDS_FILE)
        return None
    if run.cfg.method not in SCORERS or not latest.is_file():
        log.warning("thresholds: no scorer or no finished round; no %s", THRESHOLDS_FILE)
        return None
    checkpoint = torch.load(latest, map_location="cpu", weights_only=True)
    server_round, fpr = int(checkpoint["round"]), run.cfg.section(ThresholdSettings).threshold_fpr
    content = scorer_content(run.cfg, checkpoint)
    ranges, abstained = _collect(run, SCORE_RANGE, content, server_round, 2,
                                 lambda node, payload: check_range(payload))
    if not ranges:
        if abstained:
            log.warning("thresholds: no site holds held-out normal images; no %s (fedad "
                        "predict decides at 0.5)", THRESHOLDS_FILE)
            return None
        raise RuntimeError(f"thresholds: no site sent a usable score range (see "
                           f"{run.audit.path})")
    pooled = pooled_range(list(ranges.values()))
    content[SKETCH] = ConfigRecord({"bins": BINS, **{f"{name}-range": list(pooled[name])
                                                     for name in SCALES}})
    pixels = run.cfg.image_size ** 2
    histograms, _ = _collect(
        run, SCORE_HISTOGRAM, content, server_round, BINS,
        lambda node, payload: check_histogram(payload, ranges[node].count, pixels),
        sorted(ranges))
    if not histograms:
        raise RuntimeError(f"thresholds: no site sent a usable score histogram (see "
                           f"{run.audit.path})")
    scales = pooled_thresholds(list(histograms.values()), pooled, BINS, fpr)
    result = {"threshold_fpr": fpr, "bins": BINS, "round": server_round, **scales,
              "error": "q < threshold <= q + error_bound + one float32 step, q the exact "
                       "pooled (1 - fpr) quantile of the normal values (inverted CDF); "
                       "normal_fpr <= threshold_fpr",
              "normal_images": sum(p.count for p in histograms.values()),
              "sites": sorted(histograms), "test_f1_max": f1_max_on_test(
                  run, scales["image"]["threshold"])}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    log.info("thresholds (threshold-fpr=%g, %d sites, %d normal images): image %.6g "
             "(within %.2g), pixel %.6g (within %.2g) -> %s", fpr, len(histograms),
             result["normal_images"], scales["image"]["threshold"],
             scales["image"]["error_bound"], scales["pixel"]["threshold"],
             scales["pixel"]["error_bound"], path)
    return result
