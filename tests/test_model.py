"""The Flax GPT-2 against fixtures made by transformers, and its own invariants."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax import GPT2Config, GPT2LMHeadModel
from gpt2jax.attention import materialised
from gpt2jax.errors import UserError
from gpt2jax.model import init_cache, lm_loss
from hf_reference import TINY_CONFIGS, random_params  # its torch-free part

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# Written by scripts/make_fixtures.py from transformers, every tensor random (tests/hf_reference.py):
# name -> (HF checkpoint directory, expected outputs).
CHECKPOINTS = {
    "gelu": ("tiny_gpt2", "tiny_gpt2_expected.npz"),  # TINY_CONFIGS["odd"]: exact gelu, n_inner, odd sizes
    "gelu_new": ("tiny_gpt2_gelu_new", "tiny_gpt2_gelu_new_expected.npz"),  # "even": GPT-2's defaults
}
REGENERATE = "regenerate with: python scripts/make_fixtures.py (needs the reference extra)"
SMALL = GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4)
# bfloat16 compute against float32 on the fixture models (weights std 0.2, so attention is peaked,
# not the near-uniform attention of a fresh init), 4 x n_positions random tokens: measured max
# |logits difference| 0.087 (gelu), 0.098 (gelu_new), argmax agreement 0.988, 0.969 (over seeds
# 0-2: at most 0.098, at least 0.969). With the scores scaled by 1/head_dim instead of
# 1/sqrt(head_dim) in bf16 only, the difference is 1.8-5.9 and agreement 0.40-0.56.
BF16_LOGITS_ATOL = 0.25
BF16_MIN_ARGMAX_AGREEMENT = 0.9


def relative_error(actual, expected):
    return float(np.max(np.abs(np.asarray(actual) - expected)) / max(np.max(np.abs(expected)), 1e-12))


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request):
    return request.param


@pytest.fixture(scope="module")
def expected(checkpoint):
    return dict(np.load(os.path.join(FIXTURES, CHECKPOINTS[checkpoint][1])))


@pytest.fixture(scope="module")
def tiny(checkpoint):
    model = GPT2LMHeadModel.from_pretrained(os.path.join(FIXTURES, CHECKPOINTS[checkpoint][0]))
    assert model.config.activation_function == checkpoint, REGENERATE
    return model


def test_logits_match_transformers_fixture(tiny, expected):
    out = tiny(expected["input_ids"], expected["attention_mask"], expected["position_ids"])
    valid = expected["attention_mask"].astype(bool)
    diff = np.abs(np.asarray(out.logits) - expected["logits"])[valid].max()
    assert diff <= 1e-5, f"max |logits - transformers| = {diff}; {REGENERATE} if the reference changed"


def test_loss_matches_transformers_fixture(tiny, expected):
    out = tiny(expected["input_ids"], expected["attention_mask"], expected["position_ids"], labels=expected["labels"])
    assert relative_error(out.loss, expected["loss"]) <= 1e-6, (float(out.loss), float(expected["loss"]))


def test_grads_match_transformers_fixture(tiny, expected):
    def loss_fn(params):
        logits, _ = tiny.module.apply(
            {"params": params}, expected["input_ids"], expected["attention_mask"], expected["position_ids"]
        )
        return lm_loss(logits, jnp.asarray(expected["labels"]))

    grads = GPT2LMHeadModel(tiny.config, params=jax.grad(loss_fn)(tiny.params)).state_dict()
    reference = {k.removeprefix("grad:"): v for k, v in expected.items() if k.startswith("grad:")}
    assert set(reference) <= set(grads) and len(reference) == len(grads) - 1  # all; lm_head.weight is wte
    for name, ref in reference.items():
        assert relative_error(grads[name], ref) <= 1e-4, name


def test_greedy_generation_with_eos_matches_transformers_fixture(tiny, expected):
    """Left-padded prompts of different lengths; an EOS that the rows emit at different steps.

    transformers puts the pad after a row's EOS and stops once every row is done; we do the same
    but always return prompt + max_new_tokens tokens: compare the common prefix, then the rest is pad.
    """
    prompts, eos = expected["generate_prompts"], int(expected["generate_eos_token_id"])
    pad = int(expected["generate_eos_pad_token_id"])  # not 0, and never emitted: pad slots are unambiguous
    reference = expected["generate_eos_expected"]
    P, N, stop = prompts.shape[1], int(expected["generate_max_new_tokens"]), reference.shape[1]
    first_eos = [int(np.flatnonzero(row == eos)[0]) for row in reference[:, P:]]
    assert len(set(first_eos)) == len(first_eos), f"the fixture's rows should stop at different steps; {REGENERATE}"
    out = tiny.generate(prompts, expected["generate_attention_mask"], max_new_tokens=N, eos_token_id=eos,
                        pad_token_id=pad)
    assert out.shape == (len(prompts), P + N)
    np.testing.assert_array_equal(out[:, :stop], reference)
    assert np.all(out[:, stop:] == pad)


def test_hf_forward_outputs_match_transformers_fixture():
    """Without torch: hidden_states, attentions, token_type_ids / inputs_embeds logits and the cache after a
    prefix of tiny_gpt2 against transformers' (tests/test_hf_api.py checks them live when it is installed)."""
    expected = dict(np.load(os.path.join(FIXTURES, "tiny_gpt2_hf_api.npz")))
    model = GPT2LMHeadModel.from_pretrained(os.path.join(FIXTURES, "tiny_gpt2"))
    ids, mask = expected["input_ids"], expected["attention_mask"]
    out = model(ids, mask, expected["position_ids"], output_hidden_states=True, output_attentions=True)
    real = mask.astype(bool)
    assert len(out.hidden_states) == model.config.n_layer + 1 == len(out.attentions) + 1
    for i, state in enumerate(out.hidden_states):
        np.testing.assert_allclose(np.asarray(state)[real], expected[f"hidden_states:{i}"][real], atol=1e-5)
    for i, weights in enumerate(out.attentions):
        rows = np.broadcast_to(real[:, None, :, None], weights.shape)  # padded queries see no key
        np.testing.assert_allclose(np.asarray(weights)[rows], expected[f"attentions:{i}"][rows], atol=1e-5)
    np.testing.assert_allclose(model(ids, token_type_ids=expected["token_type_ids"]).logits,
                               expected["token_type_logits"], atol=1e-5)
    np.testing.assert_allclose(model(inputs_embeds=expected["inputs_embeds"]).logits,
                               expected["inputs_embeds_logits"], atol=1e-5)
    for i, (key, value) in enumerate(model(ids[:, :5], use_cache=True).past_key_values.to_legacy_cache()):
        np.testing.assert_allclose(key, expected[f"prefix_keys:{i}"], atol=1e-5)
        np.testing.assert_allclose(value, expected[f"prefix_values:{i}"], atol=1e-5)


