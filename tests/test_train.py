"""Training on 8 fake CPU devices: the smoke run, pmap == single device, accumulation, schedule, configs."""

import functools
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax import GPT2Config, UserError
from gpt2jax.experiment import load_config, validate_experiment
from gpt2jax.model import GPT2LMHeadModule, init_params
from gpt2jax.train import decay_mask, init_state, learning_rate_schedule, make_optimizer, train_step
from gpt2jax.trainer import run_training
from helpers import ROOT, SMOKE, smoke

EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def read_metrics(run_dir, split="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def test_smoke_trains_and_loss_falls(smoke_run):
    train = read_metrics(smoke_run)
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert train[0]["loss"] > train[-1]["loss"] + 0.5
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["grad_norm"] > 0 for r in train)
    val = read_metrics(smoke_run, "val")
    assert [r["step"] for r in val] == [10, 20] and val[1]["loss"] < val[0]["loss"]
    assert sorted(os.listdir(os.path.join(smoke_run, "checkpoints"))) == ["10", "20"]
    info = json.load(open(os.path.join(smoke_run, "run.json")))
    assert info["status"] == "finished" and info["device_count"] == 8 and "jax" in info["versions"]
    assert info["attention"] == {"implementation": "xla", "why": "no fused kernel on cpu"}
    resolved = json.load(open(os.path.join(smoke_run, "config.json")))
    assert resolved["model"]["vocab_size"] == 257 and resolved["optim"]["decay_steps"] == 20
    assert glob.glob(os.path.join(smoke_run, "tb", "**", "events.out.tfevents.*"), recursive=True)
    samples = [json.loads(line) for line in open(os.path.join(smoke_run, "samples.jsonl"))]
    assert [s["step"] for s in samples] == [10, 20] and all(len(s["text"]) > 0 for s in samples)


def test_restart_with_the_same_command_resumes_with_equal_losses(smoke_run, cache_dir, tmp_path):
    import shutil

    run_dir = str(tmp_path / "resumed")
    shutil.copytree(smoke_run, run_dir)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "20"))  # as if killed between steps 10 and 20
    original = read_metrics(smoke_run)
    run_training(smoke(cache_dir), run_dir, progress=False)
    resumed = [r for r in read_metrics(run_dir) if r["step"] > 10][-2:]
    assert [r["step"] for r in resumed] == [15, 20]
    for a, b in zip(resumed, original[-2:]):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5


def test_a_different_config_refuses_the_run_dir(smoke_run, cache_dir):
    with pytest.raises(UserError, match=r"different config \(optim.lr: 0.003 -> 0.001\)"):
        run_training(smoke(cache_dir, "--config.optim.lr=1e-3"), smoke_run, progress=False)


TINY = GPT2Config(vocab_size=61, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0)


def one_step(batch_size, devices, grad_accum_steps):
    """Params and loss after one pmapped step of a fixed global batch over `devices` devices."""
    config = smoke("/unused").optim
    optimizer, schedule = make_optimizer(config, max_steps=10)
    state = init_state(init_params(TINY, seed=0), optimizer, seed=0)
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (batch_size, 9)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1].reshape(devices, -1, 8), "targets": tokens[:, 1:].reshape(devices, -1, 8)}
    step = functools.partial(train_step, module=GPT2LMHeadModule(TINY), optimizer=optimizer, schedule=schedule,
                             grad_accum_steps=grad_accum_steps, dropout=False)
    stacked = jax.tree.map(lambda x: jnp.stack([x] * devices), state)
    new_state, metrics = jax.pmap(step, axis_name="batch", devices=jax.devices()[:devices])(stacked, batch)
    return jax.tree.map(lambda x: np.asarray(x[0]), new_state.params), float(metrics["loss"][0])


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=atol)


def test_pmapped_step_equals_single_device_step():
    params_8, loss_8 = one_step(16, devices=8, grad_accum_steps=1)
    params_1, loss_1 = one_step(16, devices=1, grad_accum_steps=1)
    assert abs(loss_8 - loss_1) <= 1e-5
    assert_trees_close(params_8, params_1, atol=1e-5)
    params_0 = init_params(TINY, seed=0)
    assert max(np.abs(np.asarray(x) - y).max() for x, y in zip(jax.tree.leaves(params_0), jax.tree.leaves(params_1))) > 1e-4


