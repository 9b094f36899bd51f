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
    scores_NxBxV: Any = None  # with output_scores: the scores each step chose from (after processors and warpers)


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
    warped_BxV = warp(logits_BxV, rules, temperature, top_p)
    return jax.random.categorical(rng, warped_BxV, axis=-1).astype(jnp.int32)


def warp(logits_BxV: jax.Array, rules: SamplingRules, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """The logits a draw samples from: temperature, then top-k, then top-p (greedy: the logits as they are)."""
    if not rules.do_sample:
        return logits_BxV
    logits_BxV = apply_temperature(logits_BxV, temperature)
    if rules.top_k:
        logits_BxV = apply_top_k(logits_BxV, rules.top_k)
    if rules.use_top_p:
        logits_BxV = apply_top_p(logits_BxV, top_p)
    return logits_BxV


# ------------------------------------------------------------------------------------------------------------
# Logits processors: Hugging Face's, each a small pure function of (the tokens so far, the scores), applied in
# Hugging Face's order before the sampling rules (greedy and sampling: on the logits; beam search: on the
# log-probabilities). Static choices say which run; their values travel as arrays.


@dataclasses.dataclass(frozen=True)
class Processors:
    """Which processors run (each combination compiles once)."""

    repetition_penalty: bool = False
    no_repeat_ngram_size: int = 0  # 0: off; the n-gram length shapes the program
    bad_words_shape: tuple[int, int] = (0, 0)  # (words, longest word); (0, 0): off
    min_length: bool = False  # min_length or min_new_tokens
    forced_bos: bool = False
    forced_eos: bool = False
    suppress_tokens: bool = False

    @property
    def any(self) -> bool:
        return self != Processors()


@flax.struct.dataclass
class ProcessorValues:
    repetition_penalty: jax.Array  # float32 scalar
    bad_words_WxM: jax.Array  # int32: each banned sequence right-aligned, -1 before it
    min_length: jax.Array  # int32: EOS is banned while prompt + new tokens < this
    min_new_tokens: jax.Array  # int32: EOS is banned while new tokens < this
    forced_bos_token_id: jax.Array  # int32
    forced_eos_token_id: jax.Array  # int32
    suppressed_V: jax.Array  # bool: tokens never emitted
    eos_token_id: jax.Array  # int32; -1: none
    prompt_length: jax.Array  # int32: T, the prompt as given (its padding included), as Hugging Face counts it
    max_length: jax.Array  # int32: T + N


def process_scores(scores_BxV: jax.Array, tokens_BxL: jax.Array, real_BxL: jax.Array, end: jax.Array,
                   step: jax.Array, processors: Processors, values: ProcessorValues) -> jax.Array:
    """The scores of the next token after Hugging Face's logits processors, in its order: repetition penalty,
    no repeated n-grams, bad words, minimum length, minimum new tokens, forced BOS, forced EOS, suppressed
    tokens. `tokens_BxL[:, :end]` are the tokens so far, `real_BxL` marks those that are not padding (the
    penalties and n-grams read only those; Hugging Face's also read the prompt's padding); `step` new tokens
    are generated."""
    B, V = scores_BxV.shape
    length = values.prompt_length + step  # Hugging Face's cur_len
    seen_BxL = real_BxL.astype(bool) & (jnp.arange(tokens_BxL.shape[1]) < end)[None]
    rows_B1 = jnp.arange(B)[:, None]
    if processors.repetition_penalty:
        present_BxV = jnp.zeros((B, V), bool).at[rows_B1, tokens_BxL].max(seen_BxL)
        penalised = jnp.where(scores_BxV < 0, scores_BxV * values.repetition_penalty,
                              scores_BxV / values.repetition_penalty)
        scores_BxV = jnp.where(present_BxV, penalised, scores_BxV)
    if processors.no_repeat_ngram_size:
        scores_BxV = jnp.where(ngram_bans(tokens_BxL, seen_BxL, end, processors.no_repeat_ngram_size, V),
                               -jnp.inf, scores_BxV)
    if processors.bad_words_shape != (0, 0):
        scores_BxV = jnp.where(bad_word_bans(tokens_BxL, seen_BxL, end, values.bad_words_WxM, V), -jnp.inf,
                               scores_BxV)
    if processors.min_length:
        too_short = (length < values.min_length) | (step < values.min_new_tokens)
        eos_V = (jnp.arange(V) == values.eos_token_id)
        scores_BxV = jnp.where(too_short & eos_V[None], -jnp.inf, scores_BxV)
    if processors.forced_bos:
        only_bos = jnp.where(jnp.arange(V) == values.forced_bos_token_id, 0.0, -jnp.inf)
        scores_BxV = jnp.where(length == 1, only_bos[None], scores_BxV)
    if processors.forced_eos:
        only_eos = jnp.where(jnp.arange(V) == values.forced_eos_token_id, 0.0, -jnp.inf)
        scores_BxV = jnp.where(length == values.max_length - 1, only_eos[None], scores_BxV)
    if processors.suppress_tokens:
        scores_BxV = jnp.where(values.suppressed_V[None], -jnp.inf, scores_BxV)
    return scores_BxV


def ngram_bans(tokens_BxL: jax.Array, seen_BxL: jax.Array, end: jax.Array, n: int, V: int) -> jax.Array:
    """(B, V) bool: the tokens that would repeat an n-gram already in the sequence."""
    B, L = tokens_BxL.shape
    starts_J = jnp.arange(max(L - n + 1, 1))
    window_Jxn = jnp.minimum(starts_J[:, None] + jnp.arange(n), L - 1)
    grams_BxJxn, real_J = tokens_BxL[:, window_Jxn], jnp.all(seen_BxL[:, window_Jxn], axis=-1)
    # the n - 1 tokens that end the sequence so far (none when n is 1)
    last_BxN1 = lax.dynamic_slice_in_dim(tokens_BxL, end - (n - 1), n - 1, axis=1)
    last_real_B = jnp.all(lax.dynamic_slice_in_dim(seen_BxL, end - (n - 1), n - 1, axis=1), axis=1)
    matches_BxJ = jnp.all(grams_BxJxn[:, :, :n - 1] == last_BxN1[:, None, :], axis=-1) & real_J
    matches_BxJ = matches_BxJ & (starts_J + n - 1 < end)[None] & last_real_B[:, None] & (end >= n - 1)
    return jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], grams_BxJxn[:, :, n - 1]].max(matches_BxJ)


