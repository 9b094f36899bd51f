"""Orbax checkpoints of a run: train state, data position, resolved config, metadata.

One `CheckpointManager` per run directory (`runs/NAME/checkpoints/`), saving with the
`ocp.args` API: `state` (params, opt state, step, rng; unreplicated), `data` (the step the
sampler continues from and its seed), `config` (the resolved experiment config) and `meta`.
Saves are asynchronous; Orbax writes each step into a temporary directory and renames it
when complete, so an unfinished save is never listed as a step. Kept: the latest `keep`
steps and the `keep_best` steps with the lowest validation loss. A step that fails to
restore (missing or truncated files) is reported and the previous step is used.

Formats of the parameter tree (the params, and the optimizer's moments, which mirror them): 2 is HF Flax's
(`transformer/h/0/...`, Linear kernels (out, in)), written since 2026-12 and recorded in `meta`; 1, written
before, named blocks `h_0`, ... and held kernels (in, out). A format-1 step is restored against a target
converted to format 1 and converted forward, so runs made before the change resume and sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
import warnings
from typing import Any, Callable, Iterator

import jax
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers

from gpt2jax.errors import UserError, describe

FORMAT = 2  # of the parameter tree; see the module docstring
_V1_BLOCK = re.compile(r"h_(\d+)$")


@dataclasses.dataclass(frozen=True)
class Restored:
    """What a restore found: its step, the state tree, and the JSON items that were asked for."""

    step: int
    state: Any  # the train state, or {"params": ...} from restore_params
    data: dict | None = None  # the data position (restore_latest_good)
    config: dict | None = None  # the resolved experiment config (restore_params)


class Checkpoints:
    """Save and restore the checkpoints of one run directory."""

    def __init__(self, run_dir: str, keep: int = 3, keep_best: int = 1, async_save: bool = True,
                 read_only: bool = False):
        """The trainer's handle (saves, keeps the `keep` latest and `keep_best` best steps, cleans up the
        temporary directories of its own unfinished saves), or with `read_only` a reader's: sampling, eval,
        export, forks and fine-tunes read a run that may be training at that moment, so they never write,
        delete or clean up anything in it (Orbax's cleanup would delete the step the trainer is writing)."""
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        self.unreadable: list[int] = []  # steps that failed to restore, newest first
        self.read_only = read_only
        _quiet_abandoned_writes()
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                                   enable_async_checkpointing=False, save_interval_steps=0)
        else:
            policies = [checkpoint_managers.LatestN(n=keep)]
            if keep_best:
                policies.append(checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics["val_loss"], reverse=True, n=keep_best,
                    keep_checkpoints_without_metrics=False,
                ))
            options = ocp.CheckpointManagerOptions(
                enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True,
                preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            )
        for attempt in range(5):
            try:
                self.manager = ocp.CheckpointManager(self.directory, options=options)
                break
            except FileNotFoundError:  # a reader listed a step that the training run's retention removed
                if not read_only:
                    raise
                if attempt == 4:
                    raise UserError(f"{self.directory}: its steps changed while they were listed (a trainer is "
                                    "saving and rotating them); try again") from None
                time.sleep(0.1)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data: dict, config: dict, meta: dict | None = None,
             val_loss: float | None = None) -> None:
        """Start saving `state` (single copy, not per-device) at `step`; returns before the write ends.

        `val_loss`, when this step was evaluated, ranks it for the best-k policy."""
        meta = {**(meta or {}), "val_loss": val_loss, "format": FORMAT}
        with self._writing():  # also reports a failed write of the previous (async) save
            self.manager.save(
            step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data),
                    config=ocp.args.JsonSave(config),
                    meta=ocp.args.JsonSave(meta),
                ),
                metrics=None if val_loss is None else {"val_loss": val_loss},
                force=True,
            )

    def restore_latest_good(self, abstract_state: Any) -> Restored | None:
        """The newest step that restores (state shaped like `abstract_state`, and the data position); None
        when there is no checkpoint. Broken steps are reported on stderr and skipped."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)

        def restore(step: int) -> Any:
            old = _format(self._state_metadata(step)) == 1
            state = ocp.args.StandardRestore(convert_trees(target, to_format=1) if old else target)
            restored = self.manager.restore(step, args=ocp.args.Composite(state=state, data=ocp.args.JsonRestore()))
            return (convert_trees(restored.state, to_format=2) if old else restored.state), restored.data

        found = self._newest_restorable(restore)
        return None if found is None else Restored(step=found[0], state=found[1][0], data=found[1][1])

    def _state_metadata(self, step: int) -> dict:
        """The tree of shapes and dtypes a step's state was saved with (Orbax's metadata of the item)."""
        from etils import epath

        # The item's own metadata (a Checkpointer would also look for step metadata there, and warn)
        return dict(ocp.StandardCheckpointHandler().metadata(epath.Path(self.directory) / str(step) / "state"))


    def _newest_restorable(self, restore: Callable[[int], Any], steps: list[int] | None = None):
        """(step, restored) of the newest of `steps` (default: all) that restores; None if there are none."""
        for step in sorted(self.all_steps() if steps is None else steps, reverse=True):
            try:
                restored = restore(step)
            except Exception as e:  # missing or truncated files: report, fall back to the step before
                self.unreadable.append(step)
                print(f"gpt2jax: checkpoint step {step} in {self.directory} is unreadable "
                      f"({describe(e)}); trying an older step",
                      file=sys.stderr)
                continue
            return step, restored
        if steps is None and not self.all_steps():
            return None
        raise UserError(f"{self.directory}: no readable checkpoint among steps {sorted(self.all_steps())}")

    def best_step(self) -> int | None:
        """The saved step with the lowest validation loss; the latest when no saved step was evaluated
        (train losses are not comparable with validation losses, so they never rank)."""
        scored = []
        for step in self.all_steps():
            meta = self.meta(step)
            if isinstance(meta.get("val_loss"), (int, float)) and not isinstance(meta["val_loss"], bool):
                scored.append((meta["val_loss"], step))
        return min(scored)[1] if scored else self.latest_step()

    def meta(self, step: int) -> dict:
        """A step's `meta` item (its val_loss, format, ...); damaged or missing: reported and read as {} (the
        step is then not ranked by `best_step`)."""
        return self._json_item(step, "meta", "it is not ranked")

    def data_position(self, step: int) -> dict:
        """A step's `data` item (the step the sampler continues from, its seed, the data's fingerprint);
        damaged or missing: reported and read as {}."""
        return self._json_item(step, "data", "its data is not checked")

    def _json_item(self, step: int, name: str, consequence: str) -> dict:
        """The one reader of a step's small JSON items: a damaged one is one line on stderr, never a traceback."""
        try:
            item = getattr(self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()})),
                           name)
            if not isinstance(item, dict):
                raise ValueError(f"expected a JSON object, found {type(item).__name__}")
            return item
        except Exception as e:  # truncated or edited JSON, a missing file: the step's weights may still be fine
            print(f"gpt2jax: checkpoint step {step} in {self.directory} has an unreadable {name} item "
                  f"({describe(e)}); {consequence}",
                  file=sys.stderr)
            return {}

    def resolve_step(self, step: int | str | None) -> int:
        """"latest" (or None), "best", or a step number -> an existing step."""
        if step in (None, "latest"):
            chosen = self.latest_step()
        elif step == "best":
            chosen = self.best_step()
        elif (isinstance(step, int) and not isinstance(step, bool)) or (isinstance(step, str) and step.isdigit()):
            chosen = int(step)
        else:
            raise UserError(f"step must be 'latest', 'best' or a step number, got {step!r}")
        if chosen is None:
            raise UserError(f"{self.directory}: no checkpoint yet")
        return chosen

    def restore_params(self, step: int | str | None = None) -> Restored:
        """A step's params (`.state["params"]`) and resolved config, without knowing the optimizer: for
        sampling, eval and export.

        "latest" falls back to older steps when the newest is unreadable; a named step does not."""
        chosen = self.resolve_step(step)
        if chosen not in self.all_steps():
            raise UserError(f"{self.directory}: no checkpoint at step {chosen} (have {self.all_steps()})")
        candidates = [s for s in self.all_steps() if s <= chosen] if step in (None, "latest") else [chosen]
        found, (state, config) = self._newest_restorable(self._restore_on_this_host, candidates)
        return Restored(step=found, state=state, config=config)

    def _restore_on_this_host(self, step: int) -> Any:
        """A step's state onto this process's first device, whatever topology wrote it, in format 2."""
        metadata = self._state_metadata(step)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return convert_trees(restored.state, to_format=2) if _format(metadata) == 1 else restored.state, \
            restored.config

    def set_aside_unreadable(self) -> list[str]:
        """Move the steps that failed to restore out of the way (to checkpoints_unreadable/ beside
        checkpoints/), so that training can save those steps again; returns where they went."""
        if not self.unreadable or self.read_only:
            return []
        aside = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable")
        os.makedirs(aside, exist_ok=True)
        moved = []
        for step in self.unreadable:
            target = os.path.join(aside, f"{step}-{int(time.time())}")
            os.replace(os.path.join(self.directory, str(step)), target)
            moved.append(target)
        self.unreadable = []
        self.manager.reload()
        return moved

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A save that fails on the disk (full, a file-size limit, permissions) ends as one UserError; Orbax
        reports it from its writer thread as a ValueError naming the OS error."""
        try:
            yield
        except (OSError, ValueError, RuntimeError) as e:
            reason = _os_failure(e)
            if reason is None:
                raise
            if not os.environ.get("GPT2JAX_DEBUG"):  # the writes abandoned with it warn at exit: never awaited
                warnings.filterwarnings("ignore", message="coroutine '.*' was never awaited", category=RuntimeWarning)
            raise UserError(f"{self.directory}: a checkpoint could not be written ({reason}); "
                            f"the steps saved before it are intact: {self.all_steps()}") from None

    def wait(self) -> None:
        with self._writing():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def check_steps_are_directories(run_dir: str) -> None:
    """A run's checkpoint steps must be directories it owns: Orbax's retention cannot delete a step that is a
    link (and must not delete what it points at). Checked before training writes anything."""
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.isdigit() and (os.path.islink(path) or not os.path.isdir(path)):
            what = f"a link to {os.readlink(path)}" if os.path.islink(path) else "not a directory"
            raise UserError(f"{path} is {what}; checkpoint steps must be directories this run wrote (move it out "
                            "of checkpoints/, or use --fork / --overwrite)")


def _format(state_metadata: dict) -> int:
    """The parameter tree's format of a step, from the names in its state's metadata."""
    names = {getattr(key, "key", None) for path, _ in jax.tree_util.tree_flatten_with_path(state_metadata)[0]
             for key in path}
    return 1 if any(isinstance(name, str) and _V1_BLOCK.match(name) for name in names) else FORMAT


def convert_trees(tree: Any, to_format: int) -> Any:
    """`tree` with every parameter tree in it (a dict holding "transformer": the params, and Adam's moments,
    which mirror them) converted to `to_format` (1 or 2, see the module docstring). Leaves may be arrays or
    `jax.ShapeDtypeStruct`s (a restore target); kernels are transposed, other leaves kept."""

    def transpose(leaf: Any) -> Any:
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape[::-1], leaf.dtype, sharding=leaf.sharding)
        return leaf.T if hasattr(leaf, "ndim") and leaf.ndim == 2 else leaf

    def rename(path: tuple[str, ...]) -> tuple[str, ...]:
        if to_format == 2:
            return tuple(part for name in path for part in (
                ("h", _V1_BLOCK.match(name).group(1)) if _V1_BLOCK.match(name) else (name,)))
        out = list(path)
        for i in range(len(out) - 1):
            if out[i] == "h" and out[i + 1].isdigit():
                out[i:i + 2] = [f"h_{out[i + 1]}", None]
        return tuple(part for part in out if part is not None)

    def convert(params: Any) -> Any:
        if not _holds_params(params):
            return params
        flat = traverse_util.flatten_dict(dict(params))
        return traverse_util.unflatten_dict({rename(path): transpose(leaf) if path[-1] == "kernel" else leaf
                                             for path, leaf in flat.items()})

    return jax.tree.map(convert, tree, is_leaf=_holds_params)


def _holds_params(node: Any) -> bool:
    return isinstance(node, dict) and "transformer" in node and isinstance(node["transformer"], dict)


def _quiet_abandoned_writes() -> None:
    """When a write fails, Orbax logs it with a traceback from each writer thread (absl), its unfinished
    asyncio tasks are logged when collected, and each of the other pending writes reports 'Event loop is
    closed' as it completes. `_writing` reports the failure as one line, so these echoes are dropped, once
    for the process, with the notices Orbax logs for every read-only reader; GPT2JAX_DEBUG=1 keeps them."""
    global _quiet
    if _quiet or os.environ.get("GPT2JAX_DEBUG"):
        return
    _quiet = True
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_not_a_write_failure)
    logging.getLogger("absl").addFilter(lambda record: not re.search("read.only", record.getMessage()))
    previous = sys.unraisablehook

    def unraisable(event):
        if not (isinstance(event.exc_value, RuntimeError) and str(event.exc_value) == "Event loop is closed"):
            previous(event)

    sys.unraisablehook = unraisable


_quiet = False


def _not_a_write_failure(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return error is None or _os_failure(error) is None


def _os_failure(error: BaseException) -> str | None:
    """The OS error behind a failed write, as "No space left on device", or None when it was not one."""
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    found = re.search(r"os_error_code='?(\d+)", str(error))
    return os.strerror(int(found.group(1))) if found else None
