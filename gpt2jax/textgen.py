"""Text in, text out: what `gpt2jax sample` does, as library functions."""

from __future__ import annotations

import os
import sys
from typing import TextIO

import numpy as np

from gpt2jax.errors import UserError
from gpt2jax.modeling import GPT2LMHeadModel
from gpt2jax.tokenizer import ByteTokenizer, GPT2Tokenizer, Tokenizer, load_tokenizer

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def tokenizer_for(model: GPT2LMHeadModel, model_dir: str | None, name: str | None = None) -> Tokenizer:
    """The tokenizer named, the one saved beside the model, or the one its vocabulary size implies."""
    if name is not None:
        tokenizer = load_tokenizer(name)
    elif model_dir and any(os.path.isfile(os.path.join(model_dir, f)) for f in _TOKENIZER_FILES):
        tokenizer = GPT2Tokenizer.from_pretrained(model_dir)
    elif model.config.vocab_size == len(ByteTokenizer()):
        tokenizer = ByteTokenizer()
    elif model.config.vocab_size >= 50257:
        tokenizer = GPT2Tokenizer.from_pretrained("gpt2")
    else:
        raise UserError(
            f"no tokenizer files beside the model and vocab_size={model.config.vocab_size} matches neither "
            "GPT-2 nor the byte tokenizer; pass --tokenizer"
        )
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")
    return tokenizer


def load_model_and_tokenizer(
    run: str | None, model_dir: str | None, step: str | None, tokenizer: str | None, dtype: str | None = None
) -> tuple[GPT2LMHeadModel, Tokenizer]:
    """The model of `--run` (at `step`) or `--model`, and its tokenizer (the run's, or the one beside the model)."""
    if run:
        model = GPT2LMHeadModel.from_pretrained(run, dtype=dtype, step=step or "latest")
        return model, tokenizer_for(model, None, tokenizer or model.run_config["data"]["tokenizer"])
    if step is not None:
        raise UserError("--step goes with --run")
    model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=dtype)
    return model, tokenizer_for(model, model_dir, tokenizer)


def sample(
    model: GPT2LMHeadModel,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    num_samples: int = 1,
    stream: bool = False,
    seed: int = 0,
    out: TextIO = sys.stdout,
    **generate_kwargs,
) -> list[str]:
    """Generate `num_samples` continuations of `prompt` and write them to `out`; return the completions.

    Without `stream` all samples are one batched, compiled call. With it each sample is
    decoded in compiled chunks and printed as it grows.
    """
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError("the prompt is empty")
    if num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {num_samples}")
    kwargs = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
    completions = []
    if not stream:
        tokens = model.generate(np.array([ids] * num_samples), seed=seed, **kwargs)
        completions = [tokenizer.decode(row[len(ids):], skip_special_tokens=True, unknown="replace") for row in tokens]
        for i, text in enumerate(completions):
            out.write(("" if i == 0 else "\n---\n") + prompt + text + "\n")
        return completions
    for i in range(num_samples):
        chunks = model.generate_stream(np.array([ids]), seed=seed + i, **kwargs)  # checked before printing
        out.write(("" if i == 0 else "\n---\n") + prompt)
        new_ids: list[int] = []
        shown = ""
        for chunk in chunks:
            new_ids += chunk[0].tolist()
            text = tokenizer.decode(new_ids, skip_special_tokens=True, unknown="replace")
            stable = text.rstrip("\ufffd")  # a character split across tokens: wait for the rest
            out.write(stable[len(shown):])
            out.flush()
            shown = stable
        completions.append(tokenizer.decode(new_ids, skip_special_tokens=True, unknown="replace"))
        out.write(completions[-1][len(shown):] + "\n")
    return completions
