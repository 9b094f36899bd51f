"""Task fine-tuning on the embedded docstring -> code task: given a stdlib function's signature and docstring,
write its body. The loss counts the body's tokens only; examples are packed, each attending to itself.

Command:   gpt2jax train --config experiments/pystdlib_gpt2.py --workdir runs/pystdlib_gpt2       # pretrain once
           gpt2jax train --config experiments/pystdlib_docstring2code.py --workdir runs/docstring2code
           gpt2jax eval --run runs/docstring2code                # completion loss on the held-out functions
           (init_from a Hugging Face GPT-2 directory works the same: --config.init_from=gpt2-hf, bf16 on a GPU)
Data:      6,791 functions of Python 3.11's stdlib (prompt <= 400 characters, body <= 1,600), split by a hash
           of their text (5% held out); GPT-2 BPE: prompts 37 tokens at the median, 228 at most; bodies 66 at
           the median; 20% of examples are longer than 257 tokens and are cut there.
Hardware:  CPU (2 cores, float32) as set; on one GPU set train.compute_dtype=bfloat16, global_batch_size=64
           and block_size=1024 with a larger init_from (the step is the same program).
Wall time: measured on a 2-core x86-64 VM (jax 0.10.2, one CPU device), 2026-12-03: ~20 s to prepare the
           examples once, then 200 steps at ~1.5 s/step (16 x 256 packed rows, 66% of positions counted): ~6 min.
Loss:      held-out completion loss (336 functions) 3.56 nats/token for the pretrained pystdlib_gpt2 run, 3.10
           after these 200 steps (BENCHMARKS.md, "Task fine-tuning"). The pretraining corpus holds these very
           files, so "before" has seen the bodies as text; what fine-tuning adds is the task's shape. Greedy
           samples of so small a model (7M) are still mostly indentation: the samples at each sample step are
           greedy completions of held-out prompts, logged next to the real bodies (samples.jsonl, TensorBoard).
"""

from gpt2jax.experiment import base_config


def get_config():
    c = base_config()
    c.init_from = "runs/pystdlib_gpt2"  # experiments/pystdlib_gpt2.py's run: 4 layers x 128, GPT-2 BPE, n_positions 256
    c.data.dataset = "pystdlib"
    c.data.format = "prompt_completion"  # pystdlib's task: docstring -> code (gpt2jax/sources.py)
    c.data.packing = True
    c.data.tokenizer = "gpt2"
    c.data.block_size = 256
    c.data.val_fraction = 0.05
    c.optim.lr = 1e-3
    c.optim.min_lr = 1e-4
    c.optim.warmup_steps = 20
    c.optim.weight_decay = 0.0
    c.optim.beta2 = 0.99
    c.train.global_batch_size = 16
    c.train.max_steps = 200
    c.train.log_every = 20
    c.train.eval_every = 100
    c.train.eval_batches = 16
    c.train.checkpoint_every = 100
    c.train.sample_every = 100
    c.train.sample_tokens = 96
    return c
