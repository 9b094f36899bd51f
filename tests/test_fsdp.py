"""train.parallelism="fsdp" on 8 fake CPU devices: the same losses as pmap, runs that move between the two,
state really split over the devices, memory per device, and the one-line refusals."""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

from gpt2jax import GPT2Config, GPT2LMHeadModel, UserError
from gpt2jax.bench import memory_per_device
from gpt2jax.experiment import base_config, validate_experiment
from gpt2jax.model import GPT2LMHeadModule, init_params
from gpt2jax.parallel import fsdp_spec, make_layout
from gpt2jax.train import init_state, make_optimizer
from gpt2jax.trainer import run_training
from helpers import smoke, train_losses

# width 36: wpe (16, 36) and the MLP's leaves (144 = 8 x 18) are split over 8 devices; wte (61, 36), c_attn
# (108, 36), the attention's projection and the LayerNorms have no dimension 8 divides and are replicated
WIDE = GPT2Config(vocab_size=61, n_positions=16, n_embd=36, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0)
# resume-safe keys only: a run moves between this and the default (pmap) with every other key unchanged
FSDP_4X2 = ("--config.train.parallelism=fsdp", "--config.train.fsdp_size=4",
            "--config.model.gradient_checkpointing=True")


def val_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["split"] == "val"]


def assert_same_losses(a, b):
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.fixture(scope="module")
def fsdp_run(cache_dir, tmp_path_factory):
    """The smoke run with its state split over 4 devices (2 copies), blocks recomputed."""
    run_dir = str(tmp_path_factory.mktemp("runs") / "fsdp")
    run_training(smoke(cache_dir, *FSDP_4X2), run_dir, progress=False)
    return run_dir


def test_fsdp_over_every_device_trains_the_losses_of_pmap(smoke_run, cache_dir, tmp_path):
    run_dir = str(tmp_path / "fsdp8")
    run_training(smoke(cache_dir, "--config.train.parallelism=fsdp"), run_dir, progress=False)
    assert_same_losses(train_losses(run_dir), train_losses(smoke_run))
    assert_same_losses(val_losses(run_dir), val_losses(smoke_run))
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "samples.jsonl"))]
    assert [s["step"] for s in samples] == [10, 20] and all(s["text"] for s in samples)


def test_fsdp_with_data_copies_and_recomputed_blocks_trains_the_losses_of_pmap(smoke_run, fsdp_run):
    assert_same_losses(train_losses(fsdp_run), train_losses(smoke_run))
    assert_same_losses(val_losses(fsdp_run), val_losses(smoke_run))
    # its split checkpoints read back whole, as every reader (sample, eval, export) reads them
    split, whole = (GPT2LMHeadModel.from_pretrained(run).params for run in (fsdp_run, smoke_run))
    for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    resolved = json.load(open(os.path.join(fsdp_run, "config.json")))
    assert resolved["train"]["parallelism"] == "fsdp" and resolved["train"]["fsdp_size"] == 4
    assert resolved["model"]["gradient_checkpointing"] is True


@pytest.mark.parametrize("direction", ["pmap to fsdp", "fsdp to pmap"])
def test_a_run_resumes_in_the_other_mode_with_the_losses_of_a_run_that_never_stopped(
        direction, smoke_run, fsdp_run, cache_dir, tmp_path):
    source, resume_with = (smoke_run, FSDP_4X2) if direction == "pmap to fsdp" else (fsdp_run, ())
    run_dir = str(tmp_path / "moved")
    shutil.copytree(source, run_dir)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "20"))  # as if killed between steps 10 and 20
    run_training(smoke(cache_dir, *resume_with), run_dir, progress=False)
    assert_same_losses(train_losses(run_dir)[-2:], train_losses(smoke_run)[-2:])


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_the_fsdp_step_computes_pmaps_steps_with_dropout_and_accumulation(grad_accum_steps):
    """Each device's rows get the dropout keys and micro-batches of the pmap device holding them."""
    config = WIDE.replace(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (3, 16, 9)).astype(np.int32)
    losses = {}
    for mode, fsdp_size in (("pmap", None), ("fsdp", None), ("fsdp", 2)):
        optimizer, schedule = make_optimizer(base_config().optim, 10)
        make_state = lambda: init_state(init_params(config, 0), optimizer, 0)
        layout = make_layout(mode, fsdp_size, GPT2LMHeadModule(config), optimizer, schedule, grad_accum_steps,
                             True, jax.eval_shape(make_state))
        state, losses[mode, fsdp_size] = layout.initial_state(make_state), []
        for step_tokens in tokens:  # three steps: the keys change with the step
            shaped = lambda x: x.reshape(8, 2, 8)
            state, metrics = layout.train(state, layout.batch({"inputs": shaped(step_tokens[:, :-1]),
                                                               "targets": shaped(step_tokens[:, 1:])}))
            losses[mode, fsdp_size].append(float(np.ravel(metrics["loss"])[0]))
    assert_same_losses(losses["fsdp", None], losses["pmap", None])
    assert_same_losses(losses["fsdp", 2], losses["pmap", None])


