"""Task fine-tuning, measured: held-out completion loss before and after fine-tuning, and packed vs padded rows.

    python scripts/bench_task.py --config experiments/pystdlib_docstring2code.py \
        --before runs/pystdlib_gpt2 --after runs/docstring2code [--steps 10 --rounds 3]

- loss: `gpt2jax eval`'s completion loss (gpt2jax.evaluate.evaluate_examples) of both models on the experiment's
  held-out examples (its val split), one example per row.
- speed: the experiment's train step on its own batches, packed and padded (data.packing True / False) in
  alternating rounds of --steps steps on the same devices, the first of each compiled and not timed. Reported per
  second: row positions (what the step computes), example tokens (positions that are not padding), completion
  tokens (what the loss counts) and examples; the ratio that matters is examples (or completion tokens) per
  second, packed over padded.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from gpt2jax.batches import ExampleSampler
from gpt2jax.data import prepare
from gpt2jax.evaluate import evaluate_examples
from gpt2jax.experiment import load_config
from gpt2jax.model import GPT2LMHeadModule
from gpt2jax.modeling import GPT2LMHeadModel
from gpt2jax.textgen import tokenizer_for
from gpt2jax.train import init_state, make_optimizer, pmapped_steps, replicate, shard_batch


def held_out_loss(model_dir: str, store, block_size: int) -> dict:
    model = GPT2LMHeadModel.from_pretrained(model_dir)
    tokenizer = tokenizer_for(model, None, store.meta["tokenizer"])
    return evaluate_examples(model, tokenizer, store.tokens("val"), store.index("val"), block_size, batch_size=16)


def speed(config, store, model_dir: str, steps: int, rounds: int) -> dict:
    t, T = config.train, config.data.block_size
    model = GPT2LMHeadModel.from_pretrained(model_dir)
    module = GPT2LMHeadModule(model.config)
    optimizer, schedule = make_optimizer(config.optim, t.max_steps)
    train, _ = pmapped_steps(module, optimizer, schedule, t.grad_accum_steps, dropout=False)
    samplers = {name: ExampleSampler(store.tokens("train"), store.index("train"), T, t.global_batch_size, t.seed,
                                     packed=packed, pad_id=store.meta["eos_token_id"])
                for name, packed in (("packed", True), ("padded", False))}
    state = replicate(init_state(model.params, optimizer, t.seed))
    totals = {name: {"seconds": 0.0, "positions": 0, "tokens": 0, "completion": 0, "examples": 0} for name in samplers}
    for round_ in range(rounds + 1):
        for name, sampler in samplers.items():
            batches = [sampler(round_ * steps + s) for s in range(steps)]
            device = [shard_batch(b) for b in batches]
            state, metrics = train(state, device[0])  # compiles in round 0; not timed
            jax.block_until_ready(metrics)
            start = time.perf_counter()
            for batch in device[1:]:
                state, metrics = train(state, batch)
            jax.block_until_ready(metrics)
            if round_ == 0:
                continue
            total = totals[name]
            total["seconds"] += time.perf_counter() - start
            for b, rows in zip(batches[1:], (sampler.global_rows(round_ * steps + s) for s in range(1, steps))):
                total["positions"] += b["inputs"].size
                total["completion"] += int((b["targets"] != -100).sum())
                total["examples"] += sum(len(r) for r in rows)
                lengths = np.minimum(sampler.index[np.concatenate(rows).astype(int), 2], T + 1) - 1
                total["tokens"] += int(lengths.sum())
    return {name: {f"{k}_per_s": v / total["seconds"] for k, v in total.items() if k != "seconds"}
            for name, total in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/pystdlib_docstring2code.py")
    parser.add_argument("--before", required=True, help="the model before fine-tuning (a run or HF directory)")
    parser.add_argument("--after", help="the fine-tuned run")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="--config.KEY=VALUE")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    store = prepare(config.data, progress=False)
    report = {"devices": jax.device_count(), "platform": jax.default_backend(), "jax": jax.__version__,
              "held_out_examples": int(len(store.index("val"))),
              "loss_before": held_out_loss(args.before, store, config.data.block_size)["loss"]}
    if args.after:
        report["loss_after"] = held_out_loss(args.after, store, config.data.block_size)["loss"]
    report["speed"] = speed(config, store, args.before, args.steps, args.rounds)
    packed, padded = report["speed"]["packed"], report["speed"]["padded"]
    report["packed_over_padded"] = {k: packed[k] / padded[k] for k in packed}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
