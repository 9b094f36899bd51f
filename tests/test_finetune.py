"""Task fine-tuning (data.format="prompt_completion"): the example store, completion-only loss, packing that is
exact, a loss that device count and accumulation do not change, resume, bad rows, eval and samples as a task,
and the embedded docstring -> code task."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax import GPT2Config, GPT2LMHeadModel
from gpt2jax import batches as rows_of
from gpt2jax.data import prepare
from gpt2jax.experiment import base_config
from gpt2jax.model import GPT2LMHeadModule, init_params, target_loss_sum_and_count
from gpt2jax.sources import _functions
from gpt2jax.tokenizer import ByteTokenizer
from gpt2jax.train import init_state, make_optimizer, train_step
from gpt2jax.trainer import run_training
from helpers import SMOKE, files, run_with_hook, smoke

TINY = GPT2Config(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0)
TASK = ["--config.data.format=prompt_completion", "--config.data.val_fraction=0.1", "--config.train.sample_every=10",
        "--config.train.sample_tokens=8"]


def write_rows(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


def reversal_rows(n, seed=0):
    """A toy task with prompts and completions of many lengths: 'reverse: abc =' -> ' cba'."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(1, 12))) for _ in range(n)]
    return [{"prompt": f"reverse: {w} =", "completion": f" {w[::-1]}", "id": i} for i, w in enumerate(words)]


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("task") / "reverse.jsonl", reversal_rows(300))


def task(cache_dir, task_file, *overrides):
    return smoke(cache_dir, *TASK, f"--config.data.dataset={task_file}", *overrides)


@pytest.fixture(scope="module")
def store(cache_dir, task_file):
    return prepare(task(cache_dir, task_file).data, progress=False)


# --- the store


def test_each_example_is_prompt_then_completion_then_eos_and_records_its_row(store, task_file):
    tok, rows = ByteTokenizer(), reversal_rows(300)
    seen = []
    for split in ("train", "val"):
        tokens, index = store.tokens(split), store.index(split)
        assert store.meta["splits"][split]["examples"] == len(index) > 0
        for start, prompt, length, row in index:
            ids = tokens[start: start + length].tolist()
            assert ids[:prompt] == tok.encode(rows[row]["prompt"])
            assert ids[prompt:] == tok.encode(rows[row]["completion"]) + [tok.eos_token_id]
            seen.append(row)
    assert sorted(seen) == list(range(300))  # every row once, in one split


# --- completion-only loss


def example_batch(store, block_size=32, count=12, packed=True):
    index = store.index("train")[:count]
    layout = rows_of.pack(rows_of.example_positions(index, block_size), block_size, 0) if packed else \
        [np.array([i]) for i in range(len(index))]
    return rows_of.example_rows(store.tokens("train"), index, layout, block_size, 256, packed), index, layout


def test_targets_are_the_completions_and_eos_and_nothing_else(store):
    batch, index, layout = example_batch(store)
    tokens = store.tokens("train")
    for r, members in enumerate(layout):
        expected = []
        for e in members:
            start, prompt, length, _ = index[e]
            expected += [-100] * (prompt - 1) + tokens[start + prompt: start + min(length, 33)].tolist()  # cut to T + 1
        assert batch["targets"][r].tolist() == expected + [-100] * (32 - len(expected))
    assert any(length > 33 for _, _, length, _ in index)  # the cut is exercised


def test_the_loss_ignores_predictions_at_prompts_and_padding_and_follows_completions(store):
    """The gradient of the loss with respect to the logits is zero at every prompt and padding position and not at
    completion positions: whatever the prompt's next tokens are, they teach nothing."""
    batch, _, _ = example_batch(store)
    logits = jax.random.normal(jax.random.key(0), batch["targets"].shape + (257,))
    mean_loss = lambda x: (lambda s, n: s / n)(*target_loss_sum_and_count(x, jnp.asarray(batch["targets"])))
    grad = np.abs(np.asarray(jax.grad(mean_loss)(logits))).sum(-1)
    counted = batch["targets"] != -100
    assert grad[~counted].max() == 0.0 and grad[counted].min() > 0.0
    changed = batch["targets"].copy()
    changed[counted.nonzero()[0][0], counted.nonzero()[1][0]] += 1  # one completion token
    assert float(mean_loss(logits)) != float(target_loss_sum_and_count(logits, jnp.asarray(changed))[0] / counted.sum())


