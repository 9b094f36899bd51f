"""Text in, text out: what `gpt2jax sample` does, and the samples a training run logs, as library functions."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

import numpy as np

from gpt2jax.config import GPT2Config
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


HELD_OUT_SAMPLES = 3  # held-out prompts a task fine-tuning run completes at each sample step


def training_samples(model: GPT2Config, params: Any, tokenizer: Tokenizer, store: Any, train: Any,
                     seed: int) -> list[dict[str, str]]:
    """What a run logs at a sample step: a sample after train.sample_prompt, or for task examples (a store with
    an `index`, gpt2jax.examples) the greedy completions of the first held-out prompts next to their
    references (the train split's when nothing is held out)."""
    if not hasattr(store, "index"):
        return [{"prompt": train.sample_prompt, "text": sample_text(model, params, tokenizer, train, seed)}]
    split = "val" if store.meta["splits"]["val"]["examples"] else "train"
    return complete_examples(model, params, tokenizer, store.tokens(split), store.index(split)[:HELD_OUT_SAMPLES],
                             train.sample_tokens)


def sample_text(model: GPT2Config, params: Any, tokenizer: Tokenizer, train: Any, seed: int) -> str:
    """A text sample from the current params (on this host), logged during training."""
    prompt = tokenizer.encode(train.sample_prompt) or [tokenizer.eos_token_id]
    new_tokens = min(train.sample_tokens, model.n_positions - len(prompt))
    if new_tokens < 1:
        return ""
    lm = GPT2LMHeadModel(model, params=params)
    ids = lm.generate(np.array([prompt]), max_new_tokens=new_tokens, do_sample=True, top_k=50, seed=seed,
                      eos_token_id=-1)
    return tokenizer.decode(ids[0, len(prompt):], unknown="replace")


def complete_examples(model: GPT2Config, params: Any, tokenizer: Tokenizer, tokens: np.ndarray, index: np.ndarray,
                      max_new_tokens: int) -> list[dict[str, str]]:
    """{"prompt", "text", "reference"} for each example of `index` (gpt2jax.examples' records): its prompt, the
    model's greedy completion up to EOS (at most max_new_tokens, and what n_positions leaves), and the
    completion the data holds. Prompts are left-padded into one batch."""
    prompts = [np.asarray(tokens[start: start + p]) for start, p, _, _ in index]
    references = [np.asarray(tokens[start + p: start + n - 1]) for start, p, n, _ in index]  # less the EOS
    width = max(len(p) for p in prompts)
    new_tokens = min(max_new_tokens, model.n_positions - width)
    if new_tokens < 1:
        return []
    eos = tokenizer.eos_token_id
    ids = np.array([np.concatenate([np.full(width - len(p), eos), p]) for p in prompts], np.int32)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int32)
    out = GPT2LMHeadModel(model, params=params).generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                         do_sample=False, eos_token_id=eos, pad_token_id=eos)
    decode = lambda x: tokenizer.decode([int(t) for t in x if t != eos], unknown="replace")
    samples = []
    for prompt, reference, row in zip(prompts, references, np.asarray(out)):
        new = row[width:]
        ended = np.flatnonzero(new == eos)
        samples.append({"prompt": decode(prompt), "text": decode(new[: ended[0] if len(ended) else len(new)]),
                        "reference": decode(reference)})
    return samples
