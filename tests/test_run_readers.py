"""Reading a run never harms it: sampling, evaluating, exporting, forking and fine-tuning from a run open its
checkpoints read-only, even while it trains; damaged checkpoint metadata is reported in one line and skipped."""

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from gpt2jax import GPT2LMHeadModel
from gpt2jax.checkpoint import Checkpoints
from gpt2jax.errors import UserError
from gpt2jax.experiment import load_config
from gpt2jax.hf import export_run
from gpt2jax.trainer import run_training
from helpers import OLD_RUN, SMOKE, files, train_losses



def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "gpt2jax.cli", *args], capture_output=True, text=True,
                          timeout=600, **kwargs)


@pytest.fixture
def run_with_a_save_in_progress(tmp_path):
    """The old run, with the temporary directory of a save that a trainer would be writing now."""
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    (run / "checkpoints" / "20.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    (run / "checkpoints" / "20.orbax-checkpoint-tmp-1234" / "state" / "partial").write_text("being written")
    return run


def test_every_reader_leaves_the_run_as_it_was(run_with_a_save_in_progress, tmp_path, cache_dir):
    run = str(run_with_a_save_in_progress)
    before = files(run)
    GPT2LMHeadModel.from_pretrained(run)
    GPT2LMHeadModel.from_pretrained(run, dtype="bfloat16")  # (this was a traceback: dtype given twice)
    Checkpoints(run, read_only=True).restore_params("best")
    export_run(run, "latest", str(tmp_path / "exported"))
    result = cli("sample", "--run", run, "--prompt", "def ", "--max-new-tokens", "4", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    (tmp_path / "text.txt").write_text("def f(x):\n    return x\n" * 100)
    result = cli("eval", "--run", run, "--data", str(tmp_path / "text.txt"), "--max-batches", "1")
    assert result.returncode == 0, result.stderr
    overrides = [f"--config.data.cache_dir={cache_dir}", "--config.train.max_steps=12"]
    run_training(load_config(SMOKE, overrides), str(tmp_path / "fork"), progress=False, fork_from=run)
    run_training(load_config(SMOKE, overrides + [f"--config.init_from={run}", "--config.train.max_steps=2"]),
                 str(tmp_path / "tune"), progress=False)
    assert files(run) == before  # the unfinished save too: nothing written, deleted or locked


def test_a_run_read_in_a_loop_while_it_trains_ends_as_an_undisturbed_run(tmp_path, cache_dir):
    """A trainer saving every step, and this process restoring, loading and exporting from it meanwhile."""
    args = ["train", "--config", SMOKE, f"--config.data.cache_dir={cache_dir}", "--no-progress",
            "--config.train.checkpoint_every=1", "--config.train.max_steps=10", "--config.train.eval_every=10",
            "--config.train.sample_every=0"]
    undisturbed = cli(*args, "--workdir", str(tmp_path / "alone"))
    assert undisturbed.returncode == 0, undisturbed.stderr
    run = tmp_path / "read"
    trainer = subprocess.Popen([sys.executable, "-m", "gpt2jax.cli", *args, "--workdir", str(run)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reads = 0
    while trainer.poll() is None:
        try:
            GPT2LMHeadModel.from_pretrained(run)
            export_run(str(run), "latest", str(tmp_path / f"export{reads}"))
            reads += 1
        except UserError:  # no checkpoint yet, or the step it chose was just rotated away: the reader's problem
            time.sleep(0.05)
    _, stderr = trainer.communicate()
    assert trainer.returncode == 0, stderr
    assert reads >= 2
    assert json.load(open(run / "run.json"))["status"] == "finished"
    np.testing.assert_allclose(train_losses(run), train_losses(tmp_path / "alone"), rtol=1e-6)


def test_best_step_skips_a_step_whose_metadata_is_damaged(tmp_path, cache_dir):
    run = tmp_path / "run"
    overrides = [f"--config.data.cache_dir={cache_dir}", "--config.train.keep_best=2"]
    run_training(load_config(SMOKE, overrides), str(run), progress=False)  # evaluated and saved at 10 and 20
    checkpoints = Checkpoints(str(run), read_only=True)
    best = checkpoints.best_step()
    other = ({10, 20} - {best}).pop()
    (run / "checkpoints" / str(best) / "meta" / "metadata").write_text("{bad")
    assert Checkpoints(str(run), read_only=True).best_step() == other  # the readable one is ranked
    result = cli("sample", "--run", str(run), "--step", "best", "--prompt", "a", "--max-new-tokens", "2")
    assert result.returncode == 0 and f"checkpoint step {best}" in result.stderr and "Traceback" not in result.stderr
    # every step's metadata damaged: nothing is ranked, and best means latest (as when nothing was evaluated)
    (run / "checkpoints" / str(other) / "meta" / "metadata").write_text("[1, 2]")
    assert Checkpoints(str(run), read_only=True).best_step() == 20
    result = cli("export", "--run", str(run), "--step", "best", "--out", str(tmp_path / "out"))
    assert result.returncode == 0 and "step 20" in result.stdout, result.stderr


def test_a_step_removed_while_a_reader_lists_them_is_listed_again(monkeypatch):
    """The race the loop above found: Orbax lists the steps, the trainer's retention removes one, Orbax stats
    it. A reader lists again (and after repeated failures says so in one line); the trainer is never touched."""
    from gpt2jax import checkpoint

    real, calls = checkpoint.ocp.CheckpointManager, []

    def flaky(*args, failures, **kwargs):
        calls.append(1)
        if len(calls) <= failures:
            raise FileNotFoundError(2, "No such file or directory", "checkpoints/6")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", lambda *a, **k: flaky(*a, failures=2, **k))
    assert Checkpoints(OLD_RUN, read_only=True).latest_step() == 10 and len(calls) == 3
    calls.clear()
    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", lambda *a, **k: flaky(*a, failures=99, **k))
    with pytest.raises(UserError, match="its steps changed while they were listed"):
        Checkpoints(OLD_RUN, read_only=True)
