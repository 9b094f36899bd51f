"""The train step under fsdp against pmap, alternating in one process, on an experiment's shapes.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/bench_fsdp.py experiments/smoke.py
    python scripts/bench_fsdp.py experiments/pystdlib_char.py --steps 10 --rounds 3

Both steps take the experiment's model, global batch, block size and accumulation on random tokens; each
round times `--steps` steps of one placement, then of the other, and the ratio is of the medians (these
machines are noisy: compare in one run, never across runs).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from gpt2jax.experiment import load_config, model_config
from gpt2jax.model import GPT2LMHeadModule, init_params
from gpt2jax.parallel import make_layout
from gpt2jax.train import init_state, make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment")
    parser.add_argument("--vocab-size", type=int, default=257, help="the tokenizer's (257: byte)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    config = load_config(args.experiment)
    t = config.train
    model = model_config(config, args.vocab_size, args.vocab_size - 1)
    optimizer, schedule = make_optimizer(config.optim, t.max_steps)
    make_state = lambda: init_state(init_params(model, t.seed), optimizer, t.seed)
    abstract = jax.eval_shape(make_state)
    devices, block = jax.device_count(), config.data.block_size
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, (t.global_batch_size, block + 1))
    windows = tokens.astype(np.int32).reshape(devices, -1, block + 1)
    runs = {}
    for mode in ("pmap", "fsdp"):
        layout = make_layout(mode, None, GPT2LMHeadModule(model), optimizer, schedule, t.grad_accum_steps,
                             False, abstract)
        batch = layout.batch({"inputs": windows[..., :-1], "targets": windows[..., 1:]})
        state, _ = layout.train(layout.initial_state(make_state), batch)  # compiles
        runs[mode] = {"layout": layout, "batch": batch, "state": state, "times": []}
    for _ in range(args.rounds):
        for mode, run in runs.items():
            jax.block_until_ready(run["state"])
            start = time.perf_counter()
            for _ in range(args.steps):
                run["state"], metrics = run["layout"].train(run["state"], run["batch"])
            jax.block_until_ready(metrics)
            run["times"].append((time.perf_counter() - start) / args.steps)
    median = {mode: statistics.median(run["times"]) for mode, run in runs.items()}
    print(f"{args.experiment}: {model.num_parameters():,} params, {t.global_batch_size} x {block} tokens, "
          f"{t.grad_accum_steps} micro-steps, {devices} x {jax.devices()[0].device_kind}, jax {jax.__version__}")
    for mode, seconds in median.items():
        print(f"  {mode}: {seconds * 1e3:.1f} ms/step (median of {args.rounds} rounds of {args.steps})")
    print(f"  fsdp / pmap step time: {median['fsdp'] / median['pmap']:.2f}")


if __name__ == "__main__":
    main()
