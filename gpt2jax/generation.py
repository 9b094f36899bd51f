"""Generation with GPT-2: the settings (`GenerationConfig`), the decoder that binds the Flax module to the
model-agnostic sampler in `gpt2jax.sampling`, and the decode layout of the parameters.

Legend: B batch, T prompt tokens, P prompt slots (T left-padded to a bucket), N new tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import sampling
from gpt2jax.config import GPT2Config, check_int_range, is_int
from gpt2jax.errors import UserError, check_ids
from gpt2jax.model import GPT2LMHeadModule, init_cache


@dataclasses.dataclass(unsafe_hash=True)
class GenerationConfig:
    """How to continue a prompt, with Hugging Face's names; checked when made.

    Greedy unless `do_sample`; sampling applies temperature, then top-k (0: off), then top-p, as Hugging
    Face does. A row that emits `eos_token_id` (None: the model's) gets `pad_token_id` (None: the config's,
    else EOS) after it; -1 turns EOS off. Both must be tokens of the model's vocabulary (checked per call).
    `max_length` (prompt + new tokens, the prompt's padding included, as Hugging Face counts it) is used
    when `max_new_tokens` is not given. `num_beams` > 1 searches beams (`length_penalty`, `early_stopping`
    True, False or "never", as Hugging Face); `num_return_sequences` continuations per prompt (the best beams,
    or independent samples).
    """

    max_new_tokens: int | None = None  # None: max_length - prompt, else 32
    max_length: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    seed: int = 0
    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence (CTRL's, as Hugging Face)
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size occurs twice
    bad_words_ids: tuple | None = None  # token sequences never generated (their last token is banned after the rest)
    min_length: int = 0  # EOS is banned while prompt (padding included) + new tokens < min_length
    min_new_tokens: int = 0  # EOS is banned while new tokens < min_new_tokens
    forced_bos_token_id: int | None = None  # the first token, when the prompt is one token long
    forced_eos_token_id: int | None = None  # the last token (at max_length - 1)
    suppress_tokens: tuple | None = None  # tokens never generated
    output_scores: bool = False  # each step's scores in the result's `.scores` (beam scores come either way)
    return_dict_in_generate: bool = False  # the result has `.sequences` (and `.sequences_scores`) either way

    def __setattr__(self, name: str, value: Any) -> None:
        """Settable as Hugging Face's (`model.generation_config.max_length = 5`): every change is checked, and a
        bad value raises `UserError` and leaves the settings as they were."""
        if not self.__dict__.get("_checked"):  # still in __init__
            object.__setattr__(self, name, value)
            return
        if name not in self.__dataclass_fields__:
            raise UserError(f"GenerationConfig has no field {name!r}; it has "
                            f"{', '.join(f.name for f in dataclasses.fields(self))}")
        previous = getattr(self, name)
        object.__setattr__(self, name, value)
        try:
            self.__post_init__()
        except UserError:
            object.__setattr__(self, name, previous)
            raise

    def __post_init__(self) -> None:
        self._check()
        object.__setattr__(self, "_checked", True)

    def _check(self) -> None:
        if self.max_new_tokens is not None and (not is_int(self.max_new_tokens) or self.max_new_tokens < 1):
            raise UserError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length < 2):
            raise UserError(f"max_length must be an integer >= 2 (prompt + new tokens), got {self.max_length!r}")
        for name in ("num_beams", "num_return_sequences"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise UserError(f"num_return_sequences={self.num_return_sequences} exceeds num_beams={self.num_beams}: "
                            "beam search returns at most its beams")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise UserError(f"num_return_sequences={self.num_return_sequences} needs do_sample=True or num_beams > 1 "
                            "(greedy decoding gives one continuation per prompt)")
        if self.num_beams > 1 and self.do_sample:
            raise UserError("num_beams > 1 with do_sample=True (beam sampling) is not supported; use one of them")
        if isinstance(self.early_stopping, np.bool_):  # beam search compares with `is True`
            object.__setattr__(self, "early_stopping", bool(self.early_stopping))
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise UserError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool) or \
                not np.isfinite(self.length_penalty):
            raise UserError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or isinstance(self.repetition_penalty, bool) or \
                not (0 < self.repetition_penalty < float("inf")):
            raise UserError(f"repetition_penalty must be a positive number, got {self.repetition_penalty!r}")
        for name in ("no_repeat_ngram_size", "min_length", "min_new_tokens"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise UserError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("forced_bos_token_id", "forced_eos_token_id"):
            if getattr(self, name) is not None and not is_int(getattr(self, name)):
                raise UserError(f"{name} must be an integer token id or None, got {getattr(self, name)!r}")
        object.__setattr__(self, "suppress_tokens", _token_list("suppress_tokens", self.suppress_tokens))
        words = None if self.bad_words_ids is None else _token_lists("bad_words_ids", self.bad_words_ids)
        object.__setattr__(self, "bad_words_ids", words)
        if self.do_sample and not self.temperature > 0:
            raise UserError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise UserError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("eos_token_id", "pad_token_id"):
            if getattr(self, name) is not None and not is_int(getattr(self, name)):
                raise UserError(f"{name} must be an integer token id or None, got {getattr(self, name)!r}")
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise UserError(f"do_sample must be True or False, got {self.do_sample!r}")
        if not is_int(self.seed):
            raise UserError(f"seed must be an integer, got {self.seed!r}")
        check_int_range("seed", self.seed)

    @classmethod
    def from_kwargs(cls, base: GenerationConfig | None = None, **kwargs: Any) -> GenerationConfig:
        """`base` (default: the defaults) with the fields named in `kwargs` replaced, as HF's generate does."""
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            fields = ", ".join(f.name for f in dataclasses.fields(cls))
            raise UserError(f"generate() got unknown arguments {', '.join(unknown)}; it takes {fields}")
        return dataclasses.replace(base or cls(), **kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields that differ from the defaults, with Hugging Face's names (`generation_config.json`)."""
        default = GenerationConfig()  # (token lists are tuples here: JSON writes them as lists)
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "seed" and getattr(self, f.name) != getattr(default, f.name)}

    @classmethod
    def from_hf_dict(cls, fields: dict[str, Any], where: str) -> GenerationConfig:
        """The fields of a `generation_config.json` that this decoder has (Hugging Face's others, such as
        `transformers_version`, `bos_token_id` or `use_cache`, change nothing here); a list of EOS ids keeps
        its first (gpt2jax stops on one EOS token)."""
        known = {f.name for f in dataclasses.fields(cls)} - {"seed"}
        taken = {name: value for name, value in fields.items() if name in known}
        for name in ("eos_token_id", "pad_token_id"):
            if isinstance(taken.get(name), list):
                taken[name] = taken[name][0] if taken[name] else None
        try:
            return cls(**taken)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None

    def new_tokens(self, prompt_length: int) -> int:
        """N: max_new_tokens, else max_length - the prompt's length (its padding included), else 32."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is None:
            return 32
        if self.max_length <= prompt_length:
            raise UserError(f"max_length={self.max_length} leaves no new token after the {prompt_length}-token prompt; "
                            "use max_new_tokens")
        return self.max_length - prompt_length

    def sampling_rules(self, vocab_size: int) -> sampling.SamplingRules:
        top_k = min(self.top_k, vocab_size) if self.do_sample else 0
        return sampling.SamplingRules(do_sample=self.do_sample, top_k=top_k, use_top_p=self.do_sample and self.top_p < 1)

    def processors(self, config: GPT2Config, prompt_length: int, new_tokens: int) -> tuple[sampling.Processors,
                                                                                            sampling.ProcessorValues]:
        """The logits processors these settings turn on, and their values, checked against the vocabulary."""
        V = config.vocab_size
        eos, _ = self.token_ids(config)
        for name in ("forced_bos_token_id", "forced_eos_token_id"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < V:
                raise UserError(f"{name}={getattr(self, name)} is not a token of this model (vocab_size={V})")
        named = [("suppress_tokens", t) for t in self.suppress_tokens or ()]
        named += [("bad_words_ids", t) for word in self.bad_words_ids or () for t in word]
        for name, token in named:
            if not 0 <= token < V:
                raise UserError(f"{name} holds {token}, not a token of this model (vocab_size={V})")
        words = [w for w in self.bad_words_ids or () if list(w) != [eos]]  # as Hugging Face: EOS stays allowed
        M = max((len(w) for w in words), default=0)
        words_WxM = np.full((max(len(words), 1), max(M, 1)), -1, np.int32)
        for i, word in enumerate(words):
            words_WxM[i, M - len(word):] = word
        suppressed_V = np.zeros(V, bool)
        suppressed_V[list(self.suppress_tokens or ())] = True
        processors = sampling.Processors(
            repetition_penalty=self.repetition_penalty != 1.0, no_repeat_ngram_size=self.no_repeat_ngram_size,
            bad_words_shape=(len(words), M) if words else (0, 0),
            min_length=eos >= 0 and (self.min_length > 0 or self.min_new_tokens > 0),
            forced_bos=self.forced_bos_token_id is not None, forced_eos=self.forced_eos_token_id is not None,
            suppress_tokens=bool(self.suppress_tokens))
        int32 = lambda x: jnp.int32(-1 if x is None else x)
        values = sampling.ProcessorValues(
            repetition_penalty=jnp.float32(self.repetition_penalty), bad_words_WxM=jnp.asarray(words_WxM),
            min_length=int32(self.min_length), min_new_tokens=int32(self.min_new_tokens),
            forced_bos_token_id=int32(self.forced_bos_token_id), forced_eos_token_id=int32(self.forced_eos_token_id),
            suppressed_V=jnp.asarray(suppressed_V), eos_token_id=int32(eos), prompt_length=int32(prompt_length),
            max_length=int32(prompt_length + new_tokens))
        return processors, values

    def sampling_values(self, config: GPT2Config) -> sampling.SamplingValues:
        """The traced settings, EOS and padding resolved against the model's config (`token_ids`)."""
        eos, pad = self.token_ids(config)
        return sampling.SamplingValues(temperature=jnp.float32(self.temperature), top_p=jnp.float32(self.top_p),
                                       eos_token_id=jnp.int32(eos), pad_token_id=jnp.int32(pad))

    def token_ids(self, config: GPT2Config) -> tuple[int, int]:
        """(EOS, padding) resolved against the model's config and checked against its vocabulary (an id
        outside it would be read as another token, or give token 0 forever); EOS -1: none."""
        eos = config.eos_token_id if self.eos_token_id is None else self.eos_token_id
        pad = self.pad_token_id if self.pad_token_id is not None else config.pad_token_id
        pad = pad if pad is not None else (eos if eos >= 0 else 0)  # HF pads with EOS; with EOS off any id does
        V = config.vocab_size
        if not (eos == -1 or 0 <= eos < V):
            raise UserError(f"eos_token_id={eos} is not a token of this model (vocab_size={V}); -1 turns EOS off")
        if not 0 <= pad < V:
            raise UserError(f"pad_token_id={pad} is not a token of this model (vocab_size={V})")
        return eos, pad


def _token_list(name: str, tokens: Any) -> tuple[int, ...] | None:
    if tokens is None:
        return None
    tokens = tuple(np.asarray(tokens).reshape(-1).tolist()) if not isinstance(tokens, (list, tuple)) else tuple(tokens)
    if not all(is_int(t) for t in tokens):
        raise UserError(f"{name} must be a list of integer token ids, got {tokens!r}")
    return tokens


def _token_lists(name: str, words: Any) -> tuple[tuple[int, ...], ...]:
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, (list, tuple)) and len(w) for w in words):
        raise UserError(f"{name} must be a list of non-empty lists of token ids, got {words!r}")
    return tuple(_token_list(name, w) for w in words)


