"""gpt2jax as a replacement for Hugging Face's Flax GPT-2: pure calls with `params=` under jax's transforms,
`_do_init=False`, HF Flax's parameter tree, the config's runtime fields, dtype casts, gradient checkpointing,
and weights crossing to and from PyTorch and between the base and the head model."""

import dataclasses
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from hf_reference import TINY_CONFIGS, make_reference_model

from gpt2jax import GPT2Config, GPT2LMHeadModel, GPT2Model, UserError
from gpt2jax.checkpoint import convert_trees
from gpt2jax.model import GPT2LMHeadModule

CONFIG = GPT2Config(**TINY_CONFIGS["odd"])  # dropout on (0.1, the default), odd sizes, three layers
IDS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 9))
MASK = np.ones((2, 9), np.int32)
MASK[1, :4] = 0


def flat(tree):
    return traverse_util.flatten_dict(tree)


def assert_trees_equal(a, b):
    assert flat(a).keys() == flat(b).keys()
    for path, leaf in flat(a).items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat(b)[path]), err_msg=str(path))


def test_a_call_inside_jit_leaves_the_model_as_it_was():
    """The bug HF's test_jit_compilation found: a jitted call stored a traced key on the model, and every
    later eager call or retrace failed."""
    model = GPT2LMHeadModel(CONFIG, seed=1)
    before = dict(vars(model))
    eager = model(IDS, MASK).logits

    @jax.jit
    def jitted(input_ids, attention_mask, key):
        return model(input_ids, attention_mask, dropout_rng=key, train=True).logits, model(input_ids).logits

    dropped, plain = jitted(IDS, MASK, jax.random.key(3))
    np.testing.assert_allclose(plain, model(IDS).logits, atol=1e-6)
    assert np.abs(dropped - eager).max() > 1e-3  # dropout did apply inside
    np.testing.assert_array_equal(model(IDS, MASK).logits, eager)  # eager after jit
    assert jitted(IDS[:, :5], MASK[:, :5], jax.random.key(3))[0].shape == (2, 5, CONFIG.vocab_size)  # a retrace
    with jax.disable_jit():
        np.testing.assert_allclose(jitted(IDS, MASK, jax.random.key(3))[1], plain, atol=1e-5)
    assert {k: id(v) for k, v in vars(model).items()} == {k: id(v) for k, v in before.items()}


def test_grad_over_params_equals_the_module_applied_by_hand_under_jit_and_pmap():
    model = GPT2LMHeadModel(CONFIG, seed=2)
    key = jax.random.key(5)

    def loss(params, train):
        return model(IDS, MASK, params=params, dropout_rng=key, train=train, labels=IDS).loss

    def by_hand(params, train):
        logits, _ = GPT2LMHeadModule(CONFIG).apply({"params": params}, jnp.asarray(IDS), jnp.asarray(MASK),
                                                   train=train, rngs={"dropout": key})
        return _hf_loss(logits, IDS)

    for train in (False, True):
        ours, reference = jax.grad(loss)(model.params, train), jax.grad(by_hand)(model.params, train)
        for path, g in flat(ours).items():
            np.testing.assert_allclose(g, flat(reference)[path], atol=1e-6, err_msg=str(path))
    np.testing.assert_allclose(jax.jit(loss, static_argnums=1)(model.params, False), loss(model.params, False),
                               rtol=1e-6)
    other = jax.tree.map(lambda p: p * 1.5, model.params)
    per_device = jax.pmap(lambda p, x: model(x, params=p).logits)(
        jax.tree.map(lambda p: jnp.stack([p, p]), other), jnp.stack([IDS, IDS[::-1]]))
    np.testing.assert_allclose(per_device[1], GPT2LMHeadModel(CONFIG, params=other)(IDS[::-1]).logits, atol=1e-5)
    assert not np.allclose(per_device[0], model(IDS).logits, atol=1e-3)  # params= was used, not model.params


def _hf_loss(logits, labels):
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(labels)[:, 1:, None], axis=-1))


