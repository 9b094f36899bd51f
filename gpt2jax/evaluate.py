"""Loss, perplexity and bits per byte of a model on a run's validation split, a text file, or a file of
prompt/completion rows (a task: the completions' tokens alone count, gpt2jax.examples).

Legend (the package's, gpt2jax/__init__.py): B windows per batch, T block size, W = T + 1 tokens per window.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from gpt2jax import examples, perf
from gpt2jax.batches import check_one_window, example_rows
from gpt2jax.batches import windows as batch_windows
from gpt2jax.errors import UserError
from gpt2jax.model import next_token_loss
from gpt2jax.modeling import GPT2LMHeadModel
from gpt2jax.tokenizer import Tokenizer
from gpt2jax.train import rows_loss_sum_and_count

EXAMPLE_FILES = (".jsonl", ".json", ".parquet", ".arrow")  # --data files read as prompt/completion rows


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
    return _metrics(total / windows, used[1:], tokenizer, model.config.vocab_size)


def _metrics(loss: float, targets: np.ndarray, tokenizer: Tokenizer, vocab_size: int) -> dict[str, float]:
    """Loss, perplexity and bits per byte of the `targets` a mean loss was taken over."""
    byte_lengths = np.array([len(tokenizer.token_bytes(i)) for i in range(vocab_size)])
    n_bytes = int(byte_lengths[targets].sum())
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": loss * len(targets) / (max(n_bytes, 1) * math.log(2)),
        "tokens": int(len(targets)),
    }


def evaluate_examples(model: GPT2LMHeadModel, tokenizer: Tokenizer, tokens: np.ndarray, index: np.ndarray,
                      block_size: int, batch_size: int = 8, max_batches: int | None = None) -> dict[str, float]:
    """The loss over the completion tokens (and EOS) of task examples (gpt2jax.examples' records), each alone in
    a row of block_size (cut to block_size + 1 tokens, as training cuts them): the sum over those tokens
    divided by their number, so long completions weigh as much per token as short ones."""
    if block_size > model.config.n_positions:
        raise UserError(f"block size {block_size} exceeds the model's n_positions={model.config.n_positions}")
    index = index if max_batches is None else index[: max_batches * batch_size]
    if len(index) == 0:
        raise UserError("there are no examples to evaluate (a run trained with data.val_fraction=0 holds none out: "
                        "pass --data FILE)")
    perf.check_fits(model.config, min(batch_size, len(index)), block_size, train=False,
                    what=f"evaluating in batches of {batch_size}")
    largest = int(tokens[: index[-1, 0] + index[-1, 2]].max())
    if largest >= model.config.vocab_size:
        raise UserError(f"the data has token id {largest} but the model's vocab_size is {model.config.vocab_size}")
    loss_fn = jax.jit(lambda params, rows: rows_loss_sum_and_count(model.module, params, rows))
    total, count, counted = 0.0, 0, []
    for first in range(0, len(index), batch_size):
        members = [np.array([i]) for i in range(first, min(first + batch_size, len(index)))]
        members += [np.zeros(0, np.int64)] * (batch_size - len(members))  # one compiled shape
        rows = example_rows(tokens, index, members, block_size, tokenizer.eos_token_id, packed=False)
        loss_sum, n = loss_fn(model.params, {k: jnp.asarray(v) for k, v in rows.items()})
        total, count = total + float(loss_sum), count + int(n)
        counted.append(rows["targets"][rows["targets"] >= 0])
    return {**_metrics(total / count, np.concatenate(counted), tokenizer, model.config.vocab_size),
            "examples": len(index)}


def evaluate(
    run: str | None, model_dir: str | None, step: str | None, data: str | None, tokenizer_name: str | None,
    block_size: int | None, batch_size: int, max_batches: int | None, prompt_column: str | None = None,
    completion_column: str | None = None,
) -> tuple[str, dict[str, float]]:
    """`gpt2jax eval`: (what was evaluated, its metrics) for a run (default data: its val split) or an HF dir.
    `data`: a text file, or a .jsonl / .json / .parquet / .arrow file of prompt/completion rows (the run's
    columns, or `prompt_column` / `completion_column`, default "prompt" and "completion")."""
    from gpt2jax.textgen import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(run, model_dir, step, tokenizer_name)
    run_data = model.run_config["data"] if run else None
    block = block_size or (run_data["block_size"] if run_data else model.config.n_positions)
    task_run = run_data is not None and run_data.get("format") == "prompt_completion"
    if data and os.path.splitext(data)[1] in EXAMPLE_FILES:
        if not os.path.isfile(data):
            raise UserError(f"{data}: no such file")
        settings = examples.eval_config(run_data, prompt_column, completion_column,
                                        run_data["tokenizer"] if run_data else tokenizer_name or "model", block)
        tokens, index = examples.read_examples(os.path.abspath(data), settings, tokenizer)
        return data, evaluate_examples(model, tokenizer, tokens, index, block, batch_size, max_batches)
    if prompt_column or completion_column:
        raise UserError("--prompt-column and --completion-column read --data files of rows "
                        f"({', '.join(EXAMPLE_FILES)})")
    if task_run and not data:
        import ml_collections

        from gpt2jax.data import prepare

        store = prepare(ml_collections.ConfigDict(run_data), progress=False)
        return (f"{run} val split (completions)",
                evaluate_examples(model, tokenizer, store.tokens("val"), store.index("val"), block, batch_size,
                                  max_batches))
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
