"""gpt2jax compare / sweep on real smoke runs."""

import csv
import io
import json
import os
import subprocess
import sys

import pytest

from gpt2jax import UserError
from gpt2jax.compare import compare_rows, expand_grid, format_rows, plot, read_run, read_runs, sweep
from gpt2jax.config import load_config
from gpt2jax.trainer import run_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "smoke.py")
SHORT = ["--config.train.max_steps=10", "--config.train.eval_every=5", "--config.train.sample_every=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    group = tmp_path_factory.mktemp("group")
    settings = {"base": [], "lr": ["--config.optim.lr=1e-3"], "shallow": ["--config.model.n_layer=1"]}
    for name, extra in settings.items():
        config = load_config(SMOKE, [f"--config.data.cache_dir={cache}", *SHORT, *extra])
        run_training(config, str(group / name), progress=False)
    return cache, [str(group / name) for name in settings]


def val_losses(run_dir):
    return [(r["loss"], r["step"]) for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
            if r["split"] == "val"]


def test_rows_list_exactly_the_differing_keys_and_the_best_losses(runs):
    _, paths = runs
    rows = compare_rows(read_runs(paths))
    assert {r["run"] for r in rows} == {"base", "lr", "shallow"}
    for row in rows:
        assert set(row["differs"]) == {"model.n_layer", "optim.lr"}
        best_loss, best_step = min(val_losses(os.path.join(os.path.dirname(paths[0]), row["run"])))
        assert (row["best_val_loss"], row["best_val_step"]) == (best_loss, best_step)
        assert row["steps"] == 10 and row["tokens"] == 10 * 16 * 32 and row["status"] == "finished"
        assert row["tokens_per_s"] > 0 and row["params"] > 0 and row["wall_s"] > 0
    assert [r["best_val_loss"] for r in rows] == sorted(r["best_val_loss"] for r in rows)
    shallow = next(r for r in rows if r["run"] == "shallow")
    assert shallow["differs"] == {"model.n_layer": 1, "optim.lr": 0.003}
    assert shallow["params"] < next(r for r in rows if r["run"] == "base")["params"]


def test_formats_round_trip(runs):
    rows = compare_rows(read_runs(runs[1]))
    assert json.loads(format_rows(rows, "json")) == rows
    parsed = list(csv.DictReader(io.StringIO(format_rows(rows, "csv"))))
    assert [float(p["best_val_loss"]) for p in parsed] == [r["best_val_loss"] for r in rows]
    assert [json.loads(p["differs"]) for p in parsed] == [r["differs"] for r in rows]
    table, markdown = format_rows(rows, "table"), format_rows(rows, "markdown")
    assert table.splitlines()[0].split()[0] == "run" and len(table.splitlines()) == 4
    assert markdown.startswith("| run | differs |") and "model.n_layer=1 optim.lr=0.003" in markdown


def test_plot_is_a_sensible_png(runs, tmp_path):
    from PIL import Image

    path = str(tmp_path / "compare.png")
    plot(read_runs(runs[1]), path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 400
        assert len(set(image.convert("RGB").getdata())) > 50  # lines and text, not a blank canvas


def test_a_half_written_last_line_is_tolerated(runs, tmp_path):
    import shutil

    copy = str(tmp_path / "writing")
    shutil.copytree(runs[1][0], copy)
    with open(os.path.join(copy, "metrics.jsonl"), "a") as f:
        f.write('{"step": 11, "split": "tr')
    assert len(read_run(copy).metrics) == len(read_run(runs[1][0]).metrics)


def test_cli_warns_about_bad_runs_and_fails_only_when_none_is_readable(runs, tmp_path):
    cli = lambda *a: subprocess.run([sys.executable, "-m", "gpt2jax.cli", "compare", *a], capture_output=True,
                                    text=True)
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.json").write_text("{}")
    mixed = cli(runs[1][0], str(tmp_path / "nope"), str(tmp_path / "empty_run"), "--format", "markdown")
    assert mixed.returncode == 0 and "| base |" in mixed.stdout
    assert "not a run directory" in mixed.stderr and "no metrics yet" in mixed.stderr
    bad = cli(str(tmp_path / "nope"))
    assert bad.returncode == 2 and "no readable runs" in bad.stderr


@pytest.mark.parametrize("grid, message", [
    (["optim.lr"], "not of the form KEY=\\[VALUE, ...\\]"),
    (["optim.lr=3e-4"], "not of the form"),
    (["optim.lr=[]"], "not of the form"),
    (["optim.lrr=[1e-3]"], "unknown config key 'optim.lrr'; did you mean optim.lr"),
])
def test_bad_grids(grid, message, tmp_path):
    with pytest.raises(UserError, match=message):
        sweep(SMOKE, grid, str(tmp_path), print_commands=True)
    assert not os.listdir(tmp_path)


def test_sweep_of_two_points_makes_two_runs_with_their_configs(runs, tmp_path):
    cache, _ = runs
    run_dirs = sweep(SMOKE, ["optim.lr=[0.001,0.002]"], str(tmp_path / "group"),
                     [f"--config.data.cache_dir={cache}", *SHORT], progress=False)
    assert [os.path.basename(d) for d in run_dirs] == ["lr=0.001", "lr=0.002"]
    for run_dir, lr in zip(run_dirs, (0.001, 0.002)):
        assert json.load(open(os.path.join(run_dir, "config.json")))["optim"]["lr"] == lr
        assert read_run(run_dir).split("train")[-1]["step"] == 10
    assert expand_grid(["optim.lr=[1, 2]", "model.n_layer=[3, 4]"]) == [
        ["--config.optim.lr=1", "--config.model.n_layer=3"], ["--config.optim.lr=1", "--config.model.n_layer=4"],
        ["--config.optim.lr=2", "--config.model.n_layer=3"], ["--config.optim.lr=2", "--config.model.n_layer=4"]]
    printed = subprocess.run([sys.executable, "-m", "gpt2jax.cli", "sweep", "--config", SMOKE, "--grid",
                              "model.n_layer=[1,2]", "--workdir", str(tmp_path / "g2"), "--print-commands"],
                             capture_output=True, text=True)
    assert printed.returncode == 0 and printed.stdout.count("gpt2jax train --config") == 2
    assert "--workdir " + str(tmp_path / "g2" / "n_layer=1") in printed.stdout and not os.path.exists(tmp_path / "g2")
