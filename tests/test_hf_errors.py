"""Bad checkpoints and bad inputs: one exception with an actionable message, nothing half-loaded."""

import json
import os
import shutil
import sys
import time

import numpy as np
import pytest

from gpt2jax import GPT2Config, GPT2LMHeadModel, UserError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_gpt2")


@pytest.fixture
def checkpoint(tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, directory)
    return directory


def edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "nope")


def test_directory_without_weights(checkpoint):
    os.remove(checkpoint / "model.safetensors")
    with pytest.raises(UserError, match="no weights found"):
        GPT2LMHeadModel.from_pretrained(checkpoint)


def test_directory_without_config(checkpoint):
    os.remove(checkpoint / "config.json")
    with pytest.raises(UserError, match="no config.json"):
        GPT2LMHeadModel.from_pretrained(checkpoint)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(checkpoint, keep):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(UserError, match="corrupt or truncated safetensors"):
        GPT2LMHeadModel.from_pretrained(checkpoint)


def test_garbage_safetensors(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="corrupt or truncated"):
        GPT2LMHeadModel.from_pretrained(checkpoint)


def test_config_that_does_not_match_the_weights_names_parameter_and_shapes(checkpoint):
    edit_config(checkpoint, n_inner=40)
    with pytest.raises(UserError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight: config.json implies shape \(30, 40\) "
                                        r"but the checkpoint holds \(30, 37\)"):
        GPT2LMHeadModel.from_pretrained(checkpoint)


def test_config_with_more_layers_than_the_weights(checkpoint):
    edit_config(checkpoint, n_layer=4)
    with pytest.raises(UserError, match=r"missing transformer\.h\.3\."):
        GPT2LMHeadModel.from_pretrained(checkpoint)


def test_config_with_fewer_layers_than_the_weights(checkpoint):
    edit_config(checkpoint, n_layer=2)
    with pytest.raises(UserError, match=r"unexpected transformer\.h\.2\."):
        GPT2LMHeadModel.from_pretrained(checkpoint)


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="llama"), "model_type='llama'"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(resid_pdrop=None), "resid_pdrop must be a number"),
])
def test_config_json_that_gpt2jax_cannot_honour(checkpoint, changes, message):
    edit_config(checkpoint, **changes)
    with pytest.raises(UserError, match=message):
        GPT2LMHeadModel.from_pretrained(checkpoint)


