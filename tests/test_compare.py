"""gpt2jax compare / sweep on real smoke runs."""

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpt2jax import UserError
from gpt2jax.compare import check_plot_path, compare_rows, format_rows, plot, training_time
from gpt2jax.records import read_run, read_runs
from gpt2jax.experiment import load_config
from gpt2jax.sweep import expand_grid, sweep
from helpers import SMOKE

SHORT = ["--config.train.max_steps=10", "--config.train.eval_every=5", "--config.train.sample_every=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    from gpt2jax.trainer import run_training

    cache = cache_dir
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
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 50  # lines and text, not blank


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


# Runs written by hand: the layouts and the damage a trainer, a crash or a user can leave behind.
T0 = 1_800_000_000
CONFIG = {"model": {"n_layer": 1, "n_head": 2, "n_embd": 8, "n_positions": 16, "vocab_size": 32},
          "data": {"tokenizer": "byte"}, "optim": {"lr": 1e-3}, "train": {"max_steps": 20}}


def iso(seconds):
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def record(step, time, split="train", loss=1.0):
    return json.dumps({"step": step, "split": split, "time": time, "loss": loss, "tokens_seen": 64 * step})


def make_run(path, files=None, metrics=None, info=None):
    """A run directory: config.json, metrics.jsonl (`metrics`: lines) and run.json, then `files` on top
    (name -> text; None makes a directory of that name)."""
    os.makedirs(path, exist_ok=True)
    default = {"config.json": json.dumps(CONFIG), "run.json": json.dumps(info or {"status": "finished",
                                                                                "started": iso(T0)}),
               "metrics.jsonl": "".join(line + "\n" for line in metrics or [
                   record(10, T0 + 10), record(10, T0 + 11, "val", 2.0), record(20, T0 + 20)])}
    for name, text in {**default, **(files or {})}.items():
        if text is None:
            os.makedirs(os.path.join(path, name))
        else:
            with open(os.path.join(path, name), "w", errors="surrogateescape") as f:  # "\udcff": the byte 0xff
                f.write(text)
    return str(path)


GOOD = [record(10, T0 + 10), record(10, T0 + 11, "val", 2.0)]
BAD_RUNS = [  # (id, files on top of a good run, what the one warning line says)
    ("config_not_json", {"config.json": "{nope"}, "config.json is not JSON"),
    ("config_an_array", {"config.json": "[1, 2]"}, "config.json is an array, not a JSON object"),
    ("config_without_groups", {"config.json": '{"init_from": "scratch"}'},
     "config.json lacks the model, data, optim, train group(s)"),
    ("config_group_not_object", {"config.json": json.dumps({**CONFIG, "optim": 3})}, "lacks the optim group(s)"),
    ("config_a_directory", {"config.json": None}, "config.json is not a regular file"),
    ("run_json_not_json", {"run.json": "xx"}, "run.json is not JSON"),
    ("run_json_an_array", {"run.json": "[]"}, "run.json is an array, not a JSON object"),
    ("run_json_bad_started", {"run.json": '{"started": "yesterday"}'},
     'run.json started is "yesterday", not an ISO date and time'),
    ("run_json_status_number", {"run.json": '{"status": 3}'}, "run.json status is a number, not a string"),
    ("run_json_sessions_not_list", {"run.json": '{"sessions": {"started": 1}}'},
     "run.json sessions is not a list of objects"),
    ("run_json_session_without_start", {"run.json": '{"sessions": [{"stopped": null}]}'},
     "run.json sessions[0].started is null"),
    ("run_json_a_directory", {"run.json": None}, "run.json is not a regular file"),
    ("metrics_a_directory", {"metrics.jsonl": None}, "metrics.jsonl is not a regular file"),
    ("metrics_empty", {"metrics.jsonl": ""}, "no metrics yet"),
    ("metrics_only_a_partial_line", {"metrics.jsonl": '{"step": 1, "spl'}, "no metrics yet"),
    *[(f"metrics_{name}", {"metrics.jsonl": f"{GOOD[0]}\n{line}\n{GOOD[1]}\n"}, message) for name, line, message in [
        ("line_an_array", "[]", "metrics.jsonl line 2 is an array, not a metrics record"),
        ("line_a_number", "3", "metrics.jsonl line 2 is a number, not a metrics record"),
        ("line_null", "null", "metrics.jsonl line 2 is null, not a metrics record"),
        ("step_a_string", '{"step": "x", "split": "train", "loss": 1}', 'line 2 has step "x", not a non-negative'),
        ("step_a_bool", '{"step": true, "split": "train", "loss": 1}', "line 2 has step true, not a non-negative"),
        ("step_negative", '{"step": -1, "split": "train", "loss": 1}', "line 2 has step -1, not a non-negative"),
        ("no_split", '{"step": 1, "loss": 1}', "metrics.jsonl line 2 has no 'split'"),
        ("split_a_number", '{"step": 1, "split": 1, "loss": 1}', "line 2 has split 1, not a string"),
        ("no_loss", '{"step": 1, "split": "train"}', "metrics.jsonl line 2 has no 'loss'"),
        ("loss_a_string", '{"step": 1, "split": "train", "loss": "a"}', 'line 2 has loss "a", not a number or null'),
        ("time_a_string", '{"step": 1, "split": "train", "loss": 1, "time": "t"}', 'line 2 has time "t"'),
        ("time_nan", '{"step": 1, "split": "train", "loss": 1, "time": NaN}', "line 2 has time NaN"),
        ("tokens_a_float", '{"step": 1, "split": "train", "loss": 1, "tokens_seen": 1.5}', "has tokens_seen 1.5"),
        ("speed_a_string", '{"step": 1, "split": "train", "loss": 1, "tokens_per_s": "f"}', 'has tokens_per_s "f"'),
        ("mfu_a_list", '{"step": 1, "split": "train", "loss": 1, "mfu": [1]}', "line 2 has mfu [1], not a number"),
        ("line_not_json", '{"step": 6, "spl', "metrics.jsonl line 2 is not JSON"),
        ("line_not_utf8", "\udcff", "metrics.jsonl line 2 is not JSON"),
    ]],
    ("metrics_last_line_complete_but_not_json", {"metrics.jsonl": f"{GOOD[0]}\n{{\"step\": 6, \"spl\n"},
     "metrics.jsonl line 2 is not JSON"),  # newline-terminated: not a line still being written
]


@pytest.mark.parametrize("files, message", [case[1:] for case in BAD_RUNS], ids=[case[0] for case in BAD_RUNS])
def test_a_run_that_cannot_be_read_is_reported_in_one_line_and_skipped(files, message, tmp_path, capsys):
    good, bad = make_run(tmp_path / "good"), make_run(tmp_path / "bad", files)
    records = read_runs([good, bad])
    assert [r.path for r in records] == [good]
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(f"gpt2jax compare: warning: {bad}: "), warnings
    assert message in warnings[0]


def test_not_a_run_at_all_is_reported(tmp_path, capsys):
    good = make_run(tmp_path / "good")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "no_config").mkdir()
    records = read_runs([good, str(tmp_path / "nope"), str(tmp_path / "a_file"), str(tmp_path / "no_config"), good])
    assert len(records) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"gpt2jax compare: warning: {tmp_path / 'nope'}: not a run directory (no such directory)",
        f"gpt2jax compare: warning: {tmp_path / 'a_file'}: not a run directory (a file)",
        f"gpt2jax compare: warning: {tmp_path / 'no_config'}: not a run directory (no config.json)",
        f"gpt2jax compare: warning: {good}: the same run as {good}; shown once"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_a_run_directory_without_permissions_is_reported(tmp_path, capsys):
    good, locked = make_run(tmp_path / "good"), make_run(tmp_path / "locked")
    os.chmod(locked, 0)
    try:
        assert [r.path for r in read_runs([good, locked])] == [good]
    finally:
        os.chmod(locked, 0o755)
    assert "cannot read config.json (Permission denied)" in capsys.readouterr().err


