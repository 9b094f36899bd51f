"""FLOP/s peaks and MFU: the one home of the numbers that the trainer and `gpt2jax bench` report.

MFU as nanoGPT, llm.c and MaxText report it: model FLOPs per token (`GPT2Config.flops_per_token`,
6 N + 12 L D T) x tokens per second / the peak of the chips doing the work. The peak is the
datasheet's dense bfloat16 figure for known accelerators; for anything else (CPUs) it is an
n x n x n matmul measured on the spot, and the source is reported next to the number.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
import warnings
from typing import Callable

import jax
import jax.numpy as jnp

# Dense bfloat16 peak of one chip, FLOP/s, by a substring of `device.device_kind`; first match wins.
DATASHEET_PEAKS = (
    ("H100 PCIe", 756e12),
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("V100", 125e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v6", 918e12),
)


@dataclasses.dataclass(frozen=True)
class Peak:
    flops_per_second: float  # of one chip (one host for CPUs)
    source: str  # "datasheet" or "measured"


def datasheet_peak(device_kind: str) -> float | None:
    for name, peak in DATASHEET_PEAKS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of `run()` (results waited for), after one untimed call that compiles."""
    return statistics.median(_wall_times(run, repeats))


def fastest_seconds(run: Callable[[], object], repeats: int) -> float:
    """Shortest wall time of `run()` (results waited for), after one untimed call that compiles."""
    return min(_wall_times(run, repeats))


def _wall_times(run: Callable[[], object], repeats: int) -> list[float]:
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return times


def matmul_peak(dtype: str = "float32", n: int = 1024) -> float:
    """FLOP/s of an n x n x n matmul on the first device: the fastest of 7 after compiling. A peak is the best the
    device does; a median taken while other work shares the cores reads low, and MFU against it can pass 100%."""
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x: x @ x)
    return 2 * n**3 / fastest_seconds(lambda: matmul(a), 7)


def device_peak(measure_n: int = 1024) -> Peak:
    """Peak of one chip: the datasheet for known accelerators, else a float32 matmul measured now."""
    peak = datasheet_peak(jax.devices()[0].device_kind)
    if peak is not None:
        return Peak(peak, "datasheet")
    return Peak(matmul_peak("float32", n=measure_n), "measured")


def chips() -> int:
    """What the peak multiplies by: every device of an accelerator run; one per host on CPU (a host's
    CPU devices share its cores)."""
    return jax.device_count() if jax.default_backend() != "cpu" else jax.process_count()


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak (of all chips counted)."""
    return tokens_per_s * flops_per_token / peak_flops_per_second


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache, so a second `gpt2jax sample` or `train` of the same
    shapes reads its executables instead of compiling them again. `GPT2JAX_COMPILATION_CACHE` names the
    directory (default ~/.cache/gpt2jax/jax); "off" turns it off. Returns the directory, or None."""
    setting = os.environ.get("GPT2JAX_COMPILATION_CACHE", "~/.cache/gpt2jax/jax")
    if setting.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    directory = os.path.expanduser(setting)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:  # an unusable cache is no reason to fail: it only costs compile time
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # the same holds for an entry that cannot be written (a full disk): the cache is skipped, not the command
    warnings.filterwarnings("ignore", message="Error (writing|reading) persistent compilation cache entry")
    return directory


def device_memory() -> tuple[int, str]:
    """(bytes, what) one local device can hold: its allocator's limit on GPUs and TPUs, this machine's RAM
    shared by its CPU devices on CPUs."""
    device = jax.local_devices()[0]
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # CPU clients may not implement memory_stats
        limit = None
    if limit:
        return int(limit), f"{device.device_kind}'s {limit / 2**30:.1f} GiB"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    share = ram // jax.local_device_count()
    return share, f"{share / 2**30:.1f} GiB of this machine's RAM per CPU device"


def estimate_memory(config, batch_per_device: int, seq_len: int, train: bool, state_shards: int = 1) -> int:
    """Bytes a step needs on one device, from the config alone (a lower estimate: XLA's temporaries come on
    top): the parameters, with training their gradients and Adam's two float32 moments (split over
    `state_shards` devices under fsdp, plus one layer's weights gathered whole), and the activations, after
    Korthikanti et al. (2022): per layer and token (34 D + 5 H T) half-precision bytes kept for the backward
    pass, doubled for float32 (with gradient checkpointing only each block's input is kept, and one block's
    activations are recomputed at a time), plus the float32 logits and their gradient; without training one
    layer's activations at a time."""
    params = config.num_parameters()
    size = jnp.dtype(config.compute_dtype).itemsize
    storage = jnp.dtype(config.storage_dtype).itemsize
    weights = params * storage + (params * (4 + 8) if train else 0)
    if state_shards > 1:
        weights = -(-weights // state_shards) + 12 * config.n_embd**2 * storage  # a block's weights, gathered
    tokens = batch_per_device * seq_len
    per_layer = tokens * (34 * config.n_embd + 5 * config.n_head * seq_len) * size // 2
    logits = tokens * config.vocab_size * 4 * (2 if train else 1)
    if not train:
        return weights + per_layer + logits
    if config.gradient_checkpointing:
        return weights + config.n_layer * tokens * config.n_embd * size + per_layer + logits
    return weights + config.n_layer * per_layer + logits


def check_fits(config, batch_per_device: int, seq_len: int, train: bool, what: str, state_shards: int = 1) -> None:
    """A `UserError` in one line, before anything is allocated or written, when `what` cannot fit one
    device by `estimate_memory`."""
    from gpt2jax.errors import UserError

    needed = estimate_memory(config, batch_per_device, seq_len, train, state_shards)
    available, described = device_memory()
    if needed > available:
        raise UserError(f"{what} needs at least {needed / 2**30:,.1f} GiB per device ({config.num_parameters():,} "
                        f"parameters, {batch_per_device} x {seq_len} tokens per device), more than {described}; "
                        "make the model or the batch smaller (or use more devices, gradient accumulation, "
                        "train.parallelism='fsdp' or model.gradient_checkpointing=True)")
