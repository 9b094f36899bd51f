"""Experiment configs: the schema, command-line overrides, validation, and resolution to a GPT2Config.

`experiments/*.py` files define `get_config()` returning an `ml_collections.ConfigDict` built on
`base_config()`; the command line overrides keys with `--config.GROUP.KEY=VALUE` (or
`--config.GROUP.KEY VALUE`). `validate_experiment` rejects every inconsistent setting before
anything compiles; `experiment_model` and `resolve` turn the config into the model that runs and
the resolved config a run directory records.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import glob
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections
import numpy as np
from ml_collections import config_dict

from gpt2jax import rundir
from gpt2jax.config import ARCHITECTURE, DTYPES, MODEL_SIZES, RUNTIME_FIELDS, GPT2Config, check_int_range
from gpt2jax.errors import UserError
from gpt2jax.sources import FORMATS


def base_config() -> ml_collections.ConfigDict:
    """Every key an experiment may set, with its default. Experiments start from this."""
    c = ml_collections.ConfigDict()

    # The model group is GPT2Config's fields (their meaning and units are commented there, gpt2jax/config.py),
    # so a field added to GPT2Config is an experiment key at once; `size` picks a released shape.
    c.model = model_group()

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "pystdlib"  # "pystdlib", a local file / directory / glob, or a Hugging Face hub dataset name
    c.data.dataset_config = config_dict.placeholder(str)  # hub dataset config name, if it has several
    c.data.split = "train"  # hub split (or split expression) to read
    c.data.format = "text"  # "text": documents, every token counted; "prompt_completion": task examples (below)
    c.data.text_column = "text"  # column holding the text (.jsonl, .parquet, .arrow, hub)
    c.data.prompt_column = "prompt"  # prompt_completion: the column of prompts (not counted in the loss)
    c.data.completion_column = "completion"  # prompt_completion: the column of completions (the loss counts these)
    c.data.packing = True  # prompt_completion: several examples per row, each attending to itself; False: one, padded
    c.data.text_sample_by = "paragraph"  # .txt documents: "document" (a file), "paragraph" or "line"
    c.data.tokenizer = "gpt2"  # "gpt2", "byte", or a Hugging Face tokenizer directory
    c.data.block_size = 1024  # tokens per training sequence (T)
    c.data.val_fraction = 0.005  # share of documents held out for validation, by a stable hash of their text
    c.data.cache_dir = "~/.cache/gpt2jax/data"  # where token bins are kept, keyed by source + tokenizer + split
    c.data.num_proc = 2  # tokenizer threads (tiktoken runs without the GIL; nothing is forked)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 6e-4  # peak learning rate
    c.optim.min_lr = 6e-5  # learning rate at the end of the cosine decay
    c.optim.warmup_steps = 2000  # linear warmup from 0 (optimizer steps)
    c.optim.decay_steps = config_dict.placeholder(int)  # end of the cosine decay (steps); None: train.max_steps
    c.optim.weight_decay = 0.1  # decoupled (AdamW) decay, on 2-D weights only
    c.optim.beta1 = 0.9  # Adam's decay of the gradient mean
    c.optim.beta2 = 0.95  # Adam's decay of the squared-gradient mean
    c.optim.eps = 1e-8  # Adam's denominator floor (> 0)
    c.optim.grad_clip = 1.0  # global-norm clip; 0 turns it off

    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 512  # sequences per optimizer step, GLOBAL across devices, processes, accumulation
    c.train.grad_accum_steps = 1  # micro-batches per optimizer step (inside the step, scanned)
    c.train.max_steps = 600_000  # optimizer steps
    c.train.log_every = 10  # steps between train-metric logs (host syncs: there, and at eval, sample and save)
    c.train.eval_every = 1000  # steps between validation evals
    c.train.eval_batches = 20  # fixed validation batches (of global_batch_size / grad_accum_steps sequences)
    c.train.checkpoint_every = 1000  # steps between checkpoints
    c.train.sample_every = 1000  # steps between text samples in the logs; 0 turns them off
    c.train.sample_prompt = "\n"  # prompt of those samples
    c.train.sample_tokens = 64  # new tokens per sample
    c.train.seed = 0  # params init, data order and dropout
    c.train.compute_dtype = "float32"  # "float32" or "bfloat16" (params and optimizer state stay float32)
    c.train.parallelism = "pmap"  # "pmap": state replicated on every device; "fsdp": sharded (gpt2jax/parallel.py)
    c.train.fsdp_size = config_dict.placeholder(int)  # fsdp: devices sharing one copy of the state; None: all
    c.train.keep_checkpoints = 3  # latest checkpoints kept
    c.train.keep_best = 1  # best-by-val-loss checkpoints kept besides those

    c.init_from = "scratch"  # "scratch", a Hugging Face directory, or a run directory (fine-tuning)
    return c


# GPT2Config fields that are not experiment keys: the compute dtype is train.compute_dtype, BOS / EOS come from
# the tokenizer, and Hugging Face's runtime fields are call defaults, not part of what a run computes.
# gradient_checkpointing is one of those runtime fields that an experiment sets (memory, not what is computed).
NOT_EXPERIMENT_KEYS = {"dtype", "bos_token_id", "eos_token_id", "extra", *RUNTIME_FIELDS} - {"gradient_checkpointing"}
# Where an experiment's default differs from GPT2Config's: the tokenizer's vocabulary, and no dropout (nanoGPT's
# pretraining default; fine-tuning experiments set it).
EXPERIMENT_MODEL_DEFAULTS = {"vocab_size": None, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def model_group() -> ml_collections.ConfigDict:
    """The experiment's `model` group, derived from GPT2Config's fields (None defaults become typed
    placeholders, so overrides are type-checked)."""
    group = ml_collections.ConfigDict()
    group.size = ""  # "gpt2" | "gpt2-medium" | "gpt2-large" | "gpt2-xl" sets n_layer/n_head/n_embd; "" uses them
    for field in dataclasses.fields(GPT2Config):
        if field.name in NOT_EXPERIMENT_KEYS:
            continue
        default = EXPERIMENT_MODEL_DEFAULTS.get(field.name, field.default)
        kind = {"int": int, "str": str, "float": float, "bool": bool}[str(field.type).split("|")[0].strip()]
        group[field.name] = config_dict.placeholder(kind) if default is None else default
    return group


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
    try:
        config = module.get_config()
    except Exception as e:
        raise UserError(f"{path}: get_config() failed ({type(e).__name__}: {e})") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    config.lock()
    for override in overrides:
        apply_override(config, override)
    return config


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Set one `--config.a.b=value` (or `config.a.b=value`); the value must fit the key's type."""
    text = override.removeprefix("--").removeprefix("config.")
    key, sep, raw = text.partition("=")
    if not sep:
        raise UserError(f"override {override!r} is not of the form --config.KEY=VALUE")
    known = list(rundir.flatten(config.to_dict()))
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
    if isinstance(value, bool) and node.get_type(leaf) in (int, float):
        raise UserError(f"--config.{key}={raw}: expected {node.get_type(leaf).__name__}, got a bool")
    try:
        node[leaf] = value
    except TypeError:
        raise UserError(f"--config.{key}={raw}: expected {type(node[leaf]).__name__}, got {raw!r}") from None