# --- packing


def test_packing_is_exact_each_example_gets_the_loss_it_gets_alone(store):
    params, module = init_params(TINY, 0), GPT2LMHeadModule(TINY)
    batch, index, layout = example_batch(store, block_size=64, count=20)
    assert max(len(m) for m in layout) >= 3  # really packed
    logits, _ = module.apply({"params": params}, batch["inputs"], None, batch["positions"],
                             segment_ids_BxT=batch["segments"])
    tokens = store.tokens("train")
    for r, members in enumerate(layout):
        at = 0
        for e in members:
            start, prompt, length, _ = index[e]
            assert length <= 65  # whole
            ids = jnp.asarray(tokens[start: start + length][None].astype(np.int32))
            alone, _ = module.apply({"params": params}, ids[:, :-1])
            n = length - 1
            np.testing.assert_allclose(logits[r, at: at + n], alone[0], atol=1e-5, rtol=0)
            piece = slice(at, at + n)
            packed_loss = target_loss_sum_and_count(logits[r: r + 1, piece], batch["targets"][r: r + 1, piece])
            alone_loss = target_loss_sum_and_count(alone, np.where(np.arange(n) < prompt - 1, -100, ids[0, 1:])[None])
            assert abs(float(packed_loss[0] / packed_loss[1]) - float(alone_loss[0] / alone_loss[1])) < 1e-6
            at += n


def test_packing_keeps_every_example_whole_and_fills_rows():
    lengths = np.random.default_rng(1).integers(1, 65, size=2000)
    layout = rows_of.pack(lengths, 64, seed=3)
    assert sorted(np.concatenate(layout).tolist()) == list(range(2000))
    assert all(lengths[row].sum() <= 64 for row in layout)
    assert lengths.sum() / (64 * len(layout)) > 0.97
    assert [r.tolist() for r in layout] == [r.tolist() for r in rows_of.pack(lengths, 64, seed=3)]


@pytest.mark.parametrize("packed", [True, False])
def test_a_validation_set_too_large_for_eval_batches_scores_its_first_examples(store, packed):
    """Capped by train.eval_batches, the validation rows hold a source-order prefix of the held-out examples (a
    fair sample), never the longest ones packing places first; uncapped, all of them."""
    index = store.index("train")
    layout, count = rows_of.validation_layout(index, 32, 5, packed)
    assert len(layout) <= 5 and sorted(np.concatenate(layout).tolist()) == list(range(count)) and count >= 5
    everything, total = rows_of.validation_layout(index, 32, 10**6, packed)
    assert total == len(index) and sorted(np.concatenate(everything).tolist()) == list(range(len(index)))


def test_the_materialised_attention_sees_the_same_segments():
    """Attention dropout and output_attentions materialise the probabilities: no weight crosses examples."""
    module, params = GPT2LMHeadModule(TINY), init_params(TINY, 0)
    ids = jnp.arange(10)[None] % 7
    segments, positions = jnp.array([[1] * 4 + [2] * 6]), jnp.array([list(range(4)) + list(range(6))])
    (_, _), state = module.apply({"params": params}, ids, None, positions, segment_ids_BxT=segments,
                                 mutable=["attentions"])
    probs = np.asarray(jax.tree.leaves(state)[0])
    assert probs[..., 4:, :4].max() == 0.0 and probs[..., :4, 4:].max() == 0.0


# --- the step's loss is the global batch's mean over counted tokens


