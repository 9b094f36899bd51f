"""The README's first command on a tiny budget: it trains, samples, and prints no warnings."""

import os
import subprocess
import sys

from helpers import ROOT


def test_quickstart_output_has_no_warnings(tmp_path):
    venv = os.path.dirname(os.path.dirname(sys.executable))  # the environment running the tests
    budget = (f"--config.data.cache_dir={tmp_path / 'cache'} --config.train.max_steps=4 --config.train.log_every=2 "
              "--config.train.eval_every=4 --config.train.checkpoint_every=4 --config.train.sample_every=4")
    env = {**os.environ, "VENV": venv, "RUN": str(tmp_path / "run"), "TRAIN_ARGS": budget,
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a newcomer has
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "quickstart.sh")], env=env, capture_output=True,
                            text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "== samples from" in result.stdout and "def " in result.stdout
    noisy = [line for line in output.splitlines() if "warn" in line.lower() or "Traceback" in line]
    assert not noisy, noisy
    assert "\r" not in result.stdout  # not a terminal: one line per log step, no progress-bar redraws
