"""Text corpora -> token bins (`prepare`); `gpt2jax.batches` samples training batches from them.

`prepare` loads documents with Hugging Face `datasets` (a hub dataset, local files, or the
embedded `pystdlib` corpus), tokenizes them with `.map(num_proc=N)`, puts EOT after every
document, splits train/val by a stable hash of each document's text, and writes `train.bin`,
`val.bin` and `meta.json` atomically into a cache directory keyed by what produced them.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
from typing import Any

import ml_collections
import numpy as np

from gpt2jax.errors import UserError
from gpt2jax.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
_LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


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

    def tokens(self, split: str) -> np.ndarray:
        """The split's tokens, memory-mapped read-only."""
        if self.num_tokens(split) == 0:
            return np.zeros((0,), self.dtype)
        return np.memmap(os.path.join(self.directory, f"{split}.bin"), dtype=self.dtype, mode="r")


# --------------------------------------------------------------------------------------------
# Sources


def pystdlib_documents() -> list[str]:
    """The running Python's standard library sources plus pydoc's topic texts, in a fixed order."""
    from pydoc_data.topics import topics

    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    documents = []
    for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
        with open(path, encoding="utf-8", errors="replace") as f:
            documents.append(f.read())
    return documents + [topics[key] for key in sorted(topics)]


