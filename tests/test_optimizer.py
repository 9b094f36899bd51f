"""The optimizer against slow references: the learning-rate schedule, AdamW with its decay mask and
global-norm clipping (a float64 numpy AdamW), and the optimizer state through a checkpoint."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2jax.checkpoint import Checkpoints
from gpt2jax.experiment import base_config
from gpt2jax.train import (
    TrainState, global_replicated_sharding, init_state, learning_rate_schedule, make_optimizer, replicate, to_global,
)


def optim_config(**values):
    optim = base_config().optim
    for key, value in values.items():
        setattr(optim, key, value)
    return optim


def reference_rate(step, lr, min_lr, warmup_steps, decay_steps):
    """nanoGPT's get_lr(it) at it = step + 1: linear warmup from 0, cosine down to min_lr, then min_lr."""
    it = step + 1
    if it <= warmup_steps:
        return lr * it / warmup_steps
    if it >= decay_steps:
        return min_lr
    progress = (it - warmup_steps) / (decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


@pytest.mark.parametrize(
    "warmup_steps, decay_steps, max_steps",
    [(10, 110, 500), (4, None, 40), (0, 30, 50), (5, 5, 20), (10, None, 6)],
    ids=["warmup-cosine-floor", "decay-defaults-to-max-steps", "no-warmup", "decay-equals-warmup", "short-run"],
)
def test_schedule_equals_nanogpt_reference_at_every_step(warmup_steps, decay_steps, max_steps):
    optim = optim_config(lr=1e-3, min_lr=1e-4, warmup_steps=warmup_steps, decay_steps=decay_steps)
    schedule = learning_rate_schedule(optim, max_steps=max_steps)
    end = decay_steps or max_steps
    steps = np.arange(max_steps + 20)
    ours = np.asarray(jax.vmap(schedule)(jnp.asarray(steps)))
    expected = [reference_rate(s, 1e-3, 1e-4, warmup_steps, end) for s in steps]
    np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=0)
    assert ours.min() >= 1e-4 * (1 - 1e-6)  # never below the floor
    np.testing.assert_allclose(ours[max(end, warmup_steps + 1) - 1:], 1e-4, rtol=1e-6)  # min_lr from decay_steps - 1
    if warmup_steps:
        np.testing.assert_allclose(ours[warmup_steps - 1], 1e-3, rtol=1e-6)  # the peak on step warmup_steps - 1


def test_schedule_is_cosine_not_linear():
    """A quarter and three quarters of the way down the decay: cosine gives min_lr + 0.854 and 0.146 of the
    span (a linear decay would give 0.75 and 0.25)."""
    optim = optim_config(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110)
    schedule = learning_rate_schedule(optim, max_steps=500)
    span = 1e-3 - 1e-4
    np.testing.assert_allclose(schedule(34), 1e-4 + span * (1 + math.cos(math.pi / 4)) / 2, rtol=1e-5)
    np.testing.assert_allclose(schedule(84), 1e-4 + span * (1 + math.cos(3 * math.pi / 4)) / 2, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# AdamW: the optimizer's updates against a float64 numpy AdamW, step by step.


def small_params():
    rng = np.random.default_rng(1)
    return {
        "dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                  "bias": rng.normal(size=(4,)).astype(np.float32)},
        "ln": {"scale": (1 + rng.normal(size=(4,))).astype(np.float32)},
        "wte": {"embedding": rng.normal(size=(5, 3)).astype(np.float32)},
    }


GRAD_SCALES = [30.0, 0.05, 2.0, 0.1, 5.0, 0.3, 0.01]  # global norms far above and below the clip


def gradient_sequence(params):
    rng = np.random.default_rng(2)
    out = []
    for scale in GRAD_SCALES:
        grads = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
        norm = math.sqrt(sum(float(np.sum(g * g)) for g in jax.tree.leaves(grads)))
        out.append(jax.tree.map(lambda g: (g * scale / norm).astype(np.float32), grads))
    return out


def reference_adamw(params, grads_seq, optim, schedule_values):
    """AdamW as nanoGPT (torch.optim.AdamW) runs it, in float64: global-norm clip, bias-corrected moments,
    decoupled weight decay on leaves with ndim >= 2 only, lr from the schedule at the 0-based step."""
    params = jax.tree.map(lambda p: p.astype(np.float64), params)
    mu = jax.tree.map(np.zeros_like, params)
    nu = jax.tree.map(np.zeros_like, params)
    history = []
    for t, grads in enumerate(grads_seq, start=1):
        grads = jax.tree.map(lambda g: g.astype(np.float64), grads)
        if optim.grad_clip > 0:
            norm = math.sqrt(sum(float(np.sum(g * g)) for g in jax.tree.leaves(grads)))
            if norm >= optim.grad_clip:
                grads = jax.tree.map(lambda g: g * optim.grad_clip / norm, grads)
        mu = jax.tree.map(lambda m, g: optim.beta1 * m + (1 - optim.beta1) * g, mu, grads)
        nu = jax.tree.map(lambda v, g: optim.beta2 * v + (1 - optim.beta2) * g * g, nu, grads)
        lr = schedule_values[t - 1]

        def step(p, m, v):
            update = (m / (1 - optim.beta1**t)) / (np.sqrt(v / (1 - optim.beta2**t)) + optim.eps)
            if p.ndim >= 2:
                update = update + optim.weight_decay * p
            return p - lr * update

        params = jax.tree.map(step, params, mu, nu)
        history.append(params)
    return history


STRESS = dict(lr=0.5, min_lr=0.05, warmup_steps=2, decay_steps=6, beta1=0.8, beta2=0.6, eps=0.3, weight_decay=0.2)


@pytest.mark.parametrize("grad_clip", [0.4, 0.0], ids=["clip", "no-clip"])
def test_adamw_steps_equal_numpy_reference(grad_clip):
    """Distinct beta1/beta2/eps/weight_decay, a large eps (so the gradient scale, hence the clip, shows) and a
    large lr (so clipping after Adam instead of before would show)."""
    optim = optim_config(**STRESS, grad_clip=grad_clip)
    max_steps = len(GRAD_SCALES)
    optimizer, schedule = make_optimizer(optim, max_steps=max_steps)
    rates = [float(reference_rate(s, optim.lr, optim.min_lr, optim.warmup_steps, optim.decay_steps))
             for s in range(max_steps)]
    params = small_params()
    grads_seq = gradient_sequence(params)
    expected = reference_adamw(params, grads_seq, optim, rates)
    ours = jax.tree.map(jnp.asarray, params)
    opt_state = optimizer.init(ours)
    update = jax.jit(optimizer.update)
    for t, grads in enumerate(grads_seq):
        updates, opt_state = update(jax.tree.map(jnp.asarray, grads), opt_state, ours)
        ours = optax.apply_updates(ours, updates)
        for path, got in jax.tree_util.tree_leaves_with_path(ours):
            want = expected[t]
            for key in path:
                want = want[key.key]
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6,
                                       err_msg=f"step {t} {jax.tree_util.keystr(path)}")


