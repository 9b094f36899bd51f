"""Forward-pass throughput: gpt2jax vs transformers' PyTorch GPT-2 on the same weights, same run.

    python scripts/bench_forward.py [--size gpt2] [--shapes 1x256 8x128] [--repeats 10]

Both run fp32 on the CPU (or jax on whatever device it has; torch stays on the CPU).
Measurements alternate between the two so machine noise hits both; the ratio of medians is
the figure to quote. Needs the reference extra.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from bench_pair import same_weights_pair, versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="gpt2", help="gpt2, gpt2-medium, gpt2-large or gpt2-xl")
    parser.add_argument("--shapes", nargs="+", default=["1x256", "8x128"], help="BATCHxTIME")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    ours, reference = same_weights_pair(args.size)
    config = ours.config
    forward = jax.jit(lambda params, ids: ours.module.apply({"params": params}, ids)[0])
    print(f"{args.size}: {ours.num_parameters() / 1e6:.1f}M parameters; {versions()}")
    for shape in args.shapes:
        batch, time_steps = map(int, shape.split("x"))
        ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, time_steps))
        ids_jax, ids_torch = jnp.asarray(ids, jnp.int32), torch.as_tensor(ids)
        with torch.inference_mode():
            diff = np.abs(np.asarray(forward(ours.params, ids_jax)) - reference(ids_torch).logits.numpy()).max()
            ours_s, ref_s = [], []
            for _ in range(args.repeats):
                start = time.perf_counter()
                forward(ours.params, ids_jax).block_until_ready()
                ours_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                reference(ids_torch)
                ref_s.append(time.perf_counter() - start)
        tokens = batch * time_steps
        ours_med, ref_med = statistics.median(ours_s), statistics.median(ref_s)
        print(f"  {shape}: gpt2jax {tokens / ours_med:8.0f} tok/s ({ours_med * 1e3:7.1f} ms)  "
              f"transformers {tokens / ref_med:8.0f} tok/s ({ref_med * 1e3:7.1f} ms)  "
              f"ratio {ref_med / ours_med:.2f}x  max|dlogits| {diff:.1e}")


if __name__ == "__main__":
    main()
