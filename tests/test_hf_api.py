"""The Hugging Face forward interface: the KV cache from user code (HF Flax's and HF PyTorch's patterns),
hidden states, attentions, inputs_embeds, token_type_ids, return_dict, and the base GPT2Model, checked
against the full forward and against transformers' PyTorch GPT-2 on the same weights."""

import jax
import numpy as np
import pytest
from hf_reference import TINY_CONFIGS, make_reference_model

from gpt2jax import Cache, GPT2Config, GPT2LMHeadModel, GPT2Model, UserError, forward

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
RANDOM_CONFIGS = {  # small and odd: head dim 5, n_inner unset, 1 layer; and one with n_inner and gelu
    "h5": dict(vocab_size=61, n_positions=48, n_embd=20, n_layer=3, n_head=4, **NO_DROPOUT),
    "one_layer": dict(vocab_size=33, n_positions=40, n_embd=24, n_layer=1, n_head=2, n_inner=40,
                      activation_function="gelu", **NO_DROPOUT),
}


def random_model(name: str, seed: int = 0) -> GPT2LMHeadModel:
    """Every parameter random (biases and LayerNorms too), so a misplaced tensor shows."""
    model = GPT2LMHeadModel(GPT2Config(**RANDOM_CONFIGS[name]), seed=seed)
    leaves, tree = jax.tree.flatten(model.params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    model.params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return model


def left_padded(vocab_size: int, shape=(3, 11), seed=0):
    """ids, a mask with rows 1 and 2 left-padded (3 and 6 slots), and the positions that follow the mask."""
    ids = np.random.default_rng(seed).integers(0, vocab_size, shape)
    mask = np.ones(shape, np.int32)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


@pytest.mark.parametrize("name", sorted(RANDOM_CONFIGS))
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_pytorch_style_cache_loop_equals_the_full_forward(name, chunk, padded):
    """`use_cache=True` starts a cache sized to the prompt; each call then passes the new tokens and the mask
    of all tokens so far. The cache grows as needed; every position's logits equal the full forward's."""
    model = random_model(name)
    ids, mask, positions = left_padded(model.config.vocab_size)
    if not padded:
        mask, positions = np.ones_like(mask), np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    full = np.asarray(model(ids, mask, positions).logits)
    prompt = 4
    out = model(ids[:, :prompt], mask[:, :prompt], positions[:, :prompt], use_cache=True)
    assert out.past_key_values.max_length == prompt and out.past_key_values.get_seq_length() == prompt
    pieces = [out.logits]
    for start in range(prompt, ids.shape[1], chunk):
        stop = min(start + chunk, ids.shape[1])
        out = model(ids[:, start:stop], mask[:, :stop], positions[:, start:stop], past_key_values=out.past_key_values)
        assert out.past_key_values.get_seq_length() == stop
        pieces.append(out.logits)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1)[real], full[real], atol=1e-5)


@pytest.mark.parametrize("name", sorted(RANDOM_CONFIGS))
def test_flax_style_init_cache_with_a_mask_over_max_length_equals_the_full_forward(name):
    """HF Flax's own test pattern: init_cache(batch, max_length), the mask spanning max_length (zeros for
    the left padding and ones after the tokens), positions from the caller; the calls compile once."""
    model = random_model(name, seed=1)
    ids, mask, positions = left_padded(model.config.vocab_size, seed=1)
    full = np.asarray(model(ids, mask, positions).logits)
    B, T = ids.shape
    max_length = T + 5
    mask_max = np.concatenate([mask, np.ones((B, max_length - T), np.int32)], axis=1)
    out = model(ids[:, :-4], mask_max, positions[:, :-4], past_key_values=model.init_cache(B, max_length))
    pieces = [out.logits]
    for t in range(T - 4, T):
        if t == T - 2:
            compiled = forward.forward._cache_size()
        out = model(ids[:, t:t + 1], mask_max, positions[:, t:t + 1], past_key_values=out.past_key_values)
        pieces.append(out.logits)
    assert forward.forward._cache_size() == compiled, "a cached call of an already seen shape compiled again"
    assert out.past_key_values.max_length == max_length  # preallocated: never grown
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1)[real], full[real], atol=1e-5)


def test_a_greedy_loop_written_with_the_cache_gives_generates_tokens():
    model = random_model("h5", seed=2)
    prompt = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 6))
    expected = model.generate(prompt, max_new_tokens=12, eos_token_id=-1)
    ids, mask = prompt, np.ones_like(prompt)
    out = model(ids, mask, use_cache=True)
    for _ in range(12):
        next_ids = np.argmax(np.asarray(out.logits[:, -1]), axis=-1)[:, None]
        ids, mask = np.concatenate([ids, next_ids], axis=1), np.concatenate([mask, np.ones_like(next_ids)], axis=1)
        out = model(next_ids, attention_mask=mask, past_key_values=out.past_key_values)
    np.testing.assert_array_equal(ids, expected)


