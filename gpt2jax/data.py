"""Text corpora -> token bins (`prepare`); `gpt2jax.batches` samples training batches from them.

`prepare` loads documents with Hugging Face `datasets` (a hub dataset, local files, or the embedded
`pystdlib` corpus, whose documents are whole files: each stdlib module and pydoc topic; `.txt` files
are cut by `data.text_sample_by`: "paragraph" by default, or "document" / "line"), tokenizes them in
this process on `data.num_proc` threads (tiktoken encodes without the GIL; nothing is forked, which
is unsafe once JAX runs threads), puts EOT after every document, splits train/val by a stable hash of
each document's text, and writes `train.bin`, `val.bin` and `meta.json` atomically into a cache
directory keyed by what produced them. Bins that no longer match the sizes and checksums in their
meta.json are rebuilt. `data.format="prompt_completion"` prepares task examples instead (gpt2jax.examples),
with the same cache rules.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np

from gpt2jax.batches import check_one_window
from gpt2jax.errors import UserError
from gpt2jax.rundir import write_json
from gpt2jax.sources import FORMATS, SAMPLE_BY, data_format, describe, load_documents, source_fingerprint
from gpt2jax.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 2  # of meta.json: 2 added "files" (each bin's bytes and checksum); format-1 bins are upgraded
_LAYOUT_VERSION = 1  # of the bins' bytes, part of the directory key: unchanged by format 2, so format-1 bins are found
CHECKSUM_CHUNKS, CHECKSUM_CHUNK_BYTES = 64, 1 << 16
BIN_FILES = ("train.bin", "val.bin")


@dataclasses.dataclass(frozen=True)
class TokenBins:
    """A prepared corpus: `train.bin` / `val.bin` of `dtype` tokens and their `meta.json`."""

    directory: str
    meta: dict

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def num_tokens(self, split: str) -> int:
        return self.meta["splits"][split]["tokens"]

    @property
    def fingerprint(self) -> str:
        """What the tokens are, in 16 hex digits: each bin's size and sampled checksum (meta.json's records),
        and the token counts. A run records it with every checkpoint, so it cannot resume on other data."""
        recorded = {"files": self.meta.get("files"), "splits": self.meta.get("splits")}
        return hashlib.blake2b(json.dumps(recorded, sort_keys=True).encode(), digest_size=8).hexdigest()

    def summary(self) -> str:
        """What `gpt2jax prepare` says of the bins: each split's tokens and documents."""
        return ", ".join(f"{name} {s['tokens']:,} tokens / {s['documents']:,} documents"
                         for name, s in self.meta["splits"].items())

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens, memory-mapped read-only."""
        if self.num_tokens(split) == 0:
            return np.zeros((0,), self.dtype)
        return np.memmap(os.path.join(self.directory, f"{split}.bin"), dtype=self.dtype, mode="r")


# --------------------------------------------------------------------------------------------
# Prepare


def in_validation(text: str, val_fraction: float) -> bool:
    """Stable split by content: the same document lands in the same split on any machine or worker."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def bin_checksum(path: str) -> str:
    """blake2b-128 of the file's size and of CHECKSUM_CHUNKS evenly spaced chunks of CHECKSUM_CHUNK_BYTES,
    first and last included (the whole file when it is no larger than those chunks: 4 MiB).

    Sampled, not a full hash, because it runs on every reuse: it reads at most 4 MiB of a multi-GB bin
    (milliseconds), where a full hash reads all of it (blake2b ~0.4-1 GB/s here: 20-50 s for a 20 GB
    bin, minutes from a cold disk). The size catches truncation and appends; the chunks catch damage
    that touches them (a rewrite, a copy gone wrong, zeroed blocks), not a few bytes changed between them."""
    size = os.path.getsize(path)
    digest = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
    with open(path, "rb") as f:
        if size <= CHECKSUM_CHUNKS * CHECKSUM_CHUNK_BYTES:
            digest.update(f.read())
        else:
            for i in range(CHECKSUM_CHUNKS):
                f.seek(i * (size - CHECKSUM_CHUNK_BYTES) // (CHECKSUM_CHUNKS - 1))
                digest.update(f.read(CHECKSUM_CHUNK_BYTES))
    return digest.hexdigest()


def _bin_records(directory: str, names: tuple[str, ...] = BIN_FILES) -> dict[str, dict]:
    """What meta.json records of each file to check it on reuse."""
    paths = {name: os.path.join(directory, name) for name in names}
    return {name: {"bytes": os.path.getsize(path), "blake2b_sampled": bin_checksum(path)}
            for name, path in paths.items()}


def _damage(bins: TokenBins) -> str | None:
    """What is wrong with the files on disk, against their meta.json (format 1: token counts only); None if
    nothing."""
    files = bins.meta.get("files", {})
    for name in dict.fromkeys(BIN_FILES + tuple(files)):
        path = os.path.join(bins.directory, name)
        recorded = files.get(name, {})
        expected = recorded.get("bytes", bins.num_tokens(name.split(".")[0]) * bins.dtype.itemsize)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != expected:
            return f"{name} is {os.path.getsize(path):,} bytes, meta.json says {expected:,}"
        if "blake2b_sampled" in recorded and bin_checksum(path) != recorded["blake2b_sampled"]:
            return f"{name} changed since it was written (checksum mismatch)"
    return None


def reuse_store(directory: str, store: type[TokenBins] = TokenBins) -> TokenBins | None:
    """The finished bins (a `store`) in `directory` if they still match their meta.json. Damaged ones (a cache)
    lose their meta.json, with one line on stderr, so that they are rebuilt; UserError if that is impossible."""
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.lexists(meta_path):
        return None
    try:
        bins = store(directory, _read_json(meta_path))
        damage = _damage(bins)
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as e:
        damage = f"meta.json is unreadable ({describe(e)})"
    if damage is None and bins.meta.get("format_version", 1) < FORMAT_VERSION:  # format 1: checksum it from now on
        upgraded = {**bins.meta, "files": _bin_records(directory), "format_version": FORMAT_VERSION}
        with contextlib.suppress(OSError):  # a read-only cache stays usable, checked by size alone
            write_json(meta_path, upgraded)
            bins = TokenBins(directory, upgraded)
    if damage is None:
        return bins
    try:
        os.remove(meta_path)
    except OSError as e:
        raise UserError(f"{directory}: {damage}; cannot rebuild it ({describe(e)}): remove the directory") from None
    print(f"gpt2jax prepare: {directory}: {damage}; rebuilding the token bins", file=sys.stderr)
    return None


def bins_directory(data: ml_collections.ConfigDict, source: dict[str, Any]) -> str:
    settings = {"version": _LAYOUT_VERSION, "source": source, "tokenizer": _tokenizer_fingerprint(data.tokenizer),
                "val_fraction": data.val_fraction}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(data.dataset)) or "data")[:40]
    tok = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(data.tokenizer)))[:20]
    return os.path.join(os.path.expanduser(data.cache_dir), f"{slug}-{tok}-{key}")


