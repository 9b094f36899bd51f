"""Jitted generation: prefill a KV cache with the prompt, then decode in `lax.while_loop`.

Model-agnostic: a `Decoder` supplies `init_cache(batch, length)` and
`tokens_to_logits(params, tokens_BxT, positions_BxT, mask_BxS, cache)`, which returns the
logits of the LAST of the T tokens (B, V) and the updated cache (which knows how far it is filled). The loop state is
a `SamplingState` dataclass; each sampling rule is a small pure function.

Legend: B batch, P prompt slots (a bucket, left-padded), N new tokens, L = P + N, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
from jax import lax


class Decoder(Protocol):
    def init_cache(self, batch_size: int, length: int) -> Any: ...

    def tokens_to_logits(
        self, params: Any, tokens_BxT: jax.Array, positions_BxT: jax.Array, mask_BxS: jax.Array, cache: Any
    ) -> tuple[jax.Array, Any]: ...


@dataclasses.dataclass(frozen=True)
class SamplingRules:
    """Static choices (each combination compiles once); the values travel as arrays."""

    do_sample: bool = False
    top_k: int = 0  # 0: off
    use_top_p: bool = False


@flax.struct.dataclass
class SamplingValues:
    """The sampling settings that travel as arrays (changing them does not recompile)."""

    temperature: jax.Array  # float32 scalar
    top_p: jax.Array  # float32 scalar
    eos_token_id: jax.Array  # int32 scalar; -1: none
    pad_token_id: jax.Array  # int32 scalar


@flax.struct.dataclass
class SamplingState:
    step: jax.Array  # tokens generated so far, int32 scalar
    tokens_BxL: jax.Array  # prompt slots, then generated tokens (pad after a row's EOS)
    mask_BxL: jax.Array  # 1 for prompt tokens and every generated slot
    next_position_B: jax.Array  # position id of the next token of each row
    logits_BxV: jax.Array  # float32 logits for the next token
    cache: Any
    done_B: jax.Array  # row has emitted EOS
    rng: jax.Array
    max_new_tokens: int = flax.struct.field(pytree_node=False)  # N, static


def apply_temperature(logits_BxV: jax.Array, temperature: jax.Array) -> jax.Array:
    return logits_BxV / temperature


def apply_top_k(logits_BxV: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits (ties with the k-th kept too)."""
    kth_Bx1 = lax.top_k(logits_BxV, k)[0][:, -1:]
    return jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)


def apply_top_p(logits_BxV: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass strictly more likely than each token
    kept_B = jnp.maximum(jnp.sum(before_BxV < top_p, axis=-1), 1)
    threshold_Bx1 = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
    return jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)