def to_decode_layout(params: Any, compute_dtype: Any) -> Any:
    """The parameters as the decode loop reads them: in the compute dtype, so that no weight is converted
    inside the loop, once per token. Params already in it are returned as they are (no copy); the
    kernels' (out, in) layout is already the one XLA's CPU matrix-vector products run fastest in."""
    if all(jnp.result_type(leaf) == compute_dtype for leaf in jax.tree.leaves(params)):
        return params
    return jax.jit(lambda p: jax.tree.map(lambda leaf: leaf.astype(compute_dtype), p))(params)


@dataclasses.dataclass(frozen=True)
class GPT2Decoder:
    """Binds the GPT-2 module to the sampler (`sampling.Decoder`); its params are in the decode layout."""

    module: GPT2LMHeadModule

    def init_cache(self, batch_size: int, length: int) -> Any:
        return init_cache(self.module.config, batch_size, length)

    def tokens_to_logits(self, params, tokens_BxT, positions_BxT, mask_BxS, cache):
        def last_logits(module: GPT2LMHeadModule) -> tuple[jax.Array, Any]:
            h_BxTxD, new_cache = module.transformer(
                tokens_BxT, mask_BxS, positions_BxT, train=False, cache=cache
            )
            return module.transformer.logits(h_BxTxD[:, -1:])[:, 0], new_cache

        return self.module.apply({"params": params}, method=last_logits)


