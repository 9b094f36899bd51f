"""The run directory: what is in it, who holds it, and what may be changed or removed in it.

runs/NAME/ holds config.json (the resolved experiment), run.json (versions, devices, times,
status), metrics.jsonl, samples.jsonl, tb/ (TensorBoard) and checkpoints/ (Orbax), plus the
trainer's .lock. Only these entries are ever removed (`--overwrite`), and only from a directory
proven to be a run; anything else the user keeps there is left alone.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import sys
from typing import Any, Callable, TextIO

from gpt2jax.errors import Stopped, UserError

RUN_ENTRIES = ("config.json", "run.json", "metrics.jsonl", "samples.jsonl", "tb", "checkpoints",
               "checkpoints_unreadable")
EXPERIMENT_GROUPS = ("model", "data", "optim", "train")


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)` writes the file at a temporary path beside `path`, which is then renamed over it: readers
    never see half a file, and a failed write leaves `path` as it was (and no temporary behind). The one way
    gpt2jax replaces a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, value: Any) -> None:
    """Write JSON atomically (`atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(value, f, indent=2, sort_keys=True, default=str)
            f.write("\n")

    atomic_write(path, write)


def read_json_object(path: str, what: str) -> dict:
    """A JSON object from `path`, or a UserError naming `what` it should have been."""
    try:
        with open(path) as f:
            value = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); is this {what}?") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object ({what})")
    return value


def read_resolved_config(run_dir: str) -> dict:
    """The resolved experiment config a run recorded in its config.json, checked for its groups."""
    config = read_json_object(os.path.join(run_dir, "config.json"), "a gpt2jax run's resolved config")
    missing = [group for group in EXPERIMENT_GROUPS if not isinstance(config.get(group), dict)]
    if missing:
        raise UserError(f"{run_dir}/config.json lacks the groups {', '.join(missing)}: not a gpt2jax run config")
    return config


def has_checkpoints(path: str | os.PathLike) -> bool:
    """A run directory one can load a model from: config.json beside a checkpoints/ directory."""
    path = os.fspath(path)
    return os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(os.path.join(path, "config.json"))


def is_run(path: str) -> bool:
    """Proven to be a gpt2jax run: a config.json holding an experiment config, and run.json or checkpoints/."""
    try:
        read_resolved_config(path)
    except UserError:
        return False
    return os.path.isfile(os.path.join(path, "run.json")) or os.path.isdir(os.path.join(path, "checkpoints"))


def user_entries(path: str) -> list[str]:
    """What is in `path` besides what a run writes (and the lock)."""
    return sorted(set(os.listdir(path)) - set(RUN_ENTRIES) - {".lock"}) if os.path.isdir(path) else []


def check_workdir(workdir: str, writing: bool = True) -> None:
    """A place a run can live: a directory or a path under one (not under a file), that we may write."""
    try:
        os.fsencode(workdir)
    except UnicodeError:
        raise UserError(f"--workdir {ascii(workdir)}: this process's file-system encoding is "
                        f"{sys.getfilesystemencoding()} (a C/POSIX locale), which cannot name it; run with "
                        "LANG=C.UTF-8 (or PYTHONUTF8=1)") from None
    if os.path.islink(workdir) and not os.path.exists(workdir):
        raise UserError(f"--workdir {workdir} is a link to {os.readlink(workdir)}, which does not exist")
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"--workdir {workdir}: {existing} is a file, not a directory")
    if writing and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--workdir {workdir}: no permission to write in {existing}")
    owner = _owning_run(workdir)
    if owner is not None:
        run, entry = owner
        raise UserError(f"--workdir {workdir} is inside {os.path.join(run, entry)}, which belongs to the run in {run} "
                        "(its --overwrite would remove it); choose a directory outside that run's entries")


def _owning_run(path: str) -> tuple[str, str] | None:
    """(run, entry) when `path` lies inside one of the entries a run owns (its checkpoints/, tb/, ...), by its
    path as given and as resolved through links; else None."""
    for form in {os.path.abspath(path), os.path.realpath(path)}:
        child, parent = form, os.path.dirname(form)
        while parent != child:
            if os.path.basename(child) in RUN_ENTRIES and is_run(parent):
                return parent, os.path.basename(child)
            child, parent = parent, os.path.dirname(parent)
    return None


def holds_anything(path: str) -> bool:
    """A directory with something in it besides a trainer's lock."""
    return os.path.isdir(path) and bool(set(os.listdir(path)) - {".lock"})


def check_overwrite(workdir: str) -> list[str]:
    """The run entries `--overwrite` will remove; refuses unless `workdir` is proven to be a run."""
    if not holds_anything(workdir):
        return []
    if not is_run(workdir):
        raise UserError(f"--overwrite: {workdir} is not a gpt2jax run directory (no readable experiment config.json "
                        "beside run.json or checkpoints/); nothing was written or removed")
    entries = [name for name in RUN_ENTRIES if os.path.lexists(os.path.join(workdir, name))]
    for name in entries:  # everything is checked before anything is removed
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            for directory, subdirs, _ in os.walk(path):  # links are not followed (and are unlinked, not emptied)
                if is_run(directory) and directory != path:
                    raise UserError(f"--overwrite: {directory} is another run, inside {workdir}'s {name}/; move it "
                                    "out first (nothing was written or removed)")
    return entries


def remove_run_entries(workdir: str, entries: list[str]) -> None:
    """--overwrite: remove what an earlier run wrote, saying what; the user's other files stay."""
    if not entries:
        return
    kept = user_entries(workdir)
    print(f"gpt2jax: --overwrite removes {', '.join(entries)} from {workdir}"
          + (f"; keeps {', '.join(kept)}" if kept else ""), file=sys.stderr)
    for name in entries:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:  # a file, or a link (to a directory too): the link goes, what it points at stays
            os.remove(path)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}: config JSON as dotted keys."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def check_resumable(workdir: str, resolved: dict[str, Any], ignored_keys: set[str],
                    defaults: dict[str, Any] | None = None) -> None:
    """A new or empty directory, or one holding this same experiment (training then resumes); keys in
    `ignored_keys` (logging intervals, cache paths) may differ. A key the stored config lacks (added to
    gpt2jax after the run was made) whose value now is its default in `defaults` (dotted keys) is no change:
    runs survive upgrades that add options."""
    if os.path.isfile(os.path.join(workdir, "config.json")):
        before, now, defaults = flatten(read_resolved_config(workdir)), flatten(resolved), defaults or {}
        added_at_default = {k for k in now.keys() - before.keys() if k in defaults and now[k] == defaults[k]}
        changed = sorted(k for k in (before.keys() | now.keys()) - ignored_keys - added_at_default
                         if before.get(k) != now.get(k))
        if changed:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
            raise UserError(f"{workdir} holds a run with a different config ({shown}); use another --workdir, "
                            "--fork NEW_DIR to continue from its checkpoint with this config, or --overwrite")
    elif holds_anything(workdir):
        raise UserError(f"{workdir} exists and is not a gpt2jax run directory (no config.json); use another --workdir")


def check_fork_target(workdir: str, fork_from: str) -> None:
    if not has_checkpoints(fork_from):
        raise UserError(f"--fork: {fork_from} is not a gpt2jax run directory with checkpoints")
    if holds_anything(workdir):
        raise UserError(f"--fork writes a new run into {workdir}, which is not empty")


class RunStatus:
    """run.json while a trainer holds the run: versions and devices, status running -> finished, stopped or
    failed, and one entry per session (start, stop) so wall time adds up across resumes."""

    def __init__(self, workdir: str, info: dict[str, Any], enabled: bool = True):
        self.path, self.enabled = os.path.join(workdir, "run.json"), enabled
        previous = self._previous_sessions()
        self.info = {**info, "status": "running", "sessions": previous + [{"started": _now()}]}

    def _previous_sessions(self) -> list[dict]:
        try:
            sessions = read_json_object(self.path, "run.json").get("sessions", [])
        except UserError:
            return []
        return [s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else []

    def __enter__(self) -> RunStatus:
        if self.enabled:
            write_json(self.path, self.info)
        return self

    def finish(self) -> None:
        self.info["status"] = "finished"

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> None:
        if kind is not None:
            self.info["status"] = "stopped" if issubclass(kind, (Stopped, KeyboardInterrupt)) else "failed"
        self.info["stopped"] = self.info["sessions"][-1]["stopped"] = _now()
        if self.enabled:
            write_json(self.path, self.info)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def lock(workdir: str) -> TextIO:
    """Hold runs/NAME/.lock for the life of the trainer; a second trainer on the same run refuses."""
    os.makedirs(workdir, exist_ok=True)
    handle = open(os.path.join(workdir, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"{workdir} is in use by another trainer (pid {owner}); wait for it or use another --workdir")
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def is_locked(workdir: str) -> bool:
    """A live trainer holds this run (its lock cannot be taken)."""
    path = os.path.join(workdir, ".lock")
    if not os.path.isfile(path):
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def repair_metrics(run_dir: str, resumed_step: int) -> None:
    """Make metrics.jsonl (and samples.jsonl) continue cleanly from `resumed_step`: drop a partial last
    line (a killed writer) and the records of steps after it (they will be recomputed)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
        steps = [(_step_of(line), line) for line in lines[:-1]]  # lines[-1] is a partial line, or empty
        kept = [line for step, line in steps if step is not None and step <= resumed_step]
        if len(kept) != len(lines) - 1 or lines[-1]:
            def write(tmp: str, kept: list[bytes] = kept) -> None:
                with open(tmp, "wb") as f:
                    f.writelines(line + b"\n" for line in kept)

            atomic_write(path, write)


def _step_of(line: bytes) -> int | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None
