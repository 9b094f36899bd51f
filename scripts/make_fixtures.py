"""Regenerate tests/fixtures/: a tiny Hugging Face GPT-2 checkpoint and its expected outputs.

The default test run checks parity against these files without torch; the live tests
compare against transformers directly whenever it is installed. Run after changing
tests/hf_reference.py:

    pip install -e '.[reference]' && python scripts/make_fixtures.py
"""

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from hf_reference import TINY_CONFIGS, make_reference_model, reference_outputs  # noqa: E402


def main() -> None:
    import torch
    import transformers

    out_dir = os.path.join(ROOT, "tests", "fixtures")
    model = reference = make_reference_model(TINY_CONFIGS["odd"], seed=0)
    model.save_pretrained(os.path.join(out_dir, "tiny_gpt2"))
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, model.config.vocab_size, size=(3, 11))
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
    prompts = np.array([[0, 0, 0, 17, 42, 99, 3], [5, 81, 12, 64, 23, 110, 7]])
    prompt_mask = (np.arange(7)[None] >= np.array([[3], [0]])).astype(np.int64)
    generated = reference.generate(
        torch.as_tensor(prompts), attention_mask=torch.as_tensor(prompt_mask), max_new_tokens=20, do_sample=False,
        pad_token_id=0,
    ).numpy()
    np.savez_compressed(
        os.path.join(out_dir, "tiny_gpt2_expected.npz"),
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        labels=labels,
        logits=ref["logits"],
        loss=ref["loss"],
        generate_prompts=prompts,
        generate_attention_mask=prompt_mask,
        generate_expected=generated,
        **{f"grad:{name}": g for name, g in ref["grads"].items()},
    )
    print(f"wrote {out_dir} with torch {torch.__version__}, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
