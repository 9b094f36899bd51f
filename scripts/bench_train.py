"""Train-step throughput: gpt2jax's pmapped step vs transformers + torch.optim.AdamW, same config, same run.

    python scripts/bench_train.py [--steps 5] [--cases gpt2-124m-1x256 pystdlib_char pystdlib_gpt2]

Both do the same step: forward, next-token loss, backward, global-norm clip 1.0, AdamW (weight decay on
2-D weights only), fp32, on this machine's CPU (jax: one device). MFU is against the fp32 matmul peak
measured here in the same run (best of jax and torch on a 2048^3 matmul). Needs the reference extra.
"""

import argparse
import statistics
import time

import jax
import numpy as np
import torch
import transformers
from bench_pair import versions

from gpt2jax import perf
from gpt2jax.config import GPT2Config
from gpt2jax.experiment import base_config
from gpt2jax.model import GPT2LMHeadModule
from gpt2jax.modeling import GPT2LMHeadModel
from gpt2jax.train import init_state, make_optimizer, pmapped_steps, replicate, shard_batch

CASES = {
    "gpt2-124m-1x256": (GPT2Config.from_size("gpt2"), 1, 256),
    "pystdlib_char": (GPT2Config(vocab_size=257, n_positions=128, n_embd=128, n_layer=4, n_head=4), 32, 128),
    "pystdlib_gpt2": (GPT2Config(n_positions=256, n_embd=128, n_layer=4, n_head=4), 16, 128),
}


def matmul_peak() -> float:
    """The fp32 peak of this machine: the best of jax's (gpt2jax.perf.matmul_peak) and torch's 2048^3 matmul."""
    n = 2048
    t = torch.ones(n, n)
    torch_seconds = perf.median_seconds(lambda: t @ t, 3)
    return max(perf.matmul_peak("float32", n=n), 2 * n**3 / torch_seconds)


def bench_case(name: str, steps: int, peak: float) -> None:
    config, batch, T = CASES[name]
    config = config.replace(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    optim = base_config().optim
    optim.warmup_steps = 0
    ours = GPT2LMHeadModel(config, seed=0)
    optimizer, schedule = make_optimizer(optim, max_steps=1000)
    p_train, _ = pmapped_steps(GPT2LMHeadModule(config), optimizer, schedule, 1, dropout=False)
    state = replicate(init_state(ours.params, optimizer, seed=0))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, T + 1)).astype(np.int32)
    device_batch = shard_batch({"inputs": tokens[None, :, :-1], "targets": tokens[None, :, 1:]})

    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_hf_dict())).train()
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()}, strict=False)
    decay = [p for p in reference.parameters() if p.dim() >= 2]
    no_decay = [p for p in reference.parameters() if p.dim() < 2]
    torch_opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=optim.lr,
                                  betas=(optim.beta1, optim.beta2), eps=optim.eps)
    ids = torch.as_tensor(tokens[:, :-1], dtype=torch.long)
    targets = torch.as_tensor(tokens[:, 1:], dtype=torch.long)

    def torch_step():
        logits = reference(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), optim.grad_clip)
        torch_opt.step()
        torch_opt.zero_grad(set_to_none=True)
        return loss

    state, _ = p_train(state, device_batch)  # compile
    jax.block_until_ready(state)
    torch_step()
    ours_s, ref_s = [], []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = p_train(state, device_batch)
        jax.block_until_ready((state, metrics))  # the whole update, not just the metrics
        ours_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch_step()
        ref_s.append(time.perf_counter() - start)
    flops_per_token = config.flops_per_token(T)
    ours_tps, ref_tps = batch * T / statistics.median(ours_s), batch * T / statistics.median(ref_s)
    print(f"  {name} ({ours.num_parameters() / 1e6:.1f}M, batch {batch}x{T}): gpt2jax {ours_tps:8.0f} tok/s "
          f"(MFU {perf.mfu(ours_tps, flops_per_token, peak):.0%})  torch {ref_tps:8.0f} tok/s "
          f"(MFU {perf.mfu(ref_tps, flops_per_token, peak):.0%})  ratio {ours_tps / ref_tps:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    peak = matmul_peak()
    print(f"train step, fp32; {versions()}; measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    for name in args.cases:
        bench_case(name, args.steps, peak)


if __name__ == "__main__":
    main()
