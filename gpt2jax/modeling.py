"""GPT2LMHeadModel and GPT2Model: parameters + Flax module + config behind a Hugging Face-style API."""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import forward, generation, hf, rundir
from gpt2jax.config import GPT2Config
from gpt2jax.errors import UserError
from gpt2jax.forward import BaseModelOutput, CausalLMOutput
from gpt2jax.generation import GenerationConfig
from gpt2jax.model import Cache, GPT2LMHeadModule, init_cache, init_params


class PretrainedGPT2:
    """What `GPT2LMHeadModel` and `GPT2Model` share: loading, saving, the parameters, the cache, the mode.

    Attributes:
      config: the `GPT2Config`.
      module: the Flax `GPT2LMHeadModule` (the base model is its `transformer`).
      params: the parameter tree (`transformer/h_0/attn/c_attn/kernel`, ...), the same for both classes, so
        either loads what the other saved.
    """

    def __init__(self, config: GPT2Config, seed: int = 0, *, params: Any = None):
        self.config = config
        self.module = GPT2LMHeadModule(config)
        self.params = init_params(config, seed) if params is None else params
        self.training = False
        self._dropout_key = jax.random.key(seed + 1)
        self._decoding: tuple[Any, Any] = (None, None)  # (params, their generation.Decoding)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config}, parameters={self.num_parameters():,})"

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, dtype: str | None = None, step: int | str | None = None
    ) -> PretrainedGPT2:
        """Load an HF directory (safetensors, sharded safetensors, pytorch_model.bin, flax_model.msgpack)
        or a gpt2jax run directory (one of its checkpoints).

        Args:
          name_or_path: a local directory, or a hub repo id (fetched when online).
          dtype: compute dtype override, e.g. "bfloat16"; parameters stay in `param_dtype`.
          step: for run directories: "latest" (default), "best" (lowest val loss) or a step number.
        """
        overrides = {} if dtype is None else {"dtype": dtype}
        if rundir.has_checkpoints(name_or_path):
            return cls._from_run(os.fspath(name_or_path), step, overrides)
        if step is not None:
            raise UserError(f"{name_or_path}: step= applies to run directories only")
        config, params = hf.load_pretrained(name_or_path, **overrides)
        return cls(config, params=params)

    @classmethod
    def _from_run(cls, run_dir: str, step: int | str | None, overrides: dict) -> PretrainedGPT2:
        from gpt2jax.checkpoint import Checkpoints

        rundir.read_resolved_config(run_dir)  # one clear error for a damaged config.json, before Orbax reads
        restored = Checkpoints(run_dir).restore_params(step)
        resolved = restored.config
        config = GPT2Config.from_dict(resolved["model"], dtype=resolved["train"]["compute_dtype"], **overrides)
        model = cls(config, params=jax.tree.map(jnp.asarray, restored.state["params"]))
        model.run_step, model.run_config = restored.step, resolved
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` that `transformers` loads as is."""
        hf.save_pretrained(directory, self.params, self.config)

    def init_cache(self, batch_size: int, max_length: int) -> Cache:
        """An empty KV cache of `max_length` slots (HF Flax's `init_cache`): pass it as `past_key_values`
        with an attention mask spanning all `max_length` slots."""
        return init_cache(self.config, batch_size, max_length)

    def _forward(self, arguments: dict[str, Any], head: bool) -> CausalLMOutput | BaseModelOutput | tuple:
        """Both classes' __call__, given its arguments by name (see `GPT2LMHeadModel.__call__`)."""
        a = dict(arguments)
        cache = _one_cache(a.pop("past_key_values"), a.pop("cache"))
        for name in ("encoder_hidden_states", "encoder_attention_mask"):
            if a.pop(name) is not None:
                raise UserError(f"{name}: GPT-2 here has no cross-attention (add_cross_attention is not supported)")
        use_cache = cache is not None if a["use_cache"] is None else bool(a["use_cache"])
        inputs = forward.prepare(self.config, a["input_ids"], a["inputs_embeds"], a["attention_mask"],
                                 a["position_ids"], a["token_type_ids"], cache, use_cache)
        labels, logits_to_keep = a.get("labels"), int(a.get("logits_to_keep", 0))
        if labels is not None:
            shape = (inputs["input_ids"] if inputs["input_ids"] is not None else inputs["inputs_embeds"]).shape[:2]
            if np.shape(labels) != shape:
                raise UserError(f"labels have shape {np.shape(labels)} but the input has {shape}")
            if logits_to_keep:
                raise UserError("labels need the logits of every position: leave logits_to_keep at 0")
            labels = jnp.asarray(labels, jnp.int32)
        train = self.training if a["train"] is None else a["train"]
        dropout_rng = a["dropout_rng"]
        if dropout_rng is None:
            self._dropout_key, dropout_rng = jax.random.split(self._dropout_key)
        collections = tuple(name for name in ("hidden_states", "attentions") if a[f"output_{name}"])
        out = forward.forward(self.module, self.params, inputs, labels, dropout_rng, head=head, train=bool(train),
                              collections=collections, logits_to_keep=logits_to_keep)
        if not use_cache:
            out = out.replace(past_key_values=None)
        return out if a["return_dict"] is None or a["return_dict"] else out.to_tuple()

    def num_parameters(self) -> int:
        """Parameter count, the tied LM head counted once (as transformers does)."""
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Hugging Face names -> arrays, including the tied `lm_head.weight`."""
        state = hf.to_hf_state_dict(self.params)
        state["lm_head.weight"] = state["transformer.wte.weight"]
        return state

    def parameters(self) -> list[jax.Array]:
        return jax.tree.leaves(self.params)

    def train(self, mode: bool = True) -> PretrainedGPT2:
        """Make dropout the default (`train=True`) for calls that do not say; returns self."""
        self.training = mode
        return self

    def eval(self) -> PretrainedGPT2:
        return self.train(False)


def _one_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    if past_key_values is not None and cache is not None:
        raise UserError("give the cache once: past_key_values (HF's name up to transformers 5.2x) or cache")
    return cache if past_key_values is None else past_key_values


class GPT2LMHeadModel(PretrainedGPT2):
    """GPT-2 with a language-modelling head (tied to the token embedding), used like
    `transformers.GPT2LMHeadModel` and HF's former `FlaxGPT2LMHeadModel`."""

    def __call__(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        labels: Any = None,
        train: bool | None = None,
        dropout_rng: jax.Array | None = None,
        *,
        past_key_values: Cache | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: Any = None,
        token_type_ids: Any = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        encoder_hidden_states: Any = None,
        encoder_attention_mask: Any = None,
    ) -> CausalLMOutput | tuple:
        """Forward pass with Hugging Face's arguments and semantics.

        Args:
          input_ids: int (B, T) token ids (or `inputs_embeds` (B, T, n_embd) instead).
          attention_mask: 1 (or True) for real tokens, 0 for padding; None means all ones. With a cache: over
            all its slots (HF Flax) or over the cached and the new tokens (HF PyTorch).
          position_ids: (B, T); None means arange(T) after the cached tokens.
          labels: (B, T) targets; the loss shifts them by one and skips -100.
          train: dropout on; None means the mode set by `train()` / `eval()`.
          dropout_rng: key for dropout; None draws one from the model's own key.
          past_key_values (or `cache`): a `Cache` from `init_cache` or a previous output; its filled slots
            come before the T new tokens.
          use_cache: return the updated cache as `past_key_values` (default: when one was given); without
            one a cache sized to the input is started. (HF defaults to config.use_cache, True.)
          token_type_ids: (B, T) ids whose `wte` embeddings are added, as GPT-2 does.
          output_attentions / output_hidden_states: also return `attentions` / `hidden_states`.
          return_dict: False returns `to_tuple()` of the output (HF's order, Nones left out).
          logits_to_keep: N > 0 computes the logits of the last N positions only (0: all).
          encoder_hidden_states / encoder_attention_mask: cross-attention; not supported (must be None).
        """
        arguments = dict(locals())
        del arguments["self"]
        return self._forward(arguments, head=True)

    def generate(
        self, input_ids: Any, attention_mask: Any = None, generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Continue each prompt by `max_new_tokens` tokens in one compiled loop over a KV cache.

        Settings come from `generation_config` (a `GenerationConfig`), with any of its fields given as
        keywords overriding it, as in Hugging Face: `max_new_tokens, do_sample, temperature, top_k,
        top_p, eos_token_id, pad_token_id, seed`. Batches of different lengths are left-padded with
        `attention_mask` 0; positions follow the mask, so a padded row yields the tokens it would
        yield alone. A row that emits EOS gets `pad_token_id` after it; the loop ends once every row
        is done.

        Returns:
          int32 (B, T + max_new_tokens): the prompts followed by the new tokens.
        """
        gen = GenerationConfig.from_kwargs(generation_config, **kwargs)
        return generation.generate(self.decoding(), input_ids, attention_mask, gen)

    def generate_stream(
        self, input_ids: Any, attention_mask: Any = None, generation_config: GenerationConfig | None = None, *,
        chunk_size: int = 8, **kwargs: Any,
    ) -> Iterator[np.ndarray]:
        """`generate`, yielding the new tokens (B, k) every `chunk_size` compiled steps; with the same
        settings the chunks concatenate to `generate`'s new tokens."""
        gen = GenerationConfig.from_kwargs(generation_config, **kwargs)
        return generation.generate_stream(self.decoding(), input_ids, attention_mask, gen, chunk_size)

    def decoding(self) -> generation.Decoding:
        """The decoder and the decode-layout params, made again only when `params` is replaced."""
        source, decoding = self._decoding
        if source is not self.params:
            decoding = generation.Decoding.of(self.config, self.params)
            self._decoding = (self.params, decoding)
        return decoding


class GPT2Model(PretrainedGPT2):
    """GPT-2 without the head: hidden states after ln_f, used like `transformers.GPT2Model`. Loads and saves
    the same directories and runs as `GPT2LMHeadModel` (HF's GPT2Model loads what it saves)."""

    def __call__(self, input_ids: Any = None, attention_mask: Any = None, position_ids: Any = None,
                 train: bool | None = None, dropout_rng: jax.Array | None = None, **options: Any
                 ) -> BaseModelOutput | tuple:
        """`GPT2LMHeadModel.__call__` without the head: returns `last_hidden_state` (B, T, n_embd) after ln_f.

        `options`: that method's keyword arguments but `labels` and `logits_to_keep` (`past_key_values`,
        `use_cache`, `inputs_embeds`, `token_type_ids`, `output_hidden_states`, ...)."""
        defaults = _base_model_options()
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise UserError(f"GPT2Model got unknown arguments {', '.join(unknown)}; it takes input_ids, "
                            f"attention_mask, position_ids, train, dropout_rng, {', '.join(defaults)}")
        return self._forward({**defaults, **options, "input_ids": input_ids, "attention_mask": attention_mask,
                              "position_ids": position_ids, "train": train, "dropout_rng": dropout_rng}, head=False)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Hugging Face's GPT2Model names (no `transformer.` prefix, no head) -> arrays."""
        return {name.removeprefix("transformer."): array for name, array in hf.to_hf_state_dict(self.params).items()}


@functools.cache
def _base_model_options() -> dict[str, Any]:
    """`GPT2Model.__call__`'s keyword options and their defaults: `GPT2LMHeadModel.__call__`'s keyword-only
    arguments but `logits_to_keep` (read from its signature once)."""
    return {k: v.default for k, v in inspect.signature(GPT2LMHeadModel.__call__).parameters.items()
            if v.kind is inspect.Parameter.KEYWORD_ONLY and k != "logits_to_keep"}