def test_bool_and_int_attention_masks_give_identical_outputs():
    model = random_model("h5", seed=3)
    ids, mask, positions = left_padded(model.config.vocab_size, seed=3)
    as_int = model(ids, mask, positions, output_hidden_states=True)
    as_bool = model(ids, mask.astype(bool), positions, output_hidden_states=True)
    np.testing.assert_array_equal(as_int.logits, as_bool.logits)
    for a, b in zip(as_int.hidden_states, as_bool.hidden_states):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request, tmp_path_factory):
    """A transformers GPT-2 (every parameter random, eager attention) and ours loaded from its save."""
    reference = make_reference_model(TINY_CONFIGS[request.param], seed=5)
    directory = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(directory)
    return reference, GPT2LMHeadModel.from_pretrained(directory)


def torch_long(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.long)


def test_hidden_states_and_attentions_equal_transformers(pair):
    reference, ours = pair
    ids, mask, positions = left_padded(reference.config.vocab_size, seed=6)
    with torch.no_grad():
        expected = reference(torch_long(ids), attention_mask=torch_long(mask), position_ids=torch_long(positions),
                             output_hidden_states=True, output_attentions=True)
    out = ours(ids, mask, positions, output_hidden_states=True, output_attentions=True)
    n_layer = reference.config.n_layer
    assert len(out.hidden_states) == len(expected.hidden_states) == n_layer + 1
    assert len(out.attentions) == len(expected.attentions) == n_layer
    real = mask.astype(bool)
    for mine, theirs in zip(out.hidden_states, expected.hidden_states):
        np.testing.assert_allclose(np.asarray(mine)[real], theirs.numpy()[real], atol=1e-5)
    for mine, theirs in zip(out.attentions, expected.attentions):
        assert mine.shape == theirs.shape  # (B, H, T, S)
        rows = np.broadcast_to(real[:, None, :, None], mine.shape)  # padded queries differ (all keys masked)
        np.testing.assert_allclose(np.asarray(mine)[rows], theirs.numpy()[rows], atol=1e-5)


def test_inputs_embeds_and_token_type_ids_equal_transformers(pair):
    reference, ours = pair
    ids, _, _ = left_padded(reference.config.vocab_size, seed=7)
    token_types = np.random.default_rng(7).integers(0, reference.config.vocab_size, ids.shape)
    embeds = np.random.default_rng(8).normal(size=(*ids.shape, reference.config.n_embd)).astype(np.float32)
    with torch.no_grad():
        by_types = reference(torch_long(ids), token_type_ids=torch_long(token_types)).logits.numpy()
        by_embeds = reference(inputs_embeds=torch.as_tensor(embeds)).logits.numpy()
    np.testing.assert_allclose(ours(ids, token_type_ids=token_types).logits, by_types, atol=1e-5)
    np.testing.assert_allclose(ours(inputs_embeds=embeds).logits, by_embeds, atol=1e-5)
    wte = np.asarray(ours.params["transformer"]["wte"]["embedding"])
    np.testing.assert_allclose(ours(inputs_embeds=wte[ids]).logits, ours(ids).logits, atol=1e-5)


def test_past_key_values_after_a_prefix_equal_transformers(pair):
    reference, ours = pair
    ids, _, _ = left_padded(reference.config.vocab_size, seed=9)
    with torch.no_grad():
        out = reference(torch_long(ids[:, :7]), use_cache=True)
        theirs = getattr(out, "cache", None) or out.past_key_values  # renamed in transformers 5.2x
        expected = [(layer.keys.numpy().copy(), layer.values.numpy().copy()) for layer in theirs.layers]
        after = reference(torch_long(ids[:, 7:]), **{"cache" if hasattr(out, "cache") else "past_key_values": theirs},
                          use_cache=True).logits.numpy()  # (this call fills `theirs` further)
    cache = ours(ids[:, :7], use_cache=True).past_key_values
    assert len(cache.to_legacy_cache()) == len(expected) == reference.config.n_layer
    for (key, value), (their_key, their_value) in zip(cache.to_legacy_cache(), expected):
        assert key.shape == their_key.shape  # (B, H, S, K)
        np.testing.assert_allclose(key, their_key, atol=1e-5)
        np.testing.assert_allclose(value, their_value, atol=1e-5)
    np.testing.assert_allclose(ours(ids[:, 7:], past_key_values=cache).logits, after, atol=1e-5)


