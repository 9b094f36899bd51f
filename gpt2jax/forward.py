"""The Hugging Face forward of `GPT2LMHeadModel` and `GPT2Model`: inputs checked and completed on the host,
one jitted call per shape, and HF's output records.

A cache (`model.Cache`) is a pytree, so calls with one compile once per shape. Two ways of decoding with
it, as in Hugging Face:
- Flax style: `model.init_cache(batch, max_length)`, an attention mask spanning all max_length slots, and
  the positions given by the caller;
- PyTorch style: `use_cache=True` starts a cache sized to the input, and each later call passes the mask
  of all tokens so far (filled slots + new tokens). The cache then grows by doubling (up to n_positions),
  so a token-by-token loop compiles a few times, not once per token.

Legend: B batch, T new tokens, S cache slots, M attention-mask columns, D width, V vocab.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.config import GPT2Config
from gpt2jax.errors import UserError, check_ids
from gpt2jax.model import Cache, GPT2LMHeadModule, GPT2Module, init_cache, lm_loss


class _Output:
    """HF's ModelOutput access: attributes, a mapping of the fields that are not None (`out["logits"]`,
    `"loss" in out`, `len(out)`, iteration over the names, `keys/values/items`), `out[0]`, and `to_tuple()`
    (those fields' values, in order)."""

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self.keys())

    def keys(self) -> list[str]:
        return [f.name for f in self.__dataclass_fields__.values() if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return list(self.to_tuple())

    def items(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self, name)) for name in self.keys()]

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Any:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    @property
    def cache(self) -> Cache | None:
        """transformers >= 5.2x's name for `past_key_values`."""
        return self.past_key_values


@flax.struct.dataclass
class CausalLMOutput(_Output):
    """`logits` (B, T, V) float32 (the last `logits_to_keep` positions when given); `loss` a float32 scalar
    when labels were given; `past_key_values` the updated `Cache` with `use_cache`; `hidden_states` the
    n_layer + 1 states (the embeddings, each block's input, the output of ln_f) and `attentions` the
    (B, H, T, S) probabilities of each layer when asked for."""

    loss: jax.Array | None = None  # first, as in HF's tuples
    logits: jax.Array = None
    past_key_values: Cache | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None


@flax.struct.dataclass
class BaseModelOutput(_Output):
    """`GPT2Model`'s output: `last_hidden_state` (B, T, D) after ln_f, and the fields of `CausalLMOutput`."""

    last_hidden_state: jax.Array
    past_key_values: Cache | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None


