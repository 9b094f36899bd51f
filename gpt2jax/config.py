"""GPT2Config: the model's hyperparameters with Hugging Face's field names, plus the JAX dtype and matmul
precision policy; reads and writes Hugging Face `config.json` files. Experiment configs (what a training
run does) are `gpt2jax.experiment`'s."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MATMUL_PRECISIONS = (None, "default", "high", "highest")
# How attention runs (gpt2jax.attention): "auto" picks the fused kernel of the platform a program is lowered for.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
# The MLP nonlinearities, by Hugging Face's names; gelu_new (GPT-2's) is the tanh approximation.
ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}

# Hugging Face GPT-2 options whose non-default values change the math; we reject them
# rather than silently computing something else.
_UNSUPPORTED_HF_OPTIONS = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}

# Sizes of the four released GPT-2 checkpoints.
MODEL_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


def is_int(value: Any) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


INT32 = (-(2**31), 2**31 - 1)
SEED_RANGE = (0, 2**32 - 1)


def check_int_range(name: str, value: Any) -> None:
    """A `UserError` in one line when an integer setting is out of the range it can take here: seeds are
    32-bit (a jax key from a larger seed keeps its low 32 bits only, so 5 and 2**32 + 5 would be the same run),
    every other integer fits int32 (steps, sizes and positions are int32 on the device)."""
    if not is_int(value):
        return
    is_seed = name.split(".")[-1].endswith("seed")
    low, high = SEED_RANGE if is_seed else INT32
    if not low <= value <= high:
        what = "seeds are 32-bit" if is_seed else "integers here are int32 (steps, sizes, positions on the device)"
        raise UserError(f"{name}={value} is out of range: {what}, so it must be in [{low}, {high}]")


def _dtype_name(dtype: Any) -> Any:
    """"bfloat16" for jnp.bfloat16, np.dtype("bfloat16"), "bfloat16"; anything else as given (validate says)."""
    if isinstance(dtype, str):
        return dtype
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        return dtype


def is_number(value: Any) -> bool:
    """An int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# Fields of a Hugging Face config.json that gpt2jax writes itself or that describe another library's files:
# never kept in `GPT2Config.extra` (see `from_hf_dict`).
_HF_OWN_KEYS = {"architectures", "model_type", "dtype", "torch_dtype", "gpt2jax", "transformers_version",
                *_UNSUPPORTED_HF_OPTIONS}
# The fields that make a checkpoint's weights and math: a fine-tune takes them from the model it starts from.
ARCHITECTURE = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                "layer_norm_epsilon")
# Hugging Face's runtime fields (PretrainedConfig's, with its defaults): how calls behave, not the model.
RUNTIME_FIELDS = ("use_cache", "pad_token_id", "output_hidden_states", "output_attentions", "return_dict",
                  "is_encoder_decoder", "gradient_checkpointing")


