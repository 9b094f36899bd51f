"""Hugging Face PyTorch GPT-2 models with every parameter randomised, for parity checks.

Transformers initialises biases to 0 and LayerNorms to (1, 0), which would hide a wrongly
mapped bias; here every tensor gets its own random values. Imported by the live parity
tests and by scripts/make_fixtures.py; needs torch and transformers, except TINY_CONFIGS and
`random_params` (the same randomisation for a gpt2jax parameter tree), which need neither.
"""

import numpy as np

TINY_CONFIGS = {
    # n_inner unset, even sizes
    "even": dict(vocab_size=97, n_positions=24, n_embd=64, n_layer=2, n_head=4, bos_token_id=96, eos_token_id=96),
    # n_inner set, odd sizes, head dim 10, another activation and epsilon
    "odd": dict(
        vocab_size=131, n_positions=40, n_embd=30, n_layer=3, n_head=3, n_inner=37,
        activation_function="gelu", layer_norm_epsilon=1e-6, bos_token_id=130, eos_token_id=130,
    ),
}


def make_reference_model(config_kwargs: dict, seed: int = 0):
    import torch
    import transformers

    config = transformers.GPT2Config(**config_kwargs)
    # Eager attention: the plain softmax math. SDPA differs from it (and from us) only at
    # padded query positions, whose keys are all masked: eager gives them uniform weights.
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


def reference_outputs(model, input_ids, attention_mask=None, position_ids=None, labels=None):
    """logits, loss and {HF name: grad of the loss} from the torch model, as numpy."""
    import torch

    as_t = lambda x: None if x is None else torch.as_tensor(np.asarray(x), dtype=torch.long)
    model.zero_grad()
    out = model(
        input_ids=as_t(input_ids), attention_mask=as_t(attention_mask), position_ids=as_t(position_ids),
        labels=as_t(labels),
    )
    result = {"logits": out.logits.detach().numpy()}
    if labels is not None:
        out.loss.backward()
        result["loss"] = out.loss.detach().numpy()
        result["grads"] = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    return result


def random_params(params, seed: int = 0):
    """A gpt2jax parameter tree like `params` with every leaf random, as `make_reference_model`
    makes them: LayerNorm scales 1 + 0.1 N(0, 1), everything else (biases too) 0.2 N(0, 1).

    Needs only JAX. Random init (zero biases, unit LayerNorms) would hide a bias or a LayerNorm
    tensor that an export drops or a conversion mixes up.
    """
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)

    def randomise(path, leaf):
        noise = rng.standard_normal(leaf.shape)
        return jnp.asarray(1.0 + 0.1 * noise if path[-1].key == "scale" else 0.2 * noise, leaf.dtype)

    return jax.tree_util.tree_map_with_path(randomise, params)
