"""Regenerate tests/fixtures/: tiny Hugging Face GPT-2 checkpoints and their expected outputs.

Two fixtures, one per config in tests/hf_reference.py, every tensor random:

  tiny_gpt2/, tiny_gpt2_expected.npz                    "odd" config: exact gelu, n_inner set, odd sizes
  tiny_gpt2_gelu_new/, tiny_gpt2_gelu_new_expected.npz  "even" config: GPT-2's defaults (gelu_new)

and tiny_gpt2_hf_api.npz: hidden states, attentions, inputs_embeds / token_type_ids logits and the
cache after a prefix, of tiny_gpt2.

Each of the first two .npz holds logits, loss and the gradient of every parameter for a batch with right and
left padding, greedy generation from left-padded prompts of different lengths without EOS
(generate_*), and greedy generation with an EOS the rows emit at different steps
(generate_eos_*; transformers stops once every row is done, so generate_eos_expected may be
shorter than prompt + generate_max_new_tokens).

The default test run checks parity against these files without torch; the live tests
compare against transformers directly whenever it is installed. Run after changing
tests/hf_reference.py:

    pip install -e '.[reference]' && python scripts/make_fixtures.py
"""

import copy
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from hf_reference import TINY_CONFIGS, make_reference_model, reference_outputs  # noqa: E402

# fixture name -> (TINY_CONFIGS key, checkpoint directory, expected-outputs file under tests/fixtures,
# generation prompts: row 0 left-padded by 3). The prompts are chosen so that the greedy
# continuations are varied enough for pick_eos_and_pad to find an EOS that stops the rows at steps far apart.
FIXTURES = {
    "gelu": ("odd", "tiny_gpt2", "tiny_gpt2_expected.npz", [[0, 0, 0, 17, 42, 99, 3], [5, 81, 12, 64, 23, 110, 7]]),
    "gelu_new": (
        "even", "tiny_gpt2_gelu_new", "tiny_gpt2_gelu_new_expected.npz",
        [[0, 0, 0, 91, 4, 14, 79], [91, 24, 30, 83, 41, 26, 79]],
    ),
}
PAD = 0  # pad_token_id of the generation without EOS (generate_expected)


def pick_eos_and_pad(free_run: np.ndarray, prompt_length: int, vocab_size: int, config_eos: int) -> tuple[int, int]:
    """An EOS that the rows of a greedy run without EOS first emit at different steps, and a pad.

    The pad is a token the run never emits (nor 0, the prompts' padding, nor the config's EOS), so
    every pad slot of the generation with EOS is unambiguous, and differs from the 0s that a token
    buffer starts with.
    The row that stops first must have a next token in the free run, so that generation with this
    EOS tells "pad after EOS" apart from "keep generating". Among the candidate EOS the one that
    stops the last row earliest wins: transformers then ends early.
    """
    new = free_run[:, prompt_length:]
    pad = max(set(range(1, vocab_size)) - set(free_run.ravel().tolist()) - {config_eos})
    candidates = []
    for token in sorted(set(new.ravel().tolist())):
        first = [int(np.flatnonzero(row == token)[0]) if np.any(row == token) else None for row in new]
        if None in first or len(set(first)) != len(first) or min(first) + 1 >= new.shape[1]:
            continue
        candidates.append((max(first), token))
    if not candidates:
        raise SystemExit("no token is emitted by every row at different steps; change the prompts")
    return min(candidates)[1], pad


