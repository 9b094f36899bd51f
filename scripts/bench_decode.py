"""Decode throughput: gpt2jax `generate` vs transformers' PyTorch `generate` (KV cache), same weights, same run.

    python scripts/bench_decode.py [--size gpt2] [--batches 1 8] [--prompt 32] [--new 128] [--repeats 3] [--beams 4]

Greedy, fp32, EOS disabled so every run makes exactly --new tokens. Timings alternate between
the two implementations; tokens/s counts new tokens of all rows. Needs the reference extra.
"""

import argparse
import statistics
import time

import numpy as np
import torch
from bench_pair import same_weights_pair, versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="gpt2")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beams", type=int, default=1, help="> 1: beam search with this many beams (both)")
    args = parser.parse_args()

    ours, reference = same_weights_pair(args.size)
    config = ours.config
    reference.generation_config.eos_token_id = None
    search = f"beam search of {args.beams}" if args.beams > 1 else "greedy"
    beams = dict(num_beams=args.beams) if args.beams > 1 else {}
    print(f"{args.size}, prompt {args.prompt}, {args.new} new tokens, {search} fp32; {versions()}")
    for batch in args.batches:
        ids = np.random.default_rng(batch).integers(0, config.vocab_size, (batch, args.prompt))
        run_ours = lambda: ours.generate(ids, max_new_tokens=args.new, eos_token_id=-1, pad_token_id=0, **beams)
        ids_torch = torch.as_tensor(ids)

        def run_reference():
            with torch.inference_mode():
                return reference.generate(
                    ids_torch, attention_mask=torch.ones_like(ids_torch), max_new_tokens=args.new,
                    min_new_tokens=args.new, do_sample=False, pad_token_id=0, **beams,
                ).numpy()

        start = time.perf_counter()
        first = run_ours()
        compile_s = time.perf_counter() - start
        agree = np.mean(first[:, args.prompt:] == run_reference()[:, args.prompt:])
        ours_s, ref_s = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run_ours()
            ours_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            run_reference()
            ref_s.append(time.perf_counter() - start)
        new_tokens = batch * args.new
        ours_tps, ref_tps = new_tokens / statistics.median(ours_s), new_tokens / statistics.median(ref_s)
        print(f"  batch {batch}: gpt2jax {ours_tps:7.1f} tok/s  transformers {ref_tps:7.1f} tok/s  "
              f"ratio {ours_tps / ref_tps:.2f}x  (first call incl. compile {compile_s:.1f} s; "
              f"{search} tokens agree {agree:.0%})")


if __name__ == "__main__":
    main()
