"""The console script: version, and usage errors exit with status 2."""

import os
import subprocess
import sys

import gpt2jax


def run(*args):
    return subprocess.run([sys.executable, "-m", "gpt2jax.cli", *args], capture_output=True, text=True)


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"gpt2jax {gpt2jax.__version__}"


def test_no_command_prints_usage_and_exits_2():
    result = run()
    assert result.returncode == 2 and "usage: gpt2jax" in result.stderr


def test_unknown_command_exits_2():
    result = run("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


import pytest  # noqa: E402

import numpy as np  # noqa: E402

from gpt2jax import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer  # noqa: E402
from helpers import SMOKE  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=96), seed=0).save_pretrained(directory)
    return str(directory)


def test_sample_prints_prompt_and_continuation(hf_dir):
    result = run("sample", "--model", hf_dir, "--prompt", "Hello, world", "--max-new-tokens", "12", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello, world") and len(result.stdout) > len("Hello, world\n")


def test_sample_stream_prints_the_same_text(hf_dir):
    args = ["sample", "--model", hf_dir, "--prompt", "Once upon", "--max-new-tokens", "20", "--top-k", "50"]
    batch, streamed = run(*args, "--num-samples", "2"), run(*args, "--stream", "--num-samples", "2", "--seed", "0")
    assert batch.returncode == streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.count("\n---\n") == 1
    # streamed sample i uses seed + i, as a one-sample run with that seed does
    first = run(*args, "--seed", "0").stdout
    second = run(*args, "--seed", "1").stdout
    assert streamed.stdout == first + "\n---\n" + second


def test_sample_dtype_computes_in_that_dtype(tmp_path):
    """--dtype bfloat16 gives the Python API's bfloat16 tokens, and those differ from float32's: every
    embedding row is one vector times (1 + 1e-5 noise), a difference only float32 resolves."""
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64)
    params = GPT2LMHeadModel(config, seed=0).params
    wte = params["transformer"]["wte"]["embedding"]
    noise = np.random.default_rng(0).normal(size=(wte.shape[0], 1))
    params["transformer"]["wte"]["embedding"] = np.asarray(wte[:1]) * (1 + 1e-5 * noise)
    GPT2LMHeadModel(config, params=params).save_pretrained(tmp_path)
    args = ["sample", "--model", str(tmp_path), "--prompt", "Hello, world", "--max-new-tokens", "12", "--greedy"]
    tokenizer = GPT2Tokenizer.from_pretrained("gpt2")
    prompt = tokenizer.encode("Hello, world")
    texts = {}
    for dtype in ("float32", "bfloat16"):
        model = GPT2LMHeadModel.from_pretrained(tmp_path, dtype=dtype)
        ids = model.generate(np.array([prompt]), max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
        texts[dtype] = "Hello, world" + tokenizer.decode(ids[0, len(prompt):], skip_special_tokens=True) + "\n"
    assert texts["float32"] != texts["bfloat16"]
    for dtype, text in texts.items():
        result = run(*args, "--dtype", dtype)
        assert result.returncode == 0 and result.stdout == text, (dtype, result.stderr[-2000:])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "x", "--max-new-tokens", "100"], "exceeds n_positions=96"),
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "x", "--temperature", "0"], "temperature must be > 0"),
        (["--prompt", "x", "--top-k", "-1"], "--top-k must be >= 0"),
        (["--prompt", "x", "--top-p", "2"], "top_p must be in"),
        (["--prompt", "x", "--num-samples", "0"], "num-samples must be >= 1"),
        (["--prompt", "x", "--num-beams", "0"], "--num-beams must be >= 1"),
        (["--prompt", "x", "--num-beams", "2", "--num-return-sequences", "3"], "exceeds num_beams=2"),
        (["--prompt", "x", "--greedy", "--num-return-sequences", "2"], "needs do_sample=True or num_beams > 1"),
        (["--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
        (["--prompt", "x", "--no-repeat-ngram-size", "-2"], "--no-repeat-ngram-size must be >= 0"),
        (["--prompt", "x", "--min-new-tokens", "-1"], "--min-new-tokens must be >= 0"),
        (["--prompt", "x", "--num-beams", "2", "--stream"], "use generate for num_beams > 1"),
    ],
)
def test_sample_bad_input_is_one_line_and_exit_2(hf_dir, extra, message):
    result = run("sample", "--model", hf_dir, *extra)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_sample_missing_model_dir(tmp_path):
    result = run("sample", "--model", str(tmp_path / "absent"), "--prompt", "x")
    assert result.returncode == 2 and "no such directory" in result.stderr and "Traceback" not in result.stderr




@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.data.block_sise=8", "unknown config key 'data.block_sise'; did you mean data.block_size"),
        ("--config.data.block_size=big", "--config.data.block_size=big: expected int"),
        ("--config.data.dataset=/no/such/corpus", "no such file"),
        ("--config.data.val_fraction=1.5", "val_fraction must be in [0, 1)"),
    ],
)
def test_prepare_bad_config_exits_2(tmp_path, override, message):
    result = run("prepare", "--config", SMOKE, f"--config.data.cache_dir={tmp_path}", override)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not os.listdir(tmp_path)


def test_prepare_missing_experiment_file():
    result = run("prepare", "--config", "experiments/nope.py")
    assert result.returncode == 2 and "no such experiment file" in result.stderr


def test_bench_reports_throughput_and_mfu():
    result = run("bench", "--what", "forward", "--seq", "8", "--repeats", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "gpt2 (124.4M) float32" in result.stdout and "forward 1x8:" in result.stdout and "MFU" in result.stdout



def test_a_second_sample_of_the_same_shapes_compiles_nothing(hf_dir, tmp_path):
    """The persistent compilation cache: the second process adds no executable and prints the same text."""
    cache = tmp_path / "jax-cache"
    env = {**os.environ, "GPT2JAX_COMPILATION_CACHE": str(cache)}
    args = [sys.executable, "-m", "gpt2jax.cli", "sample", "--model", hf_dir, "--prompt", "Hello", "--greedy",
            "--max-new-tokens", "8"]
    first = subprocess.run(args, capture_output=True, text=True, env=env)
    entries = sorted(os.listdir(cache))
    assert first.returncode == 0 and entries, first.stderr[-2000:]
    second = subprocess.run(args, capture_output=True, text=True, env=env)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert sorted(os.listdir(cache)) == entries
    off = subprocess.run(args, capture_output=True, text=True, env={**env, "GPT2JAX_COMPILATION_CACHE": "off"})
    assert off.returncode == 0 and off.stdout == first.stdout and sorted(os.listdir(cache)) == entries


def test_sample_by_beam_search_prints_each_returned_beam(hf_dir):
    args = ["sample", "--model", hf_dir, "--prompt", "Hello", "--max-new-tokens", "8", "--num-beams", "3",
            "--num-return-sequences", "2", "--no-repeat-ngram-size", "2", "--repetition-penalty", "1.2"]
    first, again = run(*args), run(*args, "--seed", "5")
    assert first.returncode == 0, first.stderr
    texts = first.stdout.split("\n---\n")
    assert len(texts) == 2 and all(t.startswith("Hello") for t in texts) and texts[0] != texts[1]
    assert again.stdout == first.stdout  # beam search draws nothing: the seed changes nothing