def model_config(config: ml_collections.ConfigDict, vocab_size: int, eos_token_id: int) -> GPT2Config:
    """The GPT2Config an experiment describes; vocab_size (when unset) and EOS come from the tokenizer."""
    m = config.model
    fields = {name: m[name] for name in m.keys() if name != "size"}
    if m.size:
        fields.update(MODEL_SIZES[m.size])
    if fields["vocab_size"] is None:
        fields["vocab_size"] = vocab_size
    return GPT2Config(**fields, dtype=config.train.compute_dtype, bos_token_id=eos_token_id, eos_token_id=eos_token_id)


PARALLELISMS = ("pmap", "fsdp")  # train.parallelism's values (gpt2jax/parallel.py)

# Keys whose change does not alter what a run computes: a run may resume with them changed.
RESUME_SAFE_KEYS = {
    "data.cache_dir", "data.num_proc", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.sample_every", "train.sample_prompt", "train.sample_tokens", "train.keep_checkpoints", "train.keep_best",
    "model.attention",  # how attention runs (a run moves between GPU, TPU and CPU), not what it computes
    "model.gradient_checkpointing",  # recomputes activations instead of keeping them: the same step
    "train.parallelism", "train.fsdp_size",  # how the state is laid out over devices: the same step
}


def validate_experiment(config: ml_collections.ConfigDict, device_count: int, resuming: str | None = None) -> None:
    """Raise UserError for the first inconsistent setting, before anything compiles. `resuming`: the run
    directory this config resumes, whose checkpoints hold everything its init_from gave it."""
    for name, value in rundir.flatten(config.to_dict()).items():
        check_int_range(name, value)
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
    largest = float(np.finfo(np.float32).max)  # the schedule and the optimizer run in float32
    for name, value in {"optim.lr": o.lr, "optim.min_lr": o.min_lr, "optim.weight_decay": o.weight_decay,
                        "optim.grad_clip": o.grad_clip, "optim.eps": o.eps}.items():
        if not abs(value) < largest:
            raise UserError(f"{name}={value} is not a finite float32 number")
    if not o.eps > 0:
        raise UserError(f"optim.eps must be > 0 (Adam divides by sqrt(v) + eps, and v is 0 for unused rows), got {o.eps}")
    if o.min_lr > o.lr:
        raise UserError(f"optim.min_lr={o.min_lr} exceeds optim.lr={o.lr}")
    if o.decay_steps is not None and o.decay_steps < o.warmup_steps:
        raise UserError(f"optim.decay_steps={o.decay_steps} is shorter than optim.warmup_steps={o.warmup_steps}")
    if d.block_size > m.n_positions:
        raise UserError(f"data.block_size={d.block_size} exceeds model.n_positions={m.n_positions}")
    if t.parallelism not in PARALLELISMS:
        raise UserError(f"train.parallelism={t.parallelism!r} is not one of {', '.join(map(repr, PARALLELISMS))}")
    if t.fsdp_size is not None:
        if t.parallelism != "fsdp":
            raise UserError(f"train.fsdp_size={t.fsdp_size} applies to train.parallelism='fsdp' (this run: "
                            f"{t.parallelism!r})")
        if t.fsdp_size < 1 or device_count % t.fsdp_size:
            raise UserError(f"train.fsdp_size={t.fsdp_size} does not divide the {device_count} devices")
    if t.global_batch_size % (device_count * t.grad_accum_steps):
        raise UserError(f"train.global_batch_size={t.global_batch_size} is not divisible by {device_count} devices x "
                        f"train.grad_accum_steps={t.grad_accum_steps}")
    if d.format not in FORMATS:
        raise UserError(f"data.format={d.format!r} is not one of {', '.join(map(repr, FORMATS))}")
    if not 0.0 <= d.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    if d.dataset != "pystdlib" and d.dataset.startswith((".", "/", "~")) and not glob.glob(os.path.expanduser(d.dataset)):
        raise UserError(f"data.dataset={d.dataset!r}: no such file or directory")
    if config.init_from != "scratch" and not os.path.isdir(os.path.expanduser(config.init_from)) and not resuming:
        raise UserError(f"init_from={config.init_from!r}: not 'scratch' and not a directory")