def write_fixture(name: str) -> None:
    import torch

    config_key, directory, expected_file, prompt_rows = FIXTURES[name]
    out_dir = os.path.join(ROOT, "tests", "fixtures")
    model = reference = make_reference_model(TINY_CONFIGS[config_key], seed=0)
    model.save_pretrained(os.path.join(out_dir, directory))
    vocab_size = model.config.vocab_size
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, vocab_size, size=(3, 11))
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # right padding
    attention_mask[2, :4] = 0  # left padding
    position_ids = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
    labels = np.where(attention_mask == 1, input_ids, -100)
    # No counted label may be predicted from a padded position: those positions see no key, and
    # the gradient through their (constant, uniform) attention is an artefact of PyTorch's
    # additive masking that differs between its eager and SDPA paths.
    labels[2, 4] = -100
    ref = reference_outputs(model, input_ids, attention_mask, position_ids, labels)

    # Greedy generation for two left-padded prompts of different lengths.
    prompts = np.array(prompt_rows)
    prompt_mask = (np.arange(7)[None] >= np.array([[3], [0]])).astype(np.int64)
    max_new_tokens = min(20, model.config.n_positions - prompts.shape[1])

    def generate(**settings):
        config = copy.deepcopy(reference.generation_config)  # eos_token_id: the model config's
        config.update(**{"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": PAD, **settings})
        return reference.generate(
            torch.as_tensor(prompts), attention_mask=torch.as_tensor(prompt_mask), generation_config=config
        ).numpy()

    generated = generate()  # with the config's EOS (which these rows happen not to emit)
    free_run = generate(eos_token_id=None)
    assert free_run.shape[1] == prompts.shape[1] + max_new_tokens
    eos, eos_pad = pick_eos_and_pad(free_run, prompts.shape[1], vocab_size, model.config.eos_token_id)
    generated_eos = generate(eos_token_id=eos, pad_token_id=eos_pad)
    np.savez_compressed(
        os.path.join(out_dir, expected_file),
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        labels=labels,
        logits=ref["logits"],
        loss=ref["loss"],
        generate_prompts=prompts,
        generate_attention_mask=prompt_mask,
        generate_max_new_tokens=np.int64(max_new_tokens),
        generate_expected=generated,
        generate_eos_token_id=np.int64(eos),
        generate_eos_pad_token_id=np.int64(eos_pad),
        generate_eos_expected=generated_eos,
        **{f"grad:{name}": g for name, g in ref["grads"].items()},
    )
    steps = [int(np.flatnonzero(row == eos)[0]) for row in free_run[:, prompts.shape[1]:]]
    print(f"{name}: wrote {directory}/ and {expected_file}; EOS {eos} (pad {eos_pad}) first emitted at steps {steps}, "
          f"transformers stops after {generated_eos.shape[1] - prompts.shape[1]} of {max_new_tokens} new tokens")


API_FIXTURE = "tiny_gpt2_hf_api.npz"  # the forward interface's outputs of tiny_gpt2 (the "gelu" fixture)


def write_api_fixture() -> None:
    """hidden_states, attentions, token_type_ids and inputs_embeds logits, and the cache after a prefix, of
    the saved tiny_gpt2 checkpoint (eager attention), for tests/test_model.py without torch."""
    import torch
    import transformers

    fixtures = os.path.join(ROOT, "tests", "fixtures")
    model = transformers.GPT2LMHeadModel.from_pretrained(os.path.join(fixtures, "tiny_gpt2"), attn_implementation="eager")
    model.eval()
    rng = np.random.default_rng(1)
    vocab_size, n_embd = model.config.vocab_size, model.config.n_embd
    input_ids = rng.integers(0, vocab_size, size=(2, 9))
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    position_ids = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0)
    token_type_ids = rng.integers(0, vocab_size, size=input_ids.shape)
    inputs_embeds = rng.normal(size=(*input_ids.shape, n_embd)).astype(np.float32)
    long = lambda x: torch.as_tensor(x, dtype=torch.long)
    with torch.no_grad():
        full = model(long(input_ids), attention_mask=long(attention_mask), position_ids=long(position_ids),
                     output_hidden_states=True, output_attentions=True)
        prefix = model(long(input_ids[:, :5]), use_cache=True)
        cache = getattr(prefix, "cache", None) or prefix.past_key_values
        arrays = {
            "input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
            "token_type_ids": token_type_ids, "inputs_embeds": inputs_embeds,
            "token_type_logits": model(long(input_ids), token_type_ids=long(token_type_ids)).logits.numpy(),
            "inputs_embeds_logits": model(inputs_embeds=torch.as_tensor(inputs_embeds)).logits.numpy(),
            **{f"hidden_states:{i}": h.numpy() for i, h in enumerate(full.hidden_states)},
            **{f"attentions:{i}": a.numpy() for i, a in enumerate(full.attentions)},
            **{f"prefix_keys:{i}": layer.keys.numpy() for i, layer in enumerate(cache.layers)},
            **{f"prefix_values:{i}": layer.values.numpy() for i, layer in enumerate(cache.layers)},
        }
    np.savez_compressed(os.path.join(fixtures, API_FIXTURE), **arrays)
    print(f"wrote {API_FIXTURE}")


def main() -> None:
    import torch
    import transformers

    for name in FIXTURES:
        write_fixture(name)
    write_api_fixture()
    print(f"with torch {torch.__version__}, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
