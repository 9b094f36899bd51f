"""Training: TrainState, the optimizer, the pure train and eval steps, and their pmap placement.

Data parallel with `jax.pmap(axis_name="batch")`: params replicated on every local device,
each device takes its slice of the batch, gradients are summed with `lax.psum` (each device's are
its share of the global mean). Gradient
accumulation scans over micro-batches inside the step, so the global batch does not depend on
device memory. Multi-host runs start with `jax.distributed.initialize`; each process reads its
own slice of every batch and process 0 alone writes logs. The same steps, jitted over a mesh with
the state split over the devices, are the "fsdp" placement (gpt2jax/parallel.py).

Legend (the package's, gpt2jax/__init__.py; per device, inside pmap): B batch, T time, A accumulation steps,
U micro-batch; R row groups (one per device; 1 inside pmap), so U = B / (R A).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gpt2jax.model import IGNORE_INDEX, GPT2LMHeadModule, target_loss_sum_and_count


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; step s uses fold_in(rng, s)


def learning_rate_schedule(optim: ml_collections.ConfigDict, max_steps: int) -> optax.Schedule:
    """Linear warmup to optim.lr, then cosine decay to optim.min_lr at decay_steps (default max_steps).

    Step s (0-based) uses the rate of the (s + 1)-th step, as nanoGPT does: lr / warmup_steps on the first
    step rather than 0, the peak on step warmup_steps - 1, min_lr from step decay_steps - 1 on.
    """
    decay_steps = optim.decay_steps or max_steps
    curve = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
        decay_steps=max(decay_steps, optim.warmup_steps + 1), end_value=optim.min_lr,
    )
    return lambda step: curve(step + 1)


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices and embeddings (ndim >= 2), not on biases or LayerNorm (nanoGPT's rule)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: ml_collections.ConfigDict, max_steps: int) -> tuple[optax.GradientTransformation, Any]:
    schedule = learning_rate_schedule(optim, max_steps)
    clip = optax.clip_by_global_norm(optim.grad_clip) if optim.grad_clip > 0 else optax.identity()
    adamw = optax.adamw(schedule, b1=optim.beta1, b2=optim.beta2, eps=optim.eps, weight_decay=optim.weight_decay,
                        mask=decay_mask)
    return optax.chain(clip, adamw), schedule


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.PRNGKey(seed))


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    module: GPT2LMHeadModule,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int,
    dropout: bool,
    axis_name: str | None = "batch",
    row_groups: int = 1,
    group_axes: tuple[str, ...] | None = None,
    constrain: Callable[[Any], Any] = lambda tree: tree,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the (B, T) rows of `batch`, in `grad_accum_steps` micro-batches.

    `batch`: "inputs" and "targets" (targets of -100 do not count: prompts and padding, gpt2jax.examples), and
    for packed examples their "positions" and "segments". The loss is the mean over the counted targets of the
    whole global batch: every micro-batch's summed loss divided by the global count, summed over micro-batches
    and devices, so neither accumulation nor the device count changes it (nor, with unevenly counted rows,
    weights some tokens more than others).

    Under pmap (`axis_name="batch"`) the rows are one device's slice: its dropout keys are folded with the
    device's index and the gradients summed over devices. Jitted over a mesh (`axis_name=None`, the "fsdp"
    placement, gpt2jax.parallel) the rows are the global batch, taken as `row_groups` equal slices, one per
    device (mapped over the mesh's `group_axes`), each keyed and cut into micro-batches as the pmap device
    holding it would, so both placements compute the same step; `constrain` pins the gradients to the
    parameters' sharding there.
    """
    B, T = batch["inputs"].shape
    R, A = row_groups, grad_accum_steps
    everywhere = (lambda x: lax.psum(x, axis_name)) if axis_name else (lambda x: x)
    counted = everywhere(jnp.sum(batch["targets"] != IGNORE_INDEX))
    denominator = jnp.maximum(counted, 1).astype(jnp.float32)
    first_group = lax.axis_index(axis_name) if axis_name else 0
    step_key = jax.random.fold_in(state.rng, state.step)
    keys_R = jax.vmap(lambda r: jax.random.fold_in(step_key, first_group + r))(jnp.arange(R))
    # micro-batch a holds the a-th U = B / (R A) rows of every group, as each device's own scan would
    to_AxRxUxT = lambda x: x.reshape(R, A, B // (R * A), T).swapaxes(0, 1)

    def loss_fn(params, rows_RxUxT, micro_keys_R):
        def group_sum(rows_UxT, key):
            return rows_loss_sum_and_count(module, params, rows_UxT, train=dropout, dropout_key=key)[0]

        if R == 1:
            loss_sum = group_sum(jax.tree.map(lambda x: x[0], rows_RxUxT), micro_keys_R[0])
        else:  # one group per device, as under pmap (fused attention kernels run per device inside: gpt2jax.attention)
            loss_sum = jnp.sum(jax.vmap(group_sum, spmd_axis_name=group_axes)(rows_RxUxT, micro_keys_R))
        return loss_sum / denominator  # this micro-batch's share of the global batch's mean

    def micro_step(rows_RxUxT, index):
        micro_keys_R = jax.vmap(jax.random.fold_in, (0, None))(keys_R, index)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, rows_RxUxT, micro_keys_R)
        return loss, constrain(grads)

    def accumulate(carry, xs):
        loss_sum, grad_sum = carry
        loss, grads = micro_step(*xs)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    rows_AxRxUxT = jax.tree.map(to_AxRxUxT, batch)
    if A == 1:  # no scan: it would cost extra passes over a gradient-sized carry
        loss, grads = micro_step(jax.tree.map(lambda x: x[0], rows_AxRxUxT), 0)
    else:
        zeros = constrain(jax.tree.map(jnp.zeros_like, state.params))
        (loss, grads), _ = lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), (rows_AxRxUxT, jnp.arange(A)))
    # on one device the all-reduce would only copy every gradient (~0.2 s at 124M)
    if axis_name is not None and lax.axis_size(axis_name) > 1:
        loss, grads = lax.psum((loss, grads), axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    # param_norm: non-finite parameters must never reach a checkpoint, and the loss shows them a step late
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params),
                       "lr": schedule(state.step), "counted_fraction": counted / everywhere(jnp.float32(B * T))}


