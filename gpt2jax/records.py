"""Run records: what `gpt2jax compare` reads from a run directory (resolved config, run.json sessions,
metrics.jsonl), each file checked by schema so that one unreadable run is reported and skipped, not fatal."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import stat
import sys
from typing import Any, Callable, Sequence

from gpt2jax.config import is_number
from gpt2jax.errors import UserError
from gpt2jax.rundir import EXPERIMENT_GROUPS, flatten


def is_finite(v: Any) -> bool:
    return is_number(v) and math.isfinite(v)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# The metrics.jsonl fields compare reads: name -> (check, what it must be, required). Others are not looked at.
FIELDS: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "step": (_is_count, "a non-negative integer", True),
    "split": (lambda v: isinstance(v, str), "a string", True),
    "loss": (lambda v: v is None or is_number(v), "a number or null", True),
    "time": (is_finite, "seconds since the epoch", False),
    "tokens_seen": (_is_count, "a non-negative integer", False),
    "tokens_per_s": (lambda v: v is None or is_finite(v), "a number or null", False),
    "mfu": (lambda v: v is None or is_finite(v), "a number or null", False),
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