@pytest.mark.parametrize("padded", [False, True], ids=["causal path", "masked path"])
def test_bfloat16_logits_close_to_float32_with_peaked_attention(tiny, padded):
    """Both attention paths: without a mask (the causal fast path) and with right padding (the masked one)."""
    bf16 = GPT2LMHeadModel(tiny.config.replace(dtype="bfloat16"), params=tiny.params)
    ids = np.random.default_rng(0).integers(0, tiny.config.vocab_size, (4, tiny.config.n_positions))
    mask = None
    if padded:
        mask = np.ones_like(ids)
        mask[1:, -5:] = 0
        ids = ids * mask  # padding tokens are 0; their logits are compared too (they see the real keys)
    fp32_logits, bf16_logits = np.asarray(tiny(ids, mask).logits), np.asarray(bf16(ids, mask).logits)
    assert bf16_logits.dtype == np.float32
    diff = np.abs(bf16_logits - fp32_logits).max()
    agreement = np.mean(bf16_logits.argmax(-1) == fp32_logits.argmax(-1))
    assert diff <= BF16_LOGITS_ATOL and agreement >= BF16_MIN_ARGMAX_AGREEMENT, (diff, agreement)


def test_from_pretrained_bfloat16_keeps_float32_params(tiny, checkpoint):
    bf16 = GPT2LMHeadModel.from_pretrained(os.path.join(FIXTURES, CHECKPOINTS[checkpoint][0]), dtype="bfloat16")
    assert bf16.config.dtype == "bfloat16" and bf16.config.compute_dtype == jnp.bfloat16
    assert bf16.config == tiny.config.replace(dtype="bfloat16")
    assert jax.tree.structure(bf16.params) == jax.tree.structure(tiny.params)
    for ours, fp32 in zip(jax.tree.leaves(bf16.params), jax.tree.leaves(tiny.params)):
        assert ours.dtype == jnp.float32
        np.testing.assert_array_equal(ours, fp32)
    ids = np.random.default_rng(1).integers(0, tiny.config.vocab_size, (4, tiny.config.n_positions))
    fp32_logits, bf16_logits = np.asarray(tiny(ids).logits), np.asarray(bf16(ids).logits)
    assert bf16_logits.dtype == np.float32
    diff = np.abs(bf16_logits - fp32_logits).max()
    agreement = np.mean(bf16_logits.argmax(-1) == fp32_logits.argmax(-1))
    assert 0 < diff <= BF16_LOGITS_ATOL and agreement >= BF16_MIN_ARGMAX_AGREEMENT, (diff, agreement)


