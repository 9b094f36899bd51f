"""Run records -> tables and plots (`gpt2jax compare`), and grids of runs (`gpt2jax sweep`)."""

from __future__ import annotations

import ast
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import statistics
import sys
from typing import Any, Sequence

from gpt2jax.config import flatten
from gpt2jax.errors import UserError

COLUMNS = ["run", "differs", "params", "steps", "tokens", "best_val_loss", "best_val_step", "last_train_loss",
           "tokens_per_s", "mfu", "wall_s", "status"]


@dataclasses.dataclass
class RunRecord:
    path: str
    config: dict[str, Any]  # flattened resolved config
    metrics: list[dict[str, Any]]
    info: dict[str, Any]

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def split(self, split: str) -> list[dict[str, Any]]:
        return [m for m in self.metrics if m.get("split") == split]


def read_jsonl(path: str) -> list[dict]:
    """Records of a JSON-lines file that may still be being written: a partial last line is skipped."""
    records = []
    with open(path) as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(rest.strip() for rest in lines[i + 1 :]):
                raise UserError(f"{path}: line {i + 1} is not JSON") from None
    return records


def read_run(path: str) -> RunRecord:
    config_path, metrics_path = os.path.join(path, "config.json"), os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(config_path):
        raise UserError(f"{path}: not a run directory (no config.json)")
    if not os.path.isfile(metrics_path) or not (metrics := read_jsonl(metrics_path)):
        raise UserError(f"{path}: no metrics yet")
    with open(config_path) as f:
        config = flatten(json.load(f))
    info_path = os.path.join(path, "run.json")
    info = json.load(open(info_path)) if os.path.isfile(info_path) else {}
    return RunRecord(path, config, metrics, info)


def read_runs(paths: Sequence[str]) -> list[RunRecord]:
    """Every readable run; the others are reported on stderr. None readable is an error."""
    records = []
    for path in paths:
        try:
            records.append(read_run(path))
        except UserError as e:
            print(f"gpt2jax compare: warning: {e}", file=sys.stderr)
    if not records:
        raise UserError("no readable runs among " + ", ".join(paths))
    return records


def differing_keys(records: Sequence[RunRecord]) -> list[str]:
    """Config keys whose values differ between runs, leaving out those that do not change what a run
    computes (cache paths, logging and checkpoint intervals)."""
    from gpt2jax.config import RESUME_SAFE_KEYS

    keys = sorted(set().union(*(r.config for r in records)) - RESUME_SAFE_KEYS)
    return [k for k in keys if len({json.dumps(r.config.get(k)) for r in records}) > 1]