def choose_tokens(
    logits_BxV: jax.Array, rng: jax.Array, rules: SamplingRules, temperature: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Greedy, or temperature -> top-k -> top-p -> categorical draw (Hugging Face's order)."""
    if not rules.do_sample:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = apply_temperature(logits_BxV, temperature)
    if rules.top_k:
        logits_BxV = apply_top_k(logits_BxV, rules.top_k)
    if rules.use_top_p:
        logits_BxV = apply_top_p(logits_BxV, top_p)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def prefill(
    decoder: Decoder, params: Any, prompt_BxP: jax.Array, prompt_mask_BxP: jax.Array, max_new_tokens: int, rng: jax.Array
) -> SamplingState:
    """Run the whole (left-padded) prompt through the model once, filling the cache."""
    B, P = prompt_BxP.shape
    L = P + max_new_tokens
    positions_BxP = jnp.maximum(jnp.cumsum(prompt_mask_BxP, axis=-1) - 1, 0).astype(jnp.int32)
    mask_BxL = jnp.concatenate([prompt_mask_BxP, jnp.ones((B, max_new_tokens), jnp.int32)], axis=1)
    logits_BxV, cache = decoder.tokens_to_logits(
        params, prompt_BxP, positions_BxP, mask_BxL, decoder.init_cache(B, L)
    )
    return SamplingState(
        step=jnp.zeros((), jnp.int32),
        tokens_BxL=jnp.concatenate([prompt_BxP, jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1),
        mask_BxL=mask_BxL,
        next_position_B=positions_BxP[:, -1] + 1,
        logits_BxV=logits_BxV,
        cache=cache,
        done_B=jnp.zeros((B,), bool),
        rng=rng,
        max_new_tokens=max_new_tokens,
    )


def decode(
    decoder: Decoder,
    params: Any,
    state: SamplingState,
    num_steps: int,
    rules: SamplingRules,
    values: SamplingValues,
) -> SamplingState:
    """Generate up to `num_steps` more tokens; stops early once every row is done or the buffer is full.

    The key of step s is fold_in(rng, s), so chunked (streamed) and one-shot decoding agree.
    """
    B, L = state.tokens_BxL.shape
    prompt_slots = L - state.max_new_tokens
    stop = jnp.minimum(state.step + num_steps, state.max_new_tokens)

    def running(state: SamplingState) -> jax.Array:
        return (state.step < stop) & ~jnp.all(state.done_B)

    def one_token(state: SamplingState) -> SamplingState:
        key = jax.random.fold_in(state.rng, state.step)
        token_B = choose_tokens(state.logits_BxV, key, rules, values.temperature, values.top_p)
        token_B = jnp.where(state.done_B, values.pad_token_id, token_B)
        slot = prompt_slots + state.step
        tokens_BxL = lax.dynamic_update_slice(state.tokens_BxL, token_B[:, None], (0, slot))
        logits_BxV, cache = decoder.tokens_to_logits(
            params, token_B[:, None], state.next_position_B[:, None], state.mask_BxL, state.cache
        )
        return state.replace(
            step=state.step + 1,
            tokens_BxL=tokens_BxL,
            next_position_B=state.next_position_B + 1,
            logits_BxV=logits_BxV,
            cache=cache,
            done_B=state.done_B | (token_B == values.eos_token_id),
        )

    return lax.while_loop(running, one_token, state)


def fill_after_stop(state: SamplingState, pad_token_id: jax.Array) -> jax.Array:
    """The token buffer with pad in every slot not generated (after an early exit)."""
    L = state.tokens_BxL.shape[1]
    generated_L = jnp.arange(L) < L - state.max_new_tokens + state.step
    return jnp.where(generated_L[None], state.tokens_BxL, pad_token_id)


@functools.partial(jax.jit, static_argnames=("decoder", "max_new_tokens", "rules"))
def generate_tokens(
    decoder: Decoder,
    params: Any,
    prompt_BxP: jax.Array,
    prompt_mask_BxP: jax.Array,
    max_new_tokens: int,
    rules: SamplingRules,
    values: SamplingValues,
    rng: jax.Array,
) -> jax.Array:
    """Prompt + N new tokens (B, P + N) in one compiled call: prefill, then the decode loop."""
    state = prefill(decoder, params, prompt_BxP, prompt_mask_BxP, max_new_tokens, rng)
    state = decode(decoder, params, state, max_new_tokens, rules, values)
    return fill_after_stop(state, values.pad_token_id)


prefill_jit = jax.jit(prefill, static_argnames=("decoder", "max_new_tokens"))
decode_jit = jax.jit(decode, static_argnames=("decoder", "num_steps", "rules"), donate_argnames=("state",))


def bucket_length(prompt_length: int, minimum: int = 16) -> int:
    """Prompt slots to compile for: the next power of two (at least `minimum`), so a series of
    growing prompts compiles once per bucket rather than once per length."""
    return max(minimum, 1 << (prompt_length - 1).bit_length())


def left_pad(prompt_BxT: jax.Array, mask_BxT: jax.Array, slots: int, pad_token_id: int) -> tuple[jax.Array, jax.Array]:
    B, T = prompt_BxT.shape
    extra = slots - T
    prompt = jnp.concatenate([jnp.full((B, extra), pad_token_id, jnp.int32), prompt_BxT], axis=1)
    return prompt, jnp.concatenate([jnp.zeros((B, extra), jnp.int32), mask_BxT], axis=1)