@dataclasses.dataclass(unsafe_hash=True)
class GPT2Config:
    """GPT-2 hyperparameters and Hugging Face's runtime fields, named as in `transformers.GPT2Config`.

    Settable as in Hugging Face (`config.output_hidden_states = True`): every change is checked, and a bad
    value raises `UserError` and leaves the config as it was. Hashable by value, so a module holding it can
    be a static jit argument (a changed config compiles anew). Unknown fields of a config.json are kept in
    `extra` and written back; setting an unknown attribute adds it there.
    """

    vocab_size: int = 50257  # tokens in the vocabulary (embedding rows)
    n_positions: int = 1024  # longest sequence: rows of the position embedding
    n_embd: int = 768  # model width D
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads H; head dim K = n_embd // n_head
    n_inner: int | None = None  # MLP hidden width; None means 4 * n_embd
    activation_function: str = "gelu_new"  # MLP nonlinearity; gelu_new = tanh approximation
    resid_pdrop: float = 0.1  # dropout after attention and MLP projections (train only)
    embd_pdrop: float = 0.1  # dropout on token + position embeddings (train only)
    attn_pdrop: float = 0.1  # dropout on attention probabilities (train only)
    layer_norm_epsilon: float = 1e-5  # LayerNorm epsilon
    initializer_range: float = 0.02  # std of the normal init of weights and embeddings
    bos_token_id: int = 50256  # <|endoftext|>
    eos_token_id: int = 50256  # <|endoftext|>
    dtype: str = "float32"  # compute dtype: float32, or bfloat16 on GPU/TPU
    param_dtype: str = "float32"  # storage dtype of the parameters
    # matmul precision: None means "highest" for float32 compute on GPUs and TPUs (which otherwise round
    # float32 matmuls to tf32 / bf16 passes: 4e-3 logit error on an H200), XLA's default for bfloat16
    # and on CPUs (exact for float32 there)
    matmul_precision: str | None = None
    # attention implementation: "auto" (cuDNN on NVIDIA GPUs and splash on TPUs where they apply, else XLA),
    # "xla", "cudnn" or "splash" (see gpt2jax.attention); how the model runs, not what it computes
    attention: str = "auto"
    # Hugging Face's runtime fields. output_hidden_states / output_attentions / return_dict are the defaults
    # of calls that do not say; use_cache is kept for transformers (the forward returns a cache when it was
    # given one or asked with use_cache=True, as HF Flax's did); pad_token_id is generate's default padding;
    # gradient_checkpointing recomputes each block in the backward pass (enable_gradient_checkpointing()).
    use_cache: bool = True
    pad_token_id: int | None = None
    output_hidden_states: bool = False
    output_attentions: bool = False
    return_dict: bool = True
    is_encoder_decoder: bool = False
    gradient_checkpointing: bool = False
    extra: dict = dataclasses.field(default_factory=dict, hash=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, _dtype_name(getattr(self, name)))
        if not isinstance(self.extra, dict):
            raise UserError(f"GPT2Config.extra must be a dict of config.json fields, got {type(self.extra).__name__}")
        self.validate()
        object.__setattr__(self, "_checked", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if not self.__dict__.get("_checked"):  # still in __init__
            object.__setattr__(self, name, value)
        elif name not in self.__dataclass_fields__:
            if name.startswith("_"):
                object.__setattr__(self, name, value)
            else:
                self.extra[name] = value
        else:
            previous = getattr(self, name)
            object.__setattr__(self, name, _dtype_name(value) if name in ("dtype", "param_dtype") else value)
            try:
                self.validate()
            except UserError:
                object.__setattr__(self, name, previous)
                raise

    def __getattr__(self, name: str) -> Any:  # only called for names that are not attributes
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"GPT2Config has no field {name!r}")

    def validate(self) -> None:
        """Raise `UserError` naming the first inconsistent field (types too: config.json may hold nulls)."""
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if not is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise UserError(f"GPT2Config.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise UserError(f"GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_inner is not None and (not is_int(self.n_inner) or self.n_inner <= 0):
            raise UserError(f"GPT2Config.n_inner must be a positive integer or None, got {self.n_inner!r}")
        if self.activation_function not in ACTIVATIONS:
            raise UserError(
                f"GPT2Config.activation_function={self.activation_function!r} is not supported; "
                f"use one of {', '.join(ACTIVATIONS)}"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if not is_number(getattr(self, name)) or not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"GPT2Config.{name} must be a number in [0, 1), got {getattr(self, name)!r}")
        for name in ("layer_norm_epsilon", "initializer_range"):
            if not is_number(getattr(self, name)) or not 0.0 < getattr(self, name) < float("inf"):
                raise UserError(f"GPT2Config.{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id"):
            if not is_int(getattr(self, name)):
                raise UserError(f"GPT2Config.{name} must be an integer token id, got {getattr(self, name)!r}")
        if self.pad_token_id is not None and not is_int(self.pad_token_id):
            raise UserError(f"GPT2Config.pad_token_id must be an integer token id or None, got {self.pad_token_id!r}")
        for name in ("use_cache", "output_hidden_states", "output_attentions", "return_dict", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise UserError(f"GPT2Config.{name} must be true or false, got {getattr(self, name)!r}")
        if self.is_encoder_decoder:
            raise UserError("GPT2Config.is_encoder_decoder: GPT-2 is a decoder only; it must be false")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise UserError(f"GPT2Config.matmul_precision={self.matmul_precision!r} is not one of "
                            f"{', '.join(map(repr, MATMUL_PRECISIONS))}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise UserError(f"GPT2Config.attention={self.attention!r} is not one of "
                            f"{', '.join(map(repr, ATTENTION_IMPLEMENTATIONS))}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise UserError(
                    f"GPT2Config.{name}={getattr(self, name)!r} is not a known dtype; use one of {', '.join(DTYPES)}"
                )

    def matmul_precision_context(self) -> Any:
        """The context in which this model's matmuls are traced (see `matmul_precision`). On CPUs float32
        matmuls are exact already, and asking for "highest" there cost ~8% of a small train step."""
        precision = self.matmul_precision
        if precision is None and self.dtype == "float32" and jax.default_backend() != "cpu":
            precision = "highest"
        return jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def compute_dtype(self) -> Any:
        return DTYPES[self.dtype]

    @property
    def storage_dtype(self) -> Any:
        return DTYPES[self.param_dtype]

    def num_parameters(self, exclude_position_embeddings: bool = False) -> int:
        """Parameters of the model (the tied LM head counted once), by hand from the shapes."""
        D, F = self.n_embd, self.inner_dim
        per_block = 2 * 2 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D)
        total = self.vocab_size * D + self.n_positions * D + self.n_layer * per_block + 2 * D
        return total - (self.n_positions * D if exclude_position_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), nanoGPT's and PaLM's estimate: 6 N for the
        weights (N without the position embedding, a lookup) plus 12 L D T for attention over T tokens."""
        return 6 * self.num_parameters(exclude_position_embeddings=True) + 12 * self.n_layer * self.n_embd * seq_len

    def replace(self, **changes: Any) -> GPT2Config:
        return dataclasses.replace(self, **{"extra": dict(self.extra), **changes})

    @classmethod
    def from_dict(cls, fields: dict[str, Any], **overrides: Any) -> GPT2Config:
        """From a dict holding (at least) GPT2Config's fields, e.g. a run's resolved `model` group; other
        keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in fields.items() if k in names}, **overrides})

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> GPT2Config:
        """One of the released sizes: gpt2, gpt2-medium, gpt2-large, gpt2-xl."""
        if size not in MODEL_SIZES:
            raise UserError(f"unknown model size {size!r}; use one of {', '.join(MODEL_SIZES)}")
        return cls(**{**MODEL_SIZES[size], **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """The fields of a Hugging Face GPT-2 `config.json` (the unknown ones it was read with too)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("param_dtype", "matmul_precision", "extra",
                     "attention", "gradient_checkpointing"):  # how this machine runs it, not part of the model
            fields.pop(name)
        compute_dtype = fields.pop("dtype")
        return {
            **self.extra,
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            **fields,
            **_UNSUPPORTED_HF_OPTIONS,
            "dtype": self.param_dtype,  # transformers' name for the dtype of the stored weights
            "gpt2jax": {"dtype": compute_dtype, "param_dtype": self.param_dtype,
                        "matmul_precision": self.matmul_precision},
        }

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], **overrides: Any) -> GPT2Config:
        """Build from a parsed Hugging Face `config.json`; fields GPT2Config does not have are kept in `extra`
        (but transformers' private ones, "_name_or_path", ...)."""
        model_type = data.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise UserError(f"config.json has model_type={model_type!r}; gpt2jax loads GPT-2 models only")
        for key, default in _UNSUPPORTED_HF_OPTIONS.items():
            if key in data and data[key] != default:
                raise UserError(f"config.json sets {key}={data[key]!r}; gpt2jax supports only {key}={default!r}")
        jax_fields = ("dtype", "param_dtype", "matmul_precision")
        names = {f.name for f in dataclasses.fields(cls)} - set(jax_fields) - {"attention", "extra"}
        fields = {k: v for k, v in data.items() if k in names}
        fields["extra"] = {k: v for k, v in data.items()
                           if k not in names and k not in _HF_OWN_KEYS and not k.startswith("_")}
        gpt2jax = data.get("gpt2jax") if isinstance(data.get("gpt2jax"), dict) else {}
        fields.update({k: v for k, v in gpt2jax.items() if k in jax_fields})
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> GPT2Config:
        from gpt2jax.rundir import read_json_object

        return cls.from_hf_dict(read_json_object(os.fspath(path), "a Hugging Face config.json"), **overrides)

    def save(self, directory: str | os.PathLike) -> str:
        """Write `config.json` into `directory`; return its path."""
        from gpt2jax.rundir import write_json

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "config.json")
        write_json(path, self.to_hf_dict())
        return path
