"""GPT2LMHeadModel: parameters + Flax module + config behind a Hugging Face-style API."""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import generation, hf, rundir
from gpt2jax.config import GPT2Config
from gpt2jax.errors import UserError
from gpt2jax.generation import GenerationConfig
from gpt2jax.model import GPT2LMHeadModule, init_params, lm_loss


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
        self._decoding: tuple[Any, Any] = (None, None)  # (params, their generation.Decoding)

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
        restored = Checkpoints(run_dir).restore_params(step)
        resolved = restored.config
        config = GPT2Config.from_dict(resolved["model"], dtype=resolved["train"]["compute_dtype"], **overrides)
        model = cls(config, params=jax.tree.map(jnp.asarray, restored.state["params"]))
        model.run_step, model.run_config = restored.step, resolved
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