def test_gradient_accumulation_equals_one_big_batch():
    params_acc, loss_acc = one_step(16, devices=1, grad_accum_steps=4)
    params_big, loss_big = one_step(16, devices=1, grad_accum_steps=1)
    assert abs(loss_acc - loss_big) <= 1e-5
    assert_trees_close(params_acc, params_big, atol=1e-5)
    params_both, _ = one_step(16, devices=8, grad_accum_steps=2)
    assert_trees_close(params_both, params_big, atol=1e-5)


def test_learning_rate_schedule_is_warmup_then_cosine():
    optim = smoke("/unused", "--config.optim.lr=1e-3", "--config.optim.min_lr=1e-4",
                  "--config.optim.warmup_steps=10", "--config.optim.decay_steps=110").optim
    schedule = learning_rate_schedule(optim, max_steps=500)  # step s uses the rate of the (s + 1)-th step
    np.testing.assert_allclose([schedule(0), schedule(4), schedule(9)], [1e-4, 5e-4, 1e-3], rtol=1e-5)
    np.testing.assert_allclose(schedule(59), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-5)  # half way down the cosine
    np.testing.assert_allclose([schedule(109), schedule(400)], [1e-4, 1e-4], rtol=1e-6)
    default = learning_rate_schedule(smoke("/unused").optim, max_steps=20)
    np.testing.assert_allclose(default(19), smoke("/unused").optim.min_lr, rtol=1e-6)


def test_weight_decay_only_on_matrices_and_embeddings():
    mask = decay_mask(init_params(TINY))["transformer"]
    assert mask["wte"]["embedding"] and mask["wpe"]["embedding"] and mask["h"]["0"]["attn"]["c_attn"]["kernel"]
    assert not mask["h"]["0"]["attn"]["c_attn"]["bias"] and not mask["ln_f"]["scale"] and not mask["h"]["1"]["ln_1"]["bias"]
    # and the optimizer applies it so: with zero gradients only decayed leaves move
    optim = smoke("/unused", "--config.optim.weight_decay=0.5", "--config.optim.warmup_steps=0").optim
    optimizer, _ = make_optimizer(optim, max_steps=10)
    params = init_params(TINY)
    params = jax.tree.map(lambda p: p + 1.0, params)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params), params)
    moved = jax.tree.map(lambda u: bool(np.any(np.asarray(u) != 0)), updates)
    assert moved == decay_mask(params)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_every_experiment_loads_validates_and_documents_itself(path):
    config = load_config(path)
    if config.init_from != "scratch":  # a fine-tuning config names a directory the user downloads
        config = load_config(path, [f"--config.init_from={os.path.join(ROOT, 'tests', 'fixtures', 'tiny_gpt2')}"])
    validate_experiment(config, device_count=8)
    doc = open(path).read().split('"""')[1]
    for heading in ("Command:", "Hardware:", "Wall time:", "Loss:"):
        assert heading in doc, f"{path} docstring lacks {heading}"
    assert "MEASURED" not in doc


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.n_head=3", "n_embd=32 is not divisible by model.n_head=3"),
        ("--config.data.block_size=128", "data.block_size=128 exceeds model.n_positions=64"),
        ("--config.train.global_batch_size=12", "global_batch_size=12 is not divisible by 8 devices"),
        ("--config.train.grad_accum_steps=3", "not divisible by 8 devices x train.grad_accum_steps=3"),
        ("--config.train.max_steps=0", "train.max_steps must be positive"),
        ("--config.optim.lr=-1.0", "optim.lr must be positive"),
        ("--config.optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
        ("--config.train.compute_dtype=float8", "train.compute_dtype='float8' is not one of"),
        ("--config.model.size=gpt5", "model.size='gpt5' is not one of"),
        ("--config.data.dataset=./no/such/dir", "no such file or directory"),
        ("--config.init_from=/no/such/model", "init_from='/no/such/model'"),
        ("--config.optim.beta2=1.0", r"optim.beta2 must be in \[0, 1\)"),
    ],
)
def test_validation_errors(override, message):
    with pytest.raises(UserError, match=message):
        validate_experiment(smoke("/unused", override), device_count=8)


