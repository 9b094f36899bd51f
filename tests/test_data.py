"""prepare (datasets -> token bins) and the deterministic batch sampler."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpt2jax import UserError, data
from gpt2jax.batches import BatchSampler, Prefetcher, validation_batches
from gpt2jax.config import base_config
from gpt2jax.tokenizer import GPT2Tokenizer

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
    for split, is_val in (("train", False), ("val", True)):
        docs = [d for d in corpus_order() if data.in_validation(d, 0.2) == is_val]
        expected = [i for d in docs for i in tok._encoding.encode(d, allowed_special="all") + [50256]]
        assert bins.meta["splits"][split] == {"tokens": len(expected), "documents": len(docs)}
        tokens = bins.tokens(split)
        assert tokens.dtype == np.uint16 and tokens.tolist() == expected
        assert tok.decode(tokens).split("<|endoftext|>")[:-1] == docs
    assert bins.meta["splits"]["val"]["documents"] > 0


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


def test_prepare_twice_is_a_no_op(tmp_path, jsonl_dir, monkeypatch):
    config = data_config(tmp_path, jsonl_dir)
    first = data.prepare(config, progress=False)
    stamps = {f: os.path.getmtime(os.path.join(first.directory, f)) for f in os.listdir(first.directory)}
    monkeypatch.setattr(data, "load_documents", lambda *a: pytest.fail("prepare ran again"))
    second = data.prepare(config, progress=False)
    assert second.directory == first.directory and second.meta == first.meta
    assert {f: os.path.getmtime(os.path.join(first.directory, f)) for f in os.listdir(first.directory)} == stamps


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
from gpt2jax.config import base_config
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


def test_txt_files_by_paragraph_and_document(tmp_path):
    corpus = tmp_path / "txt"
    corpus.mkdir()
    (corpus / "a.txt").write_text("first para\nline two\n\nsecond para\n")
    (corpus / "b.txt").write_text("other file\n")
    by_doc = data.prepare(data_config(tmp_path, corpus, text_sample_by="document", val_fraction=0.0, block_size=2,
                                      tokenizer="byte"), progress=False)
    by_para = data.prepare(data_config(tmp_path, corpus, val_fraction=0.0, block_size=2, tokenizer="byte"),
                           progress=False)
    assert by_doc.meta["splits"]["train"]["documents"] == 2
    assert by_para.meta["splits"]["train"]["documents"] == 3


def test_pystdlib_corpus(tmp_path):
    docs = data.pystdlib_documents()
    assert len(docs) > 500 and sum(map(len, docs)) > 10_000_000
    assert any("def " in d for d in docs[:50]) and docs == data.pystdlib_documents()
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
        (lambda p: write(p / "e.jsonl", ""), {}, "could not be loaded|has no documents"),
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


def test_process_slices_are_disjoint_and_make_the_global_batch():
    single = BatchSampler(TOKENS, 8, 32, seed=0, local_device_count=8)(7)
    parts = [BatchSampler(TOKENS, 8, 32, seed=0, process_index=i, process_count=2, local_device_count=4)(7)
             for i in range(2)]
    assert parts[0]["inputs"].shape == (4, 4, 8)
    global_rows = single["inputs"].reshape(-1, 8)
    np.testing.assert_array_equal(parts[0]["inputs"].reshape(-1, 8), global_rows[:16])  # rows 0-15
    np.testing.assert_array_equal(parts[1]["inputs"].reshape(-1, 8), global_rows[16:])  # rows 16-31


def test_validation_batches_are_fixed_and_sliced_per_process():
    full = validation_batches(TOKENS, 8, 16, 3, local_device_count=2)
    assert len(full) == 3 and full[0]["inputs"].shape == (2, 8, 8)
    again = validation_batches(TOKENS, 8, 16, 3, local_device_count=2)
    for x, y in zip(full, again):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    halves = [validation_batches(TOKENS, 8, 16, 3, process_index=i, process_count=2) for i in range(2)]
    np.testing.assert_array_equal(
        np.concatenate([h[1]["inputs"].reshape(-1, 8) for h in halves]), full[1]["inputs"].reshape(-1, 8)
    )


def test_sampler_rejects_indivisible_batch_and_short_split():
    with pytest.raises(UserError, match="not divisible"):
        BatchSampler(TOKENS, 8, 12, seed=0, local_device_count=8)
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
