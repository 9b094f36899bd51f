"""Checkpoints: kill -9 and SIGTERM resume, broken steps, best-k, device counts, export, eval, fine-tuning."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax import GPT2Config, GPT2LMHeadModel, UserError
from gpt2jax.checkpoint import Checkpoints
from gpt2jax.errors import Stopped
from gpt2jax.trainer import StopSignals, run_training
from helpers import SMOKE, run_with_hook, smoke

STEP_LOGGING = ["--config.train.log_every=1", "--config.train.checkpoint_every=5", "--config.train.sample_every=0"]


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


@pytest.fixture(scope="module")
def reference_run(cache_dir, tmp_path_factory):
    """The uninterrupted run, one train record per step."""
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    run_training(smoke(cache_dir, *STEP_LOGGING), run_dir, progress=False)
    return run_dir


def train_command(cache_dir, run_dir):
    return [sys.executable, "-m", "gpt2jax.cli", "train", "--config", SMOKE, "--workdir", run_dir, "--no-progress",
            f"--config.data.cache_dir={cache_dir}", *STEP_LOGGING]


def test_kill_9_midway_then_same_command_gives_the_same_losses(cache_dir, reference_run, tmp_path):
    run_dir = str(tmp_path / "killed")
    hook = """
import os
from gpt2jax import checkpoint
original = checkpoint.Checkpoints.save
def save_then_die(self, step, *args, **kwargs):
    original(self, step, *args, **kwargs)
    if step == 10:  # the async write of step 10 has only just started
        os.kill(os.getpid(), 9)
checkpoint.Checkpoints.save = save_then_die
"""
    killed = run_with_hook(hook, train_command(cache_dir, run_dir))
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = losses(run_dir)
    assert max(before) == 10
    restarted = subprocess.run(train_command(cache_dir, run_dir), capture_output=True, text=True, timeout=600)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert "resuming" in restarted.stdout
    after, reference = losses(run_dir), losses(reference_run)
    assert set(after) == set(reference) == set(range(1, 21))
    for step in range(1, 21):
        assert abs(after[step] - reference[step]) <= 1e-6, step


def val_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "val"}


def loss_on_the_trainers_val_batches(model, cache_dir):
    """The val loss as the trainer computes it (its fixed windows, mean over batches), from `model`."""
    from gpt2jax.batches import Placement, validation_batches
    from gpt2jax.data import prepare
    from gpt2jax.model import next_token_loss

    config = smoke(cache_dir, *STEP_LOGGING)
    tokens = prepare(config.data, progress=False).tokens("val")
    batches = validation_batches(tokens, config.data.block_size, config.train.global_batch_size,
                                 config.train.eval_batches, Placement(local_device_count=8))
    flat = lambda x: x.reshape(-1, x.shape[-1])
    return float(np.mean([next_token_loss(model(flat(b["inputs"])).logits, flat(b["targets"])) for b in batches]))


@pytest.mark.parametrize("step", [None, 10])
def test_run_dir_load_has_the_trainers_final_params(cache_dir, reference_run, step):
    """A run-dir load, judged by the trainer's own record: its val loss at that step, recomputed from the load."""
    model = GPT2LMHeadModel.from_pretrained(reference_run, **({} if step is None else {"step": step}))
    logged = val_losses(reference_run)[model.run_step]
    assert model.run_step == (20 if step is None else step)
    assert abs(loss_on_the_trainers_val_batches(model, cache_dir) - logged) <= 1e-5