@dataclasses.dataclass(frozen=True)
class Decoding:
    """What the sampler needs from a model: its decoder and its params in the decode layout."""

    config: GPT2Config
    decoder: GPT2Decoder
    params: Any

    @classmethod
    def of(cls, config: GPT2Config, params: Any) -> Decoding:
        return cls(config, GPT2Decoder(GPT2LMHeadModule(config)), to_decode_layout(params, config.compute_dtype))


@dataclasses.dataclass(frozen=True)
class Prompts:
    """Prompts left-padded to a bucket of P slots (so a series of prompts compiles once per bucket)."""

    tokens_BxP: jax.Array
    mask_BxP: jax.Array
    length: int  # T, the longest prompt before bucket padding
    new_tokens: int  # N, from max_new_tokens or max_length


def prepare_prompts(input_ids: Any, attention_mask: Any, config: GPT2Config, gen: GenerationConfig,
                    pad_token_id: int) -> Prompts:
    """Check and left-pad prompts: (B, T) ids (or (T,)), with 0 in attention_mask for left padding. Prompts
    traced by `jax.jit` have shapes but no values: only those are checked."""
    traced = any(isinstance(a, jax.core.Tracer) for a in (input_ids, attention_mask))
    ids_BxT = jnp.asarray(input_ids) if traced else np.asarray(input_ids)
    if ids_BxT.ndim == 1:
        ids_BxT = ids_BxT[None]
    if ids_BxT.ndim != 2 or ids_BxT.shape[1] == 0:
        raise UserError(f"the prompt is empty or not (batch, time): input_ids shape {ids_BxT.shape}")
    check_ids("input_ids", ids_BxT, config.vocab_size, "vocab_size")
    xp = jnp if traced else np
    mask_BxT = xp.ones_like(ids_BxT) if attention_mask is None else xp.asarray(attention_mask).reshape(ids_BxT.shape)
    if not traced:
        empty_rows = np.flatnonzero(mask_BxT.sum(axis=1) == 0)
        if empty_rows.size:
            raise UserError(f"prompt row {int(empty_rows[0])} is empty (its attention_mask is all 0)")
    T = ids_BxT.shape[1]
    N = gen.new_tokens(T)
    if T + N > config.n_positions:
        raise UserError(f"prompt ({T} tokens) + max_new_tokens ({N}) exceeds n_positions={config.n_positions}")
    tokens_BxP, mask_BxP = sampling.left_pad(jnp.asarray(ids_BxT, jnp.int32), jnp.asarray(mask_BxT != 0, jnp.int32),
                                             sampling.bucket_length(T), pad_token_id)
    return Prompts(tokens_BxP, mask_BxP, T, N)