def test_unknown_key_names_close_matches():
    with pytest.raises(UserError, match="unknown config key 'optim.learning_rate'"):
        smoke("/unused", "--config.optim.learning_rate=1e-3")
    with pytest.raises(UserError, match="did you mean train.max_steps"):
        smoke("/unused", "--config.train.max_step=10")


def two_process_commands(run_dir, cache_dir, *extra):
    """CLI commands for two JAX processes on 127.0.0.1 training the smoke run into run_dir."""
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "gpt2jax.cli", "train", "--config", SMOKE, "--workdir", run_dir, "--no-progress",
               f"--config.data.cache_dir={cache_dir}", "--coordinator-address", f"127.0.0.1:{port}",
               "--num-processes", "2", *extra]
    return [command + ["--process-id", str(i)] for i in range(2)]


def start_together(commands):
    """The processes of a 2 x 4 CPU-device run."""
    import subprocess

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    return [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for c in commands]


def finish(procs, timeout=300):
    import subprocess

    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise
    return [p.returncode for p in procs], outputs


@pytest.mark.parametrize("parallelism", ["pmap", "fsdp"])
def test_two_processes_reproduce_the_single_process_run(parallelism, smoke_run, cache_dir, tmp_path):
    """Two JAX processes on 127.0.0.1 (4 CPU devices each) train the smoke run: the same losses as 1 x 8 (pmap),
    with the state replicated (pmap) or split over the 8 devices of both processes (fsdp)."""
    run_dir = str(tmp_path / "two")
    commands = two_process_commands(run_dir, cache_dir, f"--config.train.parallelism={parallelism}")
    codes, outputs = finish(start_together(commands), timeout=600)
    assert codes == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    two, one = read_metrics(run_dir), read_metrics(smoke_run)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(two, one):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    assert json.load(open(os.path.join(run_dir, "run.json")))["process_count"] == 2
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["10", "20"]


def test_sigterm_to_one_process_stops_both_after_the_same_step(cache_dir, tmp_path):
    """Preemption of one host: the processes agree at the next log step, both save it and exit 143."""
    import re
    import signal
    import time

    run_dir = str(tmp_path / "preempted")
    procs = start_together(two_process_commands(run_dir, cache_dir, "--config.train.max_steps=100000",
                                                "--config.train.log_every=2", "--config.train.sample_every=0"))
    metrics, start = os.path.join(run_dir, "metrics.jsonl"), time.monotonic()
    while not (os.path.isfile(metrics) and os.path.getsize(metrics) > 0):
        if any(p.poll() is not None for p in procs) or time.monotonic() - start > 300:  # say why, then fail
            codes = [p.poll() for p in procs]
            for p in procs:
                p.kill()
            outputs = [p.communicate()[0] for p in procs]
            pytest.fail(f"a process ended (or none logged) before the first log step: {codes}\n"
                        + "\n".join(out[-3000:] for out in outputs))
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    codes, outputs = finish(procs)
    assert codes == [128 + signal.SIGTERM] * 2, outputs[0][-2000:] + outputs[1][-2000:]
    steps = {int(re.search(r"stopped at step (\d+) by SIGTERM", out).group(1)) for out in outputs}
    assert len(steps) == 1 and steps.pop() % 2 == 0  # the same log step on both
    saved = sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints")))
    assert saved[-1] == int(re.search(r"stopped at step (\d+)", outputs[0]).group(1))