def _tokenizer_fingerprint(name: str) -> str:
    if not os.path.isdir(name):
        return name
    digest = hashlib.sha256()
    for filename in ("vocab.json", "merges.txt", "tokenizer.json"):
        path = os.path.join(name, filename)
        if os.path.isfile(path):
            try:
                with open(path, "rb") as f:
                    digest.update(f.read())
            except OSError as e:
                raise UserError(f"data.tokenizer={name!r}: cannot read {filename} ({describe(e)})") from None
    return f"dir:{digest.hexdigest()}"


def _load_tokenizer(name: str) -> Tokenizer:
    """The tokenizer `data.tokenizer` names (a broken tokenizer directory is a UserError, from the one loader
    that sample, eval and the Python API use too)."""
    return load_tokenizer(name)


def _check_settings(data: ml_collections.ConfigDict) -> None:
    problems = {
        "data.dataset must name a source": not (isinstance(data.dataset, str) and data.dataset.strip()),
        f"data.val_fraction must be in [0, 1), got {data.val_fraction}": not 0.0 <= data.val_fraction < 1.0,
        f"data.block_size must be positive, got {data.block_size}": not data.block_size > 0,
        f"data.num_proc (tokenizer threads) must be >= 1, got {data.num_proc}": not data.num_proc >= 1,
        "data.cache_dir must name a directory": not (isinstance(data.cache_dir, str) and data.cache_dir.strip()),
        f"data.text_sample_by={data.get('text_sample_by')!r} is not one of {', '.join(SAMPLE_BY)}":
            data.get("text_sample_by", "paragraph") not in SAMPLE_BY,
        f"data.format={data_format(data)!r} is not one of {', '.join(map(repr, FORMATS))}":
            data_format(data) not in FORMATS,
    }
    if data_format(data) == "prompt_completion":
        for key in ("prompt_column", "completion_column"):
            problems[f"data.{key} must name a column"] = not (isinstance(data[key], str) and data[key].strip())
        problems["data.prompt_column and data.completion_column name the same column"] = \
            data.prompt_column == data.completion_column
    for problem, failed in problems.items():
        if failed:
            raise UserError(problem)