def test_training_with_dropout_needs_a_key_and_the_key_decides_the_mask():
    model = GPT2LMHeadModel(CONFIG, seed=2)
    with pytest.raises(UserError, match="dropout_rng"):
        model(IDS, train=True)
    a, b = (model(IDS, train=True, dropout_rng=jax.random.key(k)).logits for k in (0, 1))
    np.testing.assert_array_equal(a, model(IDS, train=True, dropout_rng=jax.random.key(0)).logits)
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("cls", [GPT2LMHeadModel, GPT2Model])
def test_without_init_the_model_holds_no_params_and_calls_take_them(cls, tmp_path):
    model = cls(CONFIG, _do_init=False)
    with pytest.raises(ValueError, match="_do_init=False"):
        model.params
    params = model.init_weights(model.key, model.input_shape)
    assert set(flat(params)) == model.required_params
    shapes = {path: leaf.shape for path, leaf in flat(model.params_shape_tree).items()}
    assert shapes == {path: leaf.shape for path, leaf in flat(params).items()}
    with pytest.raises(ValueError, match="_do_init=False"):
        model.params = params
    expected = cls(CONFIG, params=params)(IDS, MASK).to_tuple()[0]
    np.testing.assert_array_equal(model(IDS, MASK, params=params).to_tuple()[0], expected)
    # params given in part: those are kept, the missing ones drawn
    partial = {k: v for k, v in params.items() if k != "wpe"} if cls is GPT2Model else \
        {"transformer": {k: v for k, v in params["transformer"].items() if k != "wpe"}}
    completed = model.init_weights(jax.random.key(9), (1, 1), params=partial)
    assert set(flat(completed)) == model.required_params
    for path, leaf in flat(partial).items():
        np.testing.assert_array_equal(flat(completed)[path], leaf)
    # through from_pretrained: (model, params), and the model holds none
    cls(CONFIG, params=params).save_pretrained(tmp_path)
    loaded, loaded_params = cls.from_pretrained(tmp_path, _do_init=False)
    with pytest.raises(ValueError):
        loaded.params
    np.testing.assert_allclose(loaded(IDS, MASK, params=loaded_params).to_tuple()[0], expected, atol=1e-6)


def test_the_parameter_tree_is_hf_flax_s():
    """Names and shapes as transformers 4.x's FlaxGPT2 held them: its tree is PyTorch's state dict with
    Conv1D weights (in, out) transposed to kernels (out, in), `h.<i>` as h/<i>, and no lm_head (tied)."""
    torch_model = make_reference_model(TINY_CONFIGS["odd"])
    expected = {}
    for name, tensor in torch_model.state_dict().items():
        *modules, leaf = name.split(".")
        if name == "lm_head.weight" or leaf in ("masked_bias",) or (leaf == "bias" and modules[-1] == "attn"):
            continue
        if modules[-1] in ("c_attn", "c_proj", "c_fc") and leaf == "weight":
            expected[(*modules, "kernel")] = tuple(tensor.shape[::-1])
        elif modules[-1] in ("wte", "wpe"):
            expected[(*modules, "embedding")] = tuple(tensor.shape)
        else:
            expected[(*modules, "scale" if leaf == "weight" else leaf)] = tuple(tensor.shape)
    head = GPT2LMHeadModel(CONFIG, seed=4)
    assert {path: tuple(leaf.shape) for path, leaf in flat(head.params).items()} == expected
    assert head.params["transformer"]["h"]["2"]["mlp"]["c_fc"]["kernel"].shape == (37, 30)  # (out, in)
    base = GPT2Model(CONFIG, seed=4)
    assert_trees_equal(base.params, head.params["transformer"])  # the same seed gives the same weights
    assert set(base.params) == {"wte", "wpe", "h", "ln_f"}


