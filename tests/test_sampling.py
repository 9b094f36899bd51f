"""The jitted KV-cache sampler: cache == recomputation, HF greedy parity, sampling rules, EOS, retracing."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax import GPT2Config, GPT2LMHeadModel, UserError, sampling

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
SMALL = GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=100, eos_token_id=100)
GREEDY = sampling.SamplingValues(temperature=jnp.float32(1), top_p=jnp.float32(1), eos_token_id=jnp.int32(-1),
                                 pad_token_id=jnp.int32(0))


@pytest.fixture(scope="module")
def model():
    return GPT2LMHeadModel(SMALL, seed=0)


def test_cached_decoding_equals_full_recomputation(model):
    """Logits the loop decodes from its cache, step by step, against a full forward pass of the result."""
    prompts = np.array([[0, 0, 0, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26, 27]])
    mask = (np.arange(7)[None] >= np.array([[3], [0]])).astype(np.int32)
    decoder, params = model.decoding().decoder, model.decoding().params
    state = sampling.prefill_jit(decoder, params, jnp.asarray(prompts), jnp.asarray(mask), 10, jax.random.key(0))
    step_logits = [np.asarray(state.logits_BxV)]
    for _ in range(10):
        state = sampling.decode_jit(decoder, params, state, 1, sampling.SamplingRules(), GREEDY)
        step_logits.append(np.asarray(state.logits_BxV))
    tokens = np.asarray(state.tokens_BxL)
    full_mask = np.concatenate([mask, np.ones((2, 10), np.int32)], axis=1)
    positions = np.maximum(np.cumsum(full_mask, axis=1) - 1, 0)
    full = np.asarray(model(tokens, full_mask, positions).logits)
    for i, logits in enumerate(step_logits):  # step i predicts the token at slot 7 + i
        np.testing.assert_allclose(logits, full[:, 6 + i], atol=1e-5, err_msg=f"step {i}")


def test_greedy_matches_transformers_fixture():
    expected = dict(np.load(os.path.join(FIXTURES, "tiny_gpt2_expected.npz")))
    tiny = GPT2LMHeadModel.from_pretrained(os.path.join(FIXTURES, "tiny_gpt2"))
    out = tiny.generate(expected["generate_prompts"], expected["generate_attention_mask"], max_new_tokens=20,
                        pad_token_id=0)
    np.testing.assert_array_equal(out, expected["generate_expected"])


@pytest.mark.parametrize("eos", [None, "frequent"])
def test_greedy_matches_transformers_live(tmp_path, eos):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_reference import TINY_CONFIGS, make_reference_model

    reference = make_reference_model(TINY_CONFIGS["even"], seed=3)
    reference.save_pretrained(tmp_path)
    ours = GPT2LMHeadModel.from_pretrained(tmp_path)
    prompts = np.array([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    kwargs = dict(max_new_tokens=14, pad_token_id=0)
    if eos == "frequent":  # an EOS that rows actually emit, at different steps
        free_run = ours.generate(prompts, mask, eos_token_id=-1, **kwargs)
        kwargs["eos_token_id"] = int(free_run[1, 9])
    expected = reference.generate(torch.as_tensor(prompts), attention_mask=torch.as_tensor(mask), do_sample=False,
                                  **kwargs).numpy()
    out = ours.generate(prompts, mask, **kwargs)
    np.testing.assert_array_equal(out[:, : expected.shape[1]], expected)
    assert np.all(out[:, expected.shape[1]:] == 0)  # transformers stops early; we pad to the full length


def test_padded_row_equals_row_alone(model):
    alone = model.generate(np.array([[7, 8, 9]]), max_new_tokens=12)
    both = model.generate(np.array([[0, 0, 7, 8, 9], [1, 2, 3, 4, 5]]), np.array([[0, 0, 1, 1, 1], [1] * 5]),
                          max_new_tokens=12)
    np.testing.assert_array_equal(both[0, 2:], alone[0])


def test_top_k_1_equals_greedy(model):
    prompt = np.array([[3, 1, 4, 1, 5]])
    greedy = model.generate(prompt, max_new_tokens=15)
    for seed in range(3):
        np.testing.assert_array_equal(model.generate(prompt, max_new_tokens=15, do_sample=True, top_k=1, seed=seed),
                                      greedy)


def draws(logits, rules, n=4000, temperature=1.0, top_p=1.0):
    logits_BxV = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    choose = jax.jit(sampling.choose_tokens, static_argnames="rules")
    return np.asarray(choose(logits_BxV, jax.random.key(0), rules, jnp.float32(temperature), jnp.float32(top_p)))


def test_top_k_draws_stay_in_top_k():
    logits = np.random.default_rng(0).normal(size=50) * 2
    tokens = draws(logits, sampling.SamplingRules(do_sample=True, top_k=5))
    assert set(tokens) == set(np.argsort(logits)[-5:])


def test_top_p_draws_stay_in_nucleus():
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])
    tokens = draws(np.log(probs), sampling.SamplingRules(do_sample=True, use_top_p=True), top_p=0.75)
    assert set(tokens) == {0, 1, 2}  # 0.4 + 0.25 < 0.75 <= 0.4 + 0.25 + 0.15
    frequencies = np.bincount(tokens, minlength=7)[:3] / len(tokens)
    np.testing.assert_allclose(frequencies, probs[:3] / probs[:3].sum(), atol=0.03)
    assert set(draws(np.log(probs), sampling.SamplingRules(do_sample=True, use_top_p=True), top_p=0.01)) == {0}


def test_temperature_sharpens():
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    rules = sampling.SamplingRules(do_sample=True)
    cold, hot = draws(logits, rules, temperature=0.25), draws(logits, rules, temperature=4.0)
    assert np.mean(cold == 0) > 0.8 and np.mean(hot == 0) < 0.45


def test_seed_reproducible_and_different(model):
    prompt = np.array([[3, 1, 4, 1, 5]])
    sample = lambda seed: model.generate(prompt, max_new_tokens=20, do_sample=True, seed=seed)
    np.testing.assert_array_equal(sample(1), sample(1))
    assert not np.array_equal(sample(1), sample(2))


def test_stream_equals_generate(model):
    prompt = np.array([[3, 1, 4, 1, 5]])
    kwargs = dict(max_new_tokens=19, do_sample=True, top_k=20, top_p=0.9, seed=4, eos_token_id=-1)  # all 19
    chunks = list(model.generate_stream(prompt, chunk_size=4, **kwargs))
    assert [c.shape[1] for c in chunks] == [4, 4, 4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), model.generate(prompt, **kwargs)[:, 5:])


@dataclasses.dataclass(frozen=True)
class CountingDecoder:
    """Fake model: the next token is always (last token + 1) mod V."""

    vocab_size: int = 10

    def init_cache(self, batch_size, length):
        return jnp.zeros((), jnp.int32)

    def tokens_to_logits(self, params, tokens_BxT, positions_BxT, mask_BxS, cache):
        return jax.nn.one_hot((tokens_BxT[:, -1] + 1) % self.vocab_size, self.vocab_size) * 10.0, cache + 1


def test_eos_pads_rows_and_loop_exits_early():
    decoder = CountingDecoder()
    prompts = jnp.array([[0, 5], [0, 1]])
    state = sampling.prefill_jit(decoder, None, prompts, jnp.ones_like(prompts), 12, jax.random.key(0))
    values = GREEDY.replace(eos_token_id=jnp.int32(8), pad_token_id=jnp.int32(0))
    state = sampling.decode_jit(decoder, None, state, 12, sampling.SamplingRules(), values)
    # row 0: 6 7 8(eos) then pad; row 1: 2 .. 8(eos) after 7 steps: the loop stops there
    assert int(state.step) == 7 and int(state.cache) == 1 + 7
    tokens = np.asarray(sampling.fill_after_stop(state, jnp.int32(0)))
    assert tokens[0, 2:].tolist() == [6, 7, 8] + [0] * 9
    assert tokens[1, 2:].tolist() == [2, 3, 4, 5, 6, 7, 8] + [0] * 5


def test_no_retrace_for_same_shapes_and_prompt_buckets(model):
    model.generate(np.array([[1, 2, 3]]), max_new_tokens=8)
    before = sampling.generate_tokens._cache_size()
    model.generate(np.array([[4, 5, 6, 7, 8]]), max_new_tokens=8)  # same 16-slot bucket
    model.generate(np.array([[9] * 16]), max_new_tokens=8, seed=3)
    assert sampling.generate_tokens._cache_size() == before
    model.generate(np.array([[9] * 17]), max_new_tokens=8)  # next bucket: one more compile
    assert sampling.generate_tokens._cache_size() == before + 1


def test_bucket_length():
    assert [sampling.bucket_length(n) for n in (1, 16, 17, 32, 33, 1000)] == [16, 16, 32, 32, 64, 1024]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=[[1] * 60], max_new_tokens=5), "exceeds n_positions=64"),
        (dict(input_ids=np.zeros((1, 0), int)), "prompt is empty"),
        (dict(input_ids=[[1, 2]], attention_mask=[[0, 0]]), "row 0 is empty"),
        (dict(input_ids=[[1, 2]], do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(input_ids=[[1, 2]], do_sample=True, top_k=-1), "top_k must be"),
        (dict(input_ids=[[1, 2]], do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(input_ids=[[1, 2]], top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(input_ids=[[1, 101]]), "vocab_size is 101"),
        (dict(input_ids=[[1, 2]], max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(input_ids=[[1, 2]], max_len=9), "unknown arguments max_len; it takes max_new_tokens"),
        (dict(input_ids=[[1, 2]], eos_token_id=1.5), "eos_token_id must be an integer"),
    ],
)
def test_bad_generate_arguments(model, kwargs, message):
    with pytest.raises(UserError, match=message):
        model.generate(**kwargs)


# --------------------------------------------------------------------------------------------
# The sampling rules against slow references: the logits each rule hands to the categorical draw.


def filtered_logits(monkeypatch, logits_BxV, rules, temperature=1.0, top_p=1.0):
    """The logits `choose_tokens` draws from (after temperature, top-k, top-p), caught at the draw."""
    seen = []

    def categorical(key, logits, axis=-1):
        seen.append(np.asarray(logits))
        return jnp.argmax(logits, axis=axis)

    monkeypatch.setattr(jax.random, "categorical", categorical)
    sampling.choose_tokens(jnp.asarray(logits_BxV, jnp.float32), jax.random.key(0), rules, jnp.float32(temperature),
                           jnp.float32(top_p))
    monkeypatch.undo()
    assert len(seen) == 1
    return seen[0]


def hf_processed(logits_BxV, temperature, top_k, top_p):
    """Hugging Face's warpers in generate()'s order: temperature, then top-k, then top-p."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    scores = torch.as_tensor(np.asarray(logits_BxV, np.float32))
    return warpers(torch.zeros((scores.shape[0], 1), dtype=torch.long), scores).numpy()


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 0.8), (1.8, 0, 0.6), (1.5, 12, 0.5), (0.6, 8, 0.9),
                                                      (2.5, 5, 1.0), (1.3, 0, 1.0)])
