"""`gpt2jax bench`: forward, decode and train-step throughput of this machine, with MFU, and the memory a
train step needs per device under each placement of the state (`--what memory`, nothing allocated).

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
from gpt2jax.model import GPT2LMHeadModule, init_params
from gpt2jax.modeling import GPT2LMHeadModel
from gpt2jax.parallel import gigabytes, make_layout
from gpt2jax.train import init_state, make_optimizer


def run_bench(size: str, dtypes: list[str], attentions: list[str], what: list[str], batches: list[int], seq: int,
              new_tokens: int, repeats: int, parallelisms: tuple[str, ...] = ("pmap",),
              gradient_checkpointing: bool = False) -> None:
    """Print forward and train-step throughput (each dtype, attention implementation, batch and placement of
    the train state), decode throughput with the first call's time (compile included) for each dtype and
    batch, and the memory of a train step per device (each placement)."""
    kind = jax.devices()[0].device_kind
    print(f"{size}; jax {jax.__version__}, {jax.local_device_count()} x {kind}")
    for dtype, implementation in itertools.product(dtypes, attentions):
        config = GPT2Config.from_size(size, dtype=dtype, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      attention=implementation, gradient_checkpointing=gradient_checkpointing)
        runs = attention.check(config, attention.current_platform(), seq, train=False)
        if "memory" in what:
            for batch, parallelism in itertools.product(batches, parallelisms):
                bench_memory(config, batch, seq, parallelism)
        if what == ["memory"]:
            continue
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
                for parallelism in parallelisms:
                    bench_train(model, ids, repeats, peak, parallelism)


def bench_forward(model: GPT2LMHeadModel, ids: np.ndarray, repeats: int, peak: float) -> None:
    (batch, seq_plus_one), flops = ids.shape, model.config.flops_per_token(ids.shape[1] - 1) / 3  # forward only
    forward = jax.jit(lambda params, x: model.module.apply({"params": params}, x)[0])
    seconds = perf.median_seconds(lambda: forward(model.params, ids[:, :-1]), repeats)
    tokens_per_s = batch * (seq_plus_one - 1) / seconds
    print(f"  forward {batch}x{seq_plus_one - 1}: {tokens_per_s:,.0f} tok/s (MFU {perf.mfu(tokens_per_s, flops, peak):.0%})")


def bench_decode(model: GPT2LMHeadModel, prompt: np.ndarray, new_tokens: int, repeats: int) -> None:
    """Greedy, EOS off, and for a batch of 1 also a beam search of 4 beams; the first call compiles (or reads
    the persistent compilation cache). tok/s counts the new tokens of the rows returned (beams: one per
    prompt, the best)."""
    searches = [("", {})] + ([(", 4 beams", {"num_beams": 4})] if prompt.shape[0] == 1 else [])
    for label, options in searches:
        generate = lambda: model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=-1, **options)
        start = time.perf_counter()
        generate()
        first = time.perf_counter() - start
        seconds = perf.median_seconds(generate, repeats)
        batch = prompt.shape[0]
        print(f"  decode batch {batch}{label}, {prompt.shape[1]}-token prompt, {new_tokens} new: "
              f"{batch * new_tokens / seconds:,.1f} tok/s (first call {first:.1f} s)")


def bench_train(model: GPT2LMHeadModel, ids: np.ndarray, repeats: int, peak: float, parallelism: str = "pmap") -> None:
    """The trainer's step (AdamW, clipping) on random tokens, one copy of the batch per device, with the
    state laid out as `parallelism` says."""
    devices, (batch, seq_plus_one) = jax.device_count(), ids.shape
    optimizer, schedule = make_optimizer(base_config().optim, 1000)
    make_state = lambda: init_state(model.params, optimizer, seed=0)
    layout = make_layout(parallelism, None, GPT2LMHeadModule(model.config), optimizer, schedule, 1, False,
                         jax.eval_shape(make_state))
    holder = {"state": layout.initial_state(make_state)}
    windows = np.tile(ids, (devices, 1)).reshape(devices, batch, seq_plus_one)
    device_batch = layout.batch({"inputs": windows[..., :-1], "targets": windows[..., 1:]})

    def step():
        holder["state"], metrics = layout.train(holder["state"], device_batch)
        return holder["state"], metrics

    tokens_per_s = devices * batch * (seq_plus_one - 1) / perf.median_seconds(step, repeats)
    flops = model.config.flops_per_token(seq_plus_one - 1)
    print(f"  train step {devices}x{batch}x{seq_plus_one - 1} ({parallelism}): {tokens_per_s:,.0f} tok/s "
          f"(MFU {perf.mfu(tokens_per_s, flops, peak * perf.chips()):.0%})")


def memory_per_device(config: GPT2Config, batch: int, seq: int, parallelism: str,
                      compile: bool = True) -> dict[str, int | str]:
    """What one device holds for a train step of `batch` sequences per device under `parallelism`, from
    abstract shapes (nothing allocated): the parameters, Adam's moments and the gradients by their layout,
    and with `compile` the compiled step's peak by XLA's memory analysis (arguments + outputs - donated
    + temporaries)."""
    optimizer, schedule = make_optimizer(base_config().optim, 1000)
    abstract = jax.eval_shape(lambda: init_state(init_params(config, 0), optimizer, 0))
    layout = make_layout(parallelism, None, GPT2LMHeadModule(config), optimizer, schedule, 1, False, abstract)
    out: dict[str, int | str] = {"layout": layout.describe(abstract, config.num_parameters()),
                                 **layout.state_memory(abstract)}
    if compile:
        analysis = layout.lower(abstract, batch * jax.device_count(), seq).compile().memory_analysis()
        out["peak"] = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                       - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
    return out


def bench_memory(config: GPT2Config, batch: int, seq: int, parallelism: str) -> None:
    memory = memory_per_device(config, batch, seq, parallelism)
    print(f"  memory {jax.device_count()}x{batch}x{seq} ({parallelism}): {memory['layout']}: params "
          f"{gigabytes(memory['params'])}, Adam {gigabytes(memory['optimizer'])}, gradients "
          f"{gigabytes(memory['gradients'])}; compiled step peak {gigabytes(memory['peak'])} (XLA's memory analysis)")
