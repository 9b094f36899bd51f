"""Checkpoint cost for GPT-2 124M with its AdamW state: save time, and the train-step cost of saving.

    python scripts/bench_checkpoint.py [--steps 6] [--every 2]

Saves the replicated state the way the trainer does (to_global + Orbax), blocking and async, into a
temporary directory; then runs --steps train steps (1 x 256 tokens, fp32) saving every --every steps
in each mode and reports the mean step time against the same steps without saving, in one run.
"""

import argparse
import tempfile
import time

import jax
import numpy as np

from gpt2jax.checkpoint import Checkpoints
from gpt2jax.config import GPT2Config
from gpt2jax.experiment import base_config
from gpt2jax.model import GPT2LMHeadModule
from gpt2jax.model import init_params
from gpt2jax.train import init_state, make_optimizer, pmapped_steps, replicate, shard_batch, to_global


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    args = parser.parse_args()

    config = GPT2Config.from_size("gpt2").replace(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    optimizer, schedule = make_optimizer(base_config().optim, 1000)
    state = replicate(init_state(init_params(config), optimizer, seed=0))
    size = sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6
    print(f"GPT-2 124M params + AdamW state: {size:.0f} MB; jax {jax.__version__} on {jax.devices()[0].platform}")
    p_train, _ = pmapped_steps(GPT2LMHeadModule(config), optimizer, schedule, 1, dropout=False)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, 257)).astype(np.int32)
    batch = shard_batch({"inputs": tokens[None, :, :-1], "targets": tokens[None, :, 1:]})
    state, _ = p_train(state, batch)
    jax.block_until_ready(state)

    for async_save in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            checkpoints = Checkpoints(tmp, keep=2, keep_best=0, async_save=async_save)
            start = time.perf_counter()
            checkpoints.save(1, to_global(state), data={"step": 1}, config={})
            returned = time.perf_counter() - start
            checkpoints.wait()
            print(f"  {'async' if async_save else 'blocking'} save: returns after {returned:.2f} s, "
                  f"on disk after {time.perf_counter() - start:.2f} s")
            checkpoints.close()

    for mode in ("no saving", "blocking", "async"):
        with tempfile.TemporaryDirectory() as tmp:
            checkpoints = None if mode == "no saving" else Checkpoints(tmp, keep=2, keep_best=0,
                                                                     async_save=mode == "async")
            start = time.perf_counter()
            for step in range(1, args.steps + 1):
                state, metrics = p_train(state, batch)
                if checkpoints and step % args.every == 0:
                    checkpoints.save(step, to_global(state), data={"step": step}, config={})
                jax.block_until_ready(metrics)
            jax.block_until_ready(state)
            elapsed = time.perf_counter() - start
            if checkpoints:
                checkpoints.close()
            print(f"  {mode:>9}: {elapsed / args.steps:.2f} s per step (saving every {args.every} steps)")


if __name__ == "__main__":
    main()
