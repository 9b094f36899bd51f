"""Loss, perplexity and bits per byte of a model on a run's validation split or a text file.

Legend (the package's, gpt2jax/__init__.py): B windows per batch, T block size, W = T + 1 tokens per window.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import perf
from gpt2jax.batches import check_one_window
from gpt2jax.batches import windows as batch_windows
from gpt2jax.errors import UserError
from gpt2jax.model import next_token_loss
from gpt2jax.modeling import GPT2LMHeadModel
from gpt2jax.tokenizer import Tokenizer


def evaluate_tokens(
    model: GPT2LMHeadModel, tokenizer: Tokenizer, tokens: np.ndarray, block_size: int, batch_size: int = 8,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Mean next-token loss over consecutive, non-overlapping windows of `tokens`.

    bits_per_byte = loss (nats/token) x tokens / (UTF-8 bytes of those tokens x ln 2), which
    compares tokenizers: a byte-level and a BPE model on the same text get comparable numbers.
    """
    if block_size > model.config.n_positions:
        raise UserError(f"block size {block_size} exceeds the model's n_positions={model.config.n_positions}")
    check_one_window(len(tokens), block_size, "the text")
    windows = (len(tokens) - 1) // block_size
    if max_batches is not None:
        windows = min(windows, max_batches * batch_size)
    perf.check_fits(model.config, min(batch_size, windows), block_size, train=False,
                    what=f"evaluating in batches of {batch_size}")
    used = np.asarray(tokens[: windows * block_size + 1], dtype=np.int32)
    if used.max() >= model.config.vocab_size:
        raise UserError(f"the data has token id {used.max()} but the model's vocab_size is {model.config.vocab_size}")
    starts = np.arange(windows) * block_size
    loss_fn = jax.jit(lambda params, x, y: next_token_loss(model.module.apply({"params": params}, x)[0], y))
    total = 0.0
    for i in range(0, windows, batch_size):
        batch_BxW = batch_windows(used, starts[i : i + batch_size], block_size)
        loss = loss_fn(model.params, jnp.asarray(batch_BxW[:, :-1]), jnp.asarray(batch_BxW[:, 1:]))
        total += float(loss) * len(batch_BxW)
    loss = total / windows
    targets = used[1:]
    byte_lengths = np.array([len(tokenizer.token_bytes(i)) for i in range(model.config.vocab_size)])
    n_bytes = int(byte_lengths[targets].sum())
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": loss * len(targets) / (max(n_bytes, 1) * math.log(2)),
        "tokens": int(len(targets)),
    }


def evaluate(
    run: str | None, model_dir: str | None, step: str | None, data: str | None, tokenizer_name: str | None,
    block_size: int | None, batch_size: int, max_batches: int | None,
) -> tuple[str, dict[str, float]]:
    """`gpt2jax eval`: (what was evaluated, its metrics) for a run (default data: its val split) or an HF dir."""
    from gpt2jax.textgen import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(run, model_dir, step, tokenizer_name)
    run_data = model.run_config["data"] if run else None
    block = block_size or (run_data["block_size"] if run_data else model.config.n_positions)
    if data:
        needed = None if max_batches is None else max_batches * batch_size * block + 1
        tokens, source = text_file_tokens(data, tokenizer, needed), data
    elif run_data:
        import ml_collections

        from gpt2jax.data import prepare

        tokens, source = prepare(ml_collections.ConfigDict(run_data), progress=False).tokens("val"), f"{run} val split"
    else:
        raise UserError("--model needs --data FILE (a model directory has no validation split)")
    return source, evaluate_tokens(model, tokenizer, tokens, block, batch_size, max_batches)


CHUNK_CHARS = 1 << 20  # text tokenized at a time


def text_file_tokens(path: str, tokenizer: Tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """The tokens of a UTF-8 text file, read and tokenized a chunk at a time (memory follows the tokens kept,
    not the file), stopping once `max_tokens` are there. Chunks end after a newline between two non-space
    characters, where GPT-2's pre-tokenizer splits anyway, so the tokens equal those of the whole text."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    pieces: list[np.ndarray] = []
    count, pending = 0, ""
    with open(path, encoding="utf-8", errors="strict") as f:
        while max_tokens is None or count < max_tokens:
            try:
                chunk = f.read(CHUNK_CHARS)
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not UTF-8 text (byte {e.start} of a chunk: {e.reason}); eval reads text "
                                "files") from None
            if "\x00" in chunk:
                raise UserError(f"{path}: holds NUL bytes, so it is binary, not text; eval reads text files")
            text, cut = pending + chunk, len(pending + chunk)
            if chunk:
                cut = max((i + 1 for i in _newline_ends(text)), default=0)
            if cut:
                ids = np.asarray(tokenizer.encode(text[:cut]), dtype=np.int64)
                pieces.append(ids)
                count += len(ids)
            pending = text[cut:]
            if not chunk:
                break
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    return tokens if max_tokens is None else tokens[:max_tokens]


def _newline_ends(text: str):
    """The position of the last newline between two non-space characters (none or one, searched backwards):
    GPT-2's pre-tokenizer makes such a newline a piece of its own, so text can be cut after it."""
    i = len(text) - 1
    while True:
        i = text.rfind("\n", 0, i)
        if i < 1:
            return
        if i + 1 < len(text) and not text[i + 1].isspace() and not text[i - 1].isspace():
            yield i
            return