class SignalAt(StopSignals):
    """A stop signal that arrives after `step`: the seam the trainer offers in place of real signals."""

    def __init__(self, step, signum):
        super().__init__()
        self.at_step, self.signum = step, signum

    def poll(self, step, log_step):
        return self.signum if step >= self.at_step else super().poll(step, log_step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_the_step_reached_and_resumes_exactly(cache_dir, reference_run, tmp_path, signum):
    run_dir = str(tmp_path / "preempted")
    with pytest.raises(Stopped) as stopped:
        run_training(smoke(cache_dir, *STEP_LOGGING), run_dir, progress=False, stop_signals=SignalAt(8, signum))
    assert (stopped.value.step, stopped.value.signum) == (8, signum)
    assert Checkpoints(run_dir).all_steps() == [5, 8]
    assert json.load(open(os.path.join(run_dir, "run.json")))["status"] == "stopped"
    run_training(smoke(cache_dir, *STEP_LOGGING), run_dir, progress=False)
    after, reference = losses(run_dir), losses(reference_run)
    assert all(abs(after[s] - reference[s]) <= 1e-6 for s in range(1, 21))
    info = json.load(open(os.path.join(run_dir, "run.json")))
    assert info["status"] == "finished" and len(info["sessions"]) == 2


def train_records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


def test_a_stop_between_log_steps_leaves_the_records_of_a_run_that_never_stopped(cache_dir, tmp_path):
    """Logging every 5 steps, saving every 3, stopped at step 8: nothing is written off the cadence, and once
    resumed the record of step 10 averages steps 6-10 as the uninterrupted run's does (the checked but unwritten
    metrics of steps 6-8 travel in the checkpoint)."""
    options = ["--config.train.log_every=5", "--config.train.checkpoint_every=3", "--config.train.sample_every=0",
               "--config.train.eval_every=100"]
    reference, stopped = str(tmp_path / "reference"), str(tmp_path / "stopped")
    run_training(smoke(cache_dir, *options), reference, progress=False)
    with pytest.raises(Stopped):
        run_training(smoke(cache_dir, *options), stopped, progress=False,
                     stop_signals=SignalAt(8, signal.SIGTERM))
    assert [r["step"] for r in train_records(stopped)] == [5]
    run_training(smoke(cache_dir, *options), stopped, progress=False)
    after, before = train_records(stopped), train_records(reference)
    assert [r["step"] for r in after] == [r["step"] for r in before] == [5, 10, 15, 20]
    for mine, theirs in zip(after, before):
        for key in ("loss", "grad_norm", "param_norm", "lr", "counted_fraction"):
            assert abs(mine[key] - theirs[key]) <= 1e-6 * max(1.0, abs(theirs[key])), (mine["step"], key)


def wait_for_metrics(run_dir, process, timeout=300):
    """Block until the trainer has logged a step (it is past compiling), or fail if it exits first."""
    path, start = os.path.join(run_dir, "metrics.jsonl"), time.monotonic()
    while not (os.path.isfile(path) and os.path.getsize(path) > 0):
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() - start < timeout
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_real_signal_stops_the_cli_with_a_checkpoint_and_a_resume_command(cache_dir, tmp_path, signum):
    run_dir = str(tmp_path / "signalled")
    extra = ["--config.train.max_steps=100000", "--config.train.sample_prompt=def f(x, y):"]
    command = train_command(cache_dir, run_dir) + extra
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_metrics(run_dir, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, err[-2000:]
    found = re.search(rf"stopped at step (\d+) by {name}; checkpoint saved; resume with: (.*)", err)
    assert found and len(err.strip().splitlines()) == 1, err[-2000:]
    assert Checkpoints(run_dir).latest_step() == int(found.group(1))
    # quoted (the prompt has spaces), and --workdir=DIR: a directory named "-x" stays a value
    assert shlex.split(found.group(2)) == ["gpt2jax", "train", f"--config={SMOKE}", f"--workdir={run_dir}",
                                           *command[8:]]
    assert json.load(open(os.path.join(run_dir, "run.json")))["status"] == "stopped"


def truncate_step(run_dir, step):
    state_dir = os.path.join(run_dir, "checkpoints", str(step), "state")
    for directory, _, files in os.walk(state_dir):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 3)


def test_truncated_latest_checkpoint_falls_back_to_the_previous(cache_dir, reference_run, tmp_path, capfd):
    run_dir = str(tmp_path / "broken")
    shutil.copytree(reference_run, run_dir)
    truncate_step(run_dir, 20)
    model = GPT2LMHeadModel.from_pretrained(run_dir)
    assert model.run_step == 15 and "checkpoint step 20" in capfd.readouterr().err
    with pytest.raises(UserError, match="no readable checkpoint"):
        GPT2LMHeadModel.from_pretrained(run_dir, step=20)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "20"))  # resume from 15 reproduces 16..20
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        kept = [line for line in f if json.loads(line)["step"] <= 15]
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(kept)
    run_training(smoke(cache_dir, *STEP_LOGGING), run_dir, progress=False)
    assert all(abs(losses(run_dir)[s] - losses(reference_run)[s]) <= 1e-6 for s in range(16, 21))


