"""Beam search and several sequences per prompt, against transformers' PyTorch beam search on the same
random weights (two odd tiny configs, left-padded batches), and the shapes Hugging Face code reads."""

import numpy as np
import pytest

from gpt2jax import GPT2LMHeadModel, UserError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_reference import TINY_CONFIGS, make_reference_model  # noqa: E402


@pytest.fixture(scope="module", params=["even", "odd"])
def pair(request, tmp_path_factory):
    reference = make_reference_model(TINY_CONFIGS[request.param], seed=5)
    directory = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(directory)
    return reference, GPT2LMHeadModel.from_pretrained(directory)


PROMPTS = np.array([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
MASK = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
PAD = 3  # not 0: transformers' beam search fills with EOS when pad_token_id is 0 (`pad_token_id or eos`)


def frequent_eos(ours):
    """A token the greedy continuations emit early, so that beams end at different steps."""
    free = ours.generate(PROMPTS, MASK, max_new_tokens=10, eos_token_id=-1, pad_token_id=0)
    return int(free[1, 8])


def transformers_beams(reference, **kwargs):
    out = reference.generate(torch.as_tensor(PROMPTS), attention_mask=torch.as_tensor(MASK), do_sample=False,
                             return_dict_in_generate=True, output_scores=True, pad_token_id=PAD, **kwargs)
    return out.sequences.numpy(), out.sequences_scores.numpy()


@pytest.mark.parametrize("num_beams, num_return_sequences, length_penalty, early_stopping", [
    (2, 1, 1.0, False),
    (3, 3, 1.0, True),
    (4, 2, 0.0, "never"),
    (4, 1, 2.0, False),
    (3, 2, -0.5, True),
])
def test_beam_search_equals_transformers(pair, num_beams, num_return_sequences, length_penalty, early_stopping):
    reference, ours = pair
    settings = dict(num_beams=num_beams, num_return_sequences=num_return_sequences, length_penalty=length_penalty,
                    early_stopping=early_stopping, max_new_tokens=12, eos_token_id=frequent_eos(ours))
    expected, expected_scores = transformers_beams(reference, **settings)
    out = ours.generate(PROMPTS, MASK, pad_token_id=PAD, **settings)
    assert out.shape == (2 * num_return_sequences, PROMPTS.shape[1] + 12)
    np.testing.assert_array_equal(out.sequences[:, :expected.shape[1]], expected)
    assert np.all(out.sequences[:, expected.shape[1]:] == PAD)  # transformers crops; we pad to the full length
    np.testing.assert_allclose(out.sequences_scores, expected_scores, rtol=1e-4, atol=1e-4)


def test_beam_search_without_eos_runs_every_step_and_equals_transformers(pair):
    reference, ours = pair
    expected, expected_scores = transformers_beams(reference, num_beams=3, max_new_tokens=8, eos_token_id=None)
    out = ours.generate(PROMPTS, MASK, pad_token_id=PAD, num_beams=3, max_new_tokens=8, eos_token_id=-1)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_allclose(out.sequences_scores, expected_scores, rtol=1e-4, atol=1e-4)


def test_one_beam_is_greedy_and_max_length_counts_the_prompt(pair):
    _, ours = pair
    greedy = ours.generate(PROMPTS, MASK, max_new_tokens=7, pad_token_id=0)
    assert np.array_equal(ours.generate(PROMPTS, MASK, max_length=PROMPTS.shape[1] + 7, pad_token_id=0), greedy)
    assert greedy.sequences_scores is None and np.array_equal(greedy["sequences"], greedy)


def test_each_prompt_runs_through_the_model_once_whatever_the_number_of_beams(pair, monkeypatch):
    """The prompt's forward (prefill) runs on the B prompts, not on B x K copies; its cache is copied to the
    beams after (what the beam results' equality with transformers then checks)."""
    from gpt2jax import generation

    _, ours = pair
    calls = []
    original = generation.GPT2Decoder.tokens_to_logits

    def recorded(self, params, tokens_BxT, *args):
        calls.append(tokens_BxT.shape)
        return original(self, params, tokens_BxT, *args)

    monkeypatch.setattr(generation.GPT2Decoder, "tokens_to_logits", recorded)
    ours.generate(PROMPTS, MASK, max_new_tokens=9, num_beams=5, pad_token_id=PAD)  # shapes no other test compiles
    assert [shape[0] for shape in calls if shape[1] > 1] == [len(PROMPTS)]
    assert {shape[0] for shape in calls if shape[1] == 1} == {5 * len(PROMPTS)}


def test_several_samples_per_prompt_are_independent_and_keyed():
    import jax

    from gpt2jax import GPT2Config

    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=49, eos_token_id=49)
    model = GPT2LMHeadModel(config, seed=0)
    prompts = np.array([[1, 2, 3], [4, 5, 6]])
    out = model.generate(prompts, max_new_tokens=10, do_sample=True, num_return_sequences=3, seed=1)
    assert out.shape == (6, 13)
    assert np.array_equal(out[:3, :3], np.repeat(prompts[:1], 3, axis=0))  # each prompt's rows together
    assert len({tuple(row) for row in out[:3, 3:]}) == 3  # distinct draws
    again = model.generate(prompts, max_new_tokens=10, do_sample=True, num_return_sequences=3,
                           prng_key=jax.random.key(1))
    assert np.array_equal(again, out)  # prng_key is the key of the seed


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3 exceeds num_beams=2"),
    (dict(num_return_sequences=2), "needs do_sample=True or num_beams > 1"),
    (dict(num_beams=0), "num_beams must be a positive integer"),
    (dict(num_beams=2, do_sample=True), "beam sampling"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
    (dict(max_length=3, max_new_tokens=None), "max_length=3 leaves no new token"),
])
def test_bad_beam_settings_are_one_line(pair, kwargs, message):
    _, ours = pair
    with pytest.raises(UserError, match=message):
        ours.generate(PROMPTS, MASK, **kwargs)


