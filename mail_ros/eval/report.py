"""The offline evaluation report: ``report.json``, PNG plots and a one-page ``report.html``.

Error statistics are over the compared (chunk, step, dimension) values only: steps without a
ground truth (NaN in :attr:`ChunkRecord.commanded`) are left out, and every statistic says how
many values it covers. Errors are in robot units (radians for arm joints, metres for the
gripper width). Plots are drawn with matplotlib's object API (``Figure``, rendered by the Agg
canvas), so no GUI backend or pyplot state is involved. Everything except ``inference_ms`` is
a deterministic function of the bags, the checkpoint and the options.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mail_ros.eval.replay import BagReplay
from mail_ros.sync.stamps import ns_to_seconds

__all__ = ["REPORT_JSON", "REPORT_HTML", "action_error", "latency_summary", "merge_sync", "setpoint_summary",
           "write_report"]

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
SKEW_PERCENTILES = (50, 99)


def _stack(replays: list[BagReplay]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and commanded chunks of all replays: (N, A, D) each."""
    chunks = [c for r in replays for c in r.chunks]
    if not chunks:
        return np.zeros((0, 0, 0)), np.zeros((0, 0, 0))
    return np.stack([c.predicted for c in chunks]), np.stack([c.commanded for c in chunks])


def action_error(replays: list[BagReplay], names: tuple[str, ...]) -> dict[str, Any]:
    """Mean absolute error overall, per action dimension (by name) and per horizon step."""
    predicted, commanded = _stack(replays)
    if predicted.size == 0:
        return {"compared": 0, "mae": None, "rmse": None, "max": None, "per_dimension": {}, "per_step": [],
                "compared_per_step": []}
    error = np.abs(predicted - commanded)  # (N, A, D), NaN where not compared
    mask = ~np.isnan(error)

    def mean(axis):
        count = mask.sum(axis=axis)
        total = np.where(mask, error, 0.0).sum(axis=axis)
        return [float(t / c) if c else None for t, c in zip(np.atleast_1d(total), np.atleast_1d(count))]

    values = error[mask]
    return {
        "compared": int(mask.sum()),
        "mae": float(values.mean()) if values.size else None,
        "rmse": float(np.sqrt(np.mean(values**2))) if values.size else None,
        "max": float(values.max()) if values.size else None,
        "per_dimension": dict(zip(names, mean((0, 1)))),
        "per_step": mean((0, 2)),
        "compared_per_step": [int(c) for c in mask.sum(axis=(0, 2))],
    }


def latency_summary(replays: list[BagReplay]) -> dict[str, Any]:
    """Inference time per chunk in ms: p50, p99, mean, max and the count."""
    ms = np.array([c.inference_ms for r in replays for c in r.chunks])
    if ms.size == 0:
        return {"count": 0}
    p50, p99 = np.percentile(ms, [50, 99])
    return {"count": int(ms.size), "p50": float(p50), "p99": float(p99), "mean": float(ms.mean()),
            "max": float(ms.max())}


def setpoint_summary(replays: list[BagReplay]) -> dict[str, Any]:
    """The recorded arm commands at the controller's 1 kHz (mail_ros.eval.setpoints): the worst
    setpoint acceleration and jerk over all bags, against the FR3's limits."""
    bags = [r.setpoints.to_dict() for r in replays if r.setpoints is not None]
    if not bags:
        return {"commands": 0}
    return {
        "commands": sum(b["commands"] for b in bags),
        "rejected": sum(b["rejected"] for b in bags),
        "acceleration_max": max(b["acceleration_max"] for b in bags),
        "jerk_max": max(b["jerk_max"] for b in bags),
        "fr3_acceleration_limit_min": min(bags[0]["fr3_acceleration_limit"].values()),
        "fr3_jerk_limit_min": min(bags[0]["fr3_jerk_limit"].values()),
    }