@pytest.mark.parametrize("damage", ["data item removed", "state truncated"])
def test_a_damaged_latest_checkpoint_resumes_and_finishes_like_an_undamaged_run(cache_dir, reference_run, tmp_path,
                                                                                 damage):
    """Resume falls back to step 15, sets step 20 aside, saves 20 again; metrics hold each step once."""
    run_dir = str(tmp_path / "damaged")
    shutil.copytree(reference_run, run_dir)
    if damage == "data item removed":
        shutil.rmtree(os.path.join(run_dir, "checkpoints", "20", "data"))
    else:
        truncate_step(run_dir, 20)
    for attempt in range(2):  # and again: a finished run stays finished
        run_training(smoke(cache_dir, *STEP_LOGGING), run_dir, progress=False)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [r["step"] for r in map(json.loads, f) if r["split"] == "train"]
    assert steps == list(range(1, 21))
    assert all(abs(losses(run_dir)[s] - losses(reference_run)[s]) <= 1e-6 for s in range(1, 21))
    assert Checkpoints(run_dir).latest_step() == 20 and GPT2LMHeadModel.from_pretrained(run_dir).run_step == 20
    assert len(os.listdir(os.path.join(run_dir, "checkpoints_unreadable"))) == 1


def test_a_partial_metrics_line_is_repaired_on_resume(cache_dir, reference_run, tmp_path):
    """A killed writer left half a line, and records past the checkpoint: both are gone after the resume."""
    run_dir = str(tmp_path / "partial")
    shutil.copytree(reference_run, run_dir)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "20"))
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 21, "split": "tra')
    run_training(smoke(cache_dir, *STEP_LOGGING), run_dir, progress=False)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]  # every line parses
    train = [r["step"] for r in records if r["split"] == "train"]
    assert train == list(range(1, 21)) and [r["step"] for r in records if r["split"] == "val"] == [10, 20]


def test_overwrite_refuses_a_directory_that_is_not_a_run(cache_dir, tmp_path):
    workdir = tmp_path / "thesis"
    (workdir / "sub").mkdir(parents=True)
    (workdir / "thesis.tex").write_text("x")
    (workdir / "config.json").write_text('{"not": "an experiment"}')
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    result = subprocess.run(train_command(cache_dir, str(workdir)) + ["--overwrite"], capture_output=True, text=True)
    assert result.returncode == 2 and "is not a gpt2jax run directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before