def prepare(data: ml_collections.ConfigDict, *, progress: bool = True) -> TokenBins:
    """Token bins for `data` (the `data` group of an experiment config): reused when present and intact.

    Raises UserError, with nothing written, for a bad setting, a missing, unreadable, malformed or
    empty source, a text column without text, an unusable tokenizer or cache_dir, an unreachable hub
    dataset, or a split shorter than one window of block_size + 1.
    """
    _check_settings(data)
    if data_format(data) == "prompt_completion":
        from gpt2jax.examples import prepare_examples

        return prepare_examples(data, progress)
    tokenizer = _load_tokenizer(data.tokenizer)
    source = source_fingerprint(data)
    directory = bins_directory(data, source)
    bins = reuse_store(directory)
    if bins is None:
        return build_store(data, source, tokenizer, directory, progress)
    check_windows(bins, data.block_size)
    return bins


@dataclasses.dataclass(frozen=True)
class StoreFormat:
    """What a prepared store is made of: its files, the store class, and the function that writes them."""

    files: tuple[str, ...]
    store: type[TokenBins]
    write: Callable[..., dict]  # (batches, tokenizer, data, dtype, temporary paths) -> the splits' counts
    meta: dict  # what meta.json records besides the common fields


def build_store(data: ml_collections.ConfigDict, source: dict, tokenizer: Tokenizer, directory: str,
           progress: bool, layout: StoreFormat | None = None) -> TokenBins:
    """Write the store `layout` describes (default: text bins) into `directory`, all or nothing."""
    layout = layout or StoreFormat(BIN_FILES, TokenBins, _write_bins, {})
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UserError(f"data.cache_dir={data.cache_dir!r}: cannot create {directory} ({describe(e)})") from None
    _remove_abandoned(directory)
    temporary = {name: os.path.join(directory, f"{name}.tmp-{os.getpid()}") for name in layout.files + ("hf",)}
    meta_path = os.path.join(directory, "meta.json")
    try:
        documents = load_documents(data, source, temporary["hf"], progress)
        if len(documents) == 0:
            raise UserError(f"data.dataset={data.dataset!r} has no documents")
        dtype = np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.uint32)
        try:
            counts = layout.write(_batches(documents, progress), tokenizer, data, dtype, temporary)
            meta = {"tokenizer": data.tokenizer, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                    "dtype": dtype.name, "source": source, "val_fraction": data.val_fraction, "splits": counts,
                    "format_version": FORMAT_VERSION, **layout.meta}
            if layout.store is TokenBins:
                check_windows(TokenBins(directory, meta), data.block_size)
            for name in layout.files:
                os.replace(temporary[name], os.path.join(directory, name))
            write_json(meta_path, {**meta, "files": _bin_records(directory, layout.files)})
        except UnicodeDecodeError as e:
            raise UserError(f"data.dataset={data.dataset!r}: a document is not valid UTF-8 ({describe(e)})") from None
        except OSError as e:
            raise UserError(f"cannot write the token bins in {directory} ({describe(e)})") from None
    finally:
        for path in temporary.values():
            _remove(path)
        if not os.path.isfile(meta_path) and os.path.isdir(directory) and not os.listdir(directory):
            os.rmdir(directory)
    return layout.store(directory, _read_json(meta_path))


