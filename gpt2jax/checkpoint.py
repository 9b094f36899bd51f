"""Orbax checkpoints of a run: train state, data position, resolved config, metadata.

One `CheckpointManager` per run directory (`runs/NAME/checkpoints/`), saving with the
`ocp.args` API: `state` (params, opt state, step, rng; unreplicated), `data` (the step the
sampler continues from and its seed), `config` (the resolved experiment config) and `meta`.
Saves are asynchronous; Orbax writes each step into a temporary directory and renames it
when complete, so an unfinished save is never listed as a step.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from gpt2jax.errors import UserError


class Checkpoints:
    """Save and restore the checkpoints of one run directory."""

    def __init__(self, run_dir: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(run_dir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data: dict, config: dict, meta: dict | None = None) -> None:
        """Start saving `state` (single copy, not per-device) at `step`; returns before the write ends."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data),
                config=ocp.args.JsonSave(config),
                meta=ocp.args.JsonSave(meta or {}),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state, data position, config) of `step`, the state shaped like `abstract_state`."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.data, restored.config

    def best_step(self) -> int | None:
        """The saved step with the lowest validation loss (train loss when there was no eval)."""
        scored = []
        for step in self.all_steps():
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
            loss = meta.get("val_loss") if meta.get("val_loss") is not None else meta.get("loss")
            if loss is not None:
                scored.append((loss, step))
        return min(scored)[1] if scored else self.latest_step()

    def resolve_step(self, step: int | str | None) -> int:
        """"latest" (or None), "best", or a step number -> an existing step."""
        if step in (None, "latest"):
            chosen = self.latest_step()
        elif step == "best":
            chosen = self.best_step()
        else:
            try:
                chosen = int(step)
            except ValueError:
                raise UserError(f"step must be 'latest', 'best' or a number, got {step!r}") from None
        if chosen is None:
            raise UserError(f"{self.directory}: no checkpoint yet")
        return chosen

    def restore_params(self, step: int | str | None = None) -> tuple[Any, dict, int]:
        """(params, config, step) without knowing the optimizer: for sampling and export."""
        step = self.resolve_step(step)
        if step not in self.all_steps():
            raise UserError(f"{self.directory}: no checkpoint at step {step} (have {self.all_steps()})")
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), config=ocp.args.JsonRestore())
        )
        return restored.state["params"], restored.config, step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