def test_a_partial_last_line_is_left_out_and_the_run_kept(tmp_path):
    whole = make_run(tmp_path / "whole", metrics=GOOD)
    assert len(read_run(whole).metrics) == 2
    for tail in ['{"step": 20, "split": "tr', '{"step": 20, "split": "train", "time": 1', "\x00\x00\x00", "\udcff"]:
        with open(os.path.join(whole, "metrics.jsonl"), "w", errors="surrogateescape") as f:
            f.write("".join(line + "\n" for line in GOOD) + tail)
        assert read_run(whole).metrics == [json.loads(line) for line in GOOD], tail


def test_records_with_null_or_nan_losses_do_not_break_the_row(tmp_path):
    run = make_run(tmp_path / "nan", metrics=[record(10, T0 + 10, "val", None), record(20, T0 + 20, "val", 3.0),
                                              record(30, T0 + 30, "val", float("nan")), record(30, T0 + 31, loss=None)])
    row, = compare_rows(read_runs([run]))
    assert (row["best_val_loss"], row["best_val_step"], row["last_train_loss"]) == (3.0, 20, None)
    assert json.loads(format_rows([row], "json"))[0]["best_val_loss"] == 3.0


def gpt2jax(*args):
    return subprocess.run([sys.executable, "-m", "gpt2jax.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_prints_the_readable_runs_and_one_line_per_unreadable_one(tmp_path):
    good = make_run(tmp_path / "good")
    bad = [make_run(tmp_path / case_id, files) for case_id, files, _ in BAD_RUNS[:6]]
    out = gpt2jax("compare", good, *bad, "--format", "csv")
    assert out.returncode == 0 and "Traceback" not in out.stderr
    assert [row["run"] for row in csv.DictReader(io.StringIO(out.stdout))] == ["good"]
    assert [line.split(": ")[2] for line in out.stderr.splitlines()] == bad
    none = gpt2jax("compare", *bad)
    assert none.returncode == 2 and none.stdout == "" and "Traceback" not in none.stderr
    assert none.stderr.splitlines()[-1] == "gpt2jax compare: error: no readable runs among the 6 given"
    assert len(none.stderr.splitlines()) == 7


def test_wall_time_adds_up_the_sessions_of_a_resumed_run(tmp_path):
    """An older trainer's layout: run.json keeps only the latest start; a crash replays steps after the checkpoint
    (a step logged again), a SIGTERM does not (the next start is told by run.json only if it is the latest)."""
    first = [record(10, T0 + 100), record(20, T0 + 200)]  # crashed after step 20, checkpoint at 10
    second = [record(20, T0 + 1000), record(30, T0 + 1100)]  # replays step 20; stopped cleanly at 30
    third = [record(40, T0 + 5010), record(50, T0 + 5050)]
    resumed = make_run(tmp_path / "resumed", metrics=first + second + third,
                       info={"status": "finished", "started": iso(T0 + 5000)})
    assert compare_rows(read_runs([resumed]))[0]["wall_s"] == 100 + 100 + 50
    elapsed = [seconds for _, seconds in training_time(read_run(resumed))[0]]
    assert elapsed == [0, 100, 100, 200, 210, 250]
    # resumed a moment ago, nothing logged since: the old arithmetic (last record - latest start) went negative
    waiting = make_run(tmp_path / "waiting", metrics=first + second, info={"status": "running",
                                                                          "started": iso(T0 + 5000)})
    assert compare_rows(read_runs([waiting]))[0]["wall_s"] == 200
    # a newer trainer lists every session, with its stop (which counts: the final checkpoint is part of the run)
    sessions = [{"started": iso(T0 + 95), "stopped": iso(T0 + 230)}, {"started": iso(T0 + 990), "stopped": None},
                {"started": iso(T0 + 5000)}]
    listed = make_run(tmp_path / "listed", metrics=first + second[1:] + third,
                      info={"status": "running", "started": iso(T0 + 5000), "sessions": sessions})
    assert compare_rows(read_runs([listed]))[0]["wall_s"] == 135 + 110 + 50
    assert [seconds for _, seconds in training_time(read_run(listed))[0]] == [5, 105, 135 + 110, 135 + 110 + 10, 295]
    fresh = make_run(tmp_path / "fresh", metrics=first, info={"started": iso(T0 + 90)})
    assert compare_rows(read_runs([fresh]))[0]["wall_s"] == 110


def tree(root):
    """Every path under root, with the size of files: what a command wrote."""
    return sorted((os.path.relpath(os.path.join(d, n), root), os.path.getsize(os.path.join(d, n)))
                  for d, dirs, files in os.walk(root) for n in dirs + files)


PLOT_CASES = [  # (--plot relative to tmp_path, message)
    ("out/missing/x.png", "out/missing does not exist (it is not made for you)"),
    ("plots", "is a directory; name the image, e.g."),
    ("plots/", "is a directory; name the image, e.g."),
    ("a_file/x.png", "a_file is not a directory"),
    ("plots/x.foo", ".foo is not an image format (png, svg"),
]


@pytest.mark.parametrize("target, message", PLOT_CASES, ids=[case[0] for case in PLOT_CASES])
def test_a_plot_that_cannot_be_written_is_one_error_line_and_nothing_written(target, message, tmp_path):
    run = make_run(tmp_path / "runs" / "good")
    (tmp_path / "plots").mkdir()
    (tmp_path / "a_file").write_text("x")
    before = tree(tmp_path)
    out = gpt2jax("compare", run, "--plot", str(tmp_path / target))
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stdout == ""  # refused before the table
    line, = out.stderr.splitlines()
    assert line.startswith(f"gpt2jax compare: error: --plot {tmp_path / target}: ") and message in line, line
    assert tree(tmp_path) == before
    with pytest.raises(UserError, match="--plot"):
        check_plot_path(str(tmp_path / target))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes everywhere")
def test_a_plot_into_a_read_only_directory_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(UserError, match="no permission to write it"):
        check_plot_path(str(tmp_path / "ro" / "x.png"))


def test_a_plot_without_an_extension_is_a_png_at_exactly_that_path(tmp_path):
    run = make_run(tmp_path / "run", metrics=[record(10, T0 + 100), record(20, T0 + 200), record(20, T0 + 1000),
                                              record(20, T0 + 1010, "val", 2.0)], info={"started": iso(T0 + 990)})
    plot(read_runs([run]), str(tmp_path / "compare"))
    assert sorted(os.listdir(tmp_path)) == ["compare", "run"]
    with open(tmp_path / "compare", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


SWEEP_CASES = [  # (id, arguments after `sweep --config SMOKE`, with {tmp} for the test's directory; message)
    ("empty_list", ["--grid", "optim.lr=[]"], "--grid 'optim.lr=[]' is not of the form KEY=[VALUE, ...]"),
    ("no_values", ["--grid", "x"], "--grid 'x' is not of the form KEY=[VALUE, ...]"),
    ("no_key", ["--grid", "=[1]"], "--grid '=[1]' is not of the form"),
    ("a_scalar", ["--grid", "optim.lr=3e-4"], "--grid 'optim.lr=3e-4' is not of the form"),
    ("unhashable", ["--grid", "optim.lr={[1]: 2}"], "--grid 'optim.lr={[1]: 2}' is not of the form"),
    ("deeply_nested", ["--grid", "optim.lr=" + "[" * 300 + "]" * 300],
     "--grid 'optim.lr=" + "[" * 48 + "...' is not of the form"),  # shortened, still one line
    ("wrong_type", ["--grid", 'optim.lr=[1e-3, "fast"]'], "--config.optim.lr=fast: expected float"),
    ("a_bool_for_an_int", ["--grid", "model.n_layer=[True]"], "--config.model.n_layer=True: expected int, got a bool"),
    ("unknown_key", ["--grid", "optim.lrr=[1e-3]"], "unknown config key 'optim.lrr'; did you mean optim.lr"),
    ("duplicate_keys", ["--grid", "optim.lr=[1e-3]", "--grid", "config.optim.lr=[2e-3]"],
     "--grid: optim.lr is given twice; list all its values in one --grid optim.lr=[...]"),
    ("duplicate_values", ["--grid", "optim.lr=[1e-3, 0.001]"], "--grid 'optim.lr=[1e-3, 0.001]' lists a value twice"),
    ("clashing_names", ["--grid", 'data.dataset=["a/b", "a-b"]'],
     "--grid points --config.data.dataset=a/b and --config.data.dataset=a-b both name {tmp}/g/dataset=a-b"),
    ("a_name_too_long", ["--grid", f'data.dataset=["{"x" * 300}"]'], "exceed 255 bytes"),
    ("too_many_points", ["--grid", f"optim.lr={list(range(1, 41))}", "--grid", f"optim.eps={list(range(1, 41))}"],
     "--grid: 1,600 points is more than 1,000; split the sweep"),
    ("missing_config", ["--config", "{tmp}/nope.py", "--grid", "optim.lr=[1e-3]"], "{tmp}/nope.py: no such experiment"),
    ("workdir_a_file", ["--grid", "optim.lr=[1e-3]", "--workdir", "{tmp}/a_file"],
     "--workdir {tmp}/a_file: {tmp}/a_file is a file, not a directory"),
    ("workdir_under_a_file", ["--grid", "optim.lr=[1e-3]", "--workdir", "{tmp}/a_file/g"],
     "--workdir {tmp}/a_file/g: {tmp}/a_file is a file, not a directory"),
    ("a_point_is_a_file", ["--grid", "optim.lr=[1e-3]", "--workdir", "{tmp}/points"],
     "{tmp}/points/lr=0.001 is a file, not a run directory"),
]


@pytest.mark.parametrize("args, message", [case[1:] for case in SWEEP_CASES], ids=[case[0] for case in SWEEP_CASES])
def test_a_bad_sweep_is_one_error_line_and_nothing_written(args, message, tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "points").mkdir()
    (tmp_path / "points" / "lr=0.001").write_text("x")
    before = tree(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    defaults = (["--config", SMOKE] if "--config" not in args else []) + (
        ["--workdir", str(tmp_path / "g")] if "--workdir" not in args else [])
    out = gpt2jax("sweep", *defaults, *args, "--config.data.cache_dir=" + str(tmp_path / "cache"))
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    line, = out.stderr.splitlines()
    assert line.startswith("gpt2jax sweep: error: ") and message.replace("{tmp}", str(tmp_path)) in line, line
    assert tree(tmp_path) == before