def rows_loss_sum_and_count(module: GPT2LMHeadModule, params: Any, rows: dict[str, jax.Array], *, train: bool = False,
                            dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The summed loss of a batch's counted targets and their number: the forward of "inputs", with packed
    examples' "positions" and "segments" when the batch has them."""
    logits, _ = module.apply({"params": params}, rows["inputs"], None, rows.get("positions"), train=train,
                             segment_ids_BxT=rows.get("segments"),
                             rngs={} if dropout_key is None else {"dropout": dropout_key})
    return target_loss_sum_and_count(logits, rows["targets"])


def eval_step(params: Any, batch: dict[str, jax.Array], *, module: GPT2LMHeadModule,
              axis_name: str | None = "batch", row_groups: int = 1,
              group_axes: tuple[str, ...] | None = None) -> tuple[jax.Array, jax.Array]:
    """(summed loss, counted targets) of the whole batch, so that a validation set's loss is its total over its
    count: pmap's per-device rows summed over devices, or a mesh's global batch taken as `row_groups` slices,
    one per device (as `train_step` takes it)."""
    group = functools.partial(rows_loss_sum_and_count, module, params)
    if axis_name is not None:
        return lax.psum(group(batch), axis_name)
    sums, counts = jax.vmap(group, spmd_axis_name=group_axes)(
        jax.tree.map(lambda x: x.reshape(row_groups, -1, x.shape[-1]), batch))
    return jnp.sum(sums), jnp.sum(counts)


def pmapped_steps(
    module: GPT2LMHeadModule, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
    grad_accum_steps: int, dropout: bool,
) -> tuple[Callable, Callable]:
    """(train_step, eval_step) pmapped over local devices; the train state is donated."""
    train = functools.partial(train_step, module=module, optimizer=optimizer, schedule=schedule,
                              grad_accum_steps=grad_accum_steps, dropout=dropout)
    return (jax.pmap(train, axis_name="batch", donate_argnums=(0,)),
            jax.pmap(functools.partial(eval_step, module=module), axis_name="batch"))


# --------------------------------------------------------------------------------------------
# Placement: pmap wants a leading axis of local devices; Orbax wants one global copy.


def _local_sharding() -> NamedSharding:
    return NamedSharding(Mesh(np.array(jax.local_devices()), ("batch",)), PartitionSpec("batch"))


def replicate(tree: Any) -> Any:
    """A copy of every leaf on every local device, stacked on a leading device axis for pmap."""
    sharding, devices = _local_sharding(), jax.local_devices()

    def put(x):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:  # a global replicated array
            by_device = {shard.device: shard.data for shard in x.addressable_shards}
            pieces = [jnp.expand_dims(by_device[d], 0) for d in devices]
        else:
            host = np.asarray(x)[None]
            pieces = [jax.device_put(host, d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices),) + np.shape(x), sharding, pieces)

    return jax.tree.map(put, tree)


def to_global(replicated: Any) -> Any:
    """pmap-replicated leaves -> one globally replicated array each (what Orbax saves, across hosts)."""
    sharding = global_replicated_sharding()

    def convert(x):
        by_device = {shard.device: shard.data[0] for shard in x.addressable_shards}
        pieces = [by_device[d] for d in sharding.addressable_devices_indices_map(x.shape[1:])]
        return jax.make_array_from_single_device_arrays(x.shape[1:], sharding, pieces)

    return jax.tree.map(convert, replicated)


def global_replicated_sharding() -> NamedSharding:
    return NamedSharding(Mesh(np.array(jax.devices()), ("all",)), PartitionSpec())


def shard_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host batch (local devices, per-device batch, T) -> device arrays, one slice per local device."""
    return jax.device_put(batch, _local_sharding())


def unreplicate_to_host(replicated: Any) -> Any:
    """The first device's copy of every leaf, as numpy."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data[0]), replicated)
