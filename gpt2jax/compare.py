"""Run records -> tables and plots: `gpt2jax compare` (the records are read by `gpt2jax.records`)."""

from __future__ import annotations

import bisect
import csv
import io
import itertools
import json
import math
import os
import statistics
from typing import Any, Sequence

from gpt2jax.errors import UserError
from gpt2jax.records import RunRecord, is_finite
from gpt2jax.rundir import is_locked

COLUMNS = ["run", "differs", "params", "steps", "tokens", "best_val_loss", "best_val_step", "last_train_loss",
           "tokens_per_s", "mfu", "wall_s", "status"]


def differing_keys(records: Sequence[RunRecord]) -> list[str]:
    """Config keys whose values differ between runs, leaving out those that do not change what a run
    computes (cache paths, logging and checkpoint intervals)."""
    from gpt2jax.experiment import RESUME_SAFE_KEYS

    keys = sorted(set().union(*(r.config for r in records)) - RESUME_SAFE_KEYS)
    return [k for k in keys if len({json.dumps(r.config.get(k)) for r in records}) > 1]


def _status(record: RunRecord) -> str:
    status = record.info.get("status", "unknown")
    if status != "running":
        return status
    try:  # a live trainer holds the run's lock; a killed one left "running" behind
        return "running" if is_locked(record.path) else "stopped"
    except OSError:  # cannot tell
        return status


def _parameter_count(config: dict[str, Any]) -> int | None:
    from gpt2jax.config import GPT2Config

    fields = {k.removeprefix("model."): v for k, v in config.items() if k.startswith("model.")}
    try:
        model = GPT2Config(**{k: v for k, v in fields.items() if k in GPT2Config.__dataclass_fields__})
    except (TypeError, UserError):
        return None
    return model.num_parameters()  # by hand from the shapes: no tracing, whatever the sizes


def _earlier_sessions(record: RunRecord, before: float) -> list[tuple[float, float | None]]:
    """Sessions that run.json does not list (older trainers keep only the latest start), from the metrics
    logged before `before`: a resume replays the steps after its checkpoint, so a step logged again starts one."""
    sessions: list[tuple[float, float | None]] = []
    seen: dict[str, int] = {}
    for m in record.metrics:
        if "time" not in m or m["time"] >= before:
            continue
        if not sessions or m["step"] <= seen.get(m["split"], -1):
            sessions.append((m["time"], None))
            seen = {}
        seen[m["split"]] = m["step"]
    return sessions


def training_time(record: RunRecord) -> tuple[list[tuple[dict[str, Any], float]], float | None]:
    """Each timed metrics record with the training time before it, and the run's wall time: the sum of its
    sessions (the start and each resume, from start to stop or last record), the time between them left out.
    Sessions that run.json does not list count from their first record."""
    listed = record.sessions
    sessions = _earlier_sessions(record, listed[0][0] if listed else math.inf) + listed
    if not sessions:
        return [], None
    timed = [m for m in record.metrics if "time" in m]
    starts = [start for start, _ in sessions]
    ends = [start if stop is None else max(start, stop) for start, stop in sessions]
    where = [max(0, bisect.bisect_right(starts, m["time"]) - 1) for m in timed]
    for m, i in zip(timed, where):
        ends[i] = max(ends[i], m["time"])
    offsets = list(itertools.accumulate((end - start for start, end in zip(starts, ends)), initial=0.0))
    return [(m, offsets[i] + max(0.0, m["time"] - starts[i])) for m, i in zip(timed, where)], offsets[-1]