def test_base_and_head_load_each_other_and_through_pytorch(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    base, head = GPT2Model(CONFIG, seed=5), GPT2LMHeadModel(CONFIG, seed=6)
    base.save_pretrained(tmp_path / "base")
    head.save_pretrained(tmp_path / "head")
    assert_trees_equal(GPT2LMHeadModel.from_pretrained(tmp_path / "base").params["transformer"], base.params)
    assert_trees_equal(GPT2Model.from_pretrained(tmp_path / "head").params, head.params["transformer"])
    # from PyTorch: transformers' GPT2Model / GPT2LMHeadModel holding our weights, saved by transformers
    for ours, torch_class, load, expected in ((base, transformers.GPT2Model, GPT2LMHeadModel, base.params),
                                              (head, transformers.GPT2LMHeadModel, GPT2Model,
                                               head.params["transformer"])):
        theirs = torch_class.from_pretrained(tmp_path / ("base" if ours is base else "head"))
        theirs.save_pretrained(tmp_path / "pt")
        loaded = load.from_pretrained(tmp_path / "pt", from_pt=True).params
        assert_trees_equal(loaded["transformer"] if load is GPT2LMHeadModel else loaded, expected)


def test_outputs_equal_pytorch_both_ways_including_save_and_reload(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    reference = make_reference_model(TINY_CONFIGS["odd"], seed=3)
    reference.config.use_cache = False  # as HF's tests do: then both return the logits alone
    reference.save_pretrained(tmp_path / "pt")
    ours = GPT2LMHeadModel.from_pretrained(tmp_path / "pt", from_pt=True)
    assert ours.config.use_cache is False
    with torch.no_grad():
        expected = reference(torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK)).to_tuple()
    got = ours(IDS, MASK).to_tuple()
    assert len(got) == len(expected) == 1
    np.testing.assert_allclose(got[0][0], expected[0][0].numpy(), atol=1e-5)  # the unpadded row
    np.testing.assert_allclose(got[0][1, 4:], expected[0][1, 4:].numpy(), atol=1e-5)
    # and back: our save, read by transformers, keeps use_cache=False and gives the same outputs
    ours.save_pretrained(tmp_path / "ours")
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        reloaded = again(torch.as_tensor(IDS)).to_tuple()
    assert len(reloaded) == 1
    np.testing.assert_allclose(ours(IDS).logits, reloaded[0].numpy(), atol=1e-5)


def test_runtime_fields_have_hfs_defaults_are_checked_and_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    reference = transformers.GPT2Config()
    config = GPT2Config(**TINY_CONFIGS["even"])
    for name in ("use_cache", "pad_token_id", "output_hidden_states", "output_attentions", "return_dict",
                 "is_encoder_decoder"):
        assert getattr(config, name) == getattr(reference, name), name
    before = dataclasses.replace(config)
    for name, value in (("output_attentions", "yes"), ("pad_token_id", 1.5), ("n_head", 5), ("use_cache", None)):
        with pytest.raises(UserError, match=name):
            setattr(config, name, value)
        assert config == before  # the bad value was not kept
    config.use_cache, config.pad_token_id, config.output_hidden_states = False, 7, True
    config.my_note = "kept"  # unknown fields travel along, as in HF configs
    config.save(tmp_path)
    theirs = transformers.GPT2Config.from_pretrained(tmp_path)
    assert (theirs.use_cache, theirs.pad_token_id, theirs.output_hidden_states, theirs.my_note) == (False, 7, True,
                                                                                                      "kept")
    theirs.task_specific_params = {"text-generation": {"max_length": 50}}
    theirs.save_pretrained(tmp_path / "again")
    back = GPT2Config.from_json_file(tmp_path / "again" / "config.json")
    assert back == config and back.my_note == "kept"
    assert back.extra["task_specific_params"] == {"text-generation": {"max_length": 50}}
    back.save(tmp_path / "third")
    written = json.loads((tmp_path / "third" / "config.json").read_text())
    assert written["task_specific_params"] == {"text-generation": {"max_length": 50}} and written["my_note"] == "kept"
    assert not any(k.startswith("_") for k in written)
    assert hash(back) == hash(config)  # extra is not part of the value


def test_output_options_and_return_dict_default_to_the_config():
    config = dataclasses.replace(CONFIG)
    plain = GPT2LMHeadModel(config, seed=1)(IDS)
    assert len(plain) == 1 and "logits" in plain and "hidden_states" not in plain
    config.output_hidden_states, config.output_attentions = True, True
    out = GPT2LMHeadModel(config, seed=1)(IDS)
    assert list(out) == ["logits", "hidden_states", "attentions"] and len(out) == 3
    assert len(out.hidden_states) == CONFIG.n_layer + 1 and out.attentions[0].shape == (2, CONFIG.n_head, 9, 9)
    assert len(GPT2LMHeadModel(config, seed=1)(IDS, output_attentions=False)) == 2  # a call's choice wins
    config.return_dict = False
    as_tuple = GPT2Model(config, seed=1)(IDS)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    np.testing.assert_allclose(as_tuple[0], GPT2Model(CONFIG, seed=1)(IDS).last_hidden_state, atol=1e-6)
    with pytest.raises(KeyError):
        plain["loss"]


def test_generate_pads_with_the_config_s_pad_token_and_takes_params():
    config = dataclasses.replace(CONFIG)
    model = GPT2LMHeadModel(config, seed=1)
    other = GPT2LMHeadModel(config, seed=2)
    prompt = IDS[:, :4]
    np.testing.assert_array_equal(model.generate(prompt, max_new_tokens=5, params=other.params),
                                  other.generate(prompt, max_new_tokens=5))
    eos = int(model.generate(prompt, max_new_tokens=5)[0, 4])  # the first new token, made the EOS
    config.eos_token_id, config.pad_token_id = eos, 3
    padded = GPT2LMHeadModel(config, params=model.params).generate(prompt, max_new_tokens=5)
    assert padded[0, 4] == eos and set(padded[0, 5:]) == {3}


def test_dtype_casts_follow_hfs_mask_semantics():
    model = GPT2LMHeadModel(CONFIG, seed=1)
    dtypes = lambda tree: {path: leaf.dtype for path, leaf in flat(tree).items()}
    assert set(dtypes(model.to_bf16(model.params)).values()) == {jnp.dtype(jnp.bfloat16)}
    half = model.to_fp16(model.params)
    assert set(dtypes(half).values()) == {jnp.dtype(jnp.float16)}
    assert set(dtypes(model.to_fp32(half)).values()) == {jnp.dtype(jnp.float32)}
    kept = ("transformer", "h", "1", "attn", "c_attn", "kernel")
    mask = traverse_util.unflatten_dict({path: path != kept for path in flat(model.params)})
    casts = dtypes(model.to_bf16(model.params, mask))
    assert casts.pop(kept) == jnp.float32 and set(casts.values()) == {jnp.dtype(jnp.bfloat16)}
    assert dtypes(model.to_fp32(half, mask))[kept] == jnp.float16
    assert dtypes(model.params)[kept] == jnp.float32  # a new tree: the model's own is untouched
    with pytest.raises(UserError, match="structure"):
        model.to_fp16(model.params, {"transformer": True})


@pytest.mark.parametrize("cast", ["to_fp16", "to_bf16"])
def test_half_precision_params_save_and_load_as_they_are(cast, tmp_path):
    head = GPT2LMHeadModel(CONFIG, seed=1)
    half = getattr(head, cast)(head.params)
    head.save_pretrained(tmp_path, params=half)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert_trees_equal(loaded.params, half)
    base = GPT2Model.from_pretrained(tmp_path)
    assert_trees_equal(base.params, half["transformer"])
    assert base.config.param_dtype == jnp.dtype(half["transformer"]["wte"]["embedding"].dtype).name
    np.testing.assert_allclose(loaded(IDS).logits, GPT2LMHeadModel(CONFIG, params=half)(IDS).logits, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_the_dtype_argument_sets_compute_not_storage(dtype):
    model = GPT2LMHeadModel(CONFIG, dtype=dtype)
    assert model.config.dtype == jnp.dtype(dtype).name and CONFIG.dtype == "float32"
    assert {leaf.dtype for leaf in jax.tree.leaves(model.params)} == {jnp.dtype(jnp.float32)}
    logits = model(IDS).logits
    assert logits.dtype == jnp.float32  # accumulated in float32 whatever the compute
    np.testing.assert_allclose(logits, GPT2LMHeadModel(CONFIG, params=model.params)(IDS).logits, atol=0.1)


def test_gradient_checkpointing_recomputes_blocks_and_changes_nothing_else():
    model = GPT2LMHeadModel(CONFIG, seed=3)
    remat = GPT2LMHeadModel(CONFIG, params=model.params)
    remat.enable_gradient_checkpointing()
    assert remat.config.gradient_checkpointing and not CONFIG.gradient_checkpointing
    key = jax.random.key(1)
    loss = lambda m: lambda p: m(IDS, params=p, labels=IDS, train=True, dropout_rng=key).loss
    np.testing.assert_allclose(remat(IDS).logits, model(IDS).logits, atol=1e-6)
    for path, g in flat(jax.grad(loss(remat))(model.params)).items():
        np.testing.assert_allclose(g, flat(jax.grad(loss(model))(model.params))[path], atol=1e-6)
    names = lambda m: str(jax.make_jaxpr(jax.grad(loss(m)))(model.params))
    assert names(remat).count("remat") == CONFIG.n_layer and "remat" not in names(model)


@pytest.mark.parametrize("cls", [GPT2LMHeadModel, GPT2Model])
def test_the_forward_signature_and_class_attributes_are_hf_flax_s(cls):
    names = list(inspect.signature(cls(CONFIG).__call__).parameters)
    assert names[:10] == ["input_ids", "attention_mask", "position_ids", "params", "past_key_values",
                          "dropout_rng", "train", "output_attentions", "output_hidden_states", "return_dict"]
    assert (cls.main_input_name, cls.base_model_prefix) == ("input_ids", "transformer")
    assert cls(CONFIG).can_generate() == (cls is GPT2LMHeadModel)


def test_old_parameter_trees_convert_both_ways_with_the_optimizer_moments():
    params = GPT2LMHeadModel(CONFIG, seed=1).params
    state = {"params": params, "opt_state": ({"mu": params, "nu": params}, ()), "step": jnp.int32(3)}
    old = convert_trees(state, to_format=1)
    assert set(old["params"]["transformer"]) == {"wte", "wpe", "ln_f", "h_0", "h_1", "h_2"}
    assert old["opt_state"][0]["mu"]["transformer"]["h_2"]["mlp"]["c_fc"]["kernel"].shape == (30, 37)  # (in, out)
    back = convert_trees(old, to_format=2)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    assert jax.tree.map(lambda x: x.shape, convert_trees(abstract, to_format=1)) == \
        jax.tree.map(lambda x: x.shape, old)


def test_the_expected_pytorch_shapes_are_the_models():
    """`hf.param_shapes` is arithmetic on the config (fast for any n_layer); it must name and shape exactly
    what the model holds."""
    from gpt2jax import hf

    for config in (CONFIG, GPT2Config(**TINY_CONFIGS["even"])):
        held = {name: tuple(array.shape) for name, array in hf.to_hf_state_dict(GPT2LMHeadModel(config).params).items()}
        assert hf.param_shapes(config) == held


@pytest.mark.parametrize("setting, message", [
    (dict(pad_token_id=CONFIG.vocab_size), f"pad_token_id={CONFIG.vocab_size} is not a token of this model"),
    (dict(pad_token_id=-5), "pad_token_id=-5 is not a token"),
    (dict(eos_token_id=-5), "eos_token_id=-5 is not a token of this model"),
    (dict(do_sample="no"), "do_sample must be True or False"),
    (dict(seed=2**70), "seed=1180591620717411303424 is out of range"),
])
def test_generate_refuses_ids_outside_the_vocabulary(setting, message):
    model = GPT2LMHeadModel(CONFIG, seed=1)
    with pytest.raises(UserError, match=message):
        model.generate(IDS[:, :3], max_new_tokens=2, **setting)
    assert model.generate(IDS[:, :3], max_new_tokens=2, eos_token_id=-1).shape == (2, 5)  # -1: EOS off