def _local_files(dataset: str) -> list[str] | None:
    """The files a local source names (a file, directory or glob), or None if it names none."""
    expanded = os.path.expanduser(dataset)
    if os.path.isfile(expanded):
        return [os.path.abspath(expanded)]
    if os.path.isdir(expanded):
        found = [os.path.join(d, f) for d, _, files in os.walk(expanded) for f in files]
        return sorted(os.path.abspath(p) for p in found if os.path.splitext(p)[1] in _LOADERS)
    if glob.has_magic(expanded):
        return sorted(os.path.abspath(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    return None


def _is_local(dataset: str) -> bool:
    return dataset.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(dataset)) or glob.has_magic(dataset)


def source_fingerprint(data: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the bins depend on: the source's identity (and for local files, their sizes and mtimes)."""
    if data.dataset == "pystdlib":
        return {"kind": "pystdlib", "python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"]}
    if _is_local(data.dataset):
        files = _local_files(data.dataset)
        if not files:
            raise UserError(f"data.dataset={data.dataset!r}: no such file, or no {'/'.join(_LOADERS)} files there")
        kinds = {_LOADERS.get(os.path.splitext(f)[1]) for f in files}
        if None in kinds or len(kinds) > 1:
            raise UserError(f"data.dataset={data.dataset!r}: mixes or has unsupported file types "
                            f"({', '.join(sorted({os.path.splitext(f)[1] or '(none)' for f in files}))})")
        loader = kinds.pop()
        stats = [[f, os.path.getsize(f), os.path.getmtime(f)] for f in files]
        if loader == "text":
            return {"kind": "local", "loader": loader, "files": stats, "sample_by": data.text_sample_by}
        return {"kind": "local", "loader": loader, "files": stats, "text_column": data.text_column}
    return {"kind": "hub", "name": data.dataset, "config": data.dataset_config, "split": data.split,
            "text_column": data.text_column}


def load_documents(data: ml_collections.ConfigDict, source: dict[str, Any], cache_dir: str):
    """A `datasets.Dataset` with one "text" column, one row per document, in source order."""
    import datasets

    if source["kind"] == "pystdlib":
        return datasets.Dataset.from_dict({"text": pystdlib_documents()})
    try:
        if source["kind"] == "local":
            files = [f for f, _, _ in source["files"]]
            kwargs = {"sample_by": data.text_sample_by} if source["loader"] == "text" else {}
            ds = datasets.load_dataset(source["loader"], data_files=files, split="train",
                                       cache_dir=os.path.join(cache_dir, "hf"), **kwargs)
        else:
            ds = datasets.load_dataset(data.dataset, data.dataset_config, split=data.split)
    except Exception as e:  # offline, unknown dataset, malformed file: one line for the user
        where = "local files" if source["kind"] == "local" else "the Hugging Face Hub (offline?)"
        raise UserError(f"data.dataset={data.dataset!r}: could not be loaded from {where}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    column = "text" if source["kind"] == "local" and source["loader"] == "text" else data.text_column
    if column not in ds.column_names:
        raise UserError(f"data.text_column={column!r} is not a column of {data.dataset!r} "
                        f"(it has {', '.join(ds.column_names)})")
    return ds.select_columns([column]).rename_column(column, "text") if column != "text" else ds.select_columns(["text"])


# --------------------------------------------------------------------------------------------
# Prepare


def in_validation(text: str, val_fraction: float) -> bool:
    """Stable split by content: the same document lands in the same split on any machine or worker."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def _tokenize_batch(batch: dict, tokenizer_name: str, val_fraction: float, dtype: str) -> dict:
    """Each document's ids + EOT as raw `dtype` bytes: cheap to pass between processes and to write."""
    tokenizer = _worker_tokenizer(tokenizer_name)
    ids = tokenizer.encode_batch(batch["text"])
    return {
        "ids": [np.asarray(seq + [tokenizer.eos_token_id], dtype).tobytes() for seq in ids],
        "is_val": [in_validation(t, val_fraction) for t in batch["text"]],
    }


_TOKENIZERS: dict[str, Tokenizer] = {}


def _worker_tokenizer(name: str) -> Tokenizer:
    """One tokenizer per worker process, built on its first batch."""
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = load_tokenizer(name)
    return _TOKENIZERS[name]


def bins_directory(data: ml_collections.ConfigDict, source: dict[str, Any]) -> str:
    settings = {"version": FORMAT_VERSION, "source": source, "tokenizer": _tokenizer_fingerprint(data.tokenizer),
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
            with open(path, "rb") as f:
                digest.update(f.read())
    return f"dir:{digest.hexdigest()}"


def prepare(data: ml_collections.ConfigDict, *, progress: bool = True) -> TokenBins:
    """Token bins for `data` (the `data` group of an experiment config): reused when present.

    Raises UserError, with nothing written, for a missing or empty source, an unknown text
    column, an unreachable hub dataset, or a split shorter than one window of block_size + 1.
    """
    tokenizer = load_tokenizer(data.tokenizer)
    if not 0.0 <= data.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in [0, 1), got {data.val_fraction}")
    source = source_fingerprint(data)
    directory = bins_directory(data, source)
    meta_path = os.path.join(directory, "meta.json")
    if os.path.isfile(meta_path):
        bins = TokenBins(directory, _read_json(meta_path))
        check_windows(bins, data.block_size)
        return bins

    documents = load_documents(data, source, os.path.expanduser(data.cache_dir))
    if len(documents) == 0:
        raise UserError(f"data.dataset={data.dataset!r} has no documents")
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    tokenized = documents.map(
        _tokenize_batch, batched=True, batch_size=64, num_proc=min(data.num_proc, len(documents)) if data.num_proc > 1 else None,
        remove_columns=["text"], desc="tokenizing", load_from_cache_file=False,
        fn_kwargs={"tokenizer_name": data.tokenizer, "val_fraction": data.val_fraction, "dtype": np.dtype(dtype).name},
    )
    os.makedirs(directory, exist_ok=True)
    _remove_abandoned(directory)
    temporary = {split: os.path.join(directory, f"{split}.bin.tmp-{os.getpid()}") for split in ("train", "val")}
    counts = {split: {"tokens": 0, "documents": 0} for split in temporary}
    try:
        with open(temporary["train"], "wb") as train_file, open(temporary["val"], "wb") as val_file:
            files = {"train": train_file, "val": val_file}
            for batch in _batches(tokenized, progress):
                for ids, is_val in zip(batch["ids"], batch["is_val"]):
                    split = "val" if is_val else "train"
                    files[split].write(ids)
                    counts[split]["tokens"] += len(ids) // np.dtype(dtype).itemsize
                    counts[split]["documents"] += 1
        meta = {"tokenizer": data.tokenizer, "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                "dtype": np.dtype(dtype).name, "source": source, "val_fraction": data.val_fraction,
                "splits": counts, "format_version": FORMAT_VERSION}
        check_windows(TokenBins(directory, meta), data.block_size)
        for split, path in temporary.items():
            os.replace(path, os.path.join(directory, f"{split}.bin"))
        _write_json_atomic(meta_path, meta)
    finally:
        for path in temporary.values():
            if os.path.exists(path):
                os.remove(path)
        if not os.path.isfile(meta_path) and os.path.isdir(directory) and not os.listdir(directory):
            os.rmdir(directory)
    return TokenBins(directory, _read_json(meta_path))


def _remove_abandoned(directory: str) -> None:
    """Delete temporary bins left by a prepare that was killed (its process no longer exists)."""
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
        os.remove(path)


def check_windows(bins: TokenBins, block_size: int) -> None:
    """Each split that is used must hold at least one window of block_size + 1 tokens."""
    for split in ("train", "val"):
        tokens = bins.num_tokens(split)
        if split == "val" and bins.meta["val_fraction"] == 0:
            continue
        if tokens < block_size + 1:
            hint = "raise data.val_fraction or " if split == "val" else ""
            raise UserError(f"the {split} split has {tokens} tokens, fewer than one window of block_size + 1 = "
                            f"{block_size + 1}; {hint}lower data.block_size or use a larger corpus")


def _batches(dataset, progress: bool):
    from tqdm.auto import tqdm

    with tqdm(total=len(dataset), desc="writing bins", unit="doc", disable=not progress) as bar:
        for batch in dataset.iter(batch_size=256):
            yield batch
            bar.update(len(batch["ids"]))


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _write_json_atomic(path: str, value: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
