"""`gpt2jax bench`: forward, decode and train-step throughput of this machine, with MFU.

No peer here (the package never imports torch); scripts/bench_*.py measure against transformers
in the same run. MFU is against the datasheet peak of known accelerators (`gpt2jax.perf`), else
against a matmul measured now in the compute dtype on one device; the header says which.
"""

from __future__ import annotations

import jax
import numpy as np

from gpt2jax import perf
from gpt2jax.config import GPT2Config, base_config
from gpt2jax.model import GPT2LMHeadModule
from gpt2jax.modeling import GPT2LMHeadModel
from gpt2jax.train import init_state, make_optimizer, pmapped_steps, replicate, shard_batch


def run_bench(size: str, dtype: str, what: list[str], batch: int, seq: int, new_tokens: int, repeats: int) -> None:
    config = GPT2Config.from_size(size, dtype=dtype, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config, seed=0)
    flops_per_token = config.flops_per_token(seq)
    kind = jax.devices()[0].device_kind
    peak, source = perf.datasheet_peak(kind), "datasheet"
    if peak is None:  # 4096^3 takes seconds on a CPU
        peak, source = perf.matmul_peak(dtype, n=2048 if jax.default_backend() == "cpu" else 4096), "measured matmul"
    devices = jax.local_device_count()
    print(f"{size} ({model.num_parameters() / 1e6:.1f}M) {dtype}; jax {jax.__version__}, {devices} x {kind}; "
          f"{source} peak {peak / 1e12:.2f} TFLOP/s per device")
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
    if "forward" in what:
        forward = jax.jit(lambda params, x: model.module.apply({"params": params}, x)[0])
        seconds = perf.median_seconds(lambda: forward(model.params, ids[:, :-1]), repeats)
        print(f"  forward {batch}x{seq}: {batch * seq / seconds:,.0f} tok/s "
              f"(MFU {perf.mfu(batch * seq / seconds, flops_per_token / 3, peak):.0%})")
    if "decode" in what:
        prompt = ids[:, :32]
        seconds = perf.median_seconds(lambda: model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=-1), repeats)
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

        seconds = perf.median_seconds(step, repeats)
        tokens = devices * batch * seq
        print(f"  train step {devices}x{batch}x{seq}: {tokens / seconds:,.0f} tok/s "
              f"(MFU {perf.mfu(tokens / seconds, flops_per_token, peak * devices):.0%})")