def step_losses(batch, groups, accumulation, seed=0):
    """(loss, updated params) of one train step on `batch` (G rows), as 8 pmap devices or one device see it."""
    optimizer, schedule = make_optimizer(base_config().optim, 10)
    module = GPT2LMHeadModule(TINY)
    state = init_state(init_params(TINY, seed), optimizer, seed)
    step = lambda axis: functools.partial(train_step, module=module, optimizer=optimizer, schedule=schedule,
                                              grad_accum_steps=accumulation, dropout=False, axis_name=axis)
    if groups == 1:
        new, metrics = jax.jit(step(None))(state, {k: jnp.asarray(v) for k, v in batch.items()})
        return float(metrics["loss"]), new.params, float(metrics["counted_fraction"])
    n = jax.local_device_count()
    per_device = {k: v.reshape(n, -1, v.shape[-1]) for k, v in batch.items()}
    replicated = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), state)
    new, metrics = jax.pmap(step("batch"), axis_name="batch")(replicated, per_device)
    return float(metrics["loss"][0]), jax.tree.map(lambda x: x[0], new.params), float(metrics["counted_fraction"][0])


@pytest.mark.parametrize("packed", [True, False])
def test_the_loss_of_a_global_batch_is_the_same_on_1_and_8_devices_and_with_4_micro_batches(store, packed):
    batch, _, _ = example_batch(store, count=64, packed=packed)
    batch = {k: v[:16] for k, v in batch.items()}
    counted = (batch["targets"] != -100).sum(-1)
    assert len(set(counted.reshape(8, 2).sum(-1).tolist())) > 1  # devices count unequally: a mean of means differs
    logits, _ = GPT2LMHeadModule(TINY).apply({"params": init_params(TINY, 0)}, batch["inputs"], None,
                                             batch.get("positions"), segment_ids_BxT=batch.get("segments"))
    reference = target_loss_sum_and_count(logits, batch["targets"])
    results = [step_losses(batch, groups, accumulation) for groups, accumulation in ((1, 1), (8, 1), (1, 4), (8, 2))]
    for loss, params, fraction in results:
        assert abs(loss - float(reference[0] / reference[1])) < 1e-5
        assert fraction == pytest.approx(counted.sum() / batch["targets"].size)
        for mine, first in zip(jax.tree.leaves(params), jax.tree.leaves(results[0][1])):
            np.testing.assert_allclose(mine, first, atol=1e-6)


# --- the sampler


def test_batches_are_a_pure_function_of_the_step_and_cover_every_example_each_epoch(store):
    index = store.index("train")
    make = lambda packed, **placement: rows_of.ExampleSampler(store.tokens("train"), index, 32, 16, seed=5,
                                                              placement=rows_of.Placement(**placement), packed=packed)
    padded = make(False)
    epoch = len(index) // 16
    seen = np.concatenate([np.concatenate(padded.global_rows(s)) for s in range(epoch)])
    assert len(set(seen.tolist())) == len(seen) == epoch * 16  # no example twice within an epoch
    fresh = make(True)
    for step in (0, 7, 40):
        assert all((a == b).all() for a, b in zip(make(True)(step).values(), fresh(step).values()))
    halves = [make(True, process_index=i, process_count=2)(3) for i in range(2)]
    whole = make(True)(3)
    for name in whole:
        np.testing.assert_array_equal(np.concatenate([h[name].reshape(-1, 32) for h in halves]),
                                      whole[name].reshape(-1, 32))


# --- runs


@pytest.fixture(scope="module")
def task_run(cache_dir, task_file, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "task")
    run_training(task(cache_dir, task_file, "--config.train.log_every=1", "--config.train.checkpoint_every=5",
                      "--config.train.eval_batches=8"), run_dir, progress=False)
    return run_dir


