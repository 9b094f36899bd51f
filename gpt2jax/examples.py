"""Task examples (`data.format = "prompt_completion"`): rows of a prompt and a completion -> a tokenized store.

Each row's prompt and completion are tokenized apart (the prompt's tokens are exactly what `generate` sees at
inference) and written as prompt, completion, EOS into `train.bin` / `val.bin`, with one record per example
in `train.idx` / `val.idx` (int64: start, prompt tokens, tokens, source row). The store is cached, checked and
rebuilt like the text bins (gpt2jax.data: one directory keyed by source, tokenizer, columns and split;
meta.json with each file's size and sampled checksum; written all or nothing). Rows split into train and val by
a stable hash of their text. `gpt2jax.batches` lays the examples in rows (packed or padded) with the prompt's
targets set to -100, so the loss counts the completion only.

Bad rows are a `UserError` naming the row (counted from 0 in source order): an empty prompt or completion, and,
for the run's block_size, a prompt longer than block_size (no completion token would be predicted). Examples
longer than block_size + 1 tokens are cut there, and the run's start line says how many.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import ml_collections
import numpy as np

from gpt2jax import data as bins
from gpt2jax.errors import UserError
from gpt2jax.sources import source_fingerprint
from gpt2jax.tokenizer import Tokenizer, load_tokenizer

FILES = ("train.bin", "val.bin", "train.idx", "val.idx")
INDEX_FIELDS = ("start", "prompt_tokens", "tokens", "row")  # the columns of an .idx record (int64 each)


class ExampleStore(bins.TokenBins):
    """A prepared set of task examples: `{split}.bin` tokens and `{split}.idx` records, and their meta.json."""

    def summary(self) -> str:
        """What `gpt2jax prepare` says of the store: each split's examples and tokens."""
        return ", ".join(f"{name} {s['examples']:,} examples / {s['tokens']:,} tokens "
                         f"({s['completion_tokens']:,} in completions)" for name, s in self.meta["splits"].items())

    def index(self, split: str) -> np.ndarray:
        """(N, 4) int64: each example's start in the split's tokens, prompt tokens, tokens, and source row."""
        count = self.meta["splits"][split]["examples"]
        if count == 0:
            return np.zeros((0, len(INDEX_FIELDS)), np.int64)
        return np.fromfile(os.path.join(self.directory, f"{split}.idx"), np.int64).reshape(count, len(INDEX_FIELDS))


def prepare_examples(data: ml_collections.ConfigDict, progress: bool = True) -> ExampleStore:
    """The example store for `data` (reused when present and intact), checked against data.block_size."""
    tokenizer = load_tokenizer(data.tokenizer)
    source = source_fingerprint(data)
    directory = bins.bins_directory(data, {**source, "format": "prompt_completion"})
    store = bins.reuse_store(directory, ExampleStore)
    if store is None:
        store = bins.build_store(data, source, tokenizer, directory, progress, STORE_FORMAT)
    check_examples(store, data)
    return store


def _write_examples(batches: Iterator[dict], tokenizer: Tokenizer, data: ml_collections.ConfigDict,
                    dtype: np.dtype, paths: dict[str, str]) -> dict[str, dict[str, int]]:
    """Each row's prompt + completion + EOS appended to train or val, and its record to the split's index."""
    counts = {split: {"tokens": 0, "examples": 0, "completion_tokens": 0} for split in ("train", "val")}
    pairs = (pair for batch in batches for pair in zip(batch["prompt"], batch["completion"]))
    encode = lambda pair: (tokenizer.encode(pair[0]), tokenizer.encode(pair[1]))
    with open(paths["train.bin"], "wb") as train_bin, open(paths["val.bin"], "wb") as val_bin, \
            open(paths["train.idx"], "wb") as train_idx, open(paths["val.idx"], "wb") as val_idx:
        files = {"train": (train_bin, train_idx), "val": (val_bin, val_idx)}
        for row, ((prompt, completion), (prompt_ids, completion_ids)) in enumerate(
                bins.encoded(pairs, encode, data.num_proc)):
            for what, ids in (("prompt", prompt_ids), ("completion", completion_ids)):
                if not ids:
                    raise UserError(f"{_where(data)}: row {row} has an empty {what} (data.{what}_column="
                                    f"{data[what + '_column']!r}); every example needs both")
            split = "val" if bins.in_validation(prompt + "\x00" + completion, data.val_fraction) else "train"
            ids = prompt_ids + completion_ids + [tokenizer.eos_token_id]
            tokens_file, index_file = files[split]
            tokens_file.write(np.asarray(ids, dtype).tobytes())
            index_file.write(np.asarray([counts[split]["tokens"], len(prompt_ids), len(ids), row], np.int64).tobytes())
            counts[split]["tokens"] += len(ids)
            counts[split]["examples"] += 1
            counts[split]["completion_tokens"] += len(completion_ids) + 1
    return counts


STORE_FORMAT = bins.StoreFormat(FILES, ExampleStore, _write_examples, {"format": "prompt_completion"})


def _where(data: ml_collections.ConfigDict) -> str:
    return f"data.dataset={data.dataset!r}"


def check_examples(store: ExampleStore, data: ml_collections.ConfigDict) -> None:
    """Every split in use has examples, and no prompt is longer than data.block_size (the first such row named)."""
    for split in ("train", "val"):
        if split == "val" and store.meta["val_fraction"] == 0:
            continue
        index = store.index(split)
        if len(index) == 0:
            hint = "raise data.val_fraction or " if split == "val" else "lower data.val_fraction or "
            raise UserError(f"{_where(data)}: the {split} split has no examples; {hint}add examples")
        too_long = np.flatnonzero(index[:, 1] > data.block_size)
        if len(too_long):
            first = index[too_long[0]]
            raise UserError(f"{_where(data)}: row {first[3]} has a prompt of {first[1]} tokens, longer than "
                            f"data.block_size={data.block_size}, so none of its completion would be learned "
                            f"({len(too_long)} such row(s) in the {split} split); raise data.block_size or "
                            "shorten or drop those rows")


def read_examples(path: str, data: ml_collections.ConfigDict, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, index) of the prompt/completion rows of a local file, every row whatever its hash, tokenized into
    a temporary store that is not cached (what `gpt2jax eval --data FILE` reads)."""
    import tempfile

    config = ml_collections.ConfigDict({**data.to_dict(), "dataset": path, "val_fraction": 0.0})
    source = source_fingerprint(config)
    with tempfile.TemporaryDirectory(prefix="gpt2jax-eval-") as scratch:
        store = bins.build_store(config, source, tokenizer, os.path.join(scratch, "examples"), False, STORE_FORMAT)
        check_examples(store, config)
        return np.array(store.tokens("train")), store.index("train")


def eval_config(run_data: dict[str, Any] | None, prompt_column: str | None, completion_column: str | None,
                tokenizer_name: str, block_size: int) -> ml_collections.ConfigDict:
    """The data settings that read an eval file: the run's columns (or "prompt" / "completion"), as overridden."""
    from gpt2jax.experiment import base_config

    data = base_config().data
    data.unlock()
    if run_data:
        data.update({k: v for k, v in run_data.items() if k in ("prompt_column", "completion_column")})
    data.update(format="prompt_completion", tokenizer=tokenizer_name, block_size=block_size, num_proc=2)
    if prompt_column:
        data.prompt_column = prompt_column
    if completion_column:
        data.completion_column = completion_column
    return data