def test_save_pretrained_writes_every_tensor_of_an_all_random_model(tmp_path):
    """Random init (zero biases, unit LayerNorms, as transformers' defaults) would hide an export that
    drops or zeroes biases and LayerNorm tensors; here every tensor is random."""
    from safetensors.numpy import load_file

    config = GPT2Config(**TINY_CONFIGS["odd"])
    model = GPT2LMHeadModel(config, params=random_params(GPT2LMHeadModel(config).params, seed=8))
    model.save_pretrained(tmp_path)
    saved = load_file(os.fspath(tmp_path / "model.safetensors"))
    state = model.state_dict()
    del state["lm_head.weight"]  # tied to transformer.wte.weight, which transformers re-ties on load
    assert sorted(saved) == sorted(state)
    for name, value in state.items():
        assert saved[name].dtype == np.float32, name
        np.testing.assert_array_equal(saved[name], value, err_msg=name)
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert loaded.config == config
    assert jax.tree.structure(loaded.params) == jax.tree.structure(model.params)
    for ours, original in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(model.params)):
        assert ours.dtype == original.dtype
        np.testing.assert_array_equal(ours, original)


def test_causality():
    model = GPT2LMHeadModel(SMALL, seed=1)
    ids = np.random.default_rng(0).integers(0, SMALL.vocab_size, (2, 12))
    changed = ids.copy()
    changed[:, 7] = (changed[:, 7] + 1) % SMALL.vocab_size
    a, b = np.asarray(model(ids).logits), np.asarray(model(changed).logits)
    np.testing.assert_array_equal(a[:, :7], b[:, :7])
    assert np.abs(a[:, 7:] - b[:, 7:]).min(axis=-1).max() > 0


def test_right_padding_does_not_change_real_tokens():
    model = GPT2LMHeadModel(SMALL, seed=2)
    ids = np.random.default_rng(1).integers(0, SMALL.vocab_size, (1, 9))
    padded = np.concatenate([ids, np.zeros((1, 4), int)], axis=1)
    mask = np.concatenate([np.ones((1, 9), int), np.zeros((1, 4), int)], axis=1)
    np.testing.assert_allclose(model(padded, mask).logits[:, :9], model(ids).logits, atol=1e-5)


def test_left_padding_with_position_ids_matches_unpadded():
    model = GPT2LMHeadModel(SMALL, seed=3)
    ids = np.random.default_rng(2).integers(0, SMALL.vocab_size, (1, 9))
    padded = np.concatenate([np.zeros((1, 3), int), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 3), int), np.ones((1, 9), int)], axis=1)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    logits = np.asarray(model(padded, mask, positions).logits)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits[:, 3:], model(ids).logits, atol=1e-5)


