"""A run's directory is the user's: --workdir cannot be placed inside another run's entries, --overwrite checks
everything before it removes anything (links are unlinked, never followed; a run nested inside is refused),
and a run resumes only on the data its checkpoints were trained on."""

import json
import os
import shutil

import pytest

from gpt2jax.errors import UserError
from gpt2jax.trainer import run_training
from helpers import OLD_RUN, SMOKE, files
from helpers import smoke as smoke_config



@pytest.fixture
def run(tmp_path):
    shutil.copytree(OLD_RUN, tmp_path / "f1")
    return tmp_path / "f1"


@pytest.fixture
def smoke(cache_dir):
    return lambda *overrides: smoke_config(cache_dir, *overrides)


@pytest.mark.parametrize("inside", ["checkpoints/forked", "tb/x/y", "checkpoints"])
def test_a_workdir_inside_another_runs_entries_is_refused(run, smoke, inside):
    before = files(run)
    with pytest.raises(UserError, match=f"is inside {run}/{inside.split('/')[0]}, which belongs to the run in {run}"):
        run_training(smoke(), str(run / inside), progress=False, fork_from=str(run))
    assert files(run) == before


def test_overwrite_refuses_a_run_nested_in_the_old_runs_entries(run, smoke):
    shutil.copytree(OLD_RUN, run / "tb" / "nested")  # made before this check existed, or by hand
    before = files(run)
    with pytest.raises(UserError, match=f"{run}/tb/nested is another run, inside"):
        run_training(smoke(), str(run), progress=False, overwrite=True)
    assert files(run) == before


@pytest.mark.parametrize("entry", ["tb", "checkpoints"])
def test_overwrite_unlinks_a_linked_entry_and_leaves_its_target(run, smoke, tmp_path, entry):
    target = tmp_path / "elsewhere"
    shutil.move(str(run / entry), str(target)) if (run / entry).exists() else target.mkdir()
    (target / "the_users_file").write_text("keep me")
    os.symlink(target, run / entry)
    before = files(target)
    run_training(smoke("--config.train.max_steps=2"), str(run), progress=False, overwrite=True)
    assert files(target) == before  # nothing followed through the link
    assert not os.path.islink(run / entry) and json.load(open(run / "run.json"))["status"] == "finished"


def test_a_run_does_not_resume_on_changed_data(tmp_path, smoke):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(400)))
    config = smoke(f"--config.data.dataset={text}", f"--config.data.cache_dir={tmp_path}/c")
    run_training(config, str(tmp_path / "run"), progress=False)
    run_training(config, str(tmp_path / "run"), progress=False)  # the same data: the same command is accepted
    text.write_text("\n\n".join(f"class C{i}:\n    pass" for i in range(400)))  # the same path, other text
    before = files(tmp_path / "run")
    with pytest.raises(UserError, match=r"was trained on other data: its step 20 recorded token bins [0-9a-f]{16}"):
        run_training(config, str(tmp_path / "run"), progress=False)
    assert files(tmp_path / "run") == before
    run_training(config, str(tmp_path / "fork"), progress=False, fork_from=str(tmp_path / "run"))  # the way on


def test_a_checkpoint_whose_stored_config_was_edited_is_refused(run, tmp_path):
    from gpt2jax import GPT2LMHeadModel
    from gpt2jax.hf import export_run

    stored = run / "checkpoints" / "10" / "config" / "metadata"
    config = json.loads(stored.read_text())
    config["model"]["n_layer"] = 1  # the weights hold 2 layers: running 1 of them would be silent garbage
    stored.write_text(json.dumps(config))
    with pytest.raises(UserError, match="checkpoint does not match a GPT-2 with n_layer=1"):
        GPT2LMHeadModel.from_pretrained(run)
    with pytest.raises(UserError, match="unexpected transformer.h.1"):
        export_run(str(run), "latest", str(tmp_path / "out"))


def test_the_run_records_its_cache_dir_absolute(smoke, tmp_path, monkeypatch):
    from gpt2jax.experiment import resolve
    from gpt2jax.config import GPT2Config

    monkeypatch.chdir(tmp_path)
    resolved = resolve(smoke("--config.data.cache_dir=relative/cache"), GPT2Config())
    assert resolved["data"]["cache_dir"] == str(tmp_path / "relative" / "cache")  # eval --run works from anywhere


