"""Smoke test: a 2-layer byte-level GPT-2 on the embedded pystdlib corpus, trained for a few steps.

Command:   gpt2jax train --config experiments/smoke.py --workdir runs/smoke
Hardware:  any CPU; 1 or 8 devices (the global batch is a multiple of 8).
Wall time: seconds after the bins exist (the first prepare of pystdlib takes ~1 minute on 2 cores).
Loss:      starts near ln(257) = 5.55 and falls; the number means nothing. Used by the tests.
"""

from gpt2jax.experiment import base_config


def get_config():
    c = base_config()
    c.model.n_positions = 64
    c.model.n_embd = 32
    c.model.n_layer = 2
    c.model.n_head = 2
    c.data.dataset = "pystdlib"
    c.data.tokenizer = "byte"
    c.data.block_size = 32
    c.data.val_fraction = 0.05
    c.optim.lr = 3e-3
    c.optim.min_lr = 3e-4
    c.optim.warmup_steps = 2
    c.optim.weight_decay = 0.0
    c.train.global_batch_size = 16
    c.train.max_steps = 20
    c.train.log_every = 5
    c.train.eval_every = 10
    c.train.eval_batches = 2
    c.train.checkpoint_every = 10
    c.train.sample_every = 10
    c.train.sample_tokens = 16
    return c
