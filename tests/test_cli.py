"""The console script: version, and usage errors exit with status 2."""

import subprocess
import sys

import gpt2jax


def run(*args):
    return subprocess.run([sys.executable, "-m", "gpt2jax.cli", *args], capture_output=True, text=True)


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"gpt2jax {gpt2jax.__version__}"


def test_no_command_prints_usage_and_exits_2():
    result = run()
    assert result.returncode == 2 and "usage: gpt2jax" in result.stderr


def test_unknown_command_exits_2():
    result = run("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr
