"""Grids of runs: `gpt2jax sweep` expands --grid axes into named runs, trains them one after another (or
prints one `gpt2jax train` command per point for a scheduler), then `gpt2jax compare` shows them."""

from __future__ import annotations

import ast
import itertools
import math
import os
import shlex
import sys
from typing import Sequence

from gpt2jax import rundir
from gpt2jax.errors import UserError

MAX_POINTS = 1000  # a sweep larger than this is a typo (or belongs on a scheduler, in parts)


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def expand_grid(grid: Sequence[str]) -> list[list[str]]:
    """["optim.lr=[6e-4,3e-4]", "model.n_layer=[4,6]"] -> one list of --config overrides per point."""
    axes: dict[str, list[str]] = {}
    for expression in grid:
        key, sep, values = expression.partition("=")
        key = key.strip().removeprefix("--").removeprefix("config.")
        try:
            parsed = ast.literal_eval(values.strip()) if sep else None
        except (ValueError, TypeError, SyntaxError, RecursionError):
            parsed = None
        if not key or not isinstance(parsed, (list, tuple)) or not parsed:
            raise UserError(f"--grid {_short(expression)} is not of the form KEY=[VALUE, ...]")
        if key in axes:
            raise UserError(f"--grid: {key} is given twice; list all its values in one --grid {key}=[...]")
        axes[key] = [f"--config.{key}={v}" for v in parsed]
        if len(set(axes[key])) < len(parsed):
            raise UserError(f"--grid {_short(expression)} lists a value twice")
    if (count := math.prod(len(values) for values in axes.values())) > MAX_POINTS:
        raise UserError(f"--grid: {count:,} points is more than {MAX_POINTS:,}; split the sweep")
    return [list(point) for point in itertools.product(*axes.values())]


def point_name(overrides: Sequence[str]) -> str:
    """--config.optim.lr=0.0003 --config.model.n_layer=4 -> lr=0.0003_n_layer=4"""
    parts = [o.removeprefix("--config.").split("=", 1) for o in overrides]
    name = "_".join(f"{key.split('.')[-1]}={value}" for key, value in parts)
    return "".join(c if c.isprintable() and c != "/" else "-" for c in name)


def _check_run_dirs(workdir: str, points: list[list[str]], writing: bool) -> list[str]:
    """One distinct, creatable run directory per point (checked before anything is loaded or written)."""
    run_dirs: dict[str, list[str]] = {}
    for point in points:
        run_dir = os.path.join(workdir, point_name(point))
        if run_dir in run_dirs:
            first = shlex.join(run_dirs[run_dir])
            raise UserError(f"--grid points {first} and {shlex.join(point)} both name {run_dir}")
        if len(os.fsencode(os.path.basename(run_dir))) > 255:
            raise UserError(f"--grid: run names such as {os.path.basename(run_dir)[:60]}... exceed 255 bytes")
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise UserError(f"{run_dir} is a file, not a run directory")
        run_dirs[run_dir] = point
    rundir.check_workdir(workdir, writing)
    return list(run_dirs)


def sweep(config_path: str, grid: Sequence[str], workdir: str, overrides: Sequence[str] = (),
          print_commands: bool = False, progress: bool = True) -> list[str]:
    """Expand the grid into named runs under `workdir` and train them one after another (or print the
    commands, for a scheduler). Every point is loaded and validated before the first one starts."""
    from gpt2jax.experiment import load_config

    points = expand_grid(grid)
    run_dirs = _check_run_dirs(workdir, points, writing=not print_commands)
    configs = [load_config(config_path, [*overrides, *point]) for point in points]
    if print_commands:
        for run_dir, point in zip(run_dirs, points):
            print(shlex.join(["gpt2jax", "train", "--config", config_path, "--workdir", run_dir, *overrides, *point]))
        return run_dirs
    import jax

    from gpt2jax.experiment import validate_experiment
    from gpt2jax.trainer import run_training

    for config in configs:
        validate_experiment(config, jax.device_count())
    for run_dir, config in zip(run_dirs, configs):
        print(f"== {run_dir}", file=sys.stderr)
        run_training(config, run_dir, progress=progress)
    return run_dirs