@pytest.mark.parametrize("processor", [
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.6),
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=3),
    dict(min_new_tokens=6),
    dict(min_length=11),
    dict(forced_eos_token_id=9),
    dict(suppress_tokens=[26, 75, 76, 4]),
    dict(bad_words_ids=[[26], [75, 76], [5, 6, 7]]),
])
@pytest.mark.parametrize("search", ["greedy", "beams"])
def test_each_logits_processor_equals_transformers(pair, processor, search):
    """Prompts without padding: transformers' penalties and n-grams also read the prompt's padding tokens."""
    reference, ours = pair
    prompts = np.array([[5, 6, 7, 5, 6, 9], [1, 2, 3, 4, 5, 6]])
    settings = dict(max_new_tokens=10, eos_token_id=frequent_eos(ours), pad_token_id=PAD, **processor)
    if search == "beams":
        settings.update(num_beams=3, num_return_sequences=2)
    expected = reference.generate(torch.as_tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=int),
                                  do_sample=False, **settings).numpy()
    out = ours.generate(prompts, **settings)
    np.testing.assert_array_equal(out[:, :expected.shape[1]], expected)
    assert np.all(out[:, expected.shape[1]:] == PAD)


def test_forced_bos_on_a_one_token_prompt_equals_transformers(pair):
    reference, ours = pair
    prompts = np.array([[5], [7]])
    expected = reference.generate(torch.as_tensor(prompts), do_sample=False, max_new_tokens=6, forced_bos_token_id=2,
                                  eos_token_id=None, pad_token_id=PAD).numpy()
    out = ours.generate(prompts, max_new_tokens=6, forced_bos_token_id=2, eos_token_id=-1, pad_token_id=PAD)
    np.testing.assert_array_equal(out, expected)
    assert np.all(out[:, 1] == 2)


def test_a_streamed_generation_applies_the_processors_as_generate_does(pair):
    _, ours = pair
    prompts = np.array([[5, 6, 7, 5, 6, 9]])
    settings = dict(max_new_tokens=9, eos_token_id=-1, no_repeat_ngram_size=2, repetition_penalty=1.5)
    chunks = list(ours.generate_stream(prompts, chunk_size=4, **settings))
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), ours.generate(prompts, **settings)[:, 6:])


def test_changed_processor_values_compile_nothing_new(pair):
    """The values travel as arrays: one program per (static choices, bucket)."""
    from gpt2jax import sampling

    _, ours = pair
    prompts = np.array([[5, 6, 7, 5, 6, 9]])
    ours.generate(prompts, max_new_tokens=5, repetition_penalty=1.3, min_new_tokens=2, num_beams=2)
    before = (sampling.generate_tokens._cache_size(), sampling.beam_search_jit._cache_size())
    for penalty, minimum in ((1.7, 3), (0.8, 4)):
        ours.generate(prompts, max_new_tokens=5, repetition_penalty=penalty, min_new_tokens=minimum, num_beams=2,
                      length_penalty=penalty, early_stopping=False)
        ours.generate(prompts, max_new_tokens=5, repetition_penalty=penalty, min_new_tokens=minimum)
    after = (sampling.generate_tokens._cache_size(), sampling.beam_search_jit._cache_size())
    assert after[1] == before[1] and after[0] == before[0] + 1  # the greedy program once, for both values


