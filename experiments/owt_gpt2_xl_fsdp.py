"""GPT-2 XL (1.56B) on OpenWebText with the train state split over the devices (FSDP): the model that does not
fit one device under the default pmap placement.

Command:   gpt2jax train --config experiments/owt_gpt2_xl_fsdp.py --workdir runs/owt_gpt2_xl_fsdp
           (multi-host: see scripts/launch_slurm.sh and scripts/launch_tpu_pod.sh; the mesh spans every process)
Hardware:  a TPU v5e-8 (8 chips of 16 GB), or 8 GPUs of 24 GB or more; any device count that divides 512.
Memory:    COMPUTED here with `gpt2jax.perf.estimate_memory` (not measured on a TPU or GPU), per device:
           - pmap (replicated): params 6.2 + gradients 6.2 + Adam 12.5 = 24.9 GB of state alone: no 16 or 24 GB
             device holds it;
           - fsdp over 8: 16 bytes x 1.56B / 8 = 3.1 GB of state, plus one block's weights gathered whole;
             with bfloat16 compute, gradient checkpointing and 4 sequences x 1024 tokens per device and
             micro-step, the estimate is 6.3 GB (without checkpointing 40.7 GB; 2 sequences 4.8 GB).
           `gpt2jax bench --what memory --size gpt2-xl --parallelism pmap fsdp --seq 1024` prints the state per
           device and XLA's compiled peak on any machine (CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8).
Wall time: not measured here.
Loss:      none quoted: this configuration has not been run to the end by this project.
Batch:     512 sequences x 1024 tokens = 524,288 tokens per step (GPT-2's), 4 per device x 8 devices x 16
           micro-steps.
"""

from gpt2jax.experiment import base_config


def get_config():
    c = base_config()
    c.model.size = "gpt2-xl"  # 48 layers, 25 heads, 1600 wide
    c.model.vocab_size = 50304  # 50257 padded to a multiple of 64, as nanoGPT does
    c.model.gradient_checkpointing = True  # each block recomputed in the backward pass: activations fit
    c.data.dataset = "Skylion007/openwebtext"
    c.data.split = "train"
    c.data.tokenizer = "gpt2"
    c.data.block_size = 1024
    c.data.val_fraction = 0.0005
    c.data.num_proc = 16
    c.optim.lr = 2e-4  # GPT-3's rate for its 1.3B model
    c.optim.min_lr = 2e-5
    c.optim.warmup_steps = 2000
    c.optim.weight_decay = 0.1
    c.optim.beta1, c.optim.beta2 = 0.9, 0.95
    c.optim.grad_clip = 1.0
    c.train.parallelism = "fsdp"  # params, gradients and Adam's moments split over every device
    c.train.global_batch_size = 512
    c.train.grad_accum_steps = 16  # 512 / (8 devices x 16) = 4 sequences per device per micro-step
    c.train.max_steps = 100_000
    c.train.eval_every = 1000
    c.train.eval_batches = 50
    c.train.checkpoint_every = 1000
    c.train.compute_dtype = "bfloat16"
    return c