def _write_bins(batches: Iterator[dict], tokenizer: Tokenizer, data: ml_collections.ConfigDict, dtype: np.dtype,
                paths: dict[str, str]) -> dict[str, dict[str, int]]:
    """Each document's ids + EOT appended to train or val, in source order; the token and document counts."""
    counts = {split: {"tokens": 0, "documents": 0} for split in ("train", "val")}
    texts = (text for batch in batches for text in batch["text"])
    with open(paths["train.bin"], "wb") as train_file, open(paths["val.bin"], "wb") as val_file:
        files = {"train": train_file, "val": val_file}
        for text, ids in encoded(texts, tokenizer.encode, data.num_proc):
            split = "val" if in_validation(text, data.val_fraction) else "train"
            files[split].write(np.asarray(ids + [tokenizer.eos_token_id], dtype).tobytes())
            counts[split]["tokens"] += len(ids) + 1
            counts[split]["documents"] += 1
    return counts


def encoded(texts: Iterator[str], encode: Callable[[str], list[int]], threads: int,
             chunk: int = 16) -> Iterator[tuple[str, list[int]]]:
    """(text, encode(text)) in order, encoded by `threads` threads in chunks of documents, a bounded window ahead."""
    with ThreadPoolExecutor(threads) as pool:
        pending: collections.deque = collections.deque()
        while True:
            group = [text for _, text in zip(range(chunk), texts)]
            if group:
                pending.append((group, pool.submit(lambda g: [encode(t) for t in g], group)))
            while pending and (len(pending) > 2 * threads or not group):
                done, future = pending.popleft()
                yield from zip(done, future.result())
            if not group:
                return


def _remove_abandoned(directory: str) -> None:
    """Delete temporaries left by a prepare that was killed (its process no longer exists)."""
    for path in glob.glob(os.path.join(directory, "*.tmp-*")):
        pid = int(path.rsplit("-", 1)[1]) if path.rsplit("-", 1)[1].isdigit() else None
        try:
            if pid is not None and pid != os.getpid():
                os.kill(pid, 0)
                continue  # still running: another prepare of the same bins
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _remove(path)


def _remove(path: str) -> None:
    """Delete a temporary file or directory of prepare's own, if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def check_windows(bins: TokenBins, block_size: int) -> None:
    """Each split that is used must hold at least one window of block_size + 1 tokens."""
    for split in ("train", "val"):
        if split == "val" and bins.meta["val_fraction"] == 0:
            continue
        hint = "raise data.val_fraction or " if split == "val" else ""
        check_one_window(bins.num_tokens(split), block_size, f"the {split} split",
                         f"{hint}lower data.block_size or use a larger corpus")


def _batches(dataset: Any, progress: bool) -> Iterator[dict]:
    """The rows in batches of {column: [...]}."""
    from tqdm.auto import tqdm

    with tqdm(total=len(dataset), desc="tokenizing", unit="row", disable=not progress) as bar:
        for batch in dataset.iter(batch_size=256):
            yield batch
            bar.update(len(next(iter(batch.values()))))


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
