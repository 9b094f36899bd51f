"""Run records -> tables and plots: `gpt2jax compare`."""

from __future__ import annotations

import bisect
import csv
import dataclasses
import datetime
import io
import itertools
import json
import math
import os
import stat
import statistics
import sys
from typing import Any, Callable, Sequence

from gpt2jax.errors import UserError
from gpt2jax.rundir import EXPERIMENT_GROUPS, flatten, is_locked

COLUMNS = ["run", "differs", "params", "steps", "tokens", "best_val_loss", "best_val_step", "last_train_loss",
           "tokens_per_s", "mfu", "wall_s", "status"]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# The metrics.jsonl fields compare reads: name -> (check, what it must be, required). Others are not looked at.
FIELDS: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "step": (_is_count, "a non-negative integer", True),
    "split": (lambda v: isinstance(v, str), "a string", True),
    "loss": (lambda v: v is None or _is_number(v), "a number or null", True),
    "time": (_is_finite, "seconds since the epoch", False),
    "tokens_seen": (_is_count, "a non-negative integer", False),
    "tokens_per_s": (lambda v: v is None or _is_finite(v), "a number or null", False),
    "mfu": (lambda v: v is None or _is_finite(v), "a number or null", False),
}
_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}


@dataclasses.dataclass
class RunRecord:
    path: str
    config: dict[str, Any]  # flattened resolved config
    metrics: list[dict[str, Any]]
    info: dict[str, Any]
    sessions: list[tuple[float, float | None]] = dataclasses.field(default_factory=list)  # run.json's (start, stop)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def split(self, split: str) -> list[dict[str, Any]]:
        return [m for m in self.metrics if m.get("split") == split]


def record_problem(record: Any) -> str | None:
    """What keeps one JSON value from being a metrics record, or None."""
    if not isinstance(record, dict):
        return f"is {_KINDS.get(type(record), 'a number')}, not a metrics record"
    for field, (ok, what, required) in FIELDS.items():
        if field not in record:
            if required:
                return f"has no {field!r}"
        elif not ok(record[field]):
            shown = json.dumps(record[field])
            return f"has {field} {shown[:40] + '...' * (len(shown) > 40)}, not {what}"
    return None


def parse_metrics(run: str, data: bytes) -> list[dict[str, Any]]:
    """The records of metrics.jsonl, which may still be being written: an unterminated last line that is not
    JSON (a writer caught or killed mid-line) is left out; any other bad line is an error naming it."""
    records, lines = [], data.split(b"\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
            if number == len(lines):
                continue
            raise UserError(f"{run}: metrics.jsonl line {number} is not JSON") from None
        if (problem := record_problem(record)) is not None:
            raise UserError(f"{run}: metrics.jsonl line {number} {problem}")
        records.append(record)
    return records


def _read(run: str, name: str) -> bytes | None:
    """The bytes of run/name, None when it does not exist."""
    path = os.path.join(run, name)
    if os.path.lexists(path) and not os.path.isfile(path):
        raise UserError(f"{run}: {name} is not a regular file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"{run}: cannot read {name} ({e.strerror or e})") from None


def _json_object(run: str, name: str, data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{run}: {name} is not JSON") from None
    if not isinstance(value, dict):
        raise UserError(f"{run}: {name} is {_KINDS.get(type(value), 'a number')}, not a JSON object")
    return value


def _timestamp(run: str, where: str, value: Any) -> float:
    try:
        return datetime.datetime.fromisoformat(value).timestamp()
    except (TypeError, ValueError, OverflowError, OSError):
        raise UserError(f"{run}: run.json {where} is {json.dumps(value)[:40]}, not an ISO date and time") from None


def _sessions(run: str, info: dict[str, Any]) -> list[tuple[float, float | None]]:
    """run.json checked (status a string, times ISO dates) and its training sessions as (start, stop or None):
    "sessions" as newer trainers write it, or else the latest "started" alone."""
    if not isinstance(info.get("status", ""), str):
        raise UserError(f"{run}: run.json status is {_KINDS.get(type(info['status']), 'a number')}, not a string")
    sessions = info.get("sessions")
    if sessions is None:
        return [] if info.get("started") is None else [(_timestamp(run, "started", info["started"]), None)]
    if not isinstance(sessions, list) or not all(isinstance(s, dict) for s in sessions):
        raise UserError(f"{run}: run.json sessions is not a list of objects")
    return sorted((_timestamp(run, f"sessions[{i}].started", s.get("started")),
                   None if s.get("stopped") is None else _timestamp(run, f"sessions[{i}].stopped", s["stopped"]))
                  for i, s in enumerate(sessions))


def read_run(path: str) -> RunRecord:
    """A run directory's config.json, metrics.jsonl and run.json, each checked; UserError says what is wrong."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{path}: not a run directory (no such directory)") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not stat.S_ISDIR(mode):
        raise UserError(f"{path}: not a run directory (a file)")
    config_data = _read(path, "config.json")
    if config_data is None:
        raise UserError(f"{path}: not a run directory (no config.json)")
    metrics_data = _read(path, "metrics.jsonl")
    metrics = parse_metrics(path, metrics_data) if metrics_data else []
    if not metrics:
        raise UserError(f"{path}: no metrics yet")
    config = _json_object(path, "config.json", config_data)
    missing = [group for group in EXPERIMENT_GROUPS if not isinstance(config.get(group), dict)]
    if missing:
        raise UserError(f"{path}: config.json lacks the {', '.join(missing)} group(s) of an experiment config")
    info_data = _read(path, "run.json")
    info = {} if info_data is None else _json_object(path, "run.json", info_data)
    return RunRecord(path, flatten(config), metrics, info, _sessions(path, info))


def read_runs(paths: Sequence[str]) -> list[RunRecord]:
    """Every readable run; the others are reported on stderr, one line each. None readable is an error."""
    records: list[RunRecord] = []
    seen: dict[str, str] = {}  # real path -> as given
    for path in paths:
        try:
            if os.path.realpath(path) in seen:
                raise UserError(f"{path}: the same run as {seen[os.path.realpath(path)]}; shown once")
            records.append(read_run(path))
            seen[os.path.realpath(path)] = path
        except UserError as e:
            print(f"gpt2jax compare: warning: {e}".replace("\n", "\\n"), file=sys.stderr)
    if not records:
        shown = ", ".join(paths) if len(paths) <= 3 else f"the {len(paths)} given"
        raise UserError(f"no readable runs among {shown}".replace("\n", "\\n"))
    return records


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
        train, val = r.split("train"), [m for m in r.split("val") if _is_finite(m["loss"])]
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
            "last_train_loss": train[-1]["loss"] if train and _is_finite(train[-1]["loss"]) else None,
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
            points = [m for m in r.split(split) if "tokens_seen" in m and _is_finite(m["loss"])]
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