def test_rules_equal_transformers_warpers(monkeypatch, temperature, top_k, top_p):
    """Which tokens survive, and their logits, equal transformers' TemperatureLogitsWarper ->
    TopKLogitsWarper -> TopPLogitsWarper on random rows (no ties, so HF's sort order does not matter)."""
    scales = np.array([[0.5], [1], [2], [3], [4], [6]], np.float32)
    logits = np.random.default_rng(5).normal(size=(6, 40)).astype(np.float32) * scales
    expected = hf_processed(logits, temperature, top_k, top_p)
    rules = sampling.SamplingRules(do_sample=True, top_k=top_k, use_top_p=top_p < 1.0)
    ours = filtered_logits(monkeypatch, logits, rules, temperature, top_p)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(expected))
    kept = ~np.isneginf(expected)
    assert kept.sum(axis=1).min() >= 1  # and the filters do remove tokens, in most rows:
    assert (~kept).any(axis=1).sum() >= (4 if top_k or top_p < 1 else 0)
    np.testing.assert_allclose(ours[kept], expected[kept], rtol=1e-6)


def test_order_temperature_then_top_k_then_top_p(monkeypatch):
    """Cases where any other order of the rules keeps a different set (hand-computed; transformers agrees).

    Row 1 is p = [.5, .3, .1, .06, .04]. top-k 2 then top-p .6: {0} (.625 of the two survivors reaches .6);
    top-p first would keep {0, 1}. Temperature 3 then top-p .7: p^(1/3) renormalised is
    [.30, .25, .17, .15, .13], so {0, 1, 2}; top-p before the temperature would keep {0, 1}."""
    logits = np.log(np.array([[0.35, 0.25, 0.2, 0.12, 0.08], [0.5, 0.3, 0.1, 0.06, 0.04]], np.float32))
    cases = [  # temperature, top_k, top_p, the kept tokens of each row
        (1.0, 2, 0.6, [{0, 1}, {0}]),
        (3.0, 0, 0.7, [{0, 1, 2, 3}, {0, 1, 2}]),
        (0.3, 0, 0.7, [{0, 1}, {0}]),
        (3.0, 3, 0.7, [{0, 1, 2}, {0, 1}]),
    ]
    for temperature, top_k, top_p, kept in cases:
        rules = sampling.SamplingRules(do_sample=True, top_k=top_k, use_top_p=True)
        ours = filtered_logits(monkeypatch, logits, rules, temperature, top_p)
        assert [set(np.flatnonzero(~np.isneginf(row)).tolist()) for row in ours] == kept, (temperature, top_k, top_p)