def test_fsdp_spec_splits_the_largest_dimension_that_divides():
    assert fsdp_spec((61, 40), 8) == jax.sharding.PartitionSpec(None, "fsdp")
    assert fsdp_spec((120, 40), 8) == jax.sharding.PartitionSpec("fsdp", None)
    assert fsdp_spec((40, 40), 4) == jax.sharding.PartitionSpec("fsdp", None)  # the first of equals
    assert fsdp_spec((61,), 8) == jax.sharding.PartitionSpec()  # none divides: replicated
    assert fsdp_spec((), 8) == jax.sharding.PartitionSpec()
    assert fsdp_spec((4, 6), 8) == jax.sharding.PartitionSpec()  # smaller than the devices


def tiny_layout(parallelism, fsdp_size=None, config=WIDE):
    optimizer, schedule = make_optimizer(base_config().optim, 10)
    make_state = lambda: init_state(init_params(config, 0), optimizer, 0)
    abstract = jax.eval_shape(make_state)
    layout = make_layout(parallelism, fsdp_size, GPT2LMHeadModule(config), optimizer, schedule, 1, False, abstract)
    return layout, make_state, abstract


def assert_split_over_8_devices(tree):
    """The params and Adam's two moments (each mirrors the params' tree): split where a dimension divides."""
    split, whole = 0, 0
    for leaf in jax.tree.leaves((tree.params, tree.opt_state)):
        if leaf.ndim == 0:
            continue
        spec = fsdp_spec(leaf.shape, 8)
        local = leaf.addressable_shards[0].data.shape
        if spec == jax.sharding.PartitionSpec():
            assert local == leaf.shape
            whole += 1
        else:
            axis = list(spec).index("fsdp")
            assert local[axis] * 8 == leaf.shape[axis] and len({str(s.index) for s in leaf.addressable_shards}) == 8
            split += 1
    # wpe and each block's c_fc kernel and bias and MLP projection kernel, in the params, mu and nu
    assert split == 3 * (1 + 3 * WIDE.n_layer) and whole > 0


def test_each_device_holds_its_share_of_every_split_leaf_before_and_after_a_step():
    layout, make_state, abstract = tiny_layout("fsdp")
    state = layout.initial_state(make_state)
    assert_split_over_8_devices(state)
    tokens = np.random.default_rng(0).integers(0, WIDE.vocab_size, (16, 9)).astype(np.int32)
    batch = layout.batch({"inputs": tokens[:, :-1].reshape(8, 2, 8), "targets": tokens[:, 1:].reshape(8, 2, 8)})
    state, _ = layout.train(state, batch)  # the state is donated: only the new one is left
    assert_split_over_8_devices(state)
    pmap_memory = tiny_layout("pmap")[0].state_memory(abstract)
    fsdp_memory = layout.state_memory(abstract)
    assert sum(fsdp_memory.values()) < sum(pmap_memory.values()) / 2  # 62% of the parameters are split
    assert "fsdp over 8 devices" in layout.describe(abstract, WIDE.num_parameters())
    assert "fsdp over 4 devices x 2 data-parallel copies" in tiny_layout("fsdp", 4)[0].describe(abstract, 1)


def test_the_compiled_step_gathers_weights_one_at_a_time_never_the_batch():
    """FSDP: each module gathers its weights where it runs; the rows stay on their device."""
    layout, _, abstract = tiny_layout("fsdp")
    text = layout.lower(abstract, 16, 8).compile().as_text()
    gathered = re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather\(", text)
    parameter_shapes = {",".join(map(str, leaf.shape)) for leaf in jax.tree.leaves(abstract.params)}
    assert gathered and set(gathered) <= parameter_shapes, gathered


def test_gpt2_xl_state_per_device_under_fsdp_is_at_most_a_sixth_of_pmaps():
    xl = GPT2Config.from_size("gpt2-xl")
    pmap, fsdp = (memory_per_device(xl, 1, 1024, mode, compile=False) for mode in ("pmap", "fsdp"))
    pmap_bytes = pmap["params"] + pmap["optimizer"] + pmap["gradients"]
    fsdp_bytes = fsdp["params"] + fsdp["optimizer"] + fsdp["gradients"]
    # float32 params, gradients and Adam's two moments (and its step counts)
    assert 0 <= pmap_bytes - 16 * xl.num_parameters() <= 64
    assert fsdp_bytes <= pmap_bytes / 6
    assert "1.56B params, fsdp over 8 devices" in fsdp["layout"]


def test_the_compiled_step_peak_is_reported_and_smaller_under_fsdp():
    config = WIDE.replace(n_embd=256, n_head=4, vocab_size=1024, n_positions=64)
    pmap, fsdp = (memory_per_device(config, 1, 64, mode) for mode in ("pmap", "fsdp"))
    assert 0 < fsdp["peak"] < pmap["peak"]
    assert pmap["peak"] >= pmap["params"] + pmap["optimizer"]  # the whole state is an argument of pmap's step


@pytest.mark.parametrize("overrides, message", [
    (["--config.train.parallelism=zero"], "train.parallelism='zero' is not one of 'pmap', 'fsdp'"),
    (["--config.train.parallelism=fsdp", "--config.train.fsdp_size=3"], "train.fsdp_size=3 does not divide the 8"),
    (["--config.train.parallelism=fsdp", "--config.train.fsdp_size=0"], "train.fsdp_size=0 does not divide the 8"),
    (["--config.train.fsdp_size=4"], "train.fsdp_size=4 applies to train.parallelism='fsdp'"),
])
def test_inconsistent_placements_are_refused_in_one_line(overrides, message):
    with pytest.raises(UserError, match=message):
        validate_experiment(smoke("/unused", *overrides), device_count=8)