def test_clip_is_by_global_norm_before_adam():
    """With beta1 = beta2 = 0, a huge eps and no decay, one update is -lr * clipped_g / eps: the clip scales
    every leaf by the same factor, max_norm / global_norm, and only when the global norm exceeds max_norm."""
    optim = optim_config(lr=1.0, min_lr=1.0, warmup_steps=0, decay_steps=10, beta1=0.0, beta2=0.0, eps=1e6,
                         weight_decay=0.0, grad_clip=1.0)
    optimizer, _ = make_optimizer(optim, max_steps=10)
    params = {"a": jnp.zeros((2, 2)), "b": jnp.zeros((3,))}
    update = jax.jit(optimizer.update)
    for scale in (0.5, 4.0):
        grads = {"a": jnp.array([[3.0, 0.0], [0.0, 0.0]]) * scale / 5, "b": jnp.array([4.0, 0.0, 0.0]) * scale / 5}
        updates, _ = update(grads, optimizer.init(params), params)
        clipped = jax.tree.map(lambda g: g * min(1.0, 1.0 / scale), grads)
        for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(clipped)):
            np.testing.assert_allclose(np.asarray(u) * 1e6, -np.asarray(g), rtol=1e-4, atol=1e-9)


# --------------------------------------------------------------------------------------------
# The optimizer state through a checkpoint, the way the trainer saves and restores it.


def test_checkpoint_restores_optimizer_state_not_a_fresh_one(tmp_path):
    optim = optim_config(lr=1e-2, min_lr=1e-3, warmup_steps=2, decay_steps=10)
    optimizer, _ = make_optimizer(optim, max_steps=10)
    state = init_state(jax.tree.map(jnp.asarray, small_params()), optimizer, seed=7)

    @jax.jit
    def train_step(state, grads):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                             opt_state=opt_state)

    checkpoints = Checkpoints(str(tmp_path), keep=3, keep_best=0, async_save=False)
    saved = {}
    for step, grads in enumerate(gradient_sequence(small_params())[:3], start=1):
        state = train_step(state, grads)
        checkpoints.save(step, to_global(replicate(state)), data={"step": step, "seed": 0}, config={}, meta={})
        saved[step] = jax.tree.map(np.asarray, state)
    checkpoints.wait()

    fresh = init_state(jax.tree.map(jnp.zeros_like, small_params()), optimizer, seed=0)  # what a restart builds
    sharding = global_replicated_sharding()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), fresh)
    reopened = Checkpoints(str(tmp_path))
    found = reopened.restore_latest_good(target)
    step, restored, data = found.step, found.state, found.data
    reopened.close()
    checkpoints.close()
    assert step == 3 and data == {"step": 3, "seed": 0}
    assert isinstance(restored, TrainState)
    assert jax.tree.structure(restored) == jax.tree.structure(saved[3])
    adam = [s for s in jax.tree.leaves(restored.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1 and int(adam[0].count) == 3
    assert max(float(np.abs(np.asarray(m)).max()) for m in jax.tree.leaves(adam[0].mu)) > 0  # not a fresh state
    assert max(float(np.abs(np.asarray(v)).max()) for v in jax.tree.leaves(adam[0].nu)) > 0
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(saved[3])):
        got = np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(got, want, err_msg=jax.tree_util.keystr(path))
