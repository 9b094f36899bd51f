"""GPT2Config, and the experiment configs that drive training.

`GPT2Config` uses Hugging Face field names plus the JAX dtype policy, and reads and writes
Hugging Face `config.json` files. Experiments are `experiments/*.py` files whose
`get_config()` returns an `ml_collections.ConfigDict` built on `base_config()`; the command
line overrides keys with `--config.GROUP.KEY=VALUE`.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import glob
import importlib.util
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from gpt2jax.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MATMUL_PRECISIONS = (None, "default", "high", "highest")
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyperparameters, named as in `transformers.GPT2Config`.

    Frozen and hashable, so a module holding it can be a static jit argument.
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
    # matmul precision: None means "highest" for float32 compute (GPUs and TPUs otherwise round float32
    # matmuls to tf32 / bf16 passes: 4e-3 logit error measured on an H200) and XLA's default for bfloat16
    matmul_precision: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `UserError` naming the first inconsistent field (types too: config.json may hold nulls)."""
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if not _is_int(getattr(self, name)) or getattr(self, name) <= 0:
                raise UserError(f"GPT2Config.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise UserError(f"GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_inner is not None and (not _is_int(self.n_inner) or self.n_inner <= 0):
            raise UserError(f"GPT2Config.n_inner must be a positive integer or None, got {self.n_inner!r}")
        if self.activation_function not in ACTIVATIONS:
            raise UserError(
                f"GPT2Config.activation_function={self.activation_function!r} is not supported; "
                f"use one of {', '.join(ACTIVATIONS)}"
            )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if not _is_number(getattr(self, name)) or not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"GPT2Config.{name} must be a number in [0, 1), got {getattr(self, name)!r}")
        for name in ("layer_norm_epsilon", "initializer_range"):
            if not _is_number(getattr(self, name)) or not 0.0 < getattr(self, name) < float("inf"):
                raise UserError(f"GPT2Config.{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("bos_token_id", "eos_token_id"):
            if not _is_int(getattr(self, name)):
                raise UserError(f"GPT2Config.{name} must be an integer token id, got {getattr(self, name)!r}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise UserError(f"GPT2Config.matmul_precision={self.matmul_precision!r} is not one of "
                            f"{', '.join(map(repr, MATMUL_PRECISIONS))}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise UserError(
                    f"GPT2Config.{name}={getattr(self, name)!r} is not a known dtype; use one of {', '.join(DTYPES)}"
                )

    def matmul_precision_context(self) -> Any:
        """The context in which this model's matmuls are traced (see `matmul_precision`)."""
        precision = self.matmul_precision or ("highest" if self.dtype == "float32" else None)
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
        return dataclasses.replace(self, **changes)

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
        """The fields of a Hugging Face GPT-2 `config.json`."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields.pop("param_dtype")
        fields.pop("matmul_precision")
        compute_dtype = fields.pop("dtype")
        return {
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
        """Build from a parsed Hugging Face `config.json`; unknown HF fields are ignored."""
        model_type = data.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise UserError(f"config.json has model_type={model_type!r}; gpt2jax loads GPT-2 models only")
        for key, default in _UNSUPPORTED_HF_OPTIONS.items():
            if key in data and data[key] != default:
                raise UserError(f"config.json sets {key}={data[key]!r}; gpt2jax supports only {key}={default!r}")
        jax_fields = ("dtype", "param_dtype", "matmul_precision")
        names = {f.name for f in dataclasses.fields(cls)} - set(jax_fields)
        fields = {k: v for k, v in data.items() if k in names}
        gpt2jax = data.get("gpt2jax") if isinstance(data.get("gpt2jax"), dict) else {}
        fields.update({k: v for k, v in gpt2jax.items() if k in jax_fields})
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> GPT2Config:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise UserError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(data, **overrides)

    def save(self, directory: str | os.PathLike) -> str:
        """Write `config.json` into `directory`; return its path."""
        from gpt2jax.rundir import write_json

        path = os.path.join(directory, "config.json")
        write_json(path, self.to_hf_dict())
        return path


# ---------------------------------------------------------------------------------------------
# Experiment configs: experiments/*.py define get_config() -> ml_collections.ConfigDict.


def base_config() -> ml_collections.ConfigDict:
    """Every key an experiment may set, with its default. Experiments start from this."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.size = ""  # "gpt2" | "gpt2-medium" | "gpt2-large" | "gpt2-xl" sets n_layer/n_head/n_embd; "" uses them
    c.model.vocab_size = config_dict.placeholder(int)  # None: the tokenizer's vocabulary size
    c.model.n_positions = 1024  # longest sequence the model accepts (tokens)
    c.model.n_embd = 768  # model width
    c.model.n_layer = 12  # transformer blocks
    c.model.n_head = 12  # attention heads
    c.model.n_inner = config_dict.placeholder(int)  # MLP width; None: 4 * n_embd
    c.model.activation_function = "gelu_new"  # MLP nonlinearity
    c.model.resid_pdrop = 0.0  # dropout after attention / MLP projections (probability)
    c.model.embd_pdrop = 0.0  # dropout on embeddings (probability)
    c.model.attn_pdrop = 0.0  # dropout on attention probabilities (probability)
    c.model.layer_norm_epsilon = 1e-5
    c.model.initializer_range = 0.02  # std of the normal init

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "pystdlib"  # "pystdlib", a local file / directory / glob, or a Hugging Face hub dataset name
    c.data.dataset_config = config_dict.placeholder(str)  # hub dataset config name, if it has several
    c.data.split = "train"  # hub split (or split expression) to read
    c.data.text_column = "text"  # column holding the text (.jsonl, .parquet, .arrow, hub)
    c.data.text_sample_by = "paragraph"  # .txt documents: "document" (a file), "paragraph" or "line"
    c.data.tokenizer = "gpt2"  # "gpt2", "byte", or a Hugging Face tokenizer directory
    c.data.block_size = 1024  # tokens per training sequence (T)
    c.data.val_fraction = 0.005  # share of documents held out for validation, by a stable hash of their text
    c.data.cache_dir = "~/.cache/gpt2jax/data"  # where token bins are kept, keyed by source + tokenizer + split
    c.data.num_proc = 2  # tokenizer worker processes

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 6e-4  # peak learning rate
    c.optim.min_lr = 6e-5  # learning rate at the end of the cosine decay
    c.optim.warmup_steps = 2000  # linear warmup from 0 (optimizer steps)
    c.optim.decay_steps = config_dict.placeholder(int)  # end of the cosine decay (steps); None: train.max_steps
    c.optim.weight_decay = 0.1  # decoupled (AdamW) decay, on 2-D weights only
    c.optim.beta1 = 0.9
    c.optim.beta2 = 0.95
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0  # global-norm clip; 0 turns it off

    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 512  # sequences per optimizer step, GLOBAL across devices, processes, accumulation
    c.train.grad_accum_steps = 1  # micro-batches per optimizer step (inside the step, scanned)
    c.train.max_steps = 600_000  # optimizer steps
    c.train.log_every = 10  # steps between train-metric logs (the only host syncs)
    c.train.eval_every = 1000  # steps between validation evals
    c.train.eval_batches = 20  # fixed validation batches (of global_batch_size / grad_accum_steps sequences)
    c.train.checkpoint_every = 1000  # steps between checkpoints
    c.train.sample_every = 1000  # steps between text samples in the logs; 0 turns them off
    c.train.sample_prompt = "\n"  # prompt of those samples
    c.train.sample_tokens = 64  # new tokens per sample
    c.train.seed = 0  # params init, data order and dropout
    c.train.compute_dtype = "float32"  # "float32" or "bfloat16" (params and optimizer state stay float32)
    c.train.keep_checkpoints = 3  # latest checkpoints kept
    c.train.keep_best = 1  # best-by-val-loss checkpoints kept besides those

    c.init_from = "scratch"  # "scratch", a Hugging Face directory, or a run directory (fine-tuning)
    return c


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Import `path`, call its get_config(), apply `--config.KEY=VALUE` overrides, lock and return it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such experiment file")
    spec = importlib.util.spec_from_file_location(f"gpt2jax_experiment_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"{path}: failed to import ({type(e).__name__}: {e})") from None
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"{path}: defines no get_config()")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    config.lock()
    for override in overrides:
        apply_override(config, override)
    return config


def _dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        keys += _dotted_keys(value, name + ".") if isinstance(value, ml_collections.ConfigDict) else [name]
    return keys


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Set one `--config.a.b=value` (or `config.a.b=value`); the value must fit the key's type."""
    text = override.removeprefix("--").removeprefix("config.")
    key, sep, raw = text.partition("=")
    if not sep:
        raise UserError(f"override {override!r} is not of the form --config.KEY=VALUE")
    known = _dotted_keys(config)
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UserError(f"unknown config key {key!r}{hint}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare string
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    if isinstance(node[leaf], str) and not isinstance(value, str):
        value = raw  # "--config.data.dataset=123" is still a string key
    try:
        node[leaf] = value
    except TypeError:
        raise UserError(f"--config.{key}={raw}: expected {type(node[leaf]).__name__}, got {raw!r}") from None


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}: config JSON as dotted keys."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def model_config(config: ml_collections.ConfigDict, vocab_size: int, eos_token_id: int) -> GPT2Config:
    """The GPT2Config an experiment describes; vocab_size (when unset) and EOS come from the tokenizer."""
    m = config.model
    fields = {name: m[name] for name in m.keys() if name != "size"}
    if m.size:
        fields.update(MODEL_SIZES[m.size])
    if fields["vocab_size"] is None:
        fields["vocab_size"] = vocab_size
    return GPT2Config(**fields, dtype=config.train.compute_dtype, bos_token_id=eos_token_id, eos_token_id=eos_token_id)


# Keys whose change does not alter what a run computes: a run may resume with them changed.
RESUME_SAFE_KEYS = {
    "data.cache_dir", "data.num_proc", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.sample_every", "train.sample_prompt", "train.sample_tokens", "train.keep_checkpoints", "train.keep_best",
}


def validate_experiment(config: ml_collections.ConfigDict, device_count: int) -> None:
    """Raise UserError for the first inconsistent setting, before anything compiles."""
    m, d, o, t = config.model, config.data, config.optim, config.train
    if m.size and m.size not in MODEL_SIZES:
        raise UserError(f"model.size={m.size!r} is not one of {', '.join(MODEL_SIZES)} (or '' for explicit sizes)")
    n_embd, n_head = (MODEL_SIZES[m.size]["n_embd"], MODEL_SIZES[m.size]["n_head"]) if m.size else (m.n_embd, m.n_head)
    if n_head <= 0 or n_embd % n_head:
        raise UserError(f"model.n_embd={n_embd} is not divisible by model.n_head={n_head}")
    if t.compute_dtype not in DTYPES:
        raise UserError(f"train.compute_dtype={t.compute_dtype!r} is not one of {', '.join(DTYPES)}")
    positive = {"data.block_size": d.block_size, "model.n_positions": m.n_positions, "train.max_steps": t.max_steps,
                "train.global_batch_size": t.global_batch_size, "train.grad_accum_steps": t.grad_accum_steps,
                "train.log_every": t.log_every, "train.eval_every": t.eval_every, "train.eval_batches": t.eval_batches,
                "train.checkpoint_every": t.checkpoint_every, "optim.lr": o.lr, "train.keep_checkpoints": t.keep_checkpoints}
    for name, value in positive.items():
        if not value > 0:
            raise UserError(f"{name} must be positive, got {value}")
    non_negative = {"optim.min_lr": o.min_lr, "optim.warmup_steps": o.warmup_steps, "optim.weight_decay": o.weight_decay,
                    "optim.grad_clip": o.grad_clip, "train.sample_every": t.sample_every, "train.keep_best": t.keep_best}
    for name, value in non_negative.items():
        if value < 0:
            raise UserError(f"{name} must be >= 0, got {value}")
    for name, value in {"optim.beta1": o.beta1, "optim.beta2": o.beta2}.items():
        if not 0.0 <= value < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {value}")
    if o.decay_steps is not None and o.decay_steps < o.warmup_steps:
        raise UserError(f"optim.decay_steps={o.decay_steps} is shorter than optim.warmup_steps={o.warmup_steps}")
    if d.block_size > m.n_positions:
        raise UserError(f"data.block_size={d.block_size} exceeds model.n_positions={m.n_positions}")
    if t.global_batch_size % (device_count * t.grad_accum_steps):
        raise UserError(f"train.global_batch_size={t.global_batch_size} is not divisible by {device_count} devices x "
                        f"train.grad_accum_steps={t.grad_accum_steps}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if d.dataset != "pystdlib" and d.dataset.startswith((".", "/", "~")) and not glob.glob(os.path.expanduser(d.dataset)):
        raise UserError(f"data.dataset={d.dataset!r}: no such file or directory")
    if config.init_from != "scratch" and not os.path.isdir(os.path.expanduser(config.init_from)):
        raise UserError(f"init_from={config.init_from!r}: not 'scratch' and not a directory")
