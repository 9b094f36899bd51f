"""Live parity against transformers' PyTorch GPT-2 (skipped when torch/transformers are absent).

The reference models have every parameter randomised (tests/hf_reference.py) and use
eager attention, the plain softmax math.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import serialization, traverse_util  # noqa: E402
from hf_reference import TINY_CONFIGS, make_reference_model, random_params, reference_outputs  # noqa: E402

from gpt2jax import GPT2Config, GPT2LMHeadModel  # noqa: E402
from gpt2jax.model import lm_loss  # noqa: E402


def relative_error(actual, expected):
    return float(np.max(np.abs(np.asarray(actual) - expected)) / max(np.max(np.abs(expected)), 1e-12))


def ours_from(reference, tmp_path, **save_kwargs):
    directory = tmp_path / "hf"
    reference.save_pretrained(directory, **save_kwargs)
    return GPT2LMHeadModel.from_pretrained(directory)


def batch(vocab_size, shape=(3, 13), seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=shape)
    right = np.ones(shape, int)
    right[1, 9:] = 0
    right[2, 5:] = 0
    left = np.ones(shape, int)
    left[1, :4] = 0
    left[2, :8] = 0
    return ids, right, left


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request, tmp_path_factory):
    reference = make_reference_model(TINY_CONFIGS[request.param], seed=1)
    return reference, ours_from(reference, tmp_path_factory.mktemp(request.param))


def test_logits_unmasked(pair):
    reference, ours = pair
    ids, _, _ = batch(reference.config.vocab_size)
    diff = np.abs(np.asarray(ours(ids).logits) - reference_outputs(reference, ids)["logits"]).max()
    assert diff <= 1e-5


def test_logits_right_padding(pair):
    reference, ours = pair
    ids, right, _ = batch(reference.config.vocab_size, seed=1)
    expected = reference_outputs(reference, ids, right)["logits"]
    diff = np.abs(np.asarray(ours(ids, right).logits) - expected)[right.astype(bool)].max()
    assert diff <= 1e-5


def test_logits_left_padding_with_position_ids(pair):
    reference, ours = pair
    ids, _, left = batch(reference.config.vocab_size, seed=2)
    positions = np.maximum(np.cumsum(left, axis=1) - 1, 0)
    expected = reference_outputs(reference, ids, left, positions)["logits"]
    diff = np.abs(np.asarray(ours(ids, left, positions).logits) - expected)[left.astype(bool)].max()
    assert diff <= 1e-5


def test_loss_with_ignored_labels(pair):
    reference, ours = pair
    ids, right, _ = batch(reference.config.vocab_size, seed=3)
    labels = np.where(right == 1, ids, -100)
    labels[0, 3:6] = -100
    expected = reference_outputs(reference, ids, right, labels=labels)["loss"]
    assert relative_error(ours(ids, right, labels=labels).loss, expected) <= 1e-6


def test_gradients_on_every_parameter(pair):
    reference, ours = pair
    ids, right, _ = batch(reference.config.vocab_size, seed=4)
    labels = np.where(right == 1, ids, -100)
    expected = reference_outputs(reference, ids, right, labels=labels)["grads"]

    def loss_fn(params):
        logits, _ = ours.module.apply({"params": params}, jnp.asarray(ids), jnp.asarray(right))
        return lm_loss(logits, jnp.asarray(labels))

    grads = GPT2LMHeadModel(ours.config, params=jax.grad(loss_fn)(ours.params)).state_dict()
    assert len(expected) == len(grads) - 1  # lm_head.weight is wte
    worst = max((relative_error(grads[name], g), name) for name, g in expected.items())
    assert worst[0] <= 1e-4, worst


def test_our_export_loads_in_transformers(tmp_path):
    # Every tensor random: transformers fills a missing tensor with its init (zero biases, unit
    # LayerNorms, warning only), so a fresh init would hide an export that drops them.
    config = GPT2Config(**TINY_CONFIGS["odd"])
    ours = GPT2LMHeadModel(config, params=random_params(GPT2LMHeadModel(config).params, seed=7))
    ours.save_pretrained(tmp_path)
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids, _, _ = batch(ours.config.vocab_size, seed=5)
    expected = reference(torch.as_tensor(ids)).logits.detach().numpy()
    assert np.abs(np.asarray(ours(ids).logits) - expected).max() <= 1e-5


@pytest.mark.parametrize(
    "layout", ["safetensors", "sharded-safetensors", "pytorch_model.bin", "flax_model.msgpack", "no-prefix"]
)
def test_transformers_checkpoints_load(layout, tmp_path):
    reference = make_reference_model(TINY_CONFIGS["even"], seed=2)
    reference.config.save_pretrained(tmp_path)
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    if layout == "safetensors":
        reference.save_pretrained(tmp_path)
    elif layout == "sharded-safetensors":
        reference.save_pretrained(tmp_path, max_shard_size="20KB")
        assert os.path.exists(tmp_path / "model.safetensors.index.json")
    elif layout == "pytorch_model.bin":
        torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    elif layout == "no-prefix":  # OpenAI-era checkpoints name weights without "transformer."
        from safetensors.numpy import save_file

        save_file({k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"},
                  tmp_path / "model.safetensors", metadata={"format": "pt"})
    else:  # transformers 4.x Flax layout: h/<i>/..., FlaxConv1D kernels stored (out, in)
        tree = {}
        for name, array in state.items():
            if name == "lm_head.weight":
                continue
            *modules, leaf = name.split(".")
            linear = leaf == "weight" and modules[-1] in ("c_attn", "c_proj", "c_fc")
            flax_leaf = "kernel" if linear else {"weight": "embedding" if modules[-1] in ("wte", "wpe") else "scale"}.get(leaf, leaf)
            tree[tuple(modules) + (flax_leaf,)] = array.T if linear else array
        with open(tmp_path / "flax_model.msgpack", "wb") as f:
            f.write(serialization.msgpack_serialize(traverse_util.unflatten_dict(tree)))
    ours = GPT2LMHeadModel.from_pretrained(tmp_path)
    ids, _, _ = batch(reference.config.vocab_size, seed=6)
    assert np.abs(np.asarray(ours(ids).logits) - reference_outputs(reference, ids)["logits"]).max() <= 1e-5


def test_config_json_round_trip_through_transformers(tmp_path):
    config = GPT2Config(**TINY_CONFIGS["odd"])
    config.save(tmp_path)
    hf_config = transformers.GPT2Config.from_pretrained(tmp_path)
    assert (hf_config.n_inner, hf_config.n_embd, hf_config.activation_function) == (37, 30, "gelu")
    hf_config.save_pretrained(tmp_path / "again")
    assert GPT2Config.from_json_file(tmp_path / "again" / "config.json") == config
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