def test_a_non_ascii_workdir_in_a_c_locale_is_one_line(tmp_path, cache_dir):
    import subprocess
    import sys

    env = {**os.environ, "LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    result = subprocess.run([sys.executable, "-m", "gpt2jax.cli", "train", "--config", SMOKE,
                             f"--config.data.cache_dir={cache_dir}", "--workdir", str(tmp_path / "runé")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and "LANG=C.UTF-8" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "runé")


def test_starting_a_finished_run_again_says_so(tmp_path, cache_dir):
    import subprocess
    import sys

    command = [sys.executable, "-m", "gpt2jax.cli", "train", "--config", SMOKE, f"--config.data.cache_dir={cache_dir}",
               "--config.train.max_steps=2", "--config.train.log_every=1", "--no-progress", "--workdir",
               str(tmp_path / "run")]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and "loss" in first.stdout, first.stderr[-2000:]
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "finished already at step 2; nothing was trained" in again.stdout, again.stdout


def test_a_fine_tune_resumes_after_its_init_from_directory_is_gone(tmp_path, smoke, capsys):
    from gpt2jax import GPT2Config, GPT2LMHeadModel

    source, run = tmp_path / "hf", tmp_path / "run"
    GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(source)
    config = smoke(f"--config.init_from={source}", "--config.train.max_steps=10", "--config.train.checkpoint_every=5")
    run_training(config, str(run), progress=False)
    shutil.rmtree(run / "checkpoints" / "10")  # as if it had stopped after step 5
    shutil.rmtree(source)
    with pytest.raises(UserError, match="not 'scratch' and not a directory"):  # a new run still needs it
        run_training(config, str(tmp_path / "other"), progress=False)
    capsys.readouterr()
    run_training(config, str(run), progress=False)  # the checkpoint holds everything init_from gave it
    assert f"resuming {run} from step 5" in capsys.readouterr().out
    assert "10" in os.listdir(run / "checkpoints") and json.load(open(run / "run.json"))["status"] == "finished"
    assert [r["step"] for r in map(json.loads, open(run / "metrics.jsonl")) if r["split"] == "train"] == [5, 10]


def test_a_key_added_after_a_run_was_made_does_not_orphan_it(run, smoke):
    """The old run's config.json has no model.param_dtype nor model.matmul_precision (they became experiment
    keys later): at their defaults the run resumes, at another value it is a different experiment."""
    from gpt2jax import rundir
    from gpt2jax.experiment import base_config

    stored = json.loads((run / "config.json").read_text())
    assert "param_dtype" not in stored["model"]
    resolved = stored | {"model": stored["model"] | {"param_dtype": "float32", "matmul_precision": None}}
    defaults = rundir.flatten(base_config().to_dict())
    rundir.check_resumable(str(run), resolved, set(), defaults)
    with pytest.raises(UserError, match=r"model.param_dtype: None -> 'bfloat16'"):
        rundir.check_resumable(str(run), resolved | {"model": resolved["model"] | {"param_dtype": "bfloat16"}},
                               set(), defaults)
    with pytest.raises(UserError, match="model.param_dtype"):  # without the defaults, as before this rule
        rundir.check_resumable(str(run), resolved, set())



def test_every_gpt2config_field_of_a_model_is_an_experiment_key():
    import dataclasses

    from gpt2jax.config import GPT2Config
    from gpt2jax.experiment import NOT_EXPERIMENT_KEYS, base_config

    model = base_config().model
    assert {f.name for f in dataclasses.fields(GPT2Config)} - NOT_EXPERIMENT_KEYS == set(model) - {"size"}
    assert model.param_dtype == "float32" and model.matmul_precision is None  # settable from experiments now


@pytest.mark.parametrize("kind", ["link", "file"])
def test_a_checkpoint_step_that_is_not_a_directory_is_refused_before_training(run, smoke, tmp_path, kind):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(run / "checkpoints" / "10"), str(elsewhere))
    if kind == "link":
        os.symlink(elsewhere, run / "checkpoints" / "10")
    else:
        (run / "checkpoints" / "5").write_text("x")
    before = files(run), files(elsewhere)
    with pytest.raises(UserError, match="checkpoint steps must be directories this run wrote"):
        run_training(smoke(), str(run), progress=False)
    assert (files(run), files(elsewhere)) == before
