"""GPT2LMHeadModel: parameters + Flax module + config behind a Hugging Face-style API."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import hf, rundir, sampling
from gpt2jax.config import GPT2Config
from gpt2jax.errors import UserError
from gpt2jax.model import GPT2LMHeadModule, init_cache, init_params, lm_loss, to_decode_layout


@flax.struct.dataclass
class CausalLMOutput:
    """`logits` (B, T, V) float32; `loss` a float32 scalar when labels were given, else None."""

    logits: jax.Array
    loss: jax.Array | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


@functools.partial(jax.jit, static_argnames=("module", "train"))
def _forward(
    module: GPT2LMHeadModule,
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    position_ids: jax.Array | None,
    labels: jax.Array | None,
    train: bool,
    dropout_rng: jax.Array,
) -> CausalLMOutput:
    logits, _ = module.apply(
        {"params": params}, input_ids, attention_mask, position_ids, train=train, rngs={"dropout": dropout_rng}
    )
    return CausalLMOutput(logits=logits, loss=None if labels is None else lm_loss(logits, labels))


@dataclasses.dataclass(frozen=True)
class GPT2Decoder:
    """Binds the GPT-2 module to the model-agnostic sampler; its params are in `to_decode_layout`."""

    module: GPT2LMHeadModule  # with transposed_kernels=True

    def init_cache(self, batch_size: int, length: int) -> Any:
        return init_cache(self.module.config, batch_size, length)

    def tokens_to_logits(self, params, tokens_BxT, positions_BxT, mask_BxS, cache, index):
        def last_logits(module: GPT2LMHeadModule) -> tuple[jax.Array, Any]:
            h_BxTxD, new_cache = module.transformer(
                tokens_BxT, positions_BxT, mask_BxS, train=False, cache=cache, cache_index=index
            )
            return module.transformer.logits(h_BxTxD[:, -1:])[:, 0], new_cache

        return self.module.apply({"params": params}, method=last_logits)


@dataclasses.dataclass(frozen=True)
class _Generation:
    """Validated generate() arguments, bucketed and ready for the compiled loop."""

    prompt_BxP: jax.Array
    mask_BxP: jax.Array
    prompt_length: int  # T, before bucket padding
    max_new_tokens: int
    rules: sampling.SamplingRules
    values: dict  # temperature, top_p, eos_token_id, pad_token_id as arrays
    rng: jax.Array


def _check_ids(name: str, ids: Any, upper: int, what: str) -> None:
    """Range-check concrete integer arrays (under tracing there is nothing to check)."""
    if ids is None:
        return
    try:
        array = np.asarray(ids)
    except jax.errors.TracerArrayConversionError:
        return
    if array.ndim != 2:
        raise UserError(f"{name} must have shape (batch, time), got {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= upper):
        raise UserError(f"{name} has values in [{array.min()}, {array.max()}] but {what} is {upper}")


class GPT2LMHeadModel:
    """GPT-2 with a language-modelling head, used like `transformers.GPT2LMHeadModel`.

    Attributes:
      config: the `GPT2Config`.
      module: the Flax `GPT2LMHeadModule`.
      params: the parameter tree (`transformer/h_0/attn/c_attn/kernel`, ...).
    """

    def __init__(self, config: GPT2Config, seed: int = 0, *, params: Any = None):
        self.config = config
        self.module = GPT2LMHeadModule(config)
        self.params = init_params(config, seed) if params is None else params
        self.training = False
        self._dropout_key = jax.random.key(seed + 1)
        self._decode_params: tuple[Any, Any] = (None, None)  # (params, their decode-layout copy)

    def __repr__(self) -> str:
        return f"GPT2LMHeadModel({self.config}, parameters={self.num_parameters():,})"

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, dtype: str | None = None, step: int | str | None = None
    ) -> GPT2LMHeadModel:
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
    def _from_run(cls, run_dir: str, step: int | str | None, overrides: dict) -> GPT2LMHeadModel:
        from gpt2jax.checkpoint import Checkpoints

        rundir.read_resolved_config(run_dir)  # one clear error for a damaged config.json, before Orbax reads
        params, resolved, step = Checkpoints(run_dir).restore_params(step)
        config = GPT2Config.from_dict(resolved["model"], dtype=resolved["train"]["compute_dtype"], **overrides)
        model = cls(config, params=jax.tree.map(jnp.asarray, params))
        model.run_step, model.run_config = step, resolved
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `config.json` and `model.safetensors` that `transformers` loads as is."""
        hf.save_pretrained(directory, self.params, self.config)

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        position_ids: Any = None,
        labels: Any = None,
        train: bool | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> CausalLMOutput:
        """Forward pass with Hugging Face semantics.

        Args:
          input_ids: int (B, T) token ids.
          attention_mask: 1 for real tokens, 0 for padding; None means all ones.
          position_ids: (B, T); None means arange(T).
          labels: (B, T) targets; the loss shifts them by one and skips -100.
          train: dropout on; None means the mode set by `train()` / `eval()`.
          dropout_rng: key for dropout; None draws one from the model's own key.
        """
        train = self.training if train is None else train
        cfg = self.config
        _check_ids("input_ids", input_ids, cfg.vocab_size, "vocab_size")
        T = np.shape(input_ids)[-1]
        if T > cfg.n_positions:
            raise UserError(f"input has {T} tokens but the model has n_positions={cfg.n_positions}")
        _check_ids("position_ids", position_ids, cfg.n_positions, "n_positions")
        if labels is not None and np.shape(labels) != np.shape(input_ids):
            raise UserError(f"labels have shape {np.shape(labels)} but input_ids have {np.shape(input_ids)}")
        if dropout_rng is None:
            self._dropout_key, dropout_rng = jax.random.split(self._dropout_key)
        as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
        return _forward(
            self.module,
            self.params,
            as_int(input_ids),
            as_int(attention_mask),
            as_int(position_ids),
            as_int(labels),
            bool(train),
            dropout_rng,
        )

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        seed: int = 0,
    ) -> np.ndarray:
        """Continue each prompt by `max_new_tokens` tokens in one compiled loop over a KV cache.

        Batches of different lengths are left-padded with `attention_mask` 0; positions follow
        the mask, so a padded row yields the tokens it would yield alone. Greedy unless
        `do_sample`; sampling applies temperature, then top-k (0: off), then top-p, as Hugging
        Face does. A row that emits `eos_token_id` (default: the config's) gets `pad_token_id`
        (default: EOS) after it, and the loop ends once every row is done.

        Returns:
          int32 (B, T + max_new_tokens): the prompts followed by the new tokens.
        """
        gen = self._prepare_generation(
            input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
            pad_token_id, seed,
        )
        tokens = sampling.generate_tokens(
            self._decoder(), self._params_for_decoding(), gen.prompt_BxP, gen.mask_BxP, gen.max_new_tokens, gen.rules,
            rng=gen.rng, **gen.values,
        )
        return np.asarray(tokens)[:, gen.prompt_BxP.shape[1] - gen.prompt_length :]

    def generate_stream(self, input_ids: Any, *args: Any, chunk_size: int = 8, **kwargs: Any) -> Iterator[np.ndarray]:
        """`generate`, yielding the new tokens (B, k) every `chunk_size` compiled steps.

        Takes the arguments of `generate`; with the same seed the concatenated chunks equal
        its new tokens.
        """
        gen = self._prepare_generation(input_ids, *args, **kwargs)
        decoder, params = self._decoder(), self._params_for_decoding()
        state = sampling.prefill_jit(decoder, params, gen.prompt_BxP, gen.mask_BxP, gen.max_new_tokens, gen.rng)
        prompt_slots, emitted = gen.prompt_BxP.shape[1], 0
        while emitted < gen.max_new_tokens and not bool(np.all(state.done_B)):
            state = sampling.decode_jit(decoder, params, state, chunk_size, gen.rules, **gen.values)
            step = int(state.step)
            yield np.asarray(state.tokens_BxL[:, prompt_slots + emitted : prompt_slots + step])
            emitted = step

    def _decoder(self) -> GPT2Decoder:
        return GPT2Decoder(GPT2LMHeadModule(self.config, transposed_kernels=True))

    def _params_for_decoding(self) -> Any:
        """The params with kernels transposed for fast decoding, recomputed only when params change."""
        source, converted = self._decode_params
        if source is not self.params:
            converted = jax.jit(to_decode_layout)(self.params)
            self._decode_params = (self.params, converted)
        return converted

    def _prepare_generation(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        seed: int = 0,
    ) -> _Generation:
        cfg = self.config
        input_ids = np.asarray(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise UserError(f"the prompt is empty or not (batch, time): input_ids shape {input_ids.shape}")
        _check_ids("input_ids", input_ids, cfg.vocab_size, "vocab_size")
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask).reshape(input_ids.shape)
        empty_rows = np.flatnonzero(mask.sum(axis=1) == 0)
        if empty_rows.size:
            raise UserError(f"prompt row {int(empty_rows[0])} is empty (its attention_mask is all 0)")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        T = input_ids.shape[1]
        if T + max_new_tokens > cfg.n_positions:
            raise UserError(
                f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds n_positions={cfg.n_positions}"
            )
        if do_sample and not temperature > 0:
            raise UserError(f"temperature must be > 0 when sampling, got {temperature}")
        if not isinstance(top_k, int) or top_k < 0:
            raise UserError(f"top_k must be an integer >= 0 (0 turns it off), got {top_k!r}")
        if not 0.0 < top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {top_p}")
        eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
        pad = eos if pad_token_id is None else pad_token_id
        slots = sampling.bucket_length(T)
        prompt, prompt_mask = sampling.left_pad(jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask, jnp.int32), slots, pad)
        rules = sampling.SamplingRules(do_sample=do_sample, top_k=min(top_k, cfg.vocab_size) if do_sample else 0,
                                       use_top_p=do_sample and top_p < 1.0)
        values = dict(
            temperature=jnp.float32(temperature), top_p=jnp.float32(top_p),
            eos_token_id=jnp.int32(eos), pad_token_id=jnp.int32(pad),
        )
        return _Generation(prompt, prompt_mask, T, max_new_tokens, rules, values, jax.random.key(seed))

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

    def train(self, mode: bool = True) -> GPT2LMHeadModel:
        """Make dropout the default (`train=True`) for calls that do not say; returns self."""
        self.training = mode
        return self

    def eval(self) -> GPT2LMHeadModel:
        return self.train(False)