def test_top_k_keeps_ties_with_the_kth(monkeypatch):
    """As transformers' TopKLogitsWarper: every logit >= the k-th largest survives, so ties can keep more than k."""
    logits = np.array([[3.0, 2.0, 2.0, 2.0, 0.0, -1.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 5.0, 1.0, 5.0, 2.0, 4.0]])
    for k, kept in [(2, [{0, 1, 2, 3}, {0, 1, 2, 3, 4, 5}, {1, 3}]), (3, [{0, 1, 2, 3}, {0, 1, 2, 3, 4, 5}, {1, 3, 5}]),
                    (1, [{0}, {0, 1, 2, 3, 4, 5}, {1, 3}])]:
        ours = filtered_logits(monkeypatch, logits, sampling.SamplingRules(do_sample=True, top_k=k))
        assert [set(np.flatnonzero(~np.isneginf(row)).tolist()) for row in ours] == kept, k
        reference = np.where(logits >= np.sort(logits, axis=1)[:, ::-1][:, k - 1 : k], logits, -np.inf)
        np.testing.assert_array_equal(ours, reference)


def test_top_p_boundary_mass_that_exactly_reaches_top_p(monkeypatch):
    """Dyadic probabilities, exact in float32: the kept set is the smallest whose mass reaches top_p, so at
    top_p = .75 = .5 + .25 exactly two tokens stay (transformers: cumulative mass <= 1 - top_p is removed)."""
    probs = np.array([0.0625, 0.5, 0.125, 0.25, 0.0625])
    logits = np.log(probs)[None].astype(np.float32)
    assert np.array_equal(np.asarray(jax.nn.softmax(jnp.asarray(logits)), np.float64), probs[None]), "not exact here"
    rules = sampling.SamplingRules(do_sample=True, use_top_p=True)
    for top_p, kept in [(0.5, {1}), (np.nextafter(np.float32(0.5), np.float32(0)), {1}), (0.75, {1, 3}),
                        (np.nextafter(np.float32(0.75), np.float32(1)), {1, 2, 3}), (0.875, {1, 2, 3})]:
        ours = filtered_logits(monkeypatch, logits, rules, top_p=top_p)
        assert set(np.flatnonzero(~np.isneginf(ours[0])).tolist()) == kept, top_p