@flax.struct.dataclass
class TracedGenerateOutput:
    """What `generate` returns when traced by `jax.jit` (a pytree, as Hugging Face Flax's output was):
    `.sequences` and `.sequences_scores` (None but after beam search)."""

    sequences: jax.Array
    sequences_scores: jax.Array | None = None
    scores: jax.Array | None = None  # with output_scores: (N, rows, V), every step's (zeros after the last run)


class GenerateOutput(np.ndarray):
    """What `generate` returns: the int32 ids (B R, T + N) as an array (the prompts, then the new tokens;
    R = num_return_sequences, each prompt's rows together), with Hugging Face's output fields:
    `.sequences` (the same ids, a plain array) and, after beam search, `.sequences_scores` (B R,), each
    sequence's length-penalised summed log-probability (None otherwise); with `output_scores=True`, `.scores`:
    one (rows, V) float32 array per step run, the scores that step chose from (after the processors and, when
    sampling, the warpers; beam search: the live beams' processed log-probabilities, B num_beams rows)."""

    def __new__(cls, sequences: np.ndarray, sequences_scores: np.ndarray | None = None,
                scores: tuple | None = None) -> GenerateOutput:
        output = np.asarray(sequences).view(cls)
        output.sequences_scores, output.scores = sequences_scores, scores
        return output

    def __array_finalize__(self, obj: Any) -> None:
        self.sequences_scores = getattr(obj, "sequences_scores", None)
        self.scores = getattr(obj, "scores", None)

    @property
    def sequences(self) -> np.ndarray:
        return self.view(np.ndarray)

    def __getitem__(self, key: Any) -> Any:  # HF's outputs are read by name too: output["sequences"]
        if isinstance(key, str):
            if key not in ("sequences", "sequences_scores", "scores") or getattr(self, key) is None:
                raise KeyError(key)
            return getattr(self, key)
        return super().__getitem__(key)