def _status(record: RunRecord) -> str:
    status = record.info.get("status", "unknown")
    if status != "running":
        return status
    try:  # a live trainer holds the run's lock; a killed one left "running" behind
        import fcntl

        with open(os.path.join(record.path, ".lock"), "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "stopped"
    except (BlockingIOError, OSError):
        return "running"


def _parameter_count(config: dict[str, Any]) -> int | None:
    from gpt2jax.config import GPT2Config
    from gpt2jax.hf import param_shapes

    fields = {k.removeprefix("model."): v for k, v in config.items() if k.startswith("model.")}
    try:
        model = GPT2Config(**{k: v for k, v in fields.items() if k in GPT2Config.__dataclass_fields__})
    except (TypeError, UserError):
        return None
    return sum(math.prod(s.shape) for s in param_shapes(model).values())


def compare_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per run, best validation loss first (runs without one last)."""
    keys = differing_keys(records) if len(records) > 1 else []
    rows = []
    for r in records:
        train, val = r.split("train"), r.split("val")
        best = min(val, key=lambda m: m["loss"]) if val else None
        speeds = [m["tokens_per_s"] for m in train if "tokens_per_s" in m]
        mfus = [m["mfu"] for m in train if "mfu" in m]
        times = [m["time"] for m in r.metrics if "time" in m]
        rows.append({
            "run": r.name,
            "differs": {k: r.config.get(k) for k in keys},
            "params": _parameter_count(r.config),
            "steps": max((m["step"] for m in r.metrics), default=0),
            "tokens": max((m.get("tokens_seen", 0) for m in r.metrics), default=0),
            "best_val_loss": best["loss"] if best else None,
            "best_val_step": best["step"] if best else None,
            "last_train_loss": train[-1]["loss"] if train else None,
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "mfu": statistics.median(mfus) if mfus else None,
            "wall_s": (max(times) - _started(r)) if times and _started(r) else None,
            "status": _status(r),
        })
    return sorted(rows, key=lambda row: (row["best_val_loss"] is None, row["best_val_loss"] or 0.0))


def _started(record: RunRecord) -> float | None:
    import datetime

    started = record.info.get("started")
    return datetime.datetime.fromisoformat(started).timestamp() if started else None


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


def plot(records: Sequence[RunRecord], path: str) -> None:
    """Train (thin) and val (markers) loss against tokens seen, and against wall time, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = differing_keys(records) if len(records) > 1 else []
    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(13, 5), sharey=True, constrained_layout=True)
    for i, r in enumerate(records):
        color = f"C{i % 10}"
        shown = [f"{k.split('.')[-1]}={r.config.get(k)}" for k in keys[:3]] + (["..."] if len(keys) > 3 else [])
        label = r.name + (f" ({', '.join(shown)})" if shown else "")
        start = _started(r) or min(m["time"] for m in r.metrics)
        for split, style in (("train", dict(lw=1.2, alpha=0.6)), ("val", dict(lw=0, marker="o", ms=5))):
            points = [m for m in r.split(split) if "tokens_seen" in m]
            if not points:
                continue
            tokens = [m["tokens_seen"] for m in points]
            by_tokens.plot(tokens, [m["loss"] for m in points], color=color, label=label if split == "train" else None,
                           **style)
            by_time.plot([(m["time"] - start) / 60 for m in points], [m["loss"] for m in points], color=color, **style)
    by_tokens.set_xscale("log")
    by_tokens.set_xlabel("tokens seen (log)")
    by_tokens.set_ylabel("loss (nats/token)")
    by_time.set_xlabel("wall time (minutes)")
    for axis in (by_tokens, by_time):
        axis.grid(alpha=0.3)
    by_tokens.set_title("loss vs tokens (lines: train, dots: val)")
    by_time.set_title("loss vs wall time")
    fig.legend(loc="outside lower center", ncol=min(2, len(records)), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def expand_grid(grid: Sequence[str]) -> list[list[str]]:
    """["optim.lr=[6e-4,3e-4]", "model.n_layer=[4,6]"] -> one list of --config overrides per point."""
    axes = []
    for expression in grid:
        key, sep, values = expression.partition("=")
        try:
            parsed = ast.literal_eval(values) if sep else None
        except (ValueError, SyntaxError):
            parsed = None
        if not key or not isinstance(parsed, (list, tuple)) or not parsed:
            raise UserError(f"--grid {expression!r} is not of the form KEY=[VALUE, ...]")
        axes.append([f"--config.{key.removeprefix('config.')}={v}" for v in parsed])
    return [list(point) for point in itertools.product(*axes)]


def point_name(overrides: Sequence[str]) -> str:
    """--config.optim.lr=0.0003 --config.model.n_layer=4 -> lr=0.0003_n_layer=4"""
    parts = [o.removeprefix("--config.").split("=", 1) for o in overrides]
    return "_".join(f"{key.split('.')[-1]}={value}" for key, value in parts).replace("/", "-")


def sweep(config_path: str, grid: Sequence[str], workdir: str, overrides: Sequence[str] = (),
          print_commands: bool = False, progress: bool = True) -> list[str]:
    """Expand the grid into named runs under `workdir` and train them one after another (or print the
    commands, for a scheduler). Every point is loaded and validated before the first one starts."""
    from gpt2jax.config import load_config

    points = expand_grid(grid)
    configs = [(os.path.join(workdir, point_name(p)), load_config(config_path, [*overrides, *p]), p) for p in points]
    if print_commands:
        for run_dir, _, point in configs:
            print(" ".join(["gpt2jax", "train", "--config", config_path, "--workdir", run_dir, *overrides, *point]))
        return [run_dir for run_dir, _, _ in configs]
    import jax

    from gpt2jax.config import validate_experiment
    from gpt2jax.trainer import run_training

    for _, config, _ in configs:
        validate_experiment(config, jax.device_count())
    for run_dir, config, _ in configs:
        print(f"== {run_dir}", file=sys.stderr)
        run_training(config, run_dir, progress=progress)
    return [run_dir for run_dir, _, _ in configs]
