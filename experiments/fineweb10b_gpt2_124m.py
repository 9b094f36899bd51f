"""llm.c's GPT-2 124M on 10B tokens of FineWeb (karpathy/llm.c discussion #481, train_gpt2cu -x 18865).

Command:   gpt2jax train --config experiments/fineweb10b_gpt2_124m.py --workdir runs/fineweb10b_124m
Hardware:  llm.c's figure is for 8x A100 80GB.
Wall time: about 90 minutes on 8x A100 80GB in llm.c (quoted, not measured here).
Loss:      val loss about 3.28 on FineWeb after 10B tokens (quoted from llm.c; HellaSwag ~29.9%).
Batch:     512 sequences x 1024 tokens = 524,288 tokens per step; 18,865 steps ~= 10B tokens.
"""

from gpt2jax.experiment import base_config


def get_config():
    c = base_config()
    c.model.size = "gpt2"
    c.model.vocab_size = 50304
    c.data.dataset = "HuggingFaceFW/fineweb"
    c.data.dataset_config = "sample-10BT"
    c.data.split = "train"
    c.data.tokenizer = "gpt2"
    c.data.block_size = 1024
    c.data.val_fraction = 0.001
    c.data.num_proc = 32
    c.optim.lr = 6e-4
    c.optim.min_lr = 0.0  # llm.c decays to zero
    c.optim.warmup_steps = 700
    c.optim.weight_decay = 0.1
    c.optim.beta1, c.optim.beta2 = 0.9, 0.95
    c.optim.grad_clip = 1.0
    c.train.global_batch_size = 512
    c.train.grad_accum_steps = 1  # 64 sequences per device on 8 devices; raise it if memory is short
    c.train.max_steps = 18_865
    c.train.eval_every = 250
    c.train.eval_batches = 20
    c.train.checkpoint_every = 1000
    c.train.compute_dtype = "bfloat16"
    return c
