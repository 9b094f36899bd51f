"""Every command's bad inputs: one line on stderr, exit status 2, no traceback, nothing written or deleted."""

import os
import subprocess
import sys

import pytest

from gpt2jax import GPT2Config, GPT2LMHeadModel
from helpers import SMOKE, files



@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("hf"))
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=96), seed=0).save_pretrained(directory)
    return directory


@pytest.fixture
def places(tmp_path, cache_dir, hf_dir):
    """Paths the cases refer to: a file, a non-empty directory, a run whose config.json is broken, ..."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thesis.tex").write_text("x")
    (tmp_path / "badrun" / "checkpoints").mkdir(parents=True)
    (tmp_path / "badrun" / "config.json").write_text("{not json")
    (tmp_path / "badrun" / "run.json").write_text("{}")
    (tmp_path / "raising.py").write_text("def get_config():\n    return 1 / 0\n")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    return {"file": str(tmp_path / "file"), "full": str(tmp_path / "full"), "badrun": str(tmp_path / "badrun"),
            "raising": str(tmp_path / "raising.py"), "new": str(tmp_path / "new"), "smoke": SMOKE,
            "dangling": str(tmp_path / "dangling"),
            "cache": f"--config.data.cache_dir={cache_dir}", "hf": hf_dir}


TRAIN = ["train", "--config", "{smoke}", "{cache}", "--workdir"]
CASES = {
    "train: --workdir is a file": (TRAIN + ["{file}"], "is a file, not a directory"),
    "train: --workdir under a file": (TRAIN + ["{file}/run"], "is a file, not a directory"),
    "train: get_config() raises": (["train", "--config", "{raising}", "--workdir", "{new}"],
                                   "get_config() failed (ZeroDivisionError"),
    "train: config.json of the run is not JSON": (TRAIN + ["{badrun}"], "not valid JSON"),
    "train: --overwrite on a directory that is not a run": (TRAIN + ["{full}", "--overwrite"], "nothing was written"),
    "train: --overwrite with --fork": (TRAIN + ["{new}", "--overwrite", "--fork", "{badrun}"], "exclude each other"),
    "train: --fork from a non-run": (TRAIN + ["{new}", "--fork", "{full}"], "--fork: "),
    "train: eps 0": (TRAIN + ["{new}", "--config.optim.eps=0.0"], "optim.eps must be > 0"),
    "train: min_lr 1e39": (TRAIN + ["{new}", "--config.optim.min_lr=1e39"], "is not a finite float32 number"),
    "train: min_lr above lr": (TRAIN + ["{new}", "--config.optim.min_lr=1.0"], "optim.min_lr=1.0 exceeds optim.lr"),
    "train: a bool for an int": (TRAIN + ["{new}", "--config.train.max_steps=True"], "expected int, got a bool"),
    "train: vocab below the tokenizer's": (TRAIN + ["{new}", "--config.model.vocab_size=100"],
                                          "model.vocab_size=100 is smaller than the 257 tokens"),
    "train: block beyond init_from's positions": (
        TRAIN + ["{new}", "--config.init_from={hf}", "--config.data.block_size=128", "--config.model.n_positions=128"],
        "exceeds the model's n_positions=96"),
    "train: unknown key, space form": (TRAIN + ["{new}", "--config.optim.lrr", "1e-3"], "unknown config key 'optim.lrr'"),
    "train: cuDNN attention on a CPU": (TRAIN + ["{new}", "--config.model.attention=cudnn"],
                                        "attention='cudnn' needs an NVIDIA GPU (cuda), and this process runs on cpu"),
    "train: splash attention on a CPU": (TRAIN + ["{new}", "--config.model.attention=splash"],
                                         "attention='splash' needs a TPU"),
    "train: an unknown attention": (TRAIN + ["{new}", "--config.model.attention=flash"],
                                    "attention='flash' is not one of 'auto', 'xla', 'cudnn', 'splash'"),
    "train: --num-processes 0": (TRAIN + ["{new}", "--num-processes", "0"], "--num-processes must be >= 1"),
    "train: a seed beyond 32 bits": (TRAIN + ["{new}", "--config.train.seed=99999999999999999999"],
                                     "train.seed=99999999999999999999 is out of range: seeds are 32-bit"),
    "train: a negative seed": (TRAIN + ["{new}", "--config.train.seed=-1"], "must be in [0, 4294967295]"),
    "train: steps beyond int32": (TRAIN + ["{new}", "--config.train.max_steps=3000000000"],
                                  "train.max_steps=3000000000 is out of range"),
    "train: positions beyond int32": (TRAIN + ["{new}", "--config.model.n_positions=1000000000000"],
                                      "model.n_positions=1000000000000 is out of range"),
    "train: a workdir that is not UTF-8": (TRAIN + ["{new}\udcff"], "is not UTF-8 text"),
    "train: a workdir that is a dangling link": (TRAIN + ["{dangling}"], "which does not exist"),
    "sample: a run that is not there": (["sample", "--run", "{new}", "--prompt", "x"], "no such run directory"),
    "train: a batch no device holds": (TRAIN + ["{new}", "--config.train.global_batch_size=10000000"],
                                       "training this model needs at least"),
    "train: a width no device holds": (TRAIN + ["{new}", "--config.model.n_embd=1000000000", "--config.model.n_head=1"],
                                       "GiB per device (24,000,000,349,000,000,000 parameters"),
    "bench: a batch no device holds": (["bench", "--batch", "100000", "--what", "forward"],
                                       "bench --batch 100000 needs at least"),
    "sample: a prompt that is not UTF-8": (["sample", "--model", "{hf}", "--prompt", "\udcff\udcfe"],
                                           "is not UTF-8 text"),
    "sample: a seed beyond 32 bits": (["sample", "--model", "{hf}", "--prompt", "x", "--seed", "4294967296"],
                                      "seed=4294967296 is out of range"),
    "sample: run with a broken config.json": (["sample", "--run", "{badrun}", "--prompt", "x"], "not valid JSON"),
    "sample: --max-new-tokens 0": (["sample", "--model", "{hf}", "--prompt", "x", "--max-new-tokens", "0"],
                                   "--max-new-tokens must be >= 1"),
    "sample: --temperature -1": (["sample", "--model", "{hf}", "--prompt", "x", "--temperature", "-1"],
                                 "--temperature must be > 0"),
    "sample: --top-p 0": (["sample", "--model", "{hf}", "--prompt", "x", "--top-p", "0"], "top_p must be in (0, 1]"),
    "sample: --step without --run": (["sample", "--model", "{hf}", "--prompt", "x", "--step", "3"], "--step goes with"),
    "eval: --batch-size -3": (["eval", "--model", "{hf}", "--data", "{file}", "--batch-size", "-3"],
                              "--batch-size must be >= 1"),
    "eval: --max-batches -1": (["eval", "--model", "{hf}", "--data", "{file}", "--max-batches", "-1"],
                               "--max-batches must be >= 1"),
    "eval: --block-size 0": (["eval", "--model", "{hf}", "--data", "{file}", "--block-size", "0"],
                             "--block-size must be >= 1"),
    "eval: a missing text file": (["eval", "--model", "{hf}", "--data", "{new}"], "no such file"),
    "eval: a model without --data": (["eval", "--model", "{hf}"], "--model needs --data"),
    "eval: a text shorter than one window": (["eval", "--model", "{hf}", "--data", "{file}"], "fewer than one window"),
    "export: into a non-empty directory": (["export", "--run", "{badrun}", "--out", "{full}"], "is not empty"),
    "export: into a file": (["export", "--run", "{badrun}", "--out", "{file}"], "is not a directory"),
    "export: from a non-run": (["export", "--run", "{full}", "--out", "{new}"], "not a gpt2jax run directory"),
    "export: from a run with a broken config.json": (["export", "--run", "{badrun}", "--out", "{new}"],
                                                     "not valid JSON"),
    "prepare: a missing experiment file": (["prepare", "--config", "{new}"], "no such experiment file"),
    "bench: --seq 0": (["bench", "--seq", "0"], "--seq must be >= 1"),
    "bench: --repeats 0": (["bench", "--repeats", "0"], "--repeats must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, places, tmp_path):
    args, message = CASES[case]
    args = [a.format(**places) for a in args]
    before = files(tmp_path)
    result = subprocess.run([sys.executable, "-m", "gpt2jax.cli", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, (case, result.stderr[-3000:])
    assert message in result.stderr, (case, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert files(tmp_path) == before


def test_debug_variable_shows_the_traceback(places):
    result = subprocess.run([sys.executable, "-m", "gpt2jax.cli", "eval", "--model", places["hf"], "--data",
                             places["new"]], capture_output=True, text=True, env={**os.environ, "GPT2JAX_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr and "no such file" in result.stderr
