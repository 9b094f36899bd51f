"""GPT2LMHeadModel and GPT2Model: parameters + Flax module + config behind a Hugging Face-style API."""

from __future__ import annotations

import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from gpt2jax import forward, generation, hf, perf, rundir
from gpt2jax.config import DTYPES, GPT2Config, check_int_range, is_int
from gpt2jax.errors import UserError, check_ids
from gpt2jax.forward import BaseModelOutput, CausalLMOutput
from gpt2jax.generation import GenerationConfig
from gpt2jax.model import IGNORE_INDEX, Cache, GPT2LMHeadModule, GPT2Module, init_cache, init_params


class PretrainedGPT2:
    """What `GPT2LMHeadModel` and `GPT2Model` share: loading, saving, the parameters, the cache, the mode.

    Used as Hugging Face's Flax models were: every call is pure (nothing on the model changes inside it), so
    `model(ids, params=p, dropout_rng=key, train=True)` goes under `jax.grad`, `jax.jit` and `jax.pmap`.

    Attributes:
      config: the `GPT2Config`.
      module: the Flax module (`GPT2LMHeadModule`, or `GPT2Module` for the base model): its `apply` takes
        `{"params": model.params}`.
      params: HF Flax's parameter tree: `transformer/h/0/attn/c_attn/kernel` (kernels (out, in)) for
        `GPT2LMHeadModel`, the same without `transformer` for `GPT2Model`; either class loads what the other
        saved. Unset (an error to read) when made with `_do_init=False`: calls then take `params=`.
    """

    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _head = True  # whether the module is GPT2LMHeadModule (params under "transformer")

    def __init__(self, config: GPT2Config, input_shape: tuple[int, int] = (1, 1), seed: int = 0, dtype: Any = None,
                 _do_init: bool = True, *, params: Any = None):
        """A model of `config`; random parameters from `seed` unless `params` are given (or `_do_init` is
        False: none at all, see `init_weights`). `dtype` sets the compute dtype (a name or a jnp dtype)."""
        if not isinstance(config, GPT2Config):
            raise UserError(f"config must be a gpt2jax GPT2Config, got {type(config).__name__}")
        check_int_range("seed", seed)
        self.config = config if dtype is None else config.replace(dtype=dtype)
        self.input_shape, self.key, self._do_init = tuple(input_shape), jax.random.key(seed), bool(_do_init)
        self.training = False
        # generate's defaults (Hugging Face's `model.generation_config`): read from generation_config.json by
        # from_pretrained, written by save_pretrained
        # (Hugging Face's from_model_config: generation fields set on the config, e.g. config.num_beams = 2)
        self.generation_config = GenerationConfig.from_hf_dict(self.config.extra, "the config's generation fields")
        self._decoding: tuple[Any, Any] = (None, None)  # (params, their generation.Decoding)
        self._params = None
        if params is not None:
            self._params = params
        elif self._do_init:
            self._params = self.init_weights(self.key, self.input_shape)

    @property
    def module(self) -> GPT2LMHeadModule | GPT2Module:
        return GPT2LMHeadModule(self.config) if self._head else GPT2Module(self.config)

    @property
    def params(self) -> Any:
        if self._params is None:
            raise UserError(f"this {type(self).__name__} was made with _do_init=False and holds no parameters; "
                            "pass params= to each call (from init_weights or from_pretrained(..., _do_init=False))")
        return self._params

    @params.setter
    def params(self, params: Any) -> None:
        if not self._do_init:
            raise UserError(f"this {type(self).__name__} was made with _do_init=False: it holds no parameters; "
                            "pass params= to each call instead")
        self._params = params

    @property
    def params_shape_tree(self) -> Any:
        """The parameter tree as shapes and dtypes (`jax.ShapeDtypeStruct`s), without computing it."""
        return jax.eval_shape(lambda: self.init_weights(self.key, self.input_shape))

    @property
    def required_params(self) -> set[tuple[str, ...]]:
        """The path of every parameter, as `flax.traverse_util.flatten_dict` names them."""
        return set(traverse_util.flatten_dict(self.params_shape_tree))

    def init_weights(self, rng: jax.Array, input_shape: tuple[int, int] = (1, 1), params: Any = None) -> Any:
        """Random parameters from `rng` (GPT-2's initialisation; the values do not depend on `input_shape`).
        With `params`, the ones it holds are kept and only the missing ones drawn."""
        if len(tuple(input_shape)) != 2:
            raise UserError(f"input_shape must be (batch, time), got {input_shape}")
        perf.check_fits(self.config, 1, 1, train=False, what=f"a GPT-2 of n_embd={self.config.n_embd}, "
                                                             f"n_layer={self.config.n_layer}")
        fresh = init_params(self.config, rng)
        fresh = fresh if self._head else fresh[self.base_model_prefix]
        if params is None:
            return fresh
        flat = traverse_util.flatten_dict(fresh)
        flat.update({path: leaf for path, leaf in traverse_util.flatten_dict(params).items() if path in flat})
        return traverse_util.unflatten_dict(flat)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config}, parameters={self.config.num_parameters():,})"

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, dtype: Any = None, step: int | str | None = None,
        _do_init: bool = True, from_pt: bool | None = None, from_flax: bool | None = None,
    ) -> Any:
        """Load an HF directory (safetensors, sharded safetensors, pytorch_model.bin, flax_model.msgpack)
        or a gpt2jax run directory (one of its checkpoints).

        Args:
          name_or_path: a local directory, or a hub repo id (fetched when online).
          dtype: compute dtype override, e.g. "bfloat16" or jnp.bfloat16; parameters stay in `param_dtype`.
          step: for run directories: "latest" (default), "best" (lowest val loss) or a step number.
          _do_init: False returns `(model, params)` with the model holding none (HF Flax's convention).
          from_pt / from_flax: accepted for Hugging Face's callers; whichever weights the directory holds are
            read (PyTorch's or Flax's), so they change nothing.
        """
        overrides = {} if dtype is None else {"dtype": dtype}
        if rundir.has_checkpoints(name_or_path):
            config, params, found, resolved = hf.load_run(os.fspath(name_or_path), step, **overrides)
            run = (found, resolved)
        else:
            if step is not None:
                if not os.path.exists(name_or_path):
                    raise UserError(f"{name_or_path}: no such run directory")
                raise UserError(f"{name_or_path}: not a gpt2jax run directory (no config.json beside checkpoints/); "
                                "step= applies to run directories only")
            config, params = hf.load_pretrained(name_or_path, **overrides)
            run = None
        if not cls._head:
            params = params[cls.base_model_prefix]
        model = cls(config, params=params)
        if run is not None:
            model.run_step, model.run_config = run
        settings = os.path.join(os.fspath(name_or_path), "generation_config.json")
        if run is None and os.path.isfile(settings):
            model.generation_config = GenerationConfig.from_hf_dict(
                rundir.read_json_object(settings, "a generation_config.json"), settings)
        if _do_init:
            return model
        model._params, model._do_init = None, False
        return model, params

    def save_pretrained(self, directory: str | os.PathLike, params: Any = None) -> None:
        """Write `config.json` and `model.safetensors` that `transformers` loads as is: the model's
        parameters, or `params` (in their dtype: float16 params are saved, and load again, as float16)."""
        params = self.params if params is None else params
        head_params = params if self._head else {self.base_model_prefix: params}
        hf.save_pretrained(directory, head_params, self.config.replace(param_dtype=_float_dtype(params,
                                                                                                 self.config)))
        rundir.write_json(os.path.join(os.fspath(directory), "generation_config.json"),
                          self.generation_config.to_hf_dict())

    def to_bf16(self, params: Any, mask: Any = None) -> Any:
        """`params` with floating leaves cast to bfloat16; with `mask` (a tree of bools shaped like params)
        only where it is True. Returns a new tree (HF Flax's method)."""
        return _cast_floats(params, jnp.bfloat16, mask)

    def to_fp16(self, params: Any, mask: Any = None) -> Any:
        """`to_bf16` to float16."""
        return _cast_floats(params, jnp.float16, mask)

    def to_fp32(self, params: Any, mask: Any = None) -> Any:
        """`to_bf16` to float32."""
        return _cast_floats(params, jnp.float32, mask)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (less memory,
        about a third more compute); outputs are unchanged. The model gets its own config with
        `gradient_checkpointing=True`, so other models made from the same config are not changed."""
        self.config = self.config.replace(gradient_checkpointing=True)

    def can_generate(self) -> bool:
        return self._head

    def init_cache(self, batch_size: int, max_length: int) -> Cache:
        """An empty KV cache of `max_length` slots (HF Flax's `init_cache`): pass it as `past_key_values`
        with an attention mask spanning all `max_length` slots."""
        if not is_int(batch_size) or batch_size < 1:
            raise UserError(f"init_cache: batch_size must be a positive integer, got {batch_size!r}")
        if not is_int(max_length) or not 1 <= max_length <= self.config.n_positions:
            raise UserError(f"init_cache: max_length must be an integer in [1, n_positions={self.config.n_positions}], "
                            f"got {max_length!r}")
        return init_cache(self.config, batch_size, max_length)

    def _forward(self, arguments: dict[str, Any]) -> CausalLMOutput | BaseModelOutput | tuple:
        """Both classes' __call__, given its arguments by name (see `GPT2LMHeadModel.__call__`). Pure: reads
        the model, changes nothing on it."""
        a, config = dict(arguments), self.config
        params = self.params if a["params"] is None else a["params"]
        cache = _one_cache(a.pop("past_key_values"), a.pop("cache"))
        for name in ("encoder_hidden_states", "encoder_attention_mask"):
            if a.pop(name) is not None:
                raise UserError(f"{name}: GPT-2 here has no cross-attention (add_cross_attention is not supported)")
        use_cache = cache is not None if a["use_cache"] is None else bool(a["use_cache"])
        inputs = forward.prepare(config, a["input_ids"], a["inputs_embeds"], a["attention_mask"],
                                 a["position_ids"], a["token_type_ids"], cache, use_cache)
        labels, logits_to_keep = a.get("labels"), int(a.get("logits_to_keep", 0))
        if labels is not None:
            shape = (inputs["input_ids"] if inputs["input_ids"] is not None else inputs["inputs_embeds"]).shape[:2]
            if np.shape(labels) != shape:
                raise UserError(f"labels have shape {np.shape(labels)} but the input has {shape}")
            if logits_to_keep:
                raise UserError("labels need the logits of every position: leave logits_to_keep at 0")
            check_ids("labels", labels, config.vocab_size, "vocab_size", also=(IGNORE_INDEX,))
            labels = jnp.asarray(labels, jnp.int32)
        train = bool(self.training if a["train"] is None else a["train"])
        dropout_rng = a["dropout_rng"]
        if train and dropout_rng is None and max(config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) > 0:
            raise UserError("train=True applies dropout, which needs a key: pass dropout_rng=jax.random.key(...), "
                            "a new one for each step (or set the config's *_pdrop to 0)")
        if dropout_rng is None:
            dropout_rng = jax.random.key(0)  # unused: no dropout applies
        output = {name: config_default if a[f"output_{name}"] is None else a[f"output_{name}"]
                  for name, config_default in (("hidden_states", config.output_hidden_states),
                                               ("attentions", config.output_attentions))}
        collections = tuple(name for name in ("hidden_states", "attentions") if output[name])
        out = forward.forward(self.module, params, inputs, labels, dropout_rng, head=self._head, train=train,
                              collections=collections, logits_to_keep=logits_to_keep)
        if not use_cache:
            out = out.replace(past_key_values=None)
        return_dict = config.return_dict if a["return_dict"] is None else a["return_dict"]
        return out if return_dict else out.to_tuple()

    def num_parameters(self, params: Any = None) -> int:
        """Parameter count, the tied LM head counted once (as transformers does)."""
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params if params is None else params))

    def state_dict(self) -> dict[str, np.ndarray]:
        """Hugging Face's PyTorch names (and layout) -> arrays; `GPT2LMHeadModel`'s include the tied
        `lm_head.weight`, `GPT2Model`'s have no `transformer.` prefix (as transformers' do)."""
        state = hf.to_hf_state_dict(self.params)
        if self._head:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        return state

    def parameters(self) -> list[jax.Array]:
        return jax.tree.leaves(self.params)

    def train(self, mode: bool = True) -> PretrainedGPT2:
        """Make dropout the default (`train=True`) for calls that do not say; returns self. Such calls
        need a `dropout_rng`."""
        self.training = mode
        return self

    def eval(self) -> PretrainedGPT2:
        return self.train(False)


def _float_dtype(params: Any, config: GPT2Config) -> str:
    """The dtype of `params`' floating leaves when they share one gpt2jax knows, else the config's."""
    names = {jnp.dtype(x.dtype).name for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)}
    return names.pop() if len(names) == 1 and names <= set(DTYPES) else config.param_dtype


def _cast_floats(params: Any, dtype: Any, mask: Any) -> Any:
    """HF Flax's `_cast_floating_to`: floating leaves to `dtype`, where `mask` (None: everywhere) is True."""
    cast = lambda x: jnp.asarray(x).astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
    flat = traverse_util.flatten_dict(params)
    if mask is None:
        return traverse_util.unflatten_dict({path: cast(leaf) for path, leaf in flat.items()})
    flat_mask = traverse_util.flatten_dict(mask)
    if set(flat_mask) != set(flat):
        raise UserError("mask must have the structure of params (a bool for each parameter)")
    return traverse_util.unflatten_dict({path: cast(leaf) if flat_mask[path] else leaf for path, leaf in flat.items()})


