"""Generation with GPT-2: the settings (`GenerationConfig`), the decoder that binds the Flax module to the
model-agnostic sampler in `gpt2jax.sampling`, and the decode layout of the parameters.

Legend: B batch, T prompt tokens, P prompt slots (T left-padded to a bucket), N new tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import sampling
from gpt2jax.config import GPT2Config, check_int_range, is_int
from gpt2jax.errors import UserError, check_ids
from gpt2jax.model import GPT2LMHeadModule, init_cache


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to continue a prompt, with Hugging Face's names; checked when made.

    Greedy unless `do_sample`; sampling applies temperature, then top-k (0: off), then top-p, as Hugging
    Face does. A row that emits `eos_token_id` (None: the model's) gets `pad_token_id` (None: the config's,
    else EOS) after it; -1 turns EOS off. Both must be tokens of the model's vocabulary (checked per call).
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
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

    def sampling_rules(self, vocab_size: int) -> sampling.SamplingRules:
        top_k = min(self.top_k, vocab_size) if self.do_sample else 0
        return sampling.SamplingRules(do_sample=self.do_sample, top_k=top_k, use_top_p=self.do_sample and self.top_p < 1)

    def sampling_values(self, config: GPT2Config) -> sampling.SamplingValues:
        """The traced settings, EOS and padding resolved against the model's config and checked against its
        vocabulary (an id outside it would be read as another token, or give token 0 forever)."""
        eos = config.eos_token_id if self.eos_token_id is None else self.eos_token_id
        pad = self.pad_token_id if self.pad_token_id is not None else config.pad_token_id
        pad = pad if pad is not None else (eos if eos >= 0 else 0)  # HF pads with EOS; with EOS off any id does
        V = config.vocab_size
        if not (eos == -1 or 0 <= eos < V):
            raise UserError(f"eos_token_id={eos} is not a token of this model (vocab_size={V}); -1 turns EOS off")
        if not 0 <= pad < V:
            raise UserError(f"pad_token_id={pad} is not a token of this model (vocab_size={V})")
        return sampling.SamplingValues(temperature=jnp.float32(self.temperature), top_p=jnp.float32(self.top_p),
                                       eos_token_id=jnp.int32(eos), pad_token_id=jnp.int32(pad))


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


def prepare_prompts(input_ids: Any, attention_mask: Any, config: GPT2Config, gen: GenerationConfig,
                    pad_token_id: int) -> Prompts:
    """Check and left-pad prompts: (B, T) ids (or (T,)), with 0 in attention_mask for left padding."""
    ids_BxT = np.asarray(input_ids)
    if ids_BxT.ndim == 1:
        ids_BxT = ids_BxT[None]
    if ids_BxT.ndim != 2 or ids_BxT.shape[1] == 0:
        raise UserError(f"the prompt is empty or not (batch, time): input_ids shape {ids_BxT.shape}")
    check_ids("input_ids", ids_BxT, config.vocab_size, "vocab_size")
    mask_BxT = np.ones_like(ids_BxT) if attention_mask is None else np.asarray(attention_mask).reshape(ids_BxT.shape)
    empty_rows = np.flatnonzero(mask_BxT.sum(axis=1) == 0)
    if empty_rows.size:
        raise UserError(f"prompt row {int(empty_rows[0])} is empty (its attention_mask is all 0)")
    T = ids_BxT.shape[1]
    if T + gen.max_new_tokens > config.n_positions:
        raise UserError(f"prompt ({T} tokens) + max_new_tokens ({gen.max_new_tokens}) exceeds "
                        f"n_positions={config.n_positions}")
    tokens_BxP, mask_BxP = sampling.left_pad(jnp.asarray(ids_BxT, jnp.int32), jnp.asarray(mask_BxT != 0, jnp.int32),
                                             sampling.bucket_length(T), pad_token_id)
    return Prompts(tokens_BxP, mask_BxP, T)


def generate(decoding: Decoding, input_ids: Any, attention_mask: Any, gen: GenerationConfig) -> np.ndarray:
    """int32 (B, T + N): the prompts followed by N = max_new_tokens new tokens, in one compiled call."""
    values = gen.sampling_values(decoding.config)
    prompts = prepare_prompts(input_ids, attention_mask, decoding.config, gen, int(values.pad_token_id))
    tokens_BxL = sampling.generate_tokens(
        decoding.decoder, decoding.params, prompts.tokens_BxP, prompts.mask_BxP, gen.max_new_tokens,
        gen.sampling_rules(decoding.config.vocab_size), values, jax.random.key(gen.seed),
    )
    return np.asarray(tokens_BxL)[:, prompts.tokens_BxP.shape[1] - prompts.length:]


def generate_stream(decoding: Decoding, input_ids: Any, attention_mask: Any, gen: GenerationConfig,
                    chunk_size: int) -> Iterator[np.ndarray]:
    """`generate`, yielding the new tokens (B, k) every `chunk_size` compiled steps; with the same seed the
    chunks concatenate to `generate`'s new tokens."""
    if not is_int(chunk_size) or chunk_size < 1:
        raise UserError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    values = gen.sampling_values(decoding.config)
    prompts = prepare_prompts(input_ids, attention_mask, decoding.config, gen, int(values.pad_token_id))
    rules = gen.sampling_rules(decoding.config.vocab_size)
    state = sampling.prefill_jit(decoding.decoder, decoding.params, prompts.tokens_BxP, prompts.mask_BxP,
                                 gen.max_new_tokens, jax.random.key(gen.seed))
    prompt_slots, emitted = prompts.tokens_BxP.shape[1], 0
    while emitted < gen.max_new_tokens and not bool(np.all(state.done_B)):
        state = sampling.decode_jit(decoding.decoder, decoding.params, state, chunk_size, rules, values)
        step = int(state.step)
        yield np.asarray(state.tokens_BxL[:, prompt_slots + emitted: prompt_slots + step])
        emitted = step