def test_return_dict_false_is_hfs_tuple_and_outputs_index_like_hf():
    model = random_model("h5", seed=10)
    ids = np.random.default_rng(10).integers(0, model.config.vocab_size, (2, 5))
    out = model(ids, labels=ids, use_cache=True, output_hidden_states=True)
    loss, logits, cache, hidden = model(ids, labels=ids, use_cache=True, output_hidden_states=True, return_dict=False)
    np.testing.assert_array_equal(loss, out.loss)
    np.testing.assert_array_equal(logits, out["logits"])
    assert isinstance(cache, Cache) and out.cache is out.past_key_values and len(hidden) == 4
    assert out.keys() == ["loss", "logits", "past_key_values", "hidden_states"] and out[1] is out.logits
    only_logits = model(ids, return_dict=False)
    assert len(only_logits) == 1 and only_logits[0].shape == (2, 5, model.config.vocab_size)
    last = model(ids, logits_to_keep=2).logits
    np.testing.assert_allclose(last, out.logits[:, -2:], atol=1e-6)


def test_gpt2model_is_the_base_of_the_lm_and_round_trips_through_transformers(tmp_path):
    model = random_model("h5", seed=11)
    ids = np.random.default_rng(11).integers(0, model.config.vocab_size, (2, 7))
    model.save_pretrained(tmp_path / "lm")
    base = GPT2Model.from_pretrained(tmp_path / "lm")
    lm_out = model(ids, output_hidden_states=True)
    out = base(ids, output_hidden_states=True, use_cache=True)
    np.testing.assert_allclose(out.last_hidden_state, lm_out.hidden_states[-1], atol=1e-6)
    assert out.past_key_values.get_seq_length() == 7 and len(out.hidden_states) == 4
    base.save_pretrained(tmp_path / "base")
    theirs = transformers.GPT2Model.from_pretrained(tmp_path / "base").eval()
    assert sorted(base.state_dict()) == sorted(theirs.state_dict())
    with torch.no_grad():
        expected = theirs(torch_long(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(out.last_hidden_state, expected, atol=1e-5)
    with pytest.raises(TypeError, match="labels"):  # the base model has no head: no loss, no logits
        base(ids, labels=ids)


def test_forward_argument_errors_are_one_clear_line():
    model = random_model("h5", seed=12)
    ids = np.zeros((2, 4), int)
    cache = model(ids, use_cache=True).past_key_values
    full = model.init_cache(2, 5)
    cases = [
        (dict(input_ids=ids, inputs_embeds=np.zeros((2, 4, 20))), "exactly one of input_ids and inputs_embeds"),
        (dict(inputs_embeds=np.zeros((2, 4, 7))), "inputs_embeds must have shape (batch, time, n_embd=20)"),
        (dict(input_ids=ids, past_key_values=((1, 2),)), "past_key_values must be a gpt2jax Cache"),
        (dict(input_ids=ids, past_key_values=cache, cache=cache), "give the cache once"),
        (dict(input_ids=ids[:1], past_key_values=cache), "the cache is for batch 2"),
        (dict(input_ids=ids, past_key_values=cache, attention_mask=np.ones((2, 5))), "attention_mask must be (2, 4)"),
        (dict(input_ids=ids, past_key_values=model(ids, past_key_values=full).past_key_values,
              attention_mask=np.ones((2, 5))), "the cache's 5 slots are full"),
        (dict(input_ids=np.zeros((2, 45), int), past_key_values=cache), "exceed n_positions=48"),
        (dict(input_ids=ids, token_type_ids=np.zeros((2, 3), int)), "token_type_ids must have the shape"),
        (dict(input_ids=ids, token_type_ids=np.full((2, 4), 99)), "token_type_ids has values in [99, 99]"),
        (dict(input_ids=ids, encoder_hidden_states=np.zeros((2, 4, 20))), "no cross-attention"),
        (dict(input_ids=ids, labels=ids, logits_to_keep=1), "leave logits_to_keep at 0"),
        (dict(input_ids=ids, attention_mask=np.ones((2, 3))), "attention_mask must have shape (2, 4)"),
        (dict(input_ids=np.zeros((2, 0), int)), "the input is empty: batch 2, 0 tokens"),
        (dict(input_ids=np.zeros(4, int)), "input_ids must have shape (batch, time), got (4,)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError) as caught:
            model(**kwargs)
        assert message in str(caught.value), (message, str(caught.value))