def bad_word_bans(tokens_BxL: jax.Array, seen_BxL: jax.Array, end: jax.Array, words_WxM: jax.Array,
                  V: int) -> jax.Array:
    """(B, V) bool: the last token of each banned sequence whose other tokens end the sequence so far."""
    B = tokens_BxL.shape[0]
    M = words_WxM.shape[1]
    prefix_WxM1, last_W = words_WxM[:, :-1], words_WxM[:, -1]
    if M > 1:
        start = end - (M - 1)
        index = jnp.maximum(start + jnp.arange(M - 1), 0)
        tail_BxM1 = jnp.where((start + jnp.arange(M - 1) >= 0)[None] & seen_BxL[:, index], tokens_BxL[:, index], -2)
        matches_BxW = jnp.all((prefix_WxM1[None] == -1) | (prefix_WxM1[None] == tail_BxM1[:, None]), axis=-1)
    else:
        matches_BxW = jnp.ones((B, words_WxM.shape[0]), bool)
    return jnp.zeros((B, V), bool).at[:, last_W].max(matches_BxW)


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
    processors: Processors = Processors(),
    processor_values: ProcessorValues | None = None,
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
        logits_BxV = state.logits_BxV
        if processors.any:
            logits_BxV = process_scores(logits_BxV, state.tokens_BxL, state.mask_BxL, prompt_slots + state.step,
                                        state.step, processors, processor_values)
        token_B = choose_tokens(logits_BxV, key, rules, values.temperature, values.top_p)
        scores_NxBxV = state.scores_NxBxV
        if scores_NxBxV is not None:  # output_scores: what this step chose from
            scores_NxBxV = scores_NxBxV.at[state.step].set(warp(logits_BxV, rules, values.temperature, values.top_p))
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
            scores_NxBxV=scores_NxBxV,
        )

    return lax.while_loop(running, one_token, state)


def fill_after_stop(state: SamplingState, pad_token_id: jax.Array) -> jax.Array:
    """The token buffer with pad in every slot not generated (after an early exit)."""
    L = state.tokens_BxL.shape[1]
    generated_L = jnp.arange(L) < L - state.max_new_tokens + state.step
    return jnp.where(generated_L[None], state.tokens_BxL, pad_token_id)