def compare_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per run, best validation loss first (runs without one last)."""
    keys = differing_keys(records) if len(records) > 1 else []
    names = [r.name for r in records]
    rows = []
    for r in records:
        train, val = r.split("train"), [m for m in r.split("val") if is_finite(m["loss"])]
        best = min(val, key=lambda m: m["loss"], default=None)
        speeds = [m["tokens_per_s"] for m in train if m.get("tokens_per_s") is not None]
        mfus = [m["mfu"] for m in train if m.get("mfu") is not None]
        rows.append({
            "run": r.name if names.count(r.name) == 1 else r.path,
            "differs": {k: r.config.get(k) for k in keys},
            "params": _parameter_count(r.config),
            "steps": max(m["step"] for m in r.metrics),
            "tokens": max((m.get("tokens_seen", 0) for m in r.metrics), default=0),
            "best_val_loss": best["loss"] if best else None,
            "best_val_step": best["step"] if best else None,
            "last_train_loss": train[-1]["loss"] if train and is_finite(train[-1]["loss"]) else None,
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "mfu": statistics.median(mfus) if mfus else None,
            "wall_s": training_time(r)[1],
            "status": _status(r),
        })
    return sorted(rows, key=lambda row: (row["best_val_loss"] is None, row["best_val_loss"] or 0.0))


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column == "differs":
        return " ".join(f"{k}={v}" for k, v in value.items()) or "-"
    if column == "params":
        return f"{value / 1e6:.2f}M"
    if column == "mfu":
        return f"{value:.1%}"
    if column in ("tokens_per_s", "wall_s"):
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_rows(rows: list[dict[str, Any]], fmt: str) -> str:
    """Rows as `table` (aligned text), `markdown`, `csv` or `json`."""
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "differs": json.dumps(row["differs"])})
        return out.getvalue()
    cells = [[_cell(c, row[c]) for c in COLUMNS] for row in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    if fmt != "table":
        raise UserError(f"--format must be table, markdown, csv or json, got {fmt!r}")
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    return "\n".join([line(COLUMNS)] + [line(row) for row in cells])


IMAGE_FORMATS = ("png", "svg", "svgz", "pdf", "jpg", "jpeg", "tif", "tiff", "webp")


def check_plot_path(path: str) -> str:
    """The image format of a --plot file, refusing one that cannot be written before any work is done; no
    directory is made for it."""
    parent = os.path.dirname(os.path.abspath(path))
    if not path or path.endswith(("/", os.sep)) or os.path.isdir(path):
        raise UserError(f"--plot {path}: is a directory; name the image, e.g. {os.path.join(path, 'compare.png')}")
    if not os.path.isdir(parent):
        problem = "is not a directory" if os.path.exists(parent) else "does not exist (it is not made for you)"
        raise UserError(f"--plot {path}: {parent} {problem}")
    if not os.access(path if os.path.exists(path) else parent, os.W_OK):
        raise UserError(f"--plot {path}: no permission to write it")
    extension = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    if extension not in IMAGE_FORMATS:
        raise UserError(f"--plot {path}: .{extension} is not an image format ({', '.join(IMAGE_FORMATS)})")
    return extension


def plot(records: Sequence[RunRecord], path: str) -> None:
    """Train (thin) and val (markers) loss against tokens seen, and against training time, one colour per run."""
    image_format = check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = differing_keys(records) if len(records) > 1 else []
    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(13, 5), sharey=True, constrained_layout=True)
    for i, r in enumerate(records):
        color = f"C{i % 10}"
        shown = [f"{k.split('.')[-1]}={r.config.get(k)}" for k in keys[:3]] + (["..."] if len(keys) > 3 else [])
        label = r.name + (f" ({', '.join(shown)})" if shown else "")
        elapsed = {id(m): seconds for m, seconds in training_time(r)[0]}
        for split, style in (("train", dict(lw=1.2, alpha=0.6)), ("val", dict(lw=0, marker="o", ms=5))):
            points = [m for m in r.split(split) if "tokens_seen" in m and is_finite(m["loss"])]
            by_tokens.plot([m["tokens_seen"] for m in points], [m["loss"] for m in points], color=color,
                           label=label if split == "train" else None, **style)
            timed = [m for m in points if id(m) in elapsed]
            by_time.plot([elapsed[id(m)] / 60 for m in timed], [m["loss"] for m in timed], color=color, **style)
    by_tokens.set_xscale("log")
    by_tokens.set_xlabel("tokens seen (log)")
    by_tokens.set_ylabel("loss (nats/token)")
    by_time.set_xlabel("training time (minutes; the time between resumes left out)")
    for axis in (by_tokens, by_time):
        axis.grid(alpha=0.3)
    by_tokens.set_title("loss vs tokens (lines: train, dots: val)")
    by_time.set_title("loss vs wall time")
    fig.legend(loc="outside lower center", ncol=min(2, len(records)), fontsize=8)
    try:
        fig.savefig(path, dpi=110, format=image_format)
    except OSError as e:
        raise UserError(f"--plot {path}: cannot write it ({e.strerror or e})") from None
    finally:
        plt.close(fig)
