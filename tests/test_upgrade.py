"""Runs made by an earlier gpt2jax keep working: tests/fixtures/run_v1 was written by the version named in its
expected.npz (scripts/make_run_fixture.py), a smoke run stopped after step 10 of 20."""

import json
import os
import shutil

import numpy as np
import pytest

from gpt2jax import GPT2LMHeadModel
from gpt2jax.experiment import load_config
from gpt2jax.trainer import run_training
from helpers import OLD_RUN, ROOT

FIXTURE = OLD_RUN


@pytest.fixture
def old_run(tmp_path):
    run = tmp_path / "run_v1"
    shutil.copytree(FIXTURE, run)
    return run


def test_an_old_run_loads_with_the_logits_it_had(old_run):
    expected = np.load(old_run / "expected.npz")
    model = GPT2LMHeadModel.from_pretrained(old_run)
    assert model.run_step == int(expected["step"]) == 10
    np.testing.assert_allclose(model(expected["tokens"]).logits, expected["logits"], atol=1e-5)
    assert model.generate(expected["tokens"][:1, :4], max_new_tokens=4).shape == (1, 8)


def test_an_old_run_resumes_with_the_same_command(old_run, cache_dir):
    config = load_config(os.path.join(ROOT, "experiments", "smoke.py"), [f"--config.data.cache_dir={cache_dir}"])
    run_training(config, str(old_run), progress=False)
    steps = [r["step"] for r in map(json.loads, open(old_run / "metrics.jsonl")) if r["split"] == "train"]
    assert steps == [5, 10, 15, 20]  # continued from 10, nothing logged twice
    assert json.load(open(old_run / "run.json"))["status"] == "finished"
    assert "20" in os.listdir(old_run / "checkpoints")