def test_non_finite_values_are_never_checkpointed_and_the_last_finite_one_survives(cache_dir, tmp_path):
    """Divergence with a checkpoint every step and only one kept: the survivor is the last finite step."""
    from gpt2jax import GPT2LMHeadModel

    run_dir = str(tmp_path / "diverged")
    config = smoke(cache_dir, "--config.optim.lr=1e12", "--config.optim.grad_clip=0.0", "--config.train.log_every=1",
                   "--config.train.checkpoint_every=1", "--config.train.sample_every=0",
                   "--config.train.keep_checkpoints=1", "--config.train.keep_best=0")
    with pytest.raises(UserError, match=r"non-finite .* at step (\d+); stopped without checkpointing") as info:
        run_training(config, run_dir, progress=False)
    bad = int(info.value.args[0].split("step ")[1].split(";")[0])
    steps = sorted(int(s) for s in os.listdir(os.path.join(run_dir, "checkpoints")))
    assert steps == [bad - 1] and f"latest good checkpoint: {bad - 1}" in info.value.args[0]
    params = GPT2LMHeadModel.from_pretrained(run_dir).parameters()
    assert all(np.isfinite(np.asarray(p)).all() for p in params)
    assert json.load(open(os.path.join(run_dir, "run.json")))["status"] == "failed"


def test_non_finite_parameters_are_caught_even_when_loss_and_gradient_are_finite():
    from gpt2jax.trainer import first_non_finite

    finite = {"loss": np.array([2.0]), "grad_norm": np.array([1.0]), "param_norm": np.array([10.0])}
    broken = {"loss": np.array([2.0]), "grad_norm": np.array([1.0]), "param_norm": np.array([np.nan])}
    assert first_non_finite([finite, finite], done=12) is None
    assert first_non_finite([finite, broken, finite], done=13) == (12, "parameters after the update")


def test_bfloat16_compute_trains_like_float32(smoke_run, cache_dir, tmp_path):
    """compute_dtype=bfloat16: float32 params and optimizer state, losses within 2% of the float32 run's."""
    from gpt2jax import GPT2LMHeadModel

    run_dir = str(tmp_path / "bf16")
    run_training(smoke(cache_dir, "--config.train.compute_dtype=bfloat16"), run_dir, progress=False)
    bf16, fp32 = read_metrics(run_dir), read_metrics(smoke_run)
    assert [r["step"] for r in bf16] == [r["step"] for r in fp32]
    for a, b in zip(bf16, fp32):
        assert abs(a["loss"] - b["loss"]) <= 0.02 * b["loss"], (a, b)
    assert any(a["loss"] != b["loss"] for a, b in zip(bf16, fp32))  # it did compute in bfloat16
    model = GPT2LMHeadModel.from_pretrained(run_dir)
    assert model.config.dtype == "bfloat16" and all(p.dtype == jnp.float32 for p in model.parameters())



def test_the_loop_reads_device_values_only_in_its_actions(cache_dir, tmp_path, monkeypatch):
    """Between log steps the loop must not wait for the device: every read of a device value on the loop's
    thread (device_get, block_until_ready, an array's value: float(), .item(), bool(), ...) happens inside
    `host_sync`, which only the actions (log, evaluate, sample, save) and the setup enter."""
    import contextlib
    import threading

    from jax._src.array import ArrayImpl

    from gpt2jax import trainer

    depth, stray, main = [0], [], threading.main_thread()
    real_sync = trainer.host_sync

    @contextlib.contextmanager
    def counted():
        depth[0] += 1
        try:
            with real_sync():
                yield
        finally:
            depth[0] -= 1

    def watch(read):
        def watched(*args, **kwargs):
            if depth[0] == 0 and threading.current_thread() is main:
                stray.append(read.__name__)
            return read(*args, **kwargs)
        return watched

    monkeypatch.setattr(trainer, "host_sync", counted)
    monkeypatch.setattr(jax, "device_get", watch(jax.device_get))
    monkeypatch.setattr(jax, "block_until_ready", watch(jax.block_until_ready))
    monkeypatch.setattr(ArrayImpl, "_value", property(watch(ArrayImpl._value.fget)))
    monkeypatch.setattr(ArrayImpl, "__array__", watch(ArrayImpl.__array__))
    config = smoke(cache_dir, "--config.train.max_steps=20", "--config.train.log_every=10",
                   "--config.train.checkpoint_every=20", "--config.train.eval_every=10", "--config.train.sample_every=0")
    run_training(config, str(tmp_path / "run"), progress=False)
    assert stray == [], f"the loop read device values outside its actions: {stray}"
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert [r["step"] for r in map(json.loads, f) if r["split"] == "train"] == [10, 20]  # it did log