def test_cached_decoding_equals_full_forward():
    model = GPT2LMHeadModel(SMALL, seed=4)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, SMALL.vocab_size, (2, 10)))
    full, _ = model.module.apply({"params": model.params}, ids)
    cache = init_cache(SMALL, batch_size=2, length=16)
    mask = jnp.ones((2, 16), jnp.int32)
    prefill, cache = model.module.apply({"params": model.params}, ids[:, :7], mask, cache=cache)
    steps = [prefill]
    for t in range(7, 10):
        logits, cache = model.module.apply({"params": model.params}, ids[:, t : t + 1], mask, cache=cache)
        assert int(cache[0].index) == t + 1
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_loss_ignores_minus_100_and_shifts():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
    labels = jnp.array([[1, 2, -100, 4, 5], [0, -100, -100, 3, 6]])
    logp = jax.nn.log_softmax(logits, axis=-1)
    terms = [-logp[b, t - 1, labels[b, t]] for b in range(2) for t in range(1, 5) if labels[b, t] != -100]
    np.testing.assert_allclose(lm_loss(logits, labels), np.mean(terms), rtol=1e-6)


def test_dropout_only_in_train_mode():
    model = GPT2LMHeadModel(SMALL.replace(attn_pdrop=0.2, resid_pdrop=0.2, embd_pdrop=0.2), seed=5)
    ids = np.arange(10)[None] % SMALL.vocab_size
    key = jax.random.key(0)
    np.testing.assert_array_equal(model(ids).logits, model(ids, train=False, dropout_rng=key).logits)
    a = model(ids, train=True, dropout_rng=key).logits
    np.testing.assert_array_equal(a, model(ids, train=True, dropout_rng=key).logits)
    assert np.abs(a - model(ids).logits).max() > 1e-3
    assert np.abs(a - model.train()(ids, dropout_rng=key).logits).max() < 1e-6  # train() switches the default
    with pytest.raises(UserError, match="dropout_rng"):  # as in HF Flax: dropout never draws a key of its own
        model(ids)
    np.testing.assert_array_equal(model.eval()(ids).logits, model(ids, train=False).logits)
    no_dropout = GPT2LMHeadModel(SMALL.replace(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0), seed=5)
    np.testing.assert_array_equal(no_dropout(ids, train=True).logits, no_dropout(ids).logits)


def test_attention_dropout_path_equals_fused_attention_without_dropout():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 6, 3, 8)) for i in range(3))
    mask = jnp.tril(jnp.ones((6, 6), bool))[None].repeat(2, 0).at[1, :, :2].set(False)
    fused = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    manual, _ = materialised(q, k, v, mask, 0.0, jax.random.key(0))
    np.testing.assert_allclose(manual[:, 2:], fused[:, 2:], atol=1e-5)
    np.testing.assert_allclose(manual[0], fused[0], atol=1e-5)
    dropped, _ = materialised(q, k, v, mask, 0.5, jax.random.key(0))
    assert np.abs(dropped - manual).max() > 1e-2


def test_init_matches_gpt2_scheme():
    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=256, n_layer=8, n_head=8)
    params = GPT2LMHeadModel(config, seed=0).params["transformer"]
    np.testing.assert_allclose(np.std(params["wte"]["embedding"]), 0.02, rtol=0.02)
    np.testing.assert_allclose(np.std(params["h"]["0"]["attn"]["c_attn"]["kernel"]), 0.02, rtol=0.02)
    np.testing.assert_allclose(np.std(params["h"]["3"]["mlp"]["c_proj"]["kernel"]), 0.02 / 4.0, rtol=0.02)
    np.testing.assert_allclose(np.std(params["h"]["3"]["attn"]["c_proj"]["kernel"]), 0.02 / 4.0, rtol=0.03)
    assert params["h"]["3"]["mlp"]["c_proj"]["kernel"].shape == (256, 1024)  # (out, in), as HF Flax holds it
    assert not np.any(params["h"]["0"]["mlp"]["c_fc"]["bias"])
    np.testing.assert_array_equal(params["ln_f"]["scale"], 1.0)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    fp32 = GPT2LMHeadModel(SMALL, seed=6)
    bf16 = GPT2LMHeadModel(SMALL.replace(dtype="bfloat16"), params=fp32.params)
    ids = np.arange(12)[None]
    out = bf16(ids, labels=ids)
    assert out.logits.dtype == jnp.float32 and out.loss.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in bf16.parameters())
    np.testing.assert_allclose(out.logits, fp32(ids).logits, atol=0.05)