def test_overwrite_removes_only_what_the_run_wrote(cache_dir, reference_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    (run_dir / "notes.md").write_text("my notes")
    result = subprocess.run(train_command(cache_dir, str(run_dir)) + ["--overwrite", "--config.optim.lr=1e-3"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--overwrite removes config.json, run.json, metrics.jsonl" in result.stderr and "keeps notes.md" in result.stderr
    assert (run_dir / "notes.md").read_text() == "my notes"
    assert json.load(open(run_dir / "config.json"))["optim"]["lr"] == 1e-3 and min(losses(str(run_dir))) == 1


def test_unfinished_write_is_never_a_step(reference_run, tmp_path):
    run_dir = str(tmp_path / "tmpdir")
    shutil.copytree(reference_run, run_dir)
    os.makedirs(os.path.join(run_dir, "checkpoints", "25.orbax-checkpoint-tmp-123", "state"))
    assert Checkpoints(run_dir).latest_step() == 20


def test_best_k_keeps_the_lowest_val_losses_and_the_latest(tmp_path):
    checkpoints = Checkpoints(str(tmp_path), keep=1, keep_best=2)
    for step, val_loss in zip(range(1, 7), [5.0, 1.0, 4.0, 2.0, 3.0, None]):
        checkpoints.save(step, {"params": {"w": jnp.full((2,), float(step))}}, data={"step": step}, config={},
                         val_loss=val_loss)
    checkpoints.close()
    assert Checkpoints(str(tmp_path)).all_steps() == [2, 4, 6]  # best two (1.0, 2.0) and the latest
    assert Checkpoints(str(tmp_path)).best_step() == 2


def test_eight_device_checkpoint_restores_on_one_device(reference_run):
    assert jax.device_count() == 8
    ids = np.arange(24).reshape(2, 12) % 257
    here = np.asarray(GPT2LMHeadModel.from_pretrained(reference_run)(ids).logits)
    script = (f"import numpy as np, jax; from gpt2jax import GPT2LMHeadModel; assert jax.device_count() == 1\n"
              f"np.save('{reference_run}/one.npy', np.asarray(GPT2LMHeadModel.from_pretrained('{reference_run}')"
              f"(np.arange(24).reshape(2, 12) % 257).logits))")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_allclose(np.load(os.path.join(reference_run, "one.npy")), here, atol=1e-6)


def test_resume_on_a_different_device_count(cache_dir, reference_run, tmp_path):
    """A run checkpointed on 8 devices continues on 4 (global batch unchanged): same losses."""
    run_dir = str(tmp_path / "four")
    shutil.copytree(reference_run, run_dir)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "20"))
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "15"))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run(train_command(cache_dir, run_dir), env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "from step 10" in result.stdout, result.stderr[-2000:]
    after = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    resumed = {r["step"]: r["loss"] for r in after[-12:] if r["split"] == "train" and r["step"] > 10}
    assert all(abs(resumed[s] - losses(reference_run)[s]) <= 1e-5 for s in range(11, 21))


def test_export_command_writes_the_runs_params(cache_dir, reference_run, tmp_path):
    """`gpt2jax export`: the HF directory holds the checkpoint's params (its val loss is the logged one)."""
    out = str(tmp_path / "hf")
    command = [sys.executable, "-m", "gpt2jax.cli", "export", "--run", reference_run, "--step", "10", "--out", out]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0 and f"wrote {out} from {reference_run} step 10" in result.stdout, result.stderr
    exported = GPT2LMHeadModel.from_pretrained(out)
    assert abs(loss_on_the_trainers_val_batches(exported, cache_dir) - val_losses(reference_run)[10]) <= 1e-5
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 2 and "not empty; nothing was written" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


@pytest.mark.filterwarnings("ignore:os.fork")  # preexec_fn forks this (JAX-using) test process
def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(reference_run, tmp_path):
    """The file-size limit stands in for a full disk: writes fail with an OS error part way through."""
    import resource

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failing write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "hf"
    result = subprocess.run([sys.executable, "-m", "gpt2jax.cli", "export", "--run", reference_run, "--out", str(out)],
                            capture_output=True, text=True, preexec_fn=small_files)
    assert result.returncode == 2 and "File too large" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []  # neither the output nor its staging directory


def test_export_loads_in_transformers_with_the_same_logits(reference_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gpt2jax.hf import export_run

    out = str(tmp_path / "hf")
    assert export_run(reference_run, "best", out) in (15, 20)
    ours = GPT2LMHeadModel.from_pretrained(reference_run, step="best")
    reference = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = np.arange(30).reshape(2, 15) % 257
    expected = reference(torch.as_tensor(ids)).logits.detach().numpy()
    assert np.abs(np.asarray(ours(ids).logits) - expected).max() <= 1e-5


def first_batch_loss(model, config):
    """The loss `model` gets on the first training batch of `config` (float64 numpy log-softmax)."""
    from gpt2jax.batches import BatchSampler
    from gpt2jax.data import prepare

    bins = prepare(config.data, progress=False)
    T, B = config.data.block_size, config.train.global_batch_size
    first = BatchSampler(bins.tokens("train"), T, B, seed=config.train.seed)(0)
    inputs, targets = first["inputs"].reshape(B, T), first["targets"].reshape(B, T)
    logits = np.asarray(model(inputs).logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None], -1).mean()


def test_fine_tuning_from_an_hf_dir_starts_from_its_loss(cache_dir, tmp_path):
    hf_dir = str(tmp_path / "pretrained")
    config = GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2, eos_token_id=256,
                        bos_token_id=256)
    sharp = jax.tree.map(lambda p: p * 8.0, GPT2LMHeadModel(config, seed=42).params)  # far from uniform predictions
    base = GPT2LMHeadModel(config, params=sharp)
    base.save_pretrained(hf_dir)
    config = smoke(cache_dir, f"--config.init_from={hf_dir}", "--config.train.log_every=1",
                   "--config.train.max_steps=2", "--config.model.resid_pdrop=0.0")
    run_dir = str(tmp_path / "finetuned")
    run_training(config, run_dir, progress=False)
    expected = first_batch_loss(base, config)
    assert abs(losses(run_dir)[1] - expected) <= 1e-4
    scratch = smoke(cache_dir, "--config.train.log_every=1", "--config.train.max_steps=2")
    run_training(scratch, str(tmp_path / "scratch"), progress=False)
    assert abs(losses(str(tmp_path / "scratch"))[1] - expected) > 1e-3  # the check above would notice scratch init


def test_fine_tuning_from_a_run_dir_starts_from_its_latest_params(cache_dir, reference_run, tmp_path):
    """init_from=<run dir>: params of the run's latest checkpoint, a fresh optimizer and step 0."""
    config = smoke(cache_dir, f"--config.init_from={reference_run}", "--config.train.log_every=1",
                   "--config.train.max_steps=2", "--config.train.sample_every=0", "--config.optim.lr=1e-4",
                   "--config.optim.min_lr=1e-5")
    run_dir = str(tmp_path / "from_run")
    run_training(config, run_dir, progress=False)
    expected = first_batch_loss(GPT2LMHeadModel.from_pretrained(reference_run), config)
    assert sorted(losses(run_dir)) == [1, 2] and abs(losses(run_dir)[1] - expected) <= 1e-4
    assert abs(losses(reference_run)[1] - expected) > 0.1  # the run's first step (a fresh init) was far worse


