"""A small GPT-2 with the real GPT-2 BPE on the embedded pystdlib corpus (15M tokens of Python).

Command:   gpt2jax train --config experiments/pystdlib_gpt2.py --workdir runs/pystdlib_gpt2
Hardware:  CPU; measured on a 2-core x86-64 VM (jax 0.10.2, one CPU device), 2026-11-29.
Wall time: 5 min 2 s for 300 steps (~0.9 s/step, ~2.2k tokens/s: the 50257 x 128 LM head dominates),
           including ~15 s to prepare the GPT-2 bins once.
Loss:      val 3.37 nats/token at step 300 (train 3.24; ln 50257 = 10.8 at init).
"""

from gpt2jax.experiment import base_config


def get_config():
    c = base_config()
    c.model.n_positions = 256
    c.model.n_embd = 128
    c.model.n_layer = 4
    c.model.n_head = 4
    c.data.dataset = "pystdlib"
    c.data.tokenizer = "gpt2"
    c.data.block_size = 128
    c.data.val_fraction = 0.02
    c.optim.lr = 2e-3
    c.optim.min_lr = 2e-4
    c.optim.warmup_steps = 50
    c.optim.beta2 = 0.99
    c.train.global_batch_size = 16
    c.train.max_steps = 300
    c.train.log_every = 50
    c.train.eval_every = 100
    c.train.eval_batches = 10
    c.train.checkpoint_every = 100
    c.train.sample_every = 150
    c.train.sample_prompt = "def "
    c.train.sample_tokens = 64
    return c
