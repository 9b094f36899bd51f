"""How a training run lays its state and batches over devices (`train.parallelism`).

- "pmap" (the default, the design's step): every device holds the whole train state, float32 parameters,
  AdamW's two moments and the gradients (16 bytes per parameter), and `jax.pmap` runs `train.train_step` on
  each device's slice of the batch, summing its share of the gradients with `lax.psum`.
- "fsdp": the same `train.train_step` jitted over a `Mesh(("data", "fsdp"))`, `train.fsdp_size` devices
  sharing one copy of the state (default: all of them). Each parameter, its gradient and its Adam moments
  are split over "fsdp" along their largest dimension that divides (replicated where none does), the
  batch over both axes; XLA inserts the all-gathers and reduce-scatters (ZeRO-3 / FSDP, as levanter and
  MaxText do). The global batch is taken as one row group per device, each keyed and cut into micro-batches
  as the pmap device holding those rows would, so both modes compute the same losses and a run resumes in
  either mode. Fused attention kernels run per device under the mesh (`attention.per_device_under_mesh`).

The devices are laid out process by process (`jax.devices()` order), so each process feeds the contiguous
rows of the global batch it reads (`batches.Placement`), as under pmap.

Legend (the package's, gpt2jax/__init__.py): C local devices, B per-device batch, G global batch, T time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2jax.errors import UserError
from gpt2jax.experiment import PARALLELISMS
from gpt2jax.model import GPT2LMHeadModule
from gpt2jax.train import (TrainState, eval_step, global_replicated_sharding, pmapped_steps, replicate, shard_batch,
                           to_global, train_step, unreplicate_to_host)

BATCH_AXES = ("data", "fsdp")  # the mesh's axes; the batch is split over both


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> PartitionSpec:
    """The leaf's split over "fsdp": its largest dimension that `fsdp_size` divides (the first of equals),
    nothing (replicated) where none does or the leaf is a scalar."""
    candidates = [(-size, axis) for axis, size in enumerate(shape) if size % fsdp_size == 0 and size >= fsdp_size]
    if fsdp_size == 1 or not candidates:
        return PartitionSpec()
    axis = min(candidates)[1]
    return PartitionSpec(*(["fsdp" if i == axis else None for i in range(len(shape))]))


def bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) laid out by `shardings`."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class Layout:
    """One placement of the train state and batches: the compiled steps and every conversion the loop needs."""

    parallelism: str  # "pmap" or "fsdp"
    mesh: Mesh | None  # fsdp's ("data", "fsdp") mesh; None under pmap
    train_step: Callable  # compiled: (device state, device batch) -> (device state, metrics); the state donated
    eval_step: Callable  # compiled: (device params, device batch) -> (summed loss, counted targets)

    @property
    def fsdp_size(self) -> int:
        return 1 if self.mesh is None else self.mesh.shape["fsdp"]

    def context(self) -> contextlib.AbstractContextManager:
        """Where the steps are traced and run: under fsdp the mesh is the context mesh, which attention reads
        to run fused kernels per device (`attention.per_device_under_mesh`)."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def train(self, state: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        with self.context():
            return self.train_step(state, batch)

    def evaluate(self, params: Any, batch: dict[str, jax.Array]) -> tuple[float, int]:
        """(summed loss, counted targets) of one global batch."""
        with self.context():
            loss_sum, count = self.eval_step(params, batch)
        return first_copy(loss_sum), int(first_copy(count))

    @property
    def rows(self) -> NamedSharding:
        """fsdp's global batch: its rows split over both mesh axes."""
        return NamedSharding(self.mesh, PartitionSpec(BATCH_AXES))

    # --- the state

    def state_shardings(self, abstract_state: Any) -> Any:
        """The sharding of every leaf of the state as Orbax saves and restores it: one global copy under
        pmap (replicated), the sharded layout under fsdp (a run saved in one mode restores into the other)."""
        if self.mesh is None:
            replicated = global_replicated_sharding()
            return jax.tree.map(lambda _: replicated, abstract_state)
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def sharding(path, leaf):
            top = getattr(path[0], "name", None)  # TrainState's field
            if top in ("params", "opt_state"):
                return NamedSharding(self.mesh, fsdp_spec(leaf.shape, self.fsdp_size))
            return replicated

        return jax.tree_util.tree_map_with_path(sharding, abstract_state)

    def restore_target(self, abstract_state: Any) -> Any:
        shardings = self.state_shardings(abstract_state)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
                            shardings)

    def initial_state(self, make_state: Callable[..., TrainState], *args: Any) -> Any:
        """`make_state(*args)` placed for the step; under fsdp computed sharded (a state larger than one
        device is never whole on one)."""
        if self.mesh is None:
            return replicate(make_state(*args))
        shardings = self.state_shardings(jax.eval_shape(make_state, *args))
        with self.context():
            return jax.jit(make_state, out_shardings=shardings)(*args)

    def place(self, state: Any) -> Any:
        """A restored state (laid out by `state_shardings`) -> the step's placement."""
        return replicate(state) if self.mesh is None else state

    def for_checkpoint(self, device_state: Any) -> Any:
        """The step's state -> global arrays Orbax saves (pmap's per-device copies become one)."""
        return to_global(device_state) if self.mesh is None else device_state

    def host_params(self, device_params: Any) -> Any:
        """The parameters as numpy arrays on this host (a collective under fsdp with several processes:
        every process calls it)."""
        if self.mesh is None:
            return unreplicate_to_host(device_params)
        if all(x.is_fully_addressable for x in jax.tree.leaves(device_params)):
            return jax.device_get(device_params)
        whole = NamedSharding(self.mesh, PartitionSpec())
        gathered = jax.jit(lambda tree: tree, out_shardings=whole)(device_params)
        return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), gathered)

    # --- the batches

    def batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows (C, B, T) of a global batch -> device arrays: pmap's per-device slices, or
        fsdp's global (G, T) array split over the mesh."""
        if self.mesh is None:
            return shard_batch(host_batch)

        def put(x):
            rows = x.reshape(-1, x.shape[-1])
            return jax.make_array_from_process_local_data(
                self.rows, rows, (rows.shape[0] * jax.process_count(), rows.shape[1]))

        return {name: put(x) for name, x in host_batch.items()}

    def lower(self, abstract_state: Any, global_batch: int, seq_len: int, **lowering: Any) -> Any:
        """The train step lowered for abstract inputs, nothing allocated (`lowering`: e.g.
        `lowering_platforms=("tpu",)`): what `bench --what memory` compiles for XLA's memory analysis, and
        what tests lower for other platforms."""
        devices = jax.device_count()
        tokens = lambda shape, sharding=None: jax.ShapeDtypeStruct(shape, np.int32, sharding=sharding)
        if self.mesh is None:
            state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((devices,) + x.shape, x.dtype), abstract_state)
            batch = {name: tokens((devices, global_batch // devices, seq_len)) for name in ("inputs", "targets")}
            if not lowering:  # pmap's own lowering keeps its donation (the memory analysis counts it)
                return self.train_step.lower(state, batch)
            return jax.jit(self.train_step).trace(state, batch).lower(**lowering)
        batch = {name: tokens((global_batch, seq_len), self.rows) for name in ("inputs", "targets")}
        with self.context():
            return self.train_step.trace(self.restore_target(abstract_state), batch).lower(**lowering)

    # --- what the loop reads

    def describe(self, abstract_state: Any, num_parameters: int) -> str:
        """One line for the start of a run: how the state is laid out and what one device holds of it
        (parameters, Adam's moments, and the gradients, which take the parameters' layout)."""
        per_device = sum(self.state_memory(abstract_state).values())
        devices = jax.device_count()
        how = (f"replicated on {devices} device{'s' * (devices > 1)} (pmap)" if self.mesh is None else
               f"fsdp over {self.fsdp_size} device{'s' * (self.fsdp_size > 1)}"
               + (f" x {self.mesh.shape['data']} data-parallel copies" if self.mesh.shape["data"] > 1 else ""))
        return f"state: {_count(num_parameters)} params, {how}, {gigabytes(per_device)} per device"

    def state_memory(self, abstract_state: Any) -> dict[str, int]:
        """Bytes one device holds of the parameters, of the optimizer state and of the gradients (laid out
        as the parameters are), from abstract shapes (under pmap, replicated: the whole of each)."""
        shardings = self.state_shardings(abstract_state)
        params = bytes_per_device(abstract_state.params, shardings.params)
        return {"params": params, "optimizer": bytes_per_device(abstract_state.opt_state, shardings.opt_state),
                "gradients": params}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def first_copy(value: Any) -> float:
    """A scalar the steps return: pmap's hold one copy per device, fsdp's one."""
    return float(np.ravel(value)[0])


def state_shards(parallelism: str, fsdp_size: int | None) -> int:
    """Devices that share one copy of the train state: fsdp_size (None: every device) under fsdp, 1 under
    pmap."""
    if parallelism != "fsdp":
        return 1
    return jax.device_count() if fsdp_size is None else fsdp_size


def make_mesh(fsdp_size: int | None) -> Mesh:
    """The ("data", "fsdp") mesh over every device, process by process; `fsdp_size` None: all devices."""
    devices = jax.devices()
    fsdp = state_shards("fsdp", fsdp_size)
    if fsdp < 1 or len(devices) % fsdp:
        raise UserError(f"train.fsdp_size={fsdp_size} does not divide the {len(devices)} devices")
    grid = np.array(devices).reshape(len(devices) // fsdp, fsdp)
    return Mesh(grid, BATCH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def make_layout(parallelism: str, fsdp_size: int | None, module: GPT2LMHeadModule,
                optimizer: optax.GradientTransformation, schedule: optax.Schedule, grad_accum_steps: int,
                dropout: bool, abstract_state: Any) -> Layout:
    """The layout `train.parallelism` names, with its compiled train and eval steps (the state donated)."""
    if parallelism not in PARALLELISMS:
        raise UserError(f"train.parallelism={parallelism!r} is not one of {', '.join(map(repr, PARALLELISMS))}")
    if parallelism == "pmap":
        return Layout("pmap", None, *pmapped_steps(module, optimizer, schedule, grad_accum_steps, dropout))
    step = functools.partial(train_step, module=module, optimizer=optimizer, schedule=schedule,
                             grad_accum_steps=grad_accum_steps, dropout=dropout)
    mesh = make_mesh(fsdp_size)
    layout = Layout("fsdp", mesh, None, None)
    state_shardings = layout.state_shardings(abstract_state)
    constrain = lambda grads: jax.lax.with_sharding_constraint(grads, state_shardings.params)
    replicated = NamedSharding(mesh, PartitionSpec())
    groups = dict(axis_name=None, row_groups=mesh.size, group_axes=BATCH_AXES)
    train = jax.jit(functools.partial(step, **groups, constrain=constrain),
                    in_shardings=(state_shardings, layout.rows), out_shardings=(state_shardings, replicated),
                    donate_argnums=(0,))
    evaluate = jax.jit(functools.partial(eval_step, module=module, **groups),
                       in_shardings=(state_shardings.params, layout.rows), out_shardings=replicated)
    return dataclasses.replace(layout, train_step=train, eval_step=evaluate)
