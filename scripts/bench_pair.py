"""What the benchmarks share: gpt2jax and transformers' PyTorch GPT-2 holding the same weights."""

import jax
import numpy as np
import torch
import transformers

from gpt2jax import GPT2Config, GPT2LMHeadModel


def same_weights_pair(size: str, seed: int = 0):
    """(ours, reference): a random-init GPT-2 of `size` and a transformers copy in eval mode."""
    config = GPT2Config.from_size(size)
    ours = GPT2LMHeadModel(config, seed=seed)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config.to_hf_dict())).eval()
    reference.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()}, strict=False)
    return ours, reference


def versions() -> str:
    return (f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")