def test_num_parameters_and_state_dict_names():
    model = GPT2LMHeadModel(SMALL)
    D, V, P, F = SMALL.n_embd, SMALL.vocab_size, SMALL.n_positions, 4 * SMALL.n_embd
    per_block = 4 * D + (D * 3 * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D)
    assert model.num_parameters() == V * D + P * D + SMALL.n_layer * per_block + 2 * D
    state = model.state_dict()
    assert state["transformer.h.1.attn.c_attn.weight"].shape == (D, 3 * D)
    np.testing.assert_array_equal(state["lm_head.weight"], state["transformer.wte.weight"])
    assert len(model.parameters()) == len(state) - 1


def test_causal_fast_path_equals_the_masked_path_forward_and_gradients():
    """No attention_mask: jax.nn.dot_product_attention(is_causal=True); an all-ones mask: the masked path."""
    from gpt2jax.model import next_token_loss

    model = GPT2LMHeadModel(SMALL, seed=7)
    params = jax.tree.map(lambda p: p * 4.0, model.params)  # peaked attention, so a wrong mask would show
    ids = jnp.asarray(np.random.default_rng(5).integers(0, SMALL.vocab_size, (3, 17)))
    ones = jnp.ones_like(ids)

    def loss(params, mask):
        logits, _ = model.module.apply({"params": params}, ids[:, :-1], None if mask is None else mask[:, :-1])
        return next_token_loss(logits, ids[:, 1:]), logits

    (loss_fast, logits_fast), grads_fast = jax.value_and_grad(loss, has_aux=True)(params, None)
    (loss_masked, logits_masked), grads_masked = jax.value_and_grad(loss, has_aux=True)(params, ones)
    np.testing.assert_allclose(logits_fast, logits_masked, atol=1e-5)
    assert abs(float(loss_fast) - float(loss_masked)) <= 1e-6
    for fast, masked in zip(jax.tree.leaves(grads_fast), jax.tree.leaves(grads_masked)):
        np.testing.assert_allclose(fast, masked, atol=1e-5)


@pytest.mark.parametrize("dtype, expected", [("float32", "HIGHEST"), ("bfloat16", None)])
def test_float32_means_float32_matmuls(dtype, expected, monkeypatch):
    """float32 compute traces every matmul (forward and backward) at HIGHEST precision on an accelerator
    (XLA on GPUs and TPUs would otherwise run float32 matmuls in reduced precision); bfloat16 at the
    default. Traced as if on a GPU: on CPUs float32 matmuls are exact by default."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    from jaxpr_tools import iter_eqns

    from gpt2jax.model import next_token_loss

    model = GPT2LMHeadModel(SMALL.replace(dtype=dtype), seed=0)
    ids = jnp.zeros((2, 8), jnp.int32)
    loss = lambda p: next_token_loss(model.module.apply({"params": p}, ids)[0], ids)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(model.params)
    precisions = [eqn.params["precision"] for eqn in iter_eqns(jaxpr.jaxpr) if eqn.primitive.name == "dot_general"]
    assert len(precisions) >= 6 * SMALL.n_layer  # qkv, scores, values, proj, fc, proj: forward and backward
    highest = [isinstance(p, tuple) and all(q == jax.lax.Precision.HIGHEST for q in p) for p in precisions]
    assert all(highest) if expected == "HIGHEST" else not any(highest), precisions

