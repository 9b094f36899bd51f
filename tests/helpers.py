"""What several test files share: the repository's paths, the smoke experiment, a run-directory snapshot, and
the train-split losses a run logged. Imported by the tests as `from helpers import ...` (as hf_reference)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "smoke.py")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
OLD_RUN = os.path.join(FIXTURES, "run_v1")  # a smoke run made by an earlier gpt2jax, stopped at step 10 of 20


def smoke(cache_dir, *overrides):
    """The smoke experiment on the session's token bins, with `--config.KEY=VALUE` overrides."""
    from gpt2jax.experiment import load_config

    return load_config(SMOKE, [f"--config.data.cache_dir={cache_dir}", *overrides])


def files(root):
    """Every path under `root` with its size (links as links): compare before and after to see that nothing
    was written, removed or followed."""
    return sorted((os.path.relpath(os.path.join(d, f), root), os.lstat(os.path.join(d, f)).st_size)
                  for d, dirs, names in os.walk(root) for f in names + dirs)


def train_losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def run_with_hook(hook, command):
    """Run the CLI command (`[python, -m, gpt2jax.cli, ...]`) in a subprocess after `hook` patched gpt2jax (the hook
    decides when to die)."""
    script = (f"import sys\n{hook}\nfrom gpt2jax.cli import main\nsys.argv = {command[2:]!r}\n"
              "sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