def test_invalid_config_json(checkpoint):
    (checkpoint / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        GPT2LMHeadModel.from_pretrained(checkpoint)


def test_pickle_with_code_is_refused_in_one_line(checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    os.remove(checkpoint / "model.safetensors")
    marker = tmp_path / "executed"
    torch.save({"weight": torch.zeros(2), "payload": Exploit(str(marker))}, checkpoint / "pytorch_model.bin")
    with pytest.raises(UserError) as info:
        GPT2LMHeadModel.from_pretrained(checkpoint)
    message = str(info.value)
    assert "never unpickles" in message and "\n" not in message and "weights_only=False" not in message
    assert not marker.exists()


class Exploit:
    """Unpickling this runs code (it would create `path`)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd"])
def test_shard_index_cannot_name_files_outside_the_directory(checkpoint, shard):
    (checkpoint.parent / "outside.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    os.remove(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"transformer.wte.weight": shard}}))
    with pytest.raises(UserError, match="not a file in"):
        GPT2LMHeadModel.from_pretrained(checkpoint)


def test_pytorch_bin_without_torch(checkpoint, monkeypatch):
    os.remove(checkpoint / "model.safetensors")
    (checkpoint / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(UserError, match="install torch"):
        GPT2LMHeadModel.from_pretrained(checkpoint)


def test_hub_name_offline_says_so_quickly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(UserError, match="not a local directory and the Hugging Face Hub could not provide it"):
        GPT2LMHeadModel.from_pretrained("openai-community/gpt2")
    assert time.monotonic() - start < 60


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=[[1, 2, 200]]), r"input_ids has values in \[1, 200\] but vocab_size is 131"),
        (dict(input_ids=[[-1, 2]]), "input_ids has values"),
        (dict(input_ids=[1, 2, 3]), r"shape \(batch, time\)"),
        (dict(input_ids=[[1] * 41]), "41 tokens but the model has n_positions=40"),
        (dict(input_ids=[[1, 2]], position_ids=[[0, 40]]), "position_ids has values"),
        (dict(input_ids=[[1, 2]], labels=[[1, 2, 3]]), "labels have shape"),
        (dict(input_ids=[[1, 2]], labels=[[1, 131]]), r"labels has values in \[1, 131\] but vocab_size is 131"),
        (dict(input_ids=[[1, 2]], labels=[[-5, 2]]), r"such as -5: ids must lie in \[0, 131\); -100 also allowed"),
        (dict(input_ids=[[1.7, 2.0]]), "input_ids must hold integer ids, got float64 values"),
        (dict(input_ids=[[1, 2]], labels=[[1.0, 2.0]]), "labels must hold integer ids, got float64"),
        (dict(input_ids=[[1, 2]], position_ids=[[0.5, 1.0]]), "position_ids must hold integer ids"),
    ],
)
def test_bad_model_inputs(kwargs, message):
    model = GPT2LMHeadModel.from_pretrained(FIXTURE)
    with pytest.raises(UserError, match=message):
        model(**kwargs)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_embd=30, n_head=4), "not divisible"),
        (dict(activation_function="swiglu"), "not supported"),
        (dict(dtype="fp8"), "not a known dtype"),
        (dict(n_layer=0), "positive integer"),
        (dict(attn_pdrop=1.0), r"in \[0, 1\)"),
        (dict(resid_pdrop=None), r"resid_pdrop must be a number in \[0, 1\), got None"),
        (dict(n_layer=True), "n_layer must be a positive integer, got True"),
        (dict(layer_norm_epsilon="1e-5"), "layer_norm_epsilon must be a positive number"),
        (dict(eos_token_id=None), "eos_token_id must be an integer token id"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(UserError, match=message):
        GPT2Config(**fields)


def test_loaded_weights_are_exactly_the_files(checkpoint):
    from safetensors.numpy import load_file

    state = GPT2LMHeadModel.from_pretrained(checkpoint).state_dict()
    for name, array in load_file(checkpoint / "model.safetensors").items():
        np.testing.assert_array_equal(state[name], array)


def _rewrite_weights(directory, change):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(checkpoint, bad):
    def damage(tensors):
        tensors["transformer.h.1.mlp.c_fc.bias"][3] = bad

    _rewrite_weights(checkpoint, damage)
    with pytest.raises(UserError, match=r"transformer.h.1.mlp.c_fc.bias holds 1 non-finite values"):
        GPT2LMHeadModel.from_pretrained(checkpoint)


def test_integer_weights_are_refused_naming_the_tensor(checkpoint):
    def damage(tensors):
        tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"].astype(np.int32)

    _rewrite_weights(checkpoint, damage)
    with pytest.raises(UserError, match="transformer.wpe.weight holds int32 values"):
        GPT2LMHeadModel.from_pretrained(checkpoint)


def test_a_float8_safetensors_file_is_one_line(checkpoint):
    """Safetensors dtypes numpy has no type for: the header is valid, the tensor unreadable as numpy."""
    path = checkpoint / "model.safetensors"
    header = json.dumps({"transformer.wte.weight": {"dtype": "F8_E4M3", "shape": [2, 2], "data_offsets": [0, 4]}})
    header = header.encode() + b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 4)
    with pytest.raises(UserError, match="transformer.wte.weight cannot be read as a numpy array"):
        GPT2LMHeadModel.from_pretrained(checkpoint)


@pytest.mark.parametrize("tree, message", [
    ({"transformer": {"wte": {"weight": np.zeros((2, 2), np.float32)}}}, "transformer/wte/weight is not a GPT-2"),
    ([1, 2, 3], "holds a list, not a tree of named parameters"),
    (7, "holds a int, not a tree"),
])
def test_a_flax_msgpack_that_is_not_a_gpt2_tree_is_one_line(checkpoint, tree, message):
    from flax import serialization

    os.remove(checkpoint / "model.safetensors")
    (checkpoint / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    with pytest.raises(UserError, match=message):
        GPT2LMHeadModel.from_pretrained(checkpoint)


def test_a_config_with_a_huge_n_layer_is_refused_at_once(checkpoint):
    """The expected names come from the config's arithmetic, not from tracing a model of that size."""
    edit_config(checkpoint, n_layer=100_000)
    start = time.monotonic()
    with pytest.raises(UserError, match="missing transformer.h.10.attn.c_attn.bias"):
        GPT2LMHeadModel.from_pretrained(checkpoint)
    assert time.monotonic() - start < 60  # it took about an hour when the whole model was traced first


def test_cache_sizes_and_run_steps_are_checked(tmp_path):
    model = GPT2LMHeadModel.from_pretrained(FIXTURE)
    n_positions = model.config.n_positions
    for batch, length, message in ((1, n_positions + 1, "max_length must be an integer in"), (-1, 8, "batch_size"),
                                   (1, 0, "max_length"), (2.0, 8, "batch_size")):
        with pytest.raises(UserError, match=message):
            model.init_cache(batch, length)
    run = os.path.join(os.path.dirname(__file__), "fixtures", "run_v1")
    with pytest.raises(UserError, match=r"step must be 'latest', 'best' or a step number, got 10.5"):
        GPT2LMHeadModel.from_pretrained(run, step=10.5)
    assert GPT2LMHeadModel.from_pretrained(run, step="10").run_step == 10
    with pytest.raises(UserError, match="no such run directory"):
        GPT2LMHeadModel.from_pretrained(tmp_path / "missing", step="latest")


def test_a_model_no_device_holds_is_refused_before_it_is_allocated():
    with pytest.raises(UserError, match=r"needs at least [\d,.]+ GiB per device .* more than"):
        GPT2LMHeadModel(GPT2Config(n_embd=10**9, n_head=1, n_layer=1))  # this killed the interpreter
