"""`gpt2jax train` against nanoGPT's own model and training loop, at the quick-start shape, in one run.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    python scripts/bench_nanogpt.py --nanogpt /tmp/nanoGPT [--steps 150] [--rounds 2]

nanoGPT side: its `model.py` (GPT, GPTConfig, configure_optimizers) and the body of its `train.py` loop
(memmap batches of random windows, forward, backward, clip 1.0, AdamW, zero_grad, `loss.item()` every
log_every steps), eager float32 PyTorch on the CPU, dropout 0, biases on, on the same token bins.
gpt2jax side: `gpt2jax train --config experiments/pystdlib_char.py` as a subprocess; tokens/s is the median
of its logged `tokens_per_s` after the first log step (compilation excluded, as nanoGPT's first steps are).
The rounds alternate, since this machine's speed drifts. Needs torch (the reference extra).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, "experiments", "pystdlib_char.py")


def nanogpt_tokens_per_s(nanogpt_dir: str, train_bin: str, vocab_size: int, steps: int, log_every: int,
                         config) -> float:
    """nanoGPT's loop on `train_bin`: tokens/s over `steps` steps after 5 warm-up steps."""
    import torch

    sys.path.insert(0, nanogpt_dir)
    from model import GPT, GPTConfig

    m, d, t, o = config.model, config.data, config.train, config.optim
    model = GPT(GPTConfig(block_size=d.block_size, vocab_size=vocab_size, n_layer=m.n_layer, n_head=m.n_head,
                          n_embd=m.n_embd, dropout=0.0, bias=True))
    optimizer = model.configure_optimizers(o.weight_decay, o.lr, (o.beta1, o.beta2), "cpu")
    data = np.memmap(train_bin, dtype=np.uint16, mode="r")
    B, T = t.global_batch_size, d.block_size

    def get_batch():
        ix = torch.randint(len(data) - T, (B,))
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    def step(i: int, x, y):
        _, loss = model(x, y)
        x, y = get_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i % log_every == 0:
            loss.item()
        return x, y

    x, y = get_batch()
    for i in range(5):
        x, y = step(i, x, y)
    start = time.perf_counter()
    for i in range(steps):
        x, y = step(i, x, y)
    return steps * B * T / (time.perf_counter() - start)


def gpt2jax_tokens_per_s(steps: int, log_every: int, workdir: str) -> float:
    command = [sys.executable, "-m", "gpt2jax.cli", "train", "--config", EXPERIMENT, "--workdir", workdir,
               "--no-progress", f"--config.train.max_steps={steps}",
               f"--config.train.log_every={log_every}", f"--config.train.eval_every={steps}",
               "--config.train.sample_every=0", f"--config.train.checkpoint_every={steps}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"gpt2jax train failed:\n{done.stderr[-2000:]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [r["tokens_per_s"] for r in map(json.loads, f) if r.get("split") == "train" and r["step"] > log_every]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", required=True, help="a nanoGPT checkout (its model.py is imported)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch

    from gpt2jax.data import prepare
    from gpt2jax.experiment import load_config

    config = load_config(EXPERIMENT, [])
    bins = prepare(config.data, progress=False)
    train_bin, vocab_size = os.path.join(bins.directory, "train.bin"), bins.meta["eos_token_id"] + 1  # bytes + EOS
    assert bins.dtype == np.uint16, "nanoGPT reads uint16 bins"
    print(f"pystdlib_char shape: {config.model.n_layer} x {config.model.n_embd}, batch {config.train.global_batch_size}"
          f" x {config.data.block_size}, fp32, CPU; torch {torch.__version__} ({torch.get_num_threads()} threads)")
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for round_ in range(args.rounds):
            theirs.append(nanogpt_tokens_per_s(args.nanogpt, train_bin, vocab_size, args.steps, args.log_every, config))
            ours.append(gpt2jax_tokens_per_s(args.steps, args.log_every, os.path.join(workdir, f"run{round_}")))
            print(f"  nanoGPT {theirs[-1]:8.0f} tok/s   gpt2jax train {ours[-1]:8.0f} tok/s   "
                  f"ratio {ours[-1] / theirs[-1]:.2f}x", flush=True)
    print(f"median ratio {statistics.median(o / t for o, t in zip(ours, theirs)):.2f}x")


if __name__ == "__main__":
    main()
