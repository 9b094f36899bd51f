"""Mutation testing: does the suite notice when the code is wrong?

Each mutation is a small, plausible bug. For each one this script copies the package to a scratch
directory, applies the bug there (the checkout is never touched), runs the tests that should catch it
with that copy first on PYTHONPATH, and reports caught (the tests failed) or MISSED (they passed).

    python scripts/mutate.py                 # every mutation; exit 1 if any is missed
    python scripts/mutate.py --list          # names only
    python scripts/mutate.py --only NAME ... # a few

Not part of CI: it re-runs tests once per mutation (about 15-25 minutes in all on 2 cores).
Add a mutation whenever a bug slips past the suite, together with the test that now catches it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # path inside the repository, e.g. gpt2jax/model.py
    old: str  # source text that occurs exactly once in `file`
    new: str  # what replaces it
    tests: tuple[str, ...]  # pytest node ids that must fail


def M(name: str, file: str, old: str, new: str, tests: list[str]) -> Mutation:
    return Mutation(name, file, old, new, tuple(tests))


MUTATIONS = [
    # The five the issue found passing the whole suite.
    M("run-dir load returns a fresh init", "gpt2jax/modeling.py",
      "model = cls(config, params=jax.tree.map(jnp.asarray, params))", "model = cls(config)",
      ["tests/test_checkpoint.py::test_run_dir_load_has_the_trainers_final_params"]),
    M("eval: perplexity = loss", "gpt2jax/evaluate.py",
      '"perplexity": math.exp(loss),', '"perplexity": loss,',
      ["tests/test_evaluate.py"]),
    M("eval: bits/byte with ln 10", "gpt2jax/evaluate.py",
      "(max(n_bytes, 1) * math.log(2))", "(max(n_bytes, 1) * math.log(10))",
      ["tests/test_evaluate.py"]),
    # The model, its fixtures and HF files.
    M(name="gelu_new computed as exact gelu", file="gpt2jax/config.py",
      old='"gelu_new": lambda x: jax.nn.gelu(x, approximate=True),',
      new='"gelu_new": lambda x: jax.nn.gelu(x, approximate=False),',
      tests=["tests/test_model.py::test_logits_match_transformers_fixture[gelu_new]",
             "tests/test_model.py::test_loss_matches_transformers_fixture[gelu_new]",
             "tests/test_model.py::test_grads_match_transformers_fixture[gelu_new]"]),
    M(name="sampling: no pad after a row's EOS", file="gpt2jax/sampling.py",
      old="token_B = jnp.where(state.done_B, pad_token_id, token_B)", new="token_B = token_B",
      tests=["tests/test_model.py::test_greedy_generation_with_eos_matches_transformers_fixture"]),
    M(name="sampling: slots after an early stop not padded", file="gpt2jax/sampling.py",
      old="return jnp.where(generated_L[None], state.tokens_BxL, pad_token_id)", new="return state.tokens_BxL",
      tests=["tests/test_model.py::test_greedy_generation_with_eos_matches_transformers_fixture"]),
    M(name="bf16 attention scaled by 1/head_dim", file="gpt2jax/model.py",
      old="out_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_BxTxS[:, None])",
      new=("out_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_BxTxS[:, None], "
           "scale=1.0 / cfg.head_dim if cfg.compute_dtype == jnp.bfloat16 else None)"),
      tests=["tests/test_model.py::test_bfloat16_logits_close_to_float32_with_peaked_attention"]),
    M(name="save_pretrained drops biases and LayerNorms", file="gpt2jax/hf.py",
      old='save_file(to_hf_state_dict(params), path + ".tmp", metadata={"format": "pt"})',
      new=('save_file({k: v for k, v in to_hf_state_dict(params).items() if not k.endswith(".bias") and "ln_" not in k}, '
           'path + ".tmp", metadata={"format": "pt"})'),
      tests=["tests/test_model.py::test_save_pretrained_writes_every_tensor_of_an_all_random_model"]),
    M(name="save_pretrained writes init values for biases and LayerNorms", file="gpt2jax/hf.py",
      old='save_file(to_hf_state_dict(params), path + ".tmp", metadata={"format": "pt"})',
      new=('save_file({k: np.zeros_like(v) if k.endswith(".bias") else np.ones_like(v) if "ln_" in k else v '
           'for k, v in to_hf_state_dict(params).items()}, path + ".tmp", metadata={"format": "pt"})'),
      tests=["tests/test_model.py::test_save_pretrained_writes_every_tensor_of_an_all_random_model",
             "tests/test_hf_parity.py::test_our_export_loads_in_transformers"]),
    M(name="from_pretrained ignores dtype", file="gpt2jax/modeling.py",
      old='overrides = {} if dtype is None else {"dtype": dtype}', new="overrides = {}",
      tests=["tests/test_model.py::test_from_pretrained_bfloat16_keeps_float32_params"]),
    M(name="from_pretrained stores params in the compute dtype", file="gpt2jax/hf.py",
      old="jnp.asarray(found[name], dtype=config.storage_dtype)", new="jnp.asarray(found[name], dtype=config.compute_dtype)",
      tests=["tests/test_model.py::test_from_pretrained_bfloat16_keeps_float32_params"]),
    # Training, checkpoints, CLI and the numbers they report.
    M(name="sample ignores --dtype", file="gpt2jax/cli.py", old="args.tokenizer, args.dtype)", new="args.tokenizer, None)",
      tests=["tests/test_cli.py::test_sample_dtype_computes_in_that_dtype"]),
    M(name="train ignores compute_dtype", file="gpt2jax/config.py", old="dtype=config.train.compute_dtype,",
      new='dtype="float32",', tests=["tests/test_train.py::test_bfloat16_compute_trains_like_float32"]),
    M(name="flops count the position embedding", file="gpt2jax/config.py",
      old="num_parameters(exclude_position_embeddings=True) + 12", new="num_parameters() + 12",
      tests=["tests/test_perf.py"]),
    M(name="tokens/s of one step per interval", file="gpt2jax/trainer.py",
      old="tokens_per_s = timed_steps * tokens_per_step / seconds", new="tokens_per_s = tokens_per_step / seconds",
      tests=["tests/test_perf.py"]),
    M(name="SIGINT kills instead of saving", file="gpt2jax/trainer.py",
      old="for signum in (signal.SIGTERM, signal.SIGINT):", new="for signum in (signal.SIGTERM,):",
      tests=["tests/test_checkpoint.py::test_a_real_signal_stops_the_cli_with_a_checkpoint_and_a_resume_command"]),
    M(name="processes do not agree on a stop signal", file="gpt2jax/trainer.py",
      old="return int(seen.max()) or None", new="return self.signum",
      tests=["tests/test_train.py::test_sigterm_to_one_process_stops_both_after_the_same_step"]),
    M(name="init_from a run dir starts from scratch", file="gpt2jax/trainer.py",
      old="return hf.from_hf_state_dict(hf.to_hf_state_dict(params), model)", new="return init_params(model, 0)",
      tests=["tests/test_checkpoint.py::test_fine_tuning_from_a_run_dir_starts_from_its_latest_params"]),
    M(name="export writes the latest step", file="gpt2jax/hf.py",
      old="params, resolved, found = Checkpoints(run).restore_params(step)",
      new='params, resolved, found = Checkpoints(run).restore_params("latest")',
      tests=["tests/test_checkpoint.py::test_export_command_writes_the_runs_params"]),
    # Data: formats, dtypes, the sampler's per-process slices, validation windows.
    M(name="data: bins always uint16", file="gpt2jax/data.py", old="dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32", new="dtype = np.uint16", tests=["tests/test_data.py::test_vocab_over_65536_tokens_makes_uint32_bins"]),
    M(name="data: uint32 already at 65,536 tokens", file="gpt2jax/data.py", old="len(tokenizer) <= 2**16", new="len(tokenizer) < 2**16", tests=["tests/test_data.py::test_vocab_over_65536_tokens_makes_uint32_bins"]),
    M(name="data: token count assumes 2-byte tokens", file="gpt2jax/data.py", old='counts[split]["tokens"] += len(ids) // np.dtype(dtype).itemsize', new='counts[split]["tokens"] += len(ids) // 2', tests=["tests/test_data.py::test_vocab_over_65536_tokens_makes_uint32_bins"]),
    M(name="data: text_column ignored", file="gpt2jax/data.py", old='column = "text" if source["kind"] == "local" and source["loader"] == "text" else data.text_column', new='column = "text"', tests=["tests/test_data.py::test_parquet_and_arrow_files_decode_to_the_text_column"]),
    M(name="data: text_column not in the bins fingerprint", file="gpt2jax/data.py", old='return {"kind": "local", "loader": loader, "files": stats, "text_column": data.text_column}', new='return {"kind": "local", "loader": loader, "files": stats}', tests=["tests/test_data.py::test_parquet_and_arrow_files_decode_to_the_text_column"]),
    M(name="data: .arrow files not recognised", file="gpt2jax/data.py", old='".parquet": "parquet", ".arrow": "arrow"}', new='".parquet": "parquet"}', tests=["tests/test_data.py::test_parquet_and_arrow_files_decode_to_the_text_column"]),
    M(name="data: .txt sample_by ignored", file="gpt2jax/data.py", old='kwargs = {"sample_by": data.text_sample_by} if source["loader"] == "text" else {}', new="kwargs = {}", tests=["tests/test_data.py::test_txt_files_by_line_paragraph_and_document"]),
    M(name="data: .txt sample_by not in the bins fingerprint", file="gpt2jax/data.py", old='"files": stats, "sample_by": data.text_sample_by}', new='"files": stats}', tests=["tests/test_data.py::test_txt_files_by_line_paragraph_and_document"]),
    M(name="batches: every process reads the first rows", file="gpt2jax/batches.py", old="self.rows = slice(process_index * local_batch, (process_index + 1) * local_batch)", new="self.rows = slice(0, local_batch)", tests=["tests/test_data.py::test_process_slices_are_disjoint_and_make_the_global_batch"]),
    M(name="batches: process slice offset by the global batch", file="gpt2jax/batches.py", old="self.rows = slice(process_index * local_batch, (process_index + 1) * local_batch)", new="self.rows = slice(process_index * global_batch_size, process_index * global_batch_size + local_batch)", tests=["tests/test_data.py::test_process_slices_are_disjoint_and_make_the_global_batch"]),
    M(name="batches: per-process random stream", file="gpt2jax/batches.py", old="rng = np.random.default_rng([self.seed, step])", new="rng = np.random.default_rng([self.seed, step, self.rows.start])", tests=["tests/test_data.py::test_process_slices_are_disjoint_and_make_the_global_batch"]),
    M(name="batches: rng seeded with seed + step", file="gpt2jax/batches.py", old="rng = np.random.default_rng([self.seed, step])", new="rng = np.random.default_rng(self.seed + step)", tests=["tests/test_data.py::test_process_slices_are_disjoint_and_make_the_global_batch"]),
    M(name="batches: last window never sampled", file="gpt2jax/batches.py", old="rng.integers(0, len(self.tokens) - self.block_size, size=self.global_batch_size)", new="rng.integers(0, len(self.tokens) - self.block_size - 1, size=self.global_batch_size)", tests=["tests/test_data.py::test_sampler_windows_reach_both_ends_of_the_split"]),
    M(name="validation: every process reads the first rows", file="gpt2jax/batches.py", old="batch_starts[rows]", new="batch_starts[:local_batch]", tests=["tests/test_data.py::test_validation_batches_are_fixed_spread_and_sliced_per_process"]),
    M(name="validation: windows stop short of the split's end", file="gpt2jax/batches.py", old="np.linspace(0, len(tokens) - block_size - 1, num_batches * global_batch_size)", new="np.linspace(0, len(tokens) - 2 * block_size, num_batches * global_batch_size)", tests=["tests/test_data.py::test_validation_batches_are_fixed_spread_and_sliced_per_process"]),
    M(name="validation: random windows each call", file="gpt2jax/batches.py", old="np.linspace(0, len(tokens) - block_size - 1, num_batches * global_batch_size)", new="np.sort(np.random.randint(0, len(tokens) - block_size, num_batches * global_batch_size))", tests=["tests/test_data.py::test_validation_batches_are_fixed_spread_and_sliced_per_process"]),
]


def apply(mutation: Mutation, scratch: str) -> None:
    path = os.path.join(scratch, mutation.file)
    with open(path) as f:
        source = f.read()
    count = source.count(mutation.old)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name!r}: the text to replace occurs {count} times in {mutation.file}")
    with open(path, "w") as f:
        f.write(source.replace(mutation.old, mutation.new))


def run_tests(tests: tuple[str, ...], scratch: str | None) -> tuple[int, float, str]:
    env = dict(os.environ)
    if scratch is not None:
        env.update(scratch_env(scratch))
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    return result.returncode, time.perf_counter() - start, result.stdout[-3000:] + result.stderr[-2000:]


def scratch_env(scratch: str) -> dict[str, str]:
    """Import gpt2jax from `scratch`: first on PYTHONPATH, and the checkout (the working directory, which
    `python -m` and `-c` put first on sys.path) left out with PYTHONSAFEPATH (Python >= 3.11)."""
    return {"PYTHONPATH": os.pathsep.join([scratch, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "PYTHONSAFEPATH": "1"}


def check_scratch_is_imported(scratch: str) -> None:
    env = {**os.environ, **scratch_env(scratch)}
    out = subprocess.run([sys.executable, "-c", "import gpt2jax; print(gpt2jax.__file__)"], cwd=ROOT, env=env,
                         capture_output=True, text=True).stdout.strip()
    if not out.startswith(scratch):
        raise SystemExit(f"the scratch copy is not what gets imported ({out}); is gpt2jax installed non-editable?")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip running the tests on the real code first")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(set(args.only)):
        raise SystemExit(f"unknown mutation names: {sorted(set(args.only) - {m.name for m in MUTATIONS})}")
    if args.list:
        print("\n".join(m.name for m in chosen))
        return 0
    if not args.no_baseline:
        tests = tuple(sorted({t for m in chosen for t in m.tests}))
        rc, seconds, output = run_tests(tests, None)
        if rc != 0:
            print(output)
            raise SystemExit(f"the tests fail on the unmutated code (rc {rc}); fix that first")
        print(f"baseline: {len(tests)} test selections pass on the real code ({seconds:.0f} s)")
    missed = []
    for mutation in chosen:
        scratch = tempfile.mkdtemp(prefix="gpt2jax-mutant-")
        try:
            shutil.copytree(os.path.join(ROOT, "gpt2jax"), os.path.join(scratch, "gpt2jax"),
                            ignore=shutil.ignore_patterns("__pycache__"))
            apply(mutation, scratch)
            check_scratch_is_imported(scratch)
            rc, seconds, output = run_tests(mutation.tests, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if rc == 1:
            verdict = "caught"
        elif rc == 0:
            verdict, _ = "MISSED", missed.append(mutation.name)
        else:  # collection error, crash: the mutation itself is broken
            verdict, _ = f"ERROR (pytest rc {rc})", missed.append(mutation.name)
            print(output)
        print(f"{verdict:>8}  {mutation.name}  ({mutation.file}, {seconds:.0f} s)", flush=True)
    print(f"{len(chosen) - len(missed)} of {len(chosen)} mutations caught" + (f"; missed: {', '.join(missed)}"
                                                                               if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