def test_greedy_is_argmax_over_the_whole_vocabulary():
    logits = np.random.default_rng(0).normal(size=(5, 33)).astype(np.float32)
    logits[0, -1] = logits[1, 0] = logits[2, 16] = 10.0  # maxima at the last, the first and a middle id
    logits[3] = -np.arange(33)[::-1]  # increasing: the last id
    tokens = sampling.choose_tokens(jnp.asarray(logits), jax.random.key(0), sampling.SamplingRules(), jnp.float32(0.5),
                                    jnp.float32(0.5))
    assert tokens.dtype == jnp.int32
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))
    assert tokens[:4].tolist() == [32, 0, 16, 32]


@dataclasses.dataclass(frozen=True)
class UniformDecoder(CountingDecoder):
    """Fake model: equal logits for every token, so each draw depends on its step's key alone."""

    vocab_size: int = 1000

    def tokens_to_logits(self, params, tokens_BxT, positions_BxT, mask_BxS, cache):
        return jnp.zeros((tokens_BxT.shape[0], self.vocab_size)), cache + 1


def test_step_s_draws_with_fold_in_of_the_key_and_s():
    """The documented key schedule: step s samples with fold_in(rng, s), on every row of the batch."""
    rng, steps = jax.random.key(11), 6
    prompts = jnp.array([[1, 2], [3, 4], [5, 6]])
    out = np.asarray(sampling.generate_tokens(UniformDecoder(), None, prompts, jnp.ones_like(prompts), steps,
                                              sampling.SamplingRules(do_sample=True), GREEDY, rng))
    uniform = jnp.zeros((3, 1000))
    expected = np.stack([jax.random.categorical(jax.random.fold_in(rng, s), uniform, axis=-1) for s in range(steps)], 1)
    np.testing.assert_array_equal(out[:, 2:], expected)
    assert len(set(out[0, 2:].tolist())) == steps  # a fresh key every step: no repeats among 1000 tokens