def generate(decoding: Decoding, input_ids: Any, attention_mask: Any, gen: GenerationConfig,
             rng: jax.Array | None = None) -> GenerateOutput:
    """int32 (B R, T + N): the prompts followed by N new tokens (R = num_return_sequences rows per prompt), in
    one compiled call: greedy, sampled (`rng`, default the key of `gen.seed`), or by beam search. Traced by
    `jax.jit`, the same computation, returned as a `TracedGenerateOutput`."""
    traced = any(isinstance(a, jax.core.Tracer) for a in (input_ids, attention_mask))
    output = TracedGenerateOutput if traced else GenerateOutput
    host = (lambda x: x) if traced else np.asarray
    values = gen.sampling_values(decoding.config)
    prompts = prepare_prompts(input_ids, attention_mask, decoding.config, gen, gen.token_ids(decoding.config)[1])
    R, N, cut = gen.num_return_sequences, prompts.new_tokens, prompts.tokens_BxP.shape[1] - prompts.length
    processors = gen.processors(decoding.config, prompts.length, N)
    record = bool(gen.output_scores)

    def steps(recorded: tuple) -> Any:  # HF's `scores`: one (rows, V) array per step run
        if not record:
            return None
        scores_NxRxV, ran = recorded
        return scores_NxRxV if traced else tuple(np.asarray(scores_NxRxV[:int(ran)]))

    if gen.num_beams > 1:
        beam_values = sampling.BeamValues(length_penalty=jnp.float32(gen.length_penalty),
                                          eos_token_id=values.eos_token_id, pad_token_id=values.pad_token_id)
        tokens_BxKxL, scores_BxK, *recorded = sampling.beam_search_jit(
            decoding.decoder, decoding.params, prompts.tokens_BxP, prompts.mask_BxP, N, gen.num_beams,
            gen.early_stopping, beam_values, *processors, record)
        tokens = host(tokens_BxKxL[:, :R]).reshape(-1, tokens_BxKxL.shape[-1])
        return output(tokens[:, cut:], host(scores_BxK[:, :R]).reshape(-1), steps(tuple(recorded)))
    repeat = lambda x: jnp.repeat(x, R, axis=0)  # each prompt R times, its rows together (Hugging Face's order)
    result = sampling.generate_tokens(
        decoding.decoder, decoding.params, repeat(prompts.tokens_BxP), repeat(prompts.mask_BxP), N,
        gen.sampling_rules(decoding.config.vocab_size), values, jax.random.key(gen.seed) if rng is None else rng,
        *processors, record,
    )
    tokens_BxL, *recorded = result if record else (result,)
    return output(host(tokens_BxL)[:, cut:], None, steps(tuple(recorded)))


def generate_stream(decoding: Decoding, input_ids: Any, attention_mask: Any, gen: GenerationConfig,
                    chunk_size: int) -> Iterator[np.ndarray]:
    """`generate`, yielding the new tokens (B, k) every `chunk_size` compiled steps; with the same seed the
    chunks concatenate to `generate`'s new tokens. Every setting is checked when called, before the first
    chunk is asked for (a caller can print nothing until the settings are known good)."""
    if not is_int(chunk_size) or chunk_size < 1:
        raise UserError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if gen.num_beams > 1 or gen.num_return_sequences > 1:
        raise UserError("streaming gives one sampled or greedy continuation per prompt; use generate for "
                        "num_beams > 1 or num_return_sequences > 1 (on the command line: drop --stream)")
    values = gen.sampling_values(decoding.config)
    prompts = prepare_prompts(input_ids, attention_mask, decoding.config, gen, gen.token_ids(decoding.config)[1])
    rules = gen.sampling_rules(decoding.config.vocab_size)
    processors = gen.processors(decoding.config, prompts.length, prompts.new_tokens)

    def chunks() -> Iterator[np.ndarray]:
        state = sampling.prefill_jit(decoding.decoder, decoding.params, prompts.tokens_BxP, prompts.mask_BxP,
                                     prompts.new_tokens, jax.random.key(gen.seed))
        prompt_slots, emitted = prompts.tokens_BxP.shape[1], 0
        while emitted < prompts.new_tokens and not bool(np.all(state.done_B)):
            state = sampling.decode_jit(decoding.decoder, decoding.params, state, chunk_size, rules, values,
                                        *processors)
            step = int(state.step)
            yield np.asarray(state.tokens_BxL[:, prompt_slots + emitted: prompt_slots + step])
            emitted = step

    return chunks()