def resolve(config: ml_collections.ConfigDict, model: GPT2Config) -> dict[str, Any]:
    """The config as it runs (a run's config.json): model sizes and vocab filled in, decay_steps explicit."""
    resolved = json.loads(config.to_json())
    # the train group says how it computes; HF's runtime fields are call defaults, not part of an experiment
    left_out = {"dtype", "extra", *RUNTIME_FIELDS} - {"gradient_checkpointing"}
    resolved["model"].update({k: v for k, v in dataclasses.asdict(model).items() if k not in left_out})
    resolved["optim"]["decay_steps"] = config.optim.decay_steps or config.train.max_steps
    if isinstance(resolved["data"].get("cache_dir"), str) and resolved["data"]["cache_dir"].strip():
        # absolute: `eval --run` from another directory must find these bins, not tokenize into a new relative dir
        resolved["data"]["cache_dir"] = os.path.abspath(os.path.expanduser(resolved["data"]["cache_dir"]))
    return resolved


def experiment_model(config: ml_collections.ConfigDict, vocab_size: int, eos_token_id: int,
                     resuming: str | None = None) -> GPT2Config:
    """The model an experiment trains: its own shape, or for fine-tuning the shape of the model it starts
    from (when that directory is gone and the run resumes: the shape the run recorded); checked against the
    tokenizer's vocabulary and the block size."""
    model = model_config(config, vocab_size, eos_token_id)
    if config.init_from != "scratch":
        if resuming and not os.path.isdir(os.path.expanduser(config.init_from)):
            source = GPT2Config.from_dict(rundir.read_resolved_config(resuming)["model"])
        else:
            source = init_from_config(config.init_from)
        model = model.replace(**{k: getattr(source, k) for k in ARCHITECTURE})
    if model.vocab_size < vocab_size:
        whose = f"init_from={config.init_from}'s" if config.init_from != "scratch" else "model."
        raise UserError(f"{whose}vocab_size={model.vocab_size} is smaller than the {vocab_size} tokens of "
                        f"data.tokenizer={config.data.tokenizer!r}")
    if config.data.block_size > model.n_positions:
        raise UserError(f"data.block_size={config.data.block_size} exceeds the model's n_positions={model.n_positions}"
                        + (f" (from init_from={config.init_from})" if config.init_from != "scratch" else ""))
    return model


def init_from_config(path: str) -> GPT2Config:
    """The GPT2Config of an init_from directory: a run's resolved model group, or an HF config.json."""
    path = os.path.expanduser(path)
    if rundir.has_checkpoints(path):
        fields = rundir.read_resolved_config(path)["model"]
        return GPT2Config.from_dict(fields)
    return GPT2Config.from_json_file(os.path.join(path, "config.json"))