def test_pad_value_after_eos_and_after_the_loop_stops():
    """With a pad id that differs from the buffer's initial zeros, every slot after a row's EOS holds pad,
    including the slots the loop never reached (it stops once every row is done)."""
    decoder, prompts = CountingDecoder(), jnp.array([[0, 5], [0, 1]])
    values = GREEDY.replace(eos_token_id=jnp.int32(8), pad_token_id=jnp.int32(-7))
    out = np.asarray(sampling.generate_tokens(decoder, None, prompts, jnp.ones_like(prompts), 12,
                                              sampling.SamplingRules(), values, jax.random.key(0)))
    assert out[0].tolist() == [0, 5, 6, 7, 8] + [-7] * 9
    assert out[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8] + [-7] * 5


def test_left_padded_batch_equals_greedy_by_full_recomputation(model):
    """Rows of different lengths, left-padded in one batch: each continues exactly as the slow reference does,
    the argmax of a full forward pass over the row alone (positions 0..t, no cache), one token at a time.
    Position embeddings scaled up from the N(0, 0.02) init, so that a wrong position id changes the argmax."""
    params = jax.tree_util.tree_map_with_path(lambda path, p: p * 50 if "wpe" in jax.tree_util.keystr(path) else p,
                                              model.params)
    scaled = GPT2LMHeadModel(SMALL, params=params)
    rows, new = [[7, 8, 9], [1, 2, 3, 4, 5, 6, 7], [42], [3, 1, 4, 1, 5]], 6
    width = max(map(len, rows))
    prompts = np.array([[0] * (width - len(r)) + r for r in rows])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = scaled.generate(prompts, mask, max_new_tokens=new, eos_token_id=-1, pad_token_id=0)
    for i, row in enumerate(rows):
        tokens = list(row)
        for _ in range(new):  # right-padded to one width: a single compile, and causality ignores the padding
            padded = np.array([tokens + [0] * (width + new - len(tokens))])
            tokens.append(int(np.argmax(np.asarray(scaled(padded).logits)[0, len(tokens) - 1])))
        assert out[i, width:].tolist() == tokens[len(row):], i


def test_bool_and_int_attention_masks_generate_the_same(model):
    prompts = np.array([[0, 0, 7, 8, 9], [1, 2, 3, 4, 5]])
    mask = np.array([[0, 0, 1, 1, 1], [1] * 5])
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=20, seed=2)
    np.testing.assert_array_equal(model.generate(prompts, mask.astype(bool), **kwargs),
                                  model.generate(prompts, mask, **kwargs))


def test_generation_config_and_keywords_are_one_thing(model):
    from gpt2jax.generation import GenerationConfig

    prompt = np.array([[3, 1, 4, 1, 5]])
    config = GenerationConfig(max_new_tokens=12, do_sample=True, top_p=0.9, seed=5)
    np.testing.assert_array_equal(model.generate(prompt, generation_config=config),
                                  model.generate(prompt, max_new_tokens=12, do_sample=True, top_p=0.9, seed=5))
    np.testing.assert_array_equal(model.generate(prompt, generation_config=config, seed=6),
                                  model.generate(prompt, max_new_tokens=12, do_sample=True, top_p=0.9, seed=6))


def test_the_bfloat16_decode_loop_converts_no_weights():
    """Decode-layout params are in the compute dtype, so the while loop's body casts no weight per token."""
    from jaxpr_tools import iter_eqns

    from gpt2jax.generation import Decoding, to_decode_layout

    config = SMALL.replace(dtype="bfloat16")
    fp32 = GPT2LMHeadModel(SMALL, seed=0)
    decoding = Decoding.of(config, fp32.params)
    prompt, mask = jnp.ones((2, 16), jnp.int32), jnp.ones((2, 16), jnp.int32)
    weight_shapes = {tuple(p.shape) for p in jax.tree.leaves(decoding.params) if p.ndim >= 2}

    def weight_casts(params):
        jaxpr = jax.make_jaxpr(lambda p: sampling.generate_tokens(decoding.decoder, p, prompt, mask, 4,
                                                                  sampling.SamplingRules(), GREEDY,
                                                                  jax.random.key(0)))(params)
        loops = [e for e in iter_eqns(jaxpr.jaxpr) if e.primitive.name == "while"]
        assert loops
        return [e for loop in loops for e in iter_eqns(loop.params["body_jaxpr"].jaxpr)
                if e.primitive.name == "convert_element_type" and e.params["new_dtype"] == jnp.bfloat16
                and e.invars[0].aval.dtype == jnp.float32 and tuple(e.invars[0].aval.shape) in weight_shapes]

    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(decoding.params))
    assert weight_casts(decoding.params) == []
    # the check sees casts when they are there: float32 decode-layout params in the same bfloat16 loop
    assert len(weight_casts(to_decode_layout(fp32.params, jnp.float32))) >= 4 * SMALL.n_layer