def metrics(run_dir, split="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r["split"] == split}


def test_a_task_run_logs_the_counted_fraction_and_samples_held_out_prompts_with_references(task_run, store):
    train = metrics(task_run)
    assert set(train) == set(range(1, 21)) and all(0.1 < r["counted_fraction"] < 0.7 for r in train.values())
    assert train[20]["loss"] < train[1]["loss"]
    with open(os.path.join(task_run, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    held_out = [ByteTokenizer().decode(store.tokens("val")[s: s + p].tolist()) for s, p, _, _ in store.index("val")[:3]]
    assert [s["prompt"] for s in samples if s["step"] == 10] == held_out
    for sample in samples:  # "reverse: abc =" -> " cba"
        assert sample["reference"] == " " + sample["prompt"].removeprefix("reverse: ").removesuffix(" =")[::-1]


def test_eval_of_the_run_is_the_val_loss_it_logged_and_of_a_file_is_a_slow_reference(task_run, task_file, tmp_path):
    """`gpt2jax eval --run` scores the held-out completions (unpacked, one example per row) as training did
    (packed); `--data rows.jsonl` scores a file's completions, against a per-example loop over the HF-style
    forward with -100 labels on the prompt."""
    from gpt2jax.evaluate import evaluate

    _, result = evaluate(task_run, None, None, None, None, None, 8, None)
    assert abs(result["loss"] - metrics(task_run, "val")[20]["loss"]) < 1e-5
    rows = reversal_rows(13, seed=9)
    path = write_rows(tmp_path / "rows.jsonl", [{"q": r["prompt"], "a": r["completion"]} for r in rows])
    _, result = evaluate(task_run, None, None, path, None, 64, 4, None, prompt_column="q", completion_column="a")
    model, tok = GPT2LMHeadModel.from_pretrained(task_run), ByteTokenizer()
    total, count = 0.0, 0
    for row in rows:
        prompt, completion = tok.encode(row["prompt"]), tok.encode(row["completion"]) + [tok.eos_token_id]
        labels = np.array([[-100] * len(prompt) + completion])
        out = model(np.array([prompt + completion]), labels=labels)
        total, count = total + float(out.loss) * len(completion), count + len(completion)
    assert result["examples"] == 13 and result["tokens"] == count
    assert abs(result["loss"] - total / count) < 1e-5


def test_kill_9_then_the_same_command_gives_the_same_losses(cache_dir, task_file, task_run, tmp_path):
    run_dir = str(tmp_path / "killed")
    command = [sys.executable, "-m", "gpt2jax.cli", "train", "--config", SMOKE, "--workdir", run_dir, "--no-progress",
               f"--config.data.cache_dir={cache_dir}", *TASK, f"--config.data.dataset={task_file}",
               "--config.train.log_every=1", "--config.train.checkpoint_every=5", "--config.train.eval_batches=8"]
    hook = """
import os
from gpt2jax import checkpoint
original = checkpoint.Checkpoints.save
def save_then_die(self, step, *args, **kwargs):
    original(self, step, *args, **kwargs)
    if step == 10:
        os.kill(os.getpid(), 9)
checkpoint.Checkpoints.save = save_then_die
"""
    assert run_with_hook(hook, command).returncode == -9
    restarted = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert restarted.returncode == 0 and "resuming" in restarted.stdout, restarted.stderr[-2000:]
    after, reference = metrics(run_dir), metrics(task_run)
    assert set(after) == set(reference)
    for step in reference:
        assert abs(after[step]["loss"] - reference[step]["loss"]) <= 1e-6, step


def test_fsdp_trains_the_same_task_losses_as_pmap(cache_dir, task_file, task_run, tmp_path):
    """Packed rows (positions, segments) go through the fsdp step's row groups as through pmap's devices."""
    run_dir = str(tmp_path / "fsdp")
    run_training(task(cache_dir, task_file, "--config.train.log_every=1", "--config.train.checkpoint_every=5",
                      "--config.train.eval_batches=8", "--config.train.parallelism=fsdp", "--config.train.max_steps=10",
                      "--config.optim.decay_steps=20"),  # the schedule of the 20-step run
                 run_dir, progress=False)
    fsdp, pmap = metrics(run_dir), metrics(task_run)
    assert set(fsdp) == set(range(1, 11))
    for step in fsdp:
        assert abs(fsdp[step]["loss"] - pmap[step]["loss"]) < 1e-5, step
    assert abs(metrics(run_dir, "val")[10]["loss"] - metrics(task_run, "val")[10]["loss"]) < 1e-5


def test_padded_rows_train_too_and_their_first_loss_equals_the_packed_ones(cache_dir, task_file, task_run, tmp_path):
    """Padded or packed, step 1's loss is the mean over the same kind of tokens (different rows, close values);
    the padded run fills fewer positions, so more of them are padding."""
    run_dir = str(tmp_path / "padded")
    run_training(task(cache_dir, task_file, "--config.data.packing=False", "--config.train.log_every=1",
                      "--config.train.max_steps=3", "--config.train.sample_every=0"), run_dir, progress=False)
    padded, packed = metrics(run_dir), metrics(task_run)
    assert padded[1]["counted_fraction"] < packed[1]["counted_fraction"]
    assert abs(padded[1]["loss"] - packed[1]["loss"]) < 0.1


# --- bad data: one line, exit 2, the row named, nothing written


BAD_ROWS = {
    "a missing column": ([{"prompt": "a", "answer": "b"}], "data.completion_column='completion' is not a column"),
    "an empty completion": ([{"prompt": "a", "completion": "b"}] * 3 + [{"prompt": "x", "completion": ""}],
                            "row 3 has an empty completion"),
    "an empty prompt": ([{"prompt": "a", "completion": "b"}, {"prompt": "", "completion": "b"}],
                        "row 1 has an empty prompt"),
    "a prompt longer than block_size": ([{"prompt": "a", "completion": "b"}] * 5
                                        + [{"prompt": "p" * 40, "completion": "b"}],
                                        "row 5 has a prompt of 40 tokens, longer than data.block_size=32"),
    "a null completion": ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}],
                          "is null in 1 row(s), the first is row 1"),
    "a number as prompt": ([{"prompt": 3, "completion": "b"}], "holds int64 values, not text"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_are_one_line_exit_2_naming_the_row_and_leave_no_store(case, tmp_path):
    rows, message = BAD_ROWS[case]
    path = write_rows(tmp_path / "bad.jsonl", rows)
    cache = tmp_path / "cache"
    result = subprocess.run([sys.executable, "-m", "gpt2jax.cli", "train", "--config", SMOKE, "--workdir",
                             str(tmp_path / "run"), "--no-progress", f"--config.data.cache_dir={cache}", *TASK,
                             f"--config.data.dataset={path}", "--config.data.val_fraction=0.0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.stderr
    written = [name for name, _ in files(str(cache))] if cache.exists() else []
    assert not any(".tmp-" in name for name in written)  # nothing half-written
    if "block_size" not in message:  # a store that is whole but too long for this block size stays cached
        assert not any(name.endswith("meta.json") for name in written)
    assert not (tmp_path / "run").exists()


# --- the embedded task


SOURCE = '''
import os

def plain(a, b=1):
    """Add them.

    Twice."""
    # a comment
    return a + b

class Box:
    async def method(self):
        """Open it."""
        if self:
            return 1

def one_liner(): "doc"; return 2

def no_docstring():
    return 3

def only_docstring():
    """Nothing else."""
'''


def test_prepare_says_how_many_examples_each_split_holds(cache_dir, task_file, capsys):
    from gpt2jax.cli import main

    main(["prepare", "--config", SMOKE, f"--config.data.cache_dir={cache_dir}", *TASK,
          f"--config.data.dataset={task_file}"])
    out = capsys.readouterr().out
    assert "examples /" in out and "in completions" in out and "val " in out


def test_docstring_to_code_splits_each_documented_function_at_its_docstring():
    pairs = list(_functions(SOURCE))
    assert pairs == [
        ('def plain(a, b=1):\n    """Add them.\n\n    Twice."""\n', "    # a comment\n    return a + b\n"),
        ('async def method(self):\n    """Open it."""\n', "    if self:\n        return 1\n"),
    ]
    assert list(_functions("def broken(:\n")) == []


def test_the_pystdlib_task_prepares_offline_as_prompt_completion_rows(cache_dir):
    config = smoke(cache_dir, "--config.data.format=prompt_completion", "--config.data.block_size=512",
                   "--config.data.tokenizer=gpt2")
    store = prepare(config.data, progress=False)
    from gpt2jax.tokenizer import load_tokenizer

    tok = load_tokenizer("gpt2")
    assert store.meta["source"]["task"]["name"] == "docstring_to_code"
    assert store.meta["splits"]["train"]["examples"] > 5000
    start, prompt, length, _ = store.index("train")[0]
    text = tok.decode(store.tokens("train")[start: start + prompt].tolist())
    assert text.startswith(("def ", "async def ")) and ('"""' in text or "'''" in text)