def prepare(config: GPT2Config, input_ids: Any, inputs_embeds: Any, attention_mask: Any, position_ids: Any,
            token_type_ids: Any, cache: Cache | None, use_cache: bool) -> dict[str, Any]:
    """The forward's array arguments, checked against the config and each other, the cache started or
    grown to hold the new tokens, the mask widened to the cache's slots."""
    if (input_ids is None) == (inputs_embeds is None):
        raise UserError("give exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if np.ndim(input_ids) != 2:
            raise UserError(f"input_ids must have shape (batch, time), got {np.shape(input_ids)}")
        check_ids("input_ids", input_ids, config.vocab_size, "vocab_size")
    elif np.ndim(inputs_embeds) != 3 or np.shape(inputs_embeds)[-1] != config.n_embd:
        raise UserError(f"inputs_embeds must have shape (batch, time, n_embd={config.n_embd}), "
                        f"got {np.shape(inputs_embeds)}")
    B, T = np.shape(input_ids if input_ids is not None else inputs_embeds)[:2]
    if B == 0 or T == 0:
        raise UserError(f"the input is empty: batch {B}, {T} tokens")
    for name, ids, upper, what in (("position_ids", position_ids, config.n_positions, "n_positions"),
                                   ("token_type_ids", token_type_ids, config.vocab_size, "vocab_size")):
        if ids is not None and np.shape(ids) != (B, T):
            raise UserError(f"{name} must have the shape of the input, ({B}, {T}), got {np.shape(ids)}")
        check_ids(name, ids, upper, what)
    if cache is not None and not isinstance(cache, Cache):
        raise UserError(f"past_key_values must be a gpt2jax Cache (from init_cache or an output's "
                        f"past_key_values), got {type(cache).__name__}")
    if cache is None and use_cache:
        cache = init_cache(config, B, T)
    if cache is None:
        if T > config.n_positions:
            raise UserError(f"input has {T} tokens but the model has n_positions={config.n_positions}")
        if attention_mask is not None and np.shape(attention_mask) != (B, T):
            raise UserError(f"attention_mask must have shape ({B}, {T}), got {np.shape(attention_mask)}")
    else:
        cache, attention_mask = _fit_cache(config, cache, attention_mask, B, T)
    as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
    embeds = None if inputs_embeds is None else jnp.asarray(inputs_embeds)
    return dict(input_ids=as_int(input_ids), inputs_embeds=embeds, attention_mask=as_int(attention_mask),
                position_ids=as_int(position_ids), token_type_ids=as_int(token_type_ids), cache=cache)


def _fit_cache(config: GPT2Config, cache: Cache, attention_mask: Any, B: int, T: int) -> tuple[Cache, Any]:
    """Grow `cache` (doubling, at most n_positions slots) when the T new tokens do not fit; an attention mask
    over the filled + new slots (PyTorch style) is padded to all slots, one over all slots (Flax style) kept."""
    if cache.batch_size != B or len(cache) != config.n_layer:
        raise UserError(f"the cache is for batch {cache.batch_size} and {len(cache)} layers; "
                        f"the input has batch {B} and the model {config.n_layer} layers")
    if isinstance(cache.index, jax.core.Tracer):  # inside the user's jit: no values to plan with
        return cache, attention_mask
    S, needed = cache.max_length, cache.get_seq_length() + T
    if needed > config.n_positions:
        raise UserError(f"the cache holds {needed - T} tokens; {T} more exceed n_positions={config.n_positions}")
    M = None if attention_mask is None else np.shape(attention_mask)[-1]
    if attention_mask is not None and (np.ndim(attention_mask) != 2 or np.shape(attention_mask)[0] != B
                                       or M not in (S, needed)):
        raise UserError(f"with a cache, attention_mask must be ({B}, {S}) (all the cache's slots) or ({B}, {needed}) "
                        f"(the {needed - T} cached tokens and the {T} new ones), got {np.shape(attention_mask)}")
    if needed > S:
        if M == S:
            raise UserError(f"the cache's {S} slots are full: {needed - T} filled, {T} more given; make it with "
                            f"init_cache(batch_size, max_length) for at least {needed} tokens")
        cache = cache.grown(min(max(needed, 2 * S), config.n_positions))
    if M is not None and M < cache.max_length:
        attention_mask = np.pad(np.asarray(attention_mask), ((0, 0), (0, cache.max_length - M)))
    return cache, attention_mask


@functools.partial(jax.jit, static_argnames=("module", "head", "train", "collections", "logits_to_keep"))
def forward(module: GPT2LMHeadModule | GPT2Module, params: Any, inputs: dict[str, Any], labels: jax.Array | None,
            dropout_rng: jax.Array, *, head: bool, train: bool, collections: tuple[str, ...],
            logits_to_keep: int) -> CausalLMOutput | BaseModelOutput:
    """One compiled forward: logits (and loss) of a `GPT2LMHeadModule` with `head`, else the last hidden
    state of a `GPT2Module`; the asked-for `collections` ("hidden_states", "attentions") are captured from
    the modules that sow them."""

    def run(m: GPT2LMHeadModule | GPT2Module) -> tuple[jax.Array, Cache | None]:
        body = m.transformer if head else m
        h_BxTxD, cache = body(
            inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], train=train, cache=inputs["cache"],
            inputs_embeds_BxTxD=inputs["inputs_embeds"], token_type_ids_BxT=inputs["token_type_ids"],
        )
        if not head:
            return h_BxTxD, cache
        return body.logits(h_BxTxD[:, -logits_to_keep:] if logits_to_keep else h_BxTxD), cache

    (out, cache), captured = module.apply(
        {"params": params}, method=run, mutable=list(collections), rngs={"dropout": dropout_rng}
    )
    body = lambda collection: captured[collection]["transformer"] if head else captured[collection]
    extras = dict(past_key_values=cache, hidden_states=None, attentions=None)
    if "hidden_states" in captured:  # each block's input, then the output of ln_f
        extras["hidden_states"] = body("hidden_states")["h"]["states"] + body("hidden_states")["states"]
    if "attentions" in captured:
        layers = body("attentions")["h"]
        extras["attentions"] = tuple(layers[str(i)]["attn"]["weights"][0] for i in range(module.config.n_layer))
    if not head:
        return BaseModelOutput(last_hidden_state=out, **extras)
    return CausalLMOutput(logits=out, loss=None if labels is None else lm_loss(out, labels), **extras)
