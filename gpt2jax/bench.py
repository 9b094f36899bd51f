"""`gpt2jax bench`: forward, decode and train-step throughput of this machine, with MFU.

No peer here (the package never imports torch); scripts/bench_*.py measure against transformers
in the same run. MFU is against the datasheet peak of known accelerators (`gpt2jax.perf`), else
against a matmul measured now in the compute dtype on one device; the header says which.
"""

from __future__ import annotations

import itertools
import time

import jax
import numpy as np

from gpt2jax import attention, perf
from gpt2jax.config import GPT2Config
from gpt2jax.experiment import base_config
from gpt2jax.model import GPT2LMHeadModule
from gpt2jax.modeling import GPT2LMHeadModel
from gpt2jax.train import init_state, make_optimizer, pmapped_steps, replicate, shard_batch


def run_bench(size: str, dtypes: list[str], attentions: list[str], what: list[str], batches: list[int], seq: int,
              new_tokens: int, repeats: int) -> None:
    """Print forward and train-step throughput (each dtype, attention implementation and batch) and decode
    throughput with the first call's time (compile included) for each dtype and batch."""
    kind = jax.devices()[0].device_kind
    print(f"{size}; jax {jax.__version__}, {jax.local_device_count()} x {kind}")
    for dtype, implementation in itertools.product(dtypes, attentions):
        config = GPT2Config.from_size(size, dtype=dtype, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      attention=implementation)
        runs = attention.check(config, attention.current_platform(), seq, train=False)
        for batch in batches:
            perf.check_fits(config, batch, seq, train="train" in what, what=f"bench --batch {batch}")
        model = GPT2LMHeadModel(config, seed=0)
        peak, source = perf.datasheet_peak(kind), "datasheet"
        if peak is None and ("forward" in what or "train" in what):  # 4096^3 takes seconds on a CPU
            peak, source = perf.matmul_peak(dtype, n=2048 if jax.default_backend() == "cpu" else 4096), "measured"
        print(f"{size} ({model.num_parameters() / 1e6:.1f}M) {dtype}, attention={implementation}" +
              (f"; {source} peak {peak / 1e12:.2f} TFLOP/s per device" if peak else "") +
              f"; {attention.describe(*runs)}")
        for batch in batches:
            ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
            if "forward" in what:
                bench_forward(model, ids, repeats, peak)
            if "decode" in what:
                bench_decode(model, ids[:, :32], new_tokens, repeats)
            if "train" in what:
                bench_train(model, ids, repeats, peak)


def bench_forward(model: GPT2LMHeadModel, ids: np.ndarray, repeats: int, peak: float) -> None:
    (batch, seq_plus_one), flops = ids.shape, model.config.flops_per_token(ids.shape[1] - 1) / 3  # forward only
    forward = jax.jit(lambda params, x: model.module.apply({"params": params}, x)[0])
    seconds = perf.median_seconds(lambda: forward(model.params, ids[:, :-1]), repeats)
    tokens_per_s = batch * (seq_plus_one - 1) / seconds
    print(f"  forward {batch}x{seq_plus_one - 1}: {tokens_per_s:,.0f} tok/s (MFU {perf.mfu(tokens_per_s, flops, peak):.0%})")


def bench_decode(model: GPT2LMHeadModel, prompt: np.ndarray, new_tokens: int, repeats: int) -> None:
    """Greedy, EOS off; the first call compiles (or reads the persistent compilation cache)."""
    generate = lambda: model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=-1)
    start = time.perf_counter()
    generate()
    first = time.perf_counter() - start
    seconds = perf.median_seconds(generate, repeats)
    batch = prompt.shape[0]
    print(f"  decode batch {batch}, {prompt.shape[1]}-token prompt, {new_tokens} new: "
          f"{batch * new_tokens / seconds:,.1f} tok/s (first call {first:.1f} s)")


def bench_train(model: GPT2LMHeadModel, ids: np.ndarray, repeats: int, peak: float) -> None:
    """The trainer's pmapped step (AdamW, clipping) on random tokens, one copy of the batch per device."""
    devices, (batch, seq_plus_one) = jax.local_device_count(), ids.shape
    optimizer, schedule = make_optimizer(base_config().optim, 1000)
    p_train, _ = pmapped_steps(GPT2LMHeadModule(model.config), optimizer, schedule, 1, dropout=False)
    holder = {"state": replicate(init_state(model.params, optimizer, seed=0))}
    windows = np.tile(ids, (devices, 1)).reshape(devices, batch, seq_plus_one)
    device_batch = shard_batch({"inputs": windows[..., :-1], "targets": windows[..., 1:]})

    def step():
        holder["state"], metrics = p_train(holder["state"], device_batch)
        return holder["state"], metrics

    tokens_per_s = devices * batch * (seq_plus_one - 1) / perf.median_seconds(step, repeats)
    flops = model.config.flops_per_token(seq_plus_one - 1)
    print(f"  train step {devices}x{batch}x{seq_plus_one - 1}: {tokens_per_s:,.0f} tok/s "
          f"(MFU {perf.mfu(tokens_per_s, flops, peak * devices):.0%})")