@functools.partial(jax.jit, static_argnames=("decoder", "max_new_tokens", "rules", "processors", "record_scores"))
def generate_tokens(
    decoder: Decoder,
    params: Any,
    prompt_BxP: jax.Array,
    prompt_mask_BxP: jax.Array,
    max_new_tokens: int,
    rules: SamplingRules,
    values: SamplingValues,
    rng: jax.Array,
    processors: Processors = Processors(),
    processor_values: ProcessorValues | None = None,
    record_scores: bool = False,
) -> Any:
    """Prompt + N new tokens (B, P + N) in one compiled call: prefill, then the decode loop. With
    `record_scores`: (those tokens, the (N, B, V) scores each step chose from, the steps run)."""
    state = prefill(decoder, params, prompt_BxP, prompt_mask_BxP, max_new_tokens, rng)
    if record_scores:
        state = state.replace(scores_NxBxV=jnp.zeros((max_new_tokens,) + state.logits_BxV.shape, jnp.float32))
    state = decode(decoder, params, state, max_new_tokens, rules, values, processors, processor_values)
    tokens_BxL = fill_after_stop(state, values.pad_token_id)
    return (tokens_BxL, state.scores_NxBxV, state.step) if record_scores else tokens_BxL


prefill_jit = jax.jit(prefill, static_argnames=("decoder", "max_new_tokens"))
decode_jit = jax.jit(decode, static_argnames=("decoder", "num_steps", "rules", "processors"),
                     donate_argnames=("state",))


def bucket_length(prompt_length: int, minimum: int = 16) -> int:
    """Prompt slots to compile for: the next power of two (at least `minimum`), so a series of
    growing prompts compiles once per bucket rather than once per length."""
    return max(minimum, 1 << (prompt_length - 1).bit_length())


def left_pad(prompt_BxT: jax.Array, mask_BxT: jax.Array, slots: int, pad_token_id: int) -> tuple[jax.Array, jax.Array]:
    B, T = prompt_BxT.shape
    extra = slots - T
    prompt = jnp.concatenate([jnp.full((B, extra), pad_token_id, jnp.int32), prompt_BxT], axis=1)
    return prompt, jnp.concatenate([jnp.zeros((B, extra), jnp.int32), mask_BxT], axis=1)


# ------------------------------------------------------------------------------------------------------------
# Beam search: Hugging Face's (transformers 5, `GenerationMixin._beam_search`), in one `lax.while_loop`.
# Legend: K beams, R returned sequences per prompt, 2K candidates per step.

BIG_NEGATIVE = -1.0e9  # Hugging Face's mark of a beam that cannot be chosen


@flax.struct.dataclass
class BeamValues:
    """Beam search's settings that travel as arrays (changing them does not recompile)."""

    length_penalty: jax.Array  # float32 scalar: finished scores are divided by (new tokens) ** length_penalty
    eos_token_id: jax.Array  # int32 scalar; -1: none
    pad_token_id: jax.Array  # int32 scalar


@flax.struct.dataclass
class BeamState:
    step: jax.Array  # tokens generated so far, int32 scalar
    running_BxKxL: jax.Array  # the K live beams of each prompt
    running_scores_BxK: jax.Array  # their summed log-probabilities
    finished_BxKxL: jax.Array  # the K best finished hypotheses (pad after their end)
    finished_scores_BxK: jax.Array  # their length-penalised scores (BIG_NEGATIVE: none yet)
    is_finished_BxK: jax.Array
    improvable_Bx1: jax.Array  # can a live beam still beat the worst finished one (HF's heuristic)
    all_hit_stop: jax.Array  # bool scalar: every candidate of the last step ended (EOS or the last slot)
    mask_BKxL: jax.Array
    next_position_BK: jax.Array
    logits_BKxV: jax.Array
    cache: Any
    scores_NxBKxV: Any = None  # with output_scores: each step's processed log-probabilities of the live beams