def _one_cache(past_key_values: Cache | None, cache: Cache | None) -> Cache | None:
    if past_key_values is not None and cache is not None:
        raise UserError("give the cache once: past_key_values (HF's name up to transformers 5.2x) or cache")
    return cache if past_key_values is None else past_key_values


class GPT2LMHeadModel(PretrainedGPT2):
    """GPT-2 with a language-modelling head (tied to the token embedding), used like HF's former
    `FlaxGPT2LMHeadModel` (and, by keyword, `transformers.GPT2LMHeadModel`)."""

    def __call__(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        params: Any = None,
        past_key_values: Cache | None = None,
        dropout_rng: jax.Array | None = None,
        train: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        *,
        labels: Any = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: Any = None,
        token_type_ids: Any = None,
        logits_to_keep: int = 0,
        encoder_hidden_states: Any = None,
        encoder_attention_mask: Any = None,
    ) -> CausalLMOutput | tuple:
        """Forward pass with Hugging Face Flax's arguments and semantics (positional order included).

        Args:
          input_ids: int (B, T) token ids (or `inputs_embeds` (B, T, n_embd) instead).
          attention_mask: 1 (or True) for real tokens, 0 for padding; None means all ones. With a cache: over
            all its slots (HF Flax) or over the cached and the new tokens (HF PyTorch).
          position_ids: (B, T); None means arange(T) after the cached tokens.
          params: the parameter tree to use instead of `self.params` (traced under jax.grad / jit / pmap).
          past_key_values (or `cache`): a `Cache` from `init_cache` or a previous output; its filled slots
            come before the T new tokens.
          dropout_rng: key for dropout, needed when `train` and the config has dropout.
          train: dropout on; None means the mode set by `train()` / `eval()`.
          output_attentions / output_hidden_states: also return `attentions` / `hidden_states`; None means
            the config's field of that name.
          return_dict: False returns `to_tuple()` of the output (HF's order, Nones left out); None means
            `config.return_dict`.
          labels: (B, T) targets; the loss shifts them by one and skips -100.
          use_cache: return the updated cache as `past_key_values` (default: when one was given, as in HF
            Flax); without one a cache sized to the input is started.
          token_type_ids: (B, T) ids whose `wte` embeddings are added, as GPT-2 does.
          logits_to_keep: N > 0 computes the logits of the last N positions only (0: all).
          encoder_hidden_states / encoder_attention_mask: cross-attention; not supported (must be None).
        """
        arguments = dict(locals())
        del arguments["self"]
        return self._forward(arguments)

    def generate(
        self, input_ids: Any, attention_mask: Any = None, generation_config: GenerationConfig | None = None, *,
        params: Any = None, prng_key: jax.Array | None = None, **kwargs: Any,
    ) -> generation.GenerateOutput:
        """Continue each prompt by `max_new_tokens` tokens in one compiled loop over a KV cache.

        Settings come from `generation_config` (a `GenerationConfig`), with any of its fields given as
        keywords overriding it, as in Hugging Face: `max_new_tokens, max_length, do_sample, temperature,
        top_k, top_p, eos_token_id, pad_token_id, seed, num_beams, num_return_sequences, length_penalty,
        early_stopping`. Batches of different lengths are left-padded with `attention_mask` 0; positions
        follow the mask, so a padded row yields the tokens it would yield alone. A row that emits EOS gets
        `pad_token_id` (default: the config's, else EOS) after it; the loop ends once every row is done.
        `params` replace `self.params` for this call; `prng_key` (HF Flax's name) replaces the key of `seed`.

        Returns:
          int32 (B num_return_sequences, T + max_new_tokens): the prompts followed by the new tokens, an
          array that also has Hugging Face's `.sequences` (and `.sequences_scores` after beam search).
        """
        gen = GenerationConfig.from_kwargs(generation_config or self.generation_config, **kwargs)
        return generation.generate(self.decoding(params), input_ids, attention_mask, gen, prng_key)

    def generate_stream(
        self, input_ids: Any, attention_mask: Any = None, generation_config: GenerationConfig | None = None, *,
        chunk_size: int = 8, params: Any = None, **kwargs: Any,
    ) -> Iterator[np.ndarray]:
        """`generate`, yielding the new tokens (B, k) every `chunk_size` compiled steps; with the same
        settings the chunks concatenate to `generate`'s new tokens."""
        gen = GenerationConfig.from_kwargs(generation_config or self.generation_config, **kwargs)
        return generation.generate_stream(self.decoding(params), input_ids, attention_mask, gen, chunk_size)

    def decoding(self, params: Any = None) -> generation.Decoding:
        """The decoder and `params` (default: the model's) in the decode layout, made again only when the
        params or the config change."""
        params = self.params if params is None else params
        source, decoding = self._decoding
        if source is not params or decoding.config != self.config:
            decoding = generation.Decoding.of(self.config, params)
            self._decoding = (params, decoding)
        return decoding


class GPT2Model(PretrainedGPT2):
    """GPT-2 without the head: hidden states after ln_f, used like HF's former `FlaxGPT2Model` (and
    `transformers.GPT2Model`). Its params are the head model's `transformer` subtree; each class loads the
    directories and runs the other saved."""

    _head = False

    def __call__(
        self,
        input_ids: Any = None,
        attention_mask: Any = None,
        position_ids: Any = None,
        params: Any = None,
        past_key_values: Cache | None = None,
        dropout_rng: jax.Array | None = None,
        train: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        *,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: Any = None,
        token_type_ids: Any = None,
        encoder_hidden_states: Any = None,
        encoder_attention_mask: Any = None,
    ) -> BaseModelOutput | tuple:
        """`GPT2LMHeadModel.__call__` without the head (no `labels`, `logits_to_keep`): returns
        `last_hidden_state` (B, T, n_embd) after ln_f."""
        arguments = dict(locals())
        del arguments["self"]
        return self._forward(arguments)
