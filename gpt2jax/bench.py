"""`gpt2jax bench`: forward, decode and train-step throughput of this machine, with MFU.

No peer here (the package never imports torch); scripts/bench_*.py measure against transformers
in the same run. MFU is against a matmul peak measured now, in the compute dtype, on one device.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax.config import GPT2Config, base_config
from gpt2jax.model import GPT2LMHeadModule
from gpt2jax.modeling import GPT2LMHeadModel
from gpt2jax.train import init_state, make_optimizer, pmapped_steps, replicate, shard_batch


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(run())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(dtype: str, n: int) -> float:
    """FLOP/s of an n x n x n matmul on the first device (median of 5 after compiling)."""
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x: x @ x)
    return 2 * n**3 / _median_seconds(lambda: matmul(a), 5)


def run_bench(size: str, dtype: str, what: list[str], batch: int, seq: int, new_tokens: int, repeats: int) -> None:
    config = GPT2Config.from_size(size, dtype=dtype, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config, seed=0)
    n_params = model.num_parameters() - config.n_positions * config.n_embd
    flops_per_token = 6 * n_params + 12 * config.n_layer * config.n_embd * seq
    peak = matmul_peak(dtype, n=2048 if jax.default_backend() == "cpu" else 4096)  # 4096^3 takes seconds on CPU
    devices = jax.local_device_count()
    print(f"{size} ({model.num_parameters() / 1e6:.1f}M) {dtype}; jax {jax.__version__}, {devices} x "
          f"{jax.devices()[0].device_kind}; matmul peak {peak / 1e12:.2f} TFLOP/s per device")
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
    if "forward" in what:
        forward = jax.jit(lambda params, x: model.module.apply({"params": params}, x)[0])
        seconds = _median_seconds(lambda: forward(model.params, ids[:, :-1]), repeats)
        print(f"  forward {batch}x{seq}: {batch * seq / seconds:,.0f} tok/s "
              f"(MFU {batch * seq / seconds * flops_per_token / 3 / peak:.0%})")
    if "decode" in what:
        prompt = ids[:, :32]
        seconds = _median_seconds(lambda: model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=-1), repeats)
        print(f"  decode batch {batch}, 32-token prompt, {new_tokens} new: {batch * new_tokens / seconds:,.1f} tok/s")
    if "train" in what:
        optimizer, schedule = make_optimizer(base_config().optim, 1000)
        p_train, _ = pmapped_steps(GPT2LMHeadModule(config), optimizer, schedule, 1, dropout=False)
        state = replicate(init_state(model.params, optimizer, seed=0))
        windows = np.tile(ids, (devices, 1)).reshape(devices, batch, seq + 1)
        device_batch = shard_batch({"inputs": windows[..., :-1], "targets": windows[..., 1:]})
        holder = {"state": state}

        def step():
            holder["state"], metrics = p_train(holder["state"], device_batch)
            return holder["state"], metrics

        seconds = _median_seconds(step, repeats)
        tokens = devices * batch * seq
        print(f"  train step {devices}x{batch}x{seq}: {tokens / seconds:,.0f} tok/s "
              f"(MFU {tokens / seconds * flops_per_token / (peak * devices):.0%})")
