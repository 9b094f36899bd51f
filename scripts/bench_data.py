"""Data throughput: `prepare` on pystdlib vs a plain tiktoken loop, and the batch sampler.

    python scripts/bench_data.py [--num-proc 2] [--batch 16] [--block 1024]

Prepare runs into a fresh temporary cache (so it really tokenizes) with the GPT-2 BPE; the peer
is a single-process loop calling tiktoken's `encode` on the same documents and writing one
uint16 file. The sampler figure is batches/s for (batch, block) windows, the per-host shape of a
124M run, from the memory-mapped train.bin.
"""

import argparse
import tempfile
import time

import numpy as np

from gpt2jax import data, sources
from gpt2jax.batches import BatchSampler
from gpt2jax.experiment import base_config
from gpt2jax.tokenizer import GPT2Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=1024)
    args = parser.parse_args()

    documents = sources.pystdlib_documents()
    megabytes = sum(len(d.encode("utf-8")) for d in documents) / 1e6
    encoding = GPT2Tokenizer.from_pretrained("gpt2")._encoding
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with open(f"{tmp}/plain.bin", "wb") as f:
            for doc in sources.pystdlib_documents():
                np.asarray(encoding.encode(doc, allowed_special="all") + [50256], np.uint16).tofile(f)
        plain_s = time.perf_counter() - start

        config = base_config().data
        config.cache_dir, config.num_proc, config.tokenizer = tmp, args.num_proc, "gpt2"
        start = time.perf_counter()
        bins = data.prepare(config, progress=False)
        prepare_s = time.perf_counter() - start
        print(f"pystdlib {megabytes:.1f} MB, {bins.num_tokens('train') + bins.num_tokens('val'):,} tokens")
        print(f"  prepare (num_proc={args.num_proc}): {megabytes / prepare_s:5.2f} MB/s ({prepare_s:.1f} s)")
        print(f"  plain tiktoken loop:        {megabytes / plain_s:5.2f} MB/s ({plain_s:.1f} s)  "
              f"ratio {plain_s / prepare_s:.2f}x")

        sampler = BatchSampler(bins.tokens("train"), args.block, args.batch, seed=0)
        sampler(0)
        start, steps = time.perf_counter(), 200
        for step in range(steps):
            sampler(step)
        rate = steps / (time.perf_counter() - start)
        print(f"  sampler {args.batch}x{args.block}: {rate:,.0f} batches/s ({rate * args.batch * args.block / 1e6:.1f}M "
              "tokens/s)")


if __name__ == "__main__":
    main()
