"""nanoGPT's GPT-2 124M reproduction on OpenWebText (karpathy/nanoGPT config/train_gpt2.py).

Command:   gpt2jax train --config experiments/owt_gpt2_124m.py --workdir runs/owt_gpt2_124m
           (multi-host: see scripts/launch_slurm.sh and scripts/launch_tpu_pod.sh)
Hardware:  nanoGPT's figure is for 1 node of 8x A100 40GB; any 8 / 16 / 40-device layout works.
Wall time: about 4 days on 8x A100 (quoted from nanoGPT, not measured here).
Loss:      val loss about 2.85 after 600k steps (quoted from nanoGPT; GPT-2 124M itself gets 3.11
           on OpenWebText before fine-tuning).
Batch:     480 sequences x 1024 tokens = 491,520 tokens per step (nanoGPT: 12 x 1024 x 40 accumulation).
"""

from gpt2jax.experiment import base_config


def get_config():
    c = base_config()
    c.model.size = "gpt2"  # 124M: 12 layers, 12 heads, 768 wide; "gpt2-medium" / "-large" / "-xl" for the others
    c.model.vocab_size = 50304  # 50257 padded to a multiple of 64 for faster matmuls, as nanoGPT does
    c.data.dataset = "Skylion007/openwebtext"
    c.data.split = "train"
    c.data.tokenizer = "gpt2"
    c.data.block_size = 1024
    c.data.val_fraction = 0.0005
    c.data.num_proc = 16
    c.optim.lr = 6e-4
    c.optim.min_lr = 6e-5
    c.optim.warmup_steps = 2000
    c.optim.decay_steps = 600_000
    c.optim.weight_decay = 0.1
    c.optim.beta1, c.optim.beta2 = 0.9, 0.95
    c.optim.grad_clip = 1.0
    c.train.global_batch_size = 480
    c.train.grad_accum_steps = 5  # 480 / (8 devices x 5) = 12 sequences per device per micro-step
    c.train.max_steps = 600_000
    c.train.eval_every = 1000
    c.train.eval_batches = 200
    c.train.checkpoint_every = 1000
    c.train.compute_dtype = "bfloat16"
    return c
