"""Fine-tune a Hugging Face GPT-2 (any size) on the embedded pystdlib corpus: GPT-2 learns to write stdlib Python.

Command:   huggingface-cli download openai-community/gpt2 --local-dir gpt2-hf   # once, where online
           gpt2jax train --config experiments/finetune_gpt2.py --workdir runs/finetune_gpt2 \
               [--config.init_from=PATH_TO_HF_DIR]
Hardware:  one GPU (bf16); on CPU override --config.train.compute_dtype=float32 and expect ~10 s per step.
Wall time: a few minutes on one A100-class GPU for 500 steps (estimated from the token count, not measured).
Loss:      starts at GPT-2's own loss on Python source (about 1.6-1.8 nats/token for 124M) and falls below 1.0
           on the stdlib validation documents (expected, not measured here: no GPU and no hub weights).
The model's shape comes from init_from's config.json; model.* here only sets dropout.
Dropout: 0.1 after the embeddings and the residual projections (GPT-2's), none on the attention
probabilities: no fused attention kernel jax offers takes attention dropout with a per-step key, so
attn_pdrop > 0 would run the materialised XLA attention (XLA's step: 68.6 ms against cuDNN's 38.5 ms,
124M bf16 16x1024 on an H200; see gpt2jax/attention.py). Set model.attn_pdrop=0.1 for HF's recipe at that
cost.
"""

from gpt2jax.experiment import base_config


def get_config():
    c = base_config()
    c.init_from = "gpt2-hf"  # a Hugging Face GPT-2 directory (model.safetensors + config.json) or a run dir
    c.model.resid_pdrop = 0.1
    c.model.embd_pdrop = 0.1
    c.model.attn_pdrop = 0.0  # keeps the fused attention kernel (see the docstring)
    c.data.dataset = "pystdlib"
    c.data.tokenizer = "gpt2"
    c.data.block_size = 512
    c.data.val_fraction = 0.02
    c.optim.lr = 3e-5
    c.optim.min_lr = 3e-6
    c.optim.warmup_steps = 50
    c.optim.weight_decay = 0.0
    c.train.global_batch_size = 16
    c.train.max_steps = 500
    c.train.eval_every = 100
    c.train.eval_batches = 10
    c.train.checkpoint_every = 100
    c.train.sample_every = 100
    c.train.sample_prompt = "def "
    c.train.sample_tokens = 128
    c.train.compute_dtype = "bfloat16"
    return c