def test_fine_tuning_reports_shape_mismatches_by_name(cache_dir, tmp_path):
    hf_dir = str(tmp_path / "pretrained")
    GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "config.json")) as f:
        fields = json.load(f)
    fields["n_inner"] = 100  # the weights say 128
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(fields, f)
    with pytest.raises(UserError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight: config.json implies shape \(32, 100\)"):
        run_training(smoke(cache_dir, f"--config.init_from={hf_dir}"), str(tmp_path / "run"), progress=False)


def test_fork_overwrite_and_a_second_trainer(cache_dir, reference_run, tmp_path):
    from gpt2jax.rundir import lock

    with pytest.raises(UserError, match="different config.*--fork NEW_DIR.*--overwrite"):
        run_training(smoke(cache_dir, *STEP_LOGGING, "--config.optim.lr=1e-3"), reference_run, progress=False)
    fork = str(tmp_path / "fork")
    run_training(smoke(cache_dir, *STEP_LOGGING, "--config.train.max_steps=25"), fork, progress=False,
                 fork_from=reference_run)
    assert min(losses(fork)) == 21 and Checkpoints(fork).latest_step() == 25
    assert json.load(open(os.path.join(fork, "run.json")))["forked_from"] == reference_run
    copy = str(tmp_path / "copy")
    shutil.copytree(reference_run, copy)
    run_training(smoke(cache_dir, *STEP_LOGGING, "--config.optim.lr=1e-3"), copy, progress=False, overwrite=True)
    assert min(losses(copy)) == 1 and json.load(open(os.path.join(copy, "config.json")))["optim"]["lr"] == 1e-3
    held = lock(copy)
    try:
        with pytest.raises(UserError, match=f"in use by another trainer \\(pid {os.getpid()}\\)"):
            run_training(smoke(cache_dir, *STEP_LOGGING, "--config.optim.lr=1e-3"), copy, progress=False)
    finally:
        held.close()


def test_eval_and_sample_from_a_run_on_the_cli(reference_run):
    run = lambda *args: subprocess.run([sys.executable, "-m", "gpt2jax.cli", *args], capture_output=True, text=True)
    evaluated = run("eval", "--run", reference_run, "--max-batches", "2")
    assert evaluated.returncode == 0 and "val split: loss" in evaluated.stdout and "bits/byte" in evaluated.stdout
    sampled = run("sample", "--run", reference_run, "--step", "best", "--prompt", "def ", "--max-new-tokens", "8")
    assert sampled.returncode == 0 and sampled.stdout.startswith("def ")
    assert "WARNING" not in evaluated.stderr + sampled.stderr  # e.g. absl's "Metadata file does not exist"
    missing = run("sample", "--run", reference_run, "--step", "3", "--prompt", "x")
    assert missing.returncode == 2 and "no checkpoint at step 3" in missing.stderr


def test_a_failed_start_leaves_the_run_dir_usable(cache_dir, tmp_path):
    """A bad init_from fails before anything is written, so the corrected command starts cleanly."""
    run_dir = str(tmp_path / "run")
    with pytest.raises(UserError):
        run_training(smoke(cache_dir, f"--config.init_from={tmp_path}"), run_dir, progress=False)
    assert not os.path.exists(os.path.join(run_dir, "config.json"))
    run_training(smoke(cache_dir, "--config.train.max_steps=5"), run_dir, progress=False)
    assert json.load(open(os.path.join(run_dir, "run.json")))["status"] == "finished"


@pytest.mark.filterwarnings("ignore:os.fork")  # preexec_fn forks this (JAX-using) test process
def test_a_checkpoint_that_cannot_be_written_ends_the_run_with_its_cause(cache_dir, tmp_path):
    """A full disk (the file-size limit stands in for it) during an async save: exit 2 and one line naming
    the cause, none of Orbax's writer-thread tracebacks; the same command without the limit then finishes."""
    import resource

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    run_dir = str(tmp_path / "full")
    result = subprocess.run(train_command(cache_dir, run_dir), capture_output=True, text=True,
                            preexec_fn=small_files, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.splitlines()) == 1, result.stderr[-3000:]
    line = result.stderr.strip()
    assert line.startswith("gpt2jax train: error: ") and "a checkpoint could not be written (File too large)" in line
    resumed = subprocess.run(train_command(cache_dir, run_dir), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.load(open(os.path.join(run_dir, "run.json")))["status"] == "finished"