def beam_search(decoder: Decoder, params: Any, prompt_BxP: jax.Array, prompt_mask_BxP: jax.Array,
                max_new_tokens: int, num_beams: int, early_stopping: bool | str, values: BeamValues,
                processors: Processors = Processors(), processor_values: ProcessorValues | None = None,
                record_scores: bool = False) -> tuple:
    """The K best continuations of each prompt by beam search, as Hugging Face scores and stops it: each step
    keeps the 2K best (beam, token) candidates by summed log-probability; candidates that end (EOS, or the
    last slot) enter the finished set with score / (new tokens) ** length_penalty, the K best live ones go on;
    the search stops when no live beam can beat the worst finished one (`early_stopping` False: by its
    current length, "never": by the longest it could reach when length_penalty > 0, True: as soon as K are
    finished). The KV cache is reordered by beam inside the loop.

    Returns (tokens (B, K, P + N) sorted best first, their scores (B, K)), and with `record_scores` the
    (N, B K, V) processed log-probabilities of each step and the steps run."""
    B, P = prompt_BxP.shape
    K, N = num_beams, max_new_tokens
    L = P + N
    beams = lambda x: jnp.repeat(x, K, axis=0) if x.ndim > 0 else x  # (B, ...) -> (B K, ...): a copy per beam
    # each prompt runs through the model once; its state and cache are copied to its K beams (the cache's
    # leaves are batch-major or scalars, as the reordering by beam below also takes them)
    first = prefill(decoder, params, prompt_BxP, prompt_mask_BxP, N, jax.random.key(0))
    first = first.replace(tokens_BxL=beams(first.tokens_BxL), mask_BxL=beams(first.mask_BxL),
                          next_position_B=beams(first.next_position_B), logits_BxV=beams(first.logits_BxV),
                          done_B=beams(first.done_B), cache=jax.tree.map(beams, first.cache))
    running_BxKxL = first.tokens_BxL.reshape(B, K, L).at[:, :, P:].set(values.pad_token_id)
    state = BeamState(
        step=jnp.zeros((), jnp.int32),
        running_BxKxL=running_BxKxL,
        running_scores_BxK=jnp.zeros((B, K), jnp.float32).at[:, 1:].set(BIG_NEGATIVE),  # one beam to start
        finished_BxKxL=running_BxKxL,
        finished_scores_BxK=jnp.full((B, K), BIG_NEGATIVE, jnp.float32),
        is_finished_BxK=jnp.zeros((B, K), bool),
        improvable_Bx1=jnp.ones((B, 1), bool),
        all_hit_stop=jnp.zeros((), bool),
        mask_BKxL=first.mask_BxL,
        next_position_BK=first.next_position_B,
        logits_BKxV=first.logits_BxV,
        cache=first.cache,
        scores_NxBKxV=jnp.zeros((N,) + first.logits_BxV.shape, jnp.float32) if record_scores else None,
    )
    top_K = jnp.arange(2 * K) < K  # the candidates that may enter the finished set

    def running(state: BeamState) -> jax.Array:
        exists_open_beam = ~(jnp.all(state.is_finished_BxK) & (early_stopping is True))
        return (state.step < N) & jnp.any(state.improvable_Bx1) & exists_open_beam & ~state.all_hit_stop

    def one_token(state: BeamState) -> BeamState:
        V = state.logits_BKxV.shape[-1]
        slot = P + state.step
        log_probs_BKxV = jax.nn.log_softmax(state.logits_BKxV.astype(jnp.float32), axis=-1)
        if processors.any:
            log_probs_BKxV = process_scores(log_probs_BKxV, state.running_BxKxL.reshape(B * K, L), state.mask_BKxL,
                                            slot, state.step, processors, processor_values)
        log_probs_BxKxV = log_probs_BKxV.reshape(B, K, V)
        scores_NxBKxV = state.scores_NxBKxV
        if scores_NxBKxV is not None:
            scores_NxBKxV = scores_NxBKxV.at[state.step].set(log_probs_BKxV)
        summed_BxKV = (log_probs_BxKxV + state.running_scores_BxK[:, :, None]).reshape(B, K * V)
        # the 2K best candidates: enough that K stay live however many of them end here
        top_scores_Bx2K, top_index_Bx2K = lax.top_k(summed_BxKV, 2 * K)
        parent_Bx2K, token_Bx2K = top_index_Bx2K // V, (top_index_Bx2K % V).astype(jnp.int32)
        candidates_Bx2KxL = jnp.take_along_axis(state.running_BxKxL, parent_Bx2K[:, :, None], axis=1)
        candidates_Bx2KxL = lax.dynamic_update_slice(candidates_Bx2KxL, token_Bx2K[:, :, None], (0, 0, slot))
        ends_Bx2K = (token_Bx2K == values.eos_token_id) | (state.step + 1 >= N)

        # the K best candidates that go on
        live_scores_Bx2K = top_scores_Bx2K + ends_Bx2K * BIG_NEGATIVE
        next_live_scores_BxK, next_live_BxK = lax.top_k(live_scores_Bx2K, K)
        running_BxKxL = jnp.take_along_axis(candidates_Bx2KxL, next_live_BxK[:, :, None], axis=1)
        parent_BxK = jnp.take_along_axis(parent_Bx2K, next_live_BxK, axis=1)

        # the finished set: the K best of those finished so far and the top-K candidates that end now
        ended_Bx2K = ends_Bx2K & top_K[None]
        final_Bx2K = top_scores_Bx2K / ((state.step + 1).astype(jnp.float32) ** values.length_penalty)
        full_Bx1 = jnp.all(state.is_finished_BxK, axis=-1, keepdims=True) & (early_stopping is True)
        final_Bx2K = final_Bx2K + full_Bx1 * BIG_NEGATIVE + (~state.improvable_Bx1) * BIG_NEGATIVE
        final_Bx2K = final_Bx2K + (~ended_Bx2K) * BIG_NEGATIVE
        merged_scores_Bx3K = jnp.concatenate([state.finished_scores_BxK, final_Bx2K], axis=1)
        finished_scores_BxK, best_BxK = lax.top_k(merged_scores_Bx3K, K)
        pick = lambda merged: jnp.take_along_axis(merged, best_BxK.reshape(B, K, *([1] * (merged.ndim - 2))), axis=1)
        finished_BxKxL = pick(jnp.concatenate([state.finished_BxKxL, candidates_Bx2KxL], axis=1))
        is_finished_BxK = pick(jnp.concatenate([state.is_finished_BxK, ended_Bx2K], axis=1))

        # can a live beam still beat the worst finished one? (HF's heuristic, after this token)
        new_tokens = jnp.where((early_stopping == "never") & (values.length_penalty > 0), N, state.step + 1)
        best_live_Bx1 = next_live_scores_BxK[:, :1] / (new_tokens.astype(jnp.float32) ** values.length_penalty)
        worst_Bx1 = jnp.where(is_finished_BxK, jnp.min(finished_scores_BxK, axis=1, keepdims=True), BIG_NEGATIVE)
        improvable_Bx1 = state.improvable_Bx1 & jnp.any(best_live_Bx1 > worst_Bx1, axis=-1, keepdims=True)

        # the cache follows the beams it continues; then the model reads their new tokens
        rows_BK = (jnp.arange(B)[:, None] * K + parent_BxK).reshape(B * K)
        cache = jax.tree.map(lambda x: x[rows_BK] if x.ndim > 0 else x, state.cache)
        tokens_BK = lax.dynamic_slice_in_dim(running_BxKxL, slot, 1, axis=2).reshape(B * K, 1)
        logits_BKxV, cache = decoder.tokens_to_logits(params, tokens_BK, state.next_position_BK[:, None],
                                                      state.mask_BKxL, cache)
        return state.replace(step=state.step + 1, running_BxKxL=running_BxKxL,
                             running_scores_BxK=next_live_scores_BxK, finished_BxKxL=finished_BxKxL,
                             finished_scores_BxK=finished_scores_BxK, is_finished_BxK=is_finished_BxK,
                             improvable_Bx1=improvable_Bx1, all_hit_stop=jnp.all(ends_Bx2K),
                             next_position_BK=state.next_position_BK + 1, logits_BKxV=logits_BKxV, cache=cache,
                             scores_NxBKxV=scores_NxBKxV)

    state = lax.while_loop(running, one_token, state)
    if record_scores:
        return state.finished_BxKxL, state.finished_scores_BxK, state.scores_NxBKxV, state.step
    return state.finished_BxKxL, state.finished_scores_BxK


beam_search_jit = jax.jit(beam_search, static_argnames=("decoder", "max_new_tokens", "num_beams", "early_stopping",
                                                        "processors", "record_scores"))
