"""Write tests/fixtures/run_v1: a small run directory made by this version of gpt2jax, committed so that
every later version is tested against a real old run (it must resume and sample; tests/test_upgrade.py).

The smoke experiment (2-layer byte model), stopped after step 10 of 20 as a SIGTERM would stop it, with
checkpoint 10; `expected.npz` holds the logits of its step-10 parameters on fixed tokens and the commit.

    python scripts/make_run_fixture.py [--out tests/fixtures/run_v1]

Made once, by the code whose format it preserves: do not regenerate it with a later version.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gpt2jax import GPT2LMHeadModel  # noqa: E402
from gpt2jax.errors import Stopped  # noqa: E402
from gpt2jax.experiment import load_config  # noqa: E402
from gpt2jax.trainer import StopSignals, run_training  # noqa: E402


class StopAfter(StopSignals):
    """Stops the loop after `step`, as a SIGTERM received during that step would."""

    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def poll(self, step: int, log_step: bool) -> int | None:
        return signal.SIGTERM if step >= self.step else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "run_v1"))
    args = parser.parse_args()
    if os.path.exists(args.out):
        sys.exit(f"{args.out} exists; this fixture is made once, by the version whose format it keeps")
    cache = tempfile.mkdtemp(prefix="gpt2jax-fixture-data-")
    config = load_config(os.path.join(ROOT, "experiments", "smoke.py"), [f"--config.data.cache_dir={cache}"])
    try:
        run_training(config, args.out, progress=False, stop_signals=StopAfter(10))
    except Stopped:
        pass
    shutil.rmtree(os.path.join(args.out, "tb"))  # not needed to resume, and binary
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    model = GPT2LMHeadModel.from_pretrained(args.out)
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) * 7 % model.config.vocab_size
    np.savez(os.path.join(args.out, "expected.npz"), tokens=tokens, logits=np.asarray(model(tokens).logits),
             step=model.run_step, commit=commit)
    print(f"wrote {args.out} (step {model.run_step}, commit {commit[:10]})")


if __name__ == "__main__":
    main()