def _skew_ms(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    seconds = np.asarray(samples)
    values = np.percentile(np.abs(seconds) * 1e3, SKEW_PERCENTILES)
    out = {f"p{q}": float(v) for q, v in zip(SKEW_PERCENTILES, values)}
    out["mean_signed"] = float(seconds.mean() * 1e3)
    return out


def _bag_sync(replay: BagReplay) -> dict[str, Any]:
    """One bag's per-stream counts, drop reasons and skew percentiles (ms) of every emitted set."""
    streams = {}
    for name, entry in replay.sync["streams"].items():
        streams[name] = {key: entry[key] for key in ("received", "used", "dropped")}
        streams[name]["skew_ms"] = _skew_ms(replay.skews.get(name, []))
    return {"emitted": replay.sync["emitted"], "streams": streams}


def merge_sync(replays: list[BagReplay]) -> dict[str, Any]:
    """Counts summed over bags, drop reasons merged, skew percentiles over the pooled samples."""
    merged: dict[str, Any] = {"emitted": 0, "streams": {}}
    for replay in replays:
        merged["emitted"] += replay.sync["emitted"]
        for name, entry in replay.sync["streams"].items():
            target = merged["streams"].setdefault(name, {"received": 0, "used": 0, "dropped": Counter()})
            target["received"] += entry["received"]
            target["used"] += entry["used"]
            target["dropped"].update(entry["dropped"])
    for name, target in merged["streams"].items():
        target["dropped"] = dict(sorted(target["dropped"].items()))
        target["skew_ms"] = _skew_ms([s for r in replays for s in r.skews.get(name, [])])
    return merged


def _bag_entry(index: int, replay: BagReplay) -> dict[str, Any]:
    return {
        "path": str(replay.path),
        "camera_topics": replay.camera_topics,
        "gripper_source": replay.gripper_source,
        "frames": replay.frames,
        "chunks": len(replay.chunks),
        "observations": dict(sorted(replay.observations.items())),
        "instructions": [{"time": ns_to_seconds(t) if math.isfinite(t) else None, "text": text}
                         for t, text in replay.instructions],
        "sync": _bag_sync(replay),
        "action_error": action_error([replay], replay.action_names),
        "inference_ms": latency_summary([replay]),
        "setpoint_1khz": replay.setpoints.to_dict() if replay.setpoints is not None else {"commands": 0},
        "chunks_file": f"bag{index}_chunks.npz",
        "plot": f"bag{index}_actions.png",
    }


def write_report(
    out: str | os.PathLike, replays: list[BagReplay], checkpoint: dict[str, Any], options: dict[str, Any]
) -> dict[str, Any]:
    """Write report.json, the plots, per-bag chunk arrays (.npz) and report.html into ``out``.

    ``checkpoint`` is the checkpoint's config.json content; ``options`` the replay options, stored
    verbatim. Returns the report dictionary.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = tuple(checkpoint["action_names"])
    observations: Counter[str] = Counter()
    for replay in replays:
        observations.update(replay.observations)
    report = {
        "checkpoint": {key: checkpoint[key] for key in (
            "variant", "head", "cameras", "image_size", "obs_horizon", "action_horizon", "action_names",
            "rate_hz", "dt", "language_encoder")} | {"path": options.get("checkpoint")},
        "options": options,
        "frames": sum(r.frames for r in replays),
        "chunks": sum(len(r.chunks) for r in replays),
        "observations": dict(sorted(observations.items())),
        "sync": merge_sync(replays),
        "action_error": action_error(replays, names),
        "inference_ms": latency_summary(replays),
        "setpoint_1khz": setpoint_summary(replays),
        "bags": [_bag_entry(i, r) for i, r in enumerate(replays)],
        "plots": {"error_vs_step": "error_vs_step.png", "skew_histogram": "skew_histogram.png"},
    }
    for i, replay in enumerate(replays):
        predicted, commanded = _stack([replay])
        np.savez(out / f"bag{i}_chunks.npz", stamps=np.array([ns_to_seconds(c.stamp) for c in replay.chunks]),
                 predicted=predicted, commanded=commanded, names=np.array(names))
        _plot_actions(out / f"bag{i}_actions.png", replay)
    _plot_error_vs_step(out / "error_vs_step.png", report)
    _plot_skews(out / "skew_histogram.png", replays)
    (out / REPORT_JSON).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out / REPORT_HTML).write_text(_html(report))
    return report


# ---------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _plot_actions(path: Path, replay: BagReplay) -> None:
    """Per action dimension: the commanded target over time, each predicted chunk, its first action."""
    names = replay.action_names
    columns = 2
    rows = math.ceil(len(names) / columns)
    fig = _figure(12, 2.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).reshape(-1)
    if replay.chunks:
        t0 = replay.chunks[0].stamp
        stamps = np.array([ns_to_seconds(c.stamp - t0) for c in replay.chunks])  # s after the first chunk
        predicted = np.stack([c.predicted for c in replay.chunks])  # (N, A, D)
        commanded = np.stack([c.commanded for c in replay.chunks])
        A = predicted.shape[1]
        # Action i of a chunk at t targets t + (i + 1) * dt (see the replay module docstring).
        offsets = (np.arange(A) + 1) * replay.dt
        for d, (ax, name) in enumerate(zip(axes, names)):
            ax.plot(stamps + replay.dt, commanded[:, 0, d], color="black", lw=1.5, label="commanded")
            for n in range(len(stamps)):
                ax.plot(stamps[n] + offsets, predicted[n, :, d], color="tab:orange", lw=0.6, alpha=0.5)
            ax.plot(stamps + replay.dt, predicted[:, 0, d], ".", color="tab:red", ms=3, label="predicted (step 0)")
            ax.set_title(name, fontsize=9)
            ax.tick_params(labelsize=7)
        axes[0].legend(fontsize=7, loc="best")
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"{replay.path.name}: predicted chunks vs commanded targets (time from first chunk, s)", fontsize=10)
    fig.savefig(path)


def _plot_error_vs_step(path: Path, report: dict[str, Any]) -> None:
    fig = _figure(6, 3.5)
    ax = fig.subplots()
    for bag in report["bags"]:
        steps = bag["action_error"]["per_step"]
        if steps:
            ax.plot(range(len(steps)), [np.nan if v is None else v for v in steps], marker="o", lw=1,
                    label=Path(bag["path"]).name)
    overall = report["action_error"]["per_step"]
    if overall and len(report["bags"]) > 1:
        ax.plot(range(len(overall)), [np.nan if v is None else v for v in overall], color="black", lw=2.5, label="all")
    if overall:
        ax.set_xticks(range(len(overall)))
    ax.set_xlabel("horizon step i (action for t + (i+1) dt)")
    ax.set_ylabel("mean |predicted - commanded|")
    ax.set_title("Action error vs horizon step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.savefig(path)


def _plot_skews(path: Path, replays: list[BagReplay]) -> None:
    fig = _figure(6, 3.5)
    ax = fig.subplots()
    streams = sorted({name for r in replays for name in r.skews})
    for name in streams:
        samples = np.array([s for r in replays for s in r.skews.get(name, [])]) * 1e3
        if samples.size:
            ax.hist(samples, bins=40, alpha=0.6, label=f"{name} (n={samples.size})")
    ax.set_xlabel("member stamp - reference stamp (ms)")
    ax.set_ylabel("aligned sets")
    ax.set_title("Synchronisation skew")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.savefig(path)


# ----------------------------------------------------------------------------------------- html


def _fmt(value: Any, scale: float = 1.0, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value * scale:.{digits}g}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _sync_table(sync: dict[str, Any]) -> str:
    rows = []
    for name, entry in sync["streams"].items():
        dropped = ", ".join(f"{k}: {v}" for k, v in entry["dropped"].items()) or "none"
        skew = entry["skew_ms"]
        rows.append([name, entry["received"], entry["used"], dropped, skew.get("p50"), skew.get("p99")])
    return _table(["stream", "received", "used", "dropped", "|skew| p50 ms", "|skew| p99 ms"], rows)


def _html(report: dict[str, Any]) -> str:
    err, lat, ck = report["action_error"], report["inference_ms"], report["checkpoint"]
    sp = report["setpoint_1khz"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mail-ros eval-bag report</title><style>",
        "body{font-family:sans-serif;margin:1.5em;max-width:1200px} table{border-collapse:collapse;margin:.5em 0}",
        "td,th{border:1px solid #bbb;padding:2px 8px;font-size:13px;text-align:right} th{background:#eee}",
        "img{max-width:100%;border:1px solid #ddd;margin:.3em 0}</style></head><body>",
        f"<h1>Offline evaluation: {html.escape(str(ck['path']))}</h1>",
        f"<p>{html.escape(ck['variant'])} / {html.escape(ck['head'])}, cameras {html.escape(str(ck['cameras']))}, "
        f"T={ck['obs_horizon']}, A={ck['action_horizon']}, {ck['rate_hz']} Hz, dt {ck['dt']} s. "
        f"Options: {html.escape(json.dumps(report['options']))}</p>",
        _table(["bags", "frames", "chunks", "compared values", "MAE", "RMSE", "max error", "inference p50 ms",
                "p99 ms"],
               [[len(report["bags"]), report["frames"], report["chunks"], err["compared"], err["mae"], err["rmse"],
                 err["max"], lat.get("p50"), lat.get("p99")]]),
        "<h2>Recorded arm commands at the controller's 1 kHz</h2>",
        "<p>The commands played through the JTC model (joining from its desired state) and sampled every "
        "millisecond, as libfranka checks them; limits are the FR3's smallest per joint.</p>",
        _table(["commands", "rejected", "worst acceleration rad/s^2", "limit", "worst jerk rad/s^3", "limit"],
               [[sp.get("commands"), sp.get("rejected"), sp.get("acceleration_max"),
                 sp.get("fr3_acceleration_limit_min"), sp.get("jerk_max"), sp.get("fr3_jerk_limit_min")]]),
        "<h2>Error per action dimension</h2>",
        _table(["dimension", "MAE"], [[k, v] for k, v in err["per_dimension"].items()]),
        "<h2>Error per horizon step</h2>",
        _table(["step", "MAE", "compared values"],
               [[i, v, n] for i, (v, n) in enumerate(zip(err["per_step"], err["compared_per_step"]))]),
        f"<img src='{report['plots']['error_vs_step']}' alt='error vs horizon step'>",
        "<h2>Synchronisation (all bags)</h2>",
        _sync_table(report["sync"]),
        f"<img src='{report['plots']['skew_histogram']}' alt='skew histogram'>",
    ]
    for bag in report["bags"]:
        e = bag["action_error"]
        parts += [
            f"<h2>{html.escape(bag['path'])}</h2>",
            f"<p>frames {bag['frames']}, chunks {bag['chunks']}, MAE {_fmt(e['mae'])} over {e['compared']} values, "
            f"gripper from {html.escape(bag['gripper_source'])}; observations not predicted on: "
            f"{html.escape(json.dumps(bag['observations']))}</p>",
            _sync_table(bag["sync"]),
            f"<img src='{bag['plot']}' alt='predicted vs commanded'>",
        ]
    parts.append("</body></html>\n")
    return "\n".join(parts)