def test_generation_config_travels_with_the_weights_both_ways(pair, tmp_path):
    import transformers

    _, shared = pair
    ours = GPT2LMHeadModel(shared.config, params=shared.params)  # the module's model keeps its defaults
    ours.generation_config = ours.generation_config.from_kwargs(num_beams=3, no_repeat_ngram_size=2, max_new_tokens=7,
                                                                 early_stopping=True, bad_words_ids=[[4, 5]])
    ours.save_pretrained(tmp_path)
    read = transformers.GenerationConfig.from_pretrained(tmp_path)  # what Hugging Face reads from it
    assert (read.num_beams, read.no_repeat_ngram_size, read.max_new_tokens, read.early_stopping,
            read.bad_words_ids) == (3, 2, 7, True, [[4, 5]])
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert loaded.generation_config == ours.generation_config
    # its settings are generate's defaults
    out = loaded.generate(PROMPTS, MASK, pad_token_id=PAD, eos_token_id=-1)
    assert out.shape == (2, PROMPTS.shape[1] + 7) and out.sequences_scores is not None
    # a file written by transformers: the fields gpt2jax has are taken, the others change nothing
    transformers.GenerationConfig(num_beams=2, repetition_penalty=1.3, eos_token_id=[7, 8], use_cache=False,
                                  max_length=30).save_pretrained(tmp_path)
    taken = GPT2LMHeadModel.from_pretrained(tmp_path).generation_config
    assert (taken.num_beams, taken.repetition_penalty, taken.eos_token_id, taken.max_length) == (2, 1.3, 7, 30)


@pytest.mark.parametrize("settings", [
    dict(),
    dict(do_sample=True, temperature=0.8, top_k=10, top_p=0.3, min_length=1),
    dict(num_beams=2, num_return_sequences=2, min_length=1, forced_bos_token_id=8, forced_eos_token_id=9),
])
def test_generate_under_jit_equals_generate_with_settings_from_the_config(settings):
    """As Hugging Face's Flax generation tests use it: settings set on the config before the model is made,
    `jax.jit(model.generate)`, `.sequences` of max_length, masks with left padding."""
    import jax

    from gpt2jax import GPT2Config

    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=49,
                        eos_token_id=49, pad_token_id=49)
    config.max_length = 11
    for name, value in settings.items():
        setattr(config, name, value)
    model = GPT2LMHeadModel(config, seed=0)
    ids = np.random.default_rng(0).integers(0, 49, (2, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 0] = 0
    eager = model.generate(ids, attention_mask=mask)
    jitted = jax.jit(model.generate)(ids, attention_mask=mask)
    assert jitted.sequences.shape == (2 * settings.get("num_return_sequences", 1), 11)
    np.testing.assert_array_equal(np.asarray(jitted.sequences), eager.sequences)
    if "num_beams" in settings:
        np.testing.assert_allclose(np.asarray(jitted.sequences_scores), eager.sequences_scores, rtol=1e-6)


@pytest.mark.parametrize("search", [dict(), dict(num_beams=3), dict(do_sample=True, top_k=5, temperature=0.7)])
def test_output_scores_are_each_steps_scores_as_transformers_returns_them(pair, search):
    reference, ours = pair
    prompts = np.array([[5, 6, 7, 5, 6, 9], [1, 2, 3, 4, 5, 6]])
    settings = dict(max_new_tokens=5, eos_token_id=-1, pad_token_id=PAD, repetition_penalty=1.3, **search)
    out = ours.generate(prompts, output_scores=True, return_dict_in_generate=True, **settings)
    rows = 2 * search.get("num_beams", 1)
    assert len(out.scores) == 5 and all(step.shape == (rows, ours.config.vocab_size) for step in out.scores)
    if "do_sample" in search:  # the draws differ from torch's: check the warped scores kept top-k only
        assert all(np.sum(np.isfinite(step), axis=-1).max() == 5 for step in out.scores)
        return
    settings["eos_token_id"] = None
    expected = reference.generate(torch.as_tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=int),
                                  do_sample=False, output_scores=True, return_dict_in_generate=True, **settings)
    for ours_step, theirs in zip(out.scores, expected.scores):
        finite = np.isfinite(theirs.numpy())
        np.testing.assert_array_equal(np.isfinite(ours_step), finite)
        np.testing.assert_allclose(ours_step[finite], theirs.numpy()[finite], rtol=1e-4, atol=1e-4)


def test_generation_config_is_settable_and_checked_as_hugging_faces_is(pair):
    _, ours = pair
    model = GPT2LMHeadModel(ours.config, params=ours.params)
    model.generation_config.max_length = PROMPTS.shape[1] + 4
    assert model.generate(PROMPTS, MASK, pad_token_id=PAD).shape == (2, PROMPTS.shape[1] + 4)
    with pytest.raises(UserError, match="num_beams must be a positive integer"):
        model.generation_config.num_beams = 0
    assert model.generation_config.num_beams == 1  # left as it was
    with pytest.raises(UserError, match="has no field 'do_samples'"):
        model.generation_config.do_samples = True
    with pytest.raises(UserError, match="do_samples"):  # a typo in a call is named too
        model.generate(PROMPTS, do_samples=True)
