"""`gpt2jax eval`: loss, perplexity and bits per byte against independent computations."""

import math
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from gpt2jax import GPT2Config, GPT2LMHeadModel
from gpt2jax.evaluate import evaluate_tokens
from gpt2jax.tokenizer import ByteTokenizer, GPT2Tokenizer

TEXT = ("def mean(values):\n    return sum(values) / len(values)\n\n"
        "Naïve café: 日本語 text, then ASCII again. " * 6)
BLOCK = 16


def sharp_model(vocab_size, seed):
    """A small model whose predictions are far from uniform (every tensor random), so losses differ per token."""
    config = GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2, eos_token_id=256
                        if vocab_size == 257 else 50256, bos_token_id=256 if vocab_size == 257 else 50256)
    base = GPT2LMHeadModel(config, seed=seed)
    leaves, tree = jax.tree.flatten(base.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    params = [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    return GPT2LMHeadModel(config, params=jax.tree.unflatten(tree, params))


def windows(tokens, n_windows):
    return [np.asarray(tokens[i * BLOCK : i * BLOCK + BLOCK + 1]) for i in range(n_windows)]


def numpy_loss(model, tokens, n_windows):
    """Mean cross-entropy of each window's targets, by a log-softmax written out in numpy (float64)."""
    losses = []
    for w in windows(tokens, n_windows):
        logits = np.asarray(model(w[None, :-1]).logits[0], np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        losses.append(-logp[np.arange(BLOCK), w[1:]].mean())
    return float(np.mean(losses))


@pytest.fixture(scope="module", params=["byte", "gpt2"])
def case(request):
    if request.param == "byte":
        tokenizer = ByteTokenizer()
        model = sharp_model(257, seed=0)
    else:
        tokenizer = GPT2Tokenizer.from_pretrained("gpt2")
        model = sharp_model(50257, seed=1)
    tokens = np.asarray(tokenizer.encode(TEXT), np.int64)
    return request.param, tokenizer, model, tokens


def test_loss_perplexity_and_bits_per_byte_by_hand(case):
    name, tokenizer, model, tokens = case
    n_windows = (len(tokens) - 1) // BLOCK
    result = evaluate_tokens(model, tokenizer, tokens, BLOCK, batch_size=3)
    expected = numpy_loss(model, tokens, n_windows)
    assert result["tokens"] == n_windows * BLOCK
    assert abs(result["loss"] - expected) <= 1e-5 * expected
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    targets = tokens[1 : n_windows * BLOCK + 1]
    if name == "byte":  # one UTF-8 byte per token
        n_bytes = len(targets)
    else:  # the UTF-8 length of the text the target tokens spell
        n_bytes = len(b"".join(tokenizer.token_bytes(int(t)) for t in targets))
        assert n_bytes > 1.5 * len(targets)  # BPE tokens are longer than a byte: the two cases differ
    assert result["bits_per_byte"] == pytest.approx(expected * len(targets) / (n_bytes * math.log(2)), rel=1e-5)


def test_max_batches_limits_the_windows(case):
    _, tokenizer, model, tokens = case
    result = evaluate_tokens(model, tokenizer, tokens, BLOCK, batch_size=2, max_batches=1)
    assert result["tokens"] == 2 * BLOCK
    assert abs(result["loss"] - numpy_loss(model, tokens, 2)) <= 1e-5 * result["loss"]


def test_loss_matches_transformers_on_the_exported_model(case, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, tokenizer, model, tokens = case
    model.save_pretrained(tmp_path)
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    n_windows = (len(tokens) - 1) // BLOCK
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(reference(torch.as_tensor(w[None, :-1])).logits[0],
                                                    torch.as_tensor(w[1:])).item() for w in windows(tokens, n_windows)]
    result = evaluate_tokens(model, tokenizer, tokens, BLOCK, batch_size=4)
    assert abs(result["loss"] - np.mean(losses)) <= 1e-5 * result["loss"]


def test_eval_cli_on_a_model_directory_and_a_text_file(tmp_path):
    model = sharp_model(50257, seed=2)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "data.txt").write_text(TEXT, encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "gpt2jax.cli", "eval", "--model", str(tmp_path / "model"),
                             "--data", str(tmp_path / "data.txt"), "--block-size", str(BLOCK), "--batch-size", "3"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r"loss ([\d.]+)\s+perplexity ([\d.]+)\s+bits/byte ([\d.]+)\s+\(([\d,]+) tokens\)", result.stdout)
    assert found, result.stdout
    expected = evaluate_tokens(model, GPT2Tokenizer.from_pretrained("gpt2"),
                               np.asarray(GPT2Tokenizer.from_pretrained("gpt2").encode(TEXT)), BLOCK)
    loss, perplexity, bits_per_byte, tokens = found.groups()
    assert float(loss) == pytest.approx(expected["loss"], abs=1e-4)
    assert float(perplexity) == pytest.approx(expected["perplexity"], rel=1e-5, abs=1e-3)
    assert float(bits_per_byte) == pytest.approx(expected["bits_per_byte"], abs=1e-4)
    assert int(tokens.replace(",", "")) == expected["tokens"]


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), GPT2Tokenizer.from_pretrained("gpt2")], ids=["byte", "gpt2"])
def test_a_text_file_is_tokenized_in_chunks_as_the_whole_text_would_be(tmp_path, monkeypatch, tokenizer):
    import inspect as inspect_module

    from gpt2jax import evaluate as evaluate_module

    text = inspect_module.getsource(evaluate_module) * 3  # code: indentation, blank lines, long lines
    path = tmp_path / "text.py"
    path.write_text(text)
    monkeypatch.setattr(evaluate_module, "CHUNK_CHARS", 97)  # many chunks, cut at odd places
    np.testing.assert_array_equal(evaluate_module.text_file_tokens(str(path), tokenizer), tokenizer.encode(text))
    first = evaluate_module.text_file_tokens(str(path), tokenizer, max_tokens=50)
    np.testing.assert_array_equal(first, tokenizer.encode(text)[:50])
    reads = []
    original_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: _CountingFile(original_open(*a, **k), reads))
    evaluate_module.text_file_tokens(str(path), tokenizer, max_tokens=50)
    assert sum(reads) < len(text) / 10  # it stopped reading once it had enough


class _CountingFile:
    def __init__(self, f, reads):
        self.f, self.reads = f, reads

    def read(self, n=-1):
        data = self.f.read(n)
        self.reads.append(len(data))
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("content, message", [(b"def f():\n\xff\xfe\n", "not UTF-8 text"),
                                              (b"text\x00\x01\x02", "holds NUL bytes")])
def test_eval_refuses_a_file_that_is_not_text(tmp_path, content, message):
    from gpt2jax.errors import UserError
    from gpt2jax.evaluate import text_file_tokens

    (tmp_path / "data.bin").write_bytes(content)
    with pytest.raises(UserError, match=message):
        text_file_tokens(str(tmp_path / "data.bin"), ByteTokenizer())
