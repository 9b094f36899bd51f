"""The `gpt2jax` command: argument parsing only; every command calls into the library.

A `UserError` anywhere becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """--run RUN [--step] | --model HF_DIR, and --tokenizer: how sample and eval name a model."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a Hugging Face GPT-2 directory (or hub name, when online)")
    source.add_argument("--run", help="a gpt2jax run directory, e.g. runs/NAME")
    parser.add_argument("--step", default=None, help="with --run: latest (default), best, or a step number")
    parser.add_argument("--tokenizer", help="gpt2, byte or an HF tokenizer dir (default: the run's / beside the model)")


def build_parser() -> argparse.ArgumentParser:
    from gpt2jax import __version__

    parser = argparse.ArgumentParser(prog="gpt2jax", description="GPT-2 in JAX/Flax.")
    parser.add_argument("--version", action="version", version=f"gpt2jax {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    prepare = commands.add_parser("prepare", help="tokenize an experiment's dataset into token bins")
    prepare.add_argument("--config", required=True, help="experiments/NAME.py; --config.GROUP.KEY=VALUE overrides")
    prepare.set_defaults(handler=run_prepare)

    train = commands.add_parser("train", help="train (or resume) an experiment into a run directory")
    train.add_argument("--config", required=True, help="experiments/NAME.py; --config.GROUP.KEY=VALUE overrides")
    train.add_argument("--workdir", required=True, help="run directory, e.g. runs/NAME")
    train.add_argument("--coordinator-address", help="HOST:PORT of process 0, for multi-process runs")
    train.add_argument("--num-processes", type=int, help="processes in a multi-process run")
    train.add_argument("--process-id", type=int, help="this process's index in a multi-process run")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--overwrite", action="store_true", help="discard the run already in --workdir")
    train.add_argument("--fork", metavar="RUN_DIR",
                       help="start a new run in --workdir from RUN_DIR's latest checkpoint, with this config")
    train.set_defaults(handler=run_train)

    evaluate = commands.add_parser("eval", help="loss, perplexity and bits per byte of a run or HF model")
    add_model_source(evaluate)
    evaluate.add_argument("--data", help="a text file (default: the run's validation split)")
    evaluate.add_argument("--block-size", type=int, help="tokens per window (default: the run's block size, or n_positions)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--max-batches", type=int, help="evaluate at most this many batches")
    evaluate.set_defaults(handler=run_eval)

    export = commands.add_parser("export", help="write a run's checkpoint as a Hugging Face GPT-2 directory")
    export.add_argument("--run", required=True, help="a gpt2jax run directory")
    export.add_argument("--step", default="latest", help="latest (default), best, or a step number")
    export.add_argument("--out", required=True, help="the directory to write (must not exist or be empty)")
    export.set_defaults(handler=run_export)

    compare = commands.add_parser("compare", help="compare runs: differing config keys, losses, speed")
    compare.add_argument("runs", nargs="+", help="run directories (shell globs such as runs/* work)")
    compare.add_argument("--format", default="table", choices=["table", "markdown", "csv", "json"])
    compare.add_argument("--plot", metavar="PNG", help="also plot loss against tokens and wall time")
    compare.set_defaults(handler=run_compare)

    sweep = commands.add_parser("sweep", help="train a grid of configs one after another, then compare them")
    sweep.add_argument("--config", required=True, help="experiments/NAME.py; --config.GROUP.KEY=VALUE overrides")
    sweep.add_argument("--grid", action="append", required=True, help="KEY=[V1,V2,...]; repeat for more axes")
    sweep.add_argument("--workdir", required=True, help="group directory: one run per grid point inside")
    sweep.add_argument("--print-commands", action="store_true", help="print one train command per point instead")
    sweep.add_argument("--no-progress", action="store_true")
    sweep.set_defaults(handler=run_sweep)

    bench = commands.add_parser("bench", help="forward, decode and train-step throughput here, with MFU")
    bench.add_argument("--size", default="gpt2", choices=["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
    bench.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    bench.add_argument("--what", nargs="+", default=["forward", "decode", "train"],
                       choices=["forward", "decode", "train"])
    bench.add_argument("--batch", type=int, default=1, help="sequences per device")
    bench.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    bench.add_argument("--new-tokens", type=int, default=128, help="decode: tokens generated after a 32-token prompt")
    bench.add_argument("--repeats", type=int, default=3)
    bench.set_defaults(handler=run_bench)

    sample = commands.add_parser("sample", help="sample text from a model")
    add_model_source(sample)
    sample.add_argument("--prompt", required=True, help="text to continue")
    sample.add_argument("--max-new-tokens", type=int, default=64)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-k", type=int, default=0, help="0: off")
    sample.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    sample.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    sample.add_argument("--num-samples", type=int, default=1)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--stream", action="store_true", help="print text as it is generated")
    sample.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the model's)")
    sample.set_defaults(handler=run_sample)
    return parser


def run_prepare(args: argparse.Namespace) -> None:
    from gpt2jax.config import load_config
    from gpt2jax.data import prepare

    config = load_config(args.config, args.overrides)
    bins = prepare(config.data)
    splits = ", ".join(f"{name} {s['tokens']:,} tokens / {s['documents']:,} documents"
                       for name, s in bins.meta["splits"].items())
    print(f"{bins.directory}: {splits}")


def run_train(args: argparse.Namespace) -> int:
    from gpt2jax.distributed import initialize
    from gpt2jax.errors import UserError

    initialize(args.coordinator_address, args.num_processes, args.process_id)
    from gpt2jax.config import load_config
    from gpt2jax.trainer import run_training

    from gpt2jax.trainer import Stopped

    if args.overwrite and args.fork:
        raise UserError("--overwrite and --fork exclude each other")
    config = load_config(args.config, args.overrides)
    workdir = args.workdir
    try:
        last = run_training(config, workdir, progress=not args.no_progress, overwrite=args.overwrite,
                            fork_from=args.fork)
    except Stopped as stopped:
        resume = " ".join(["gpt2jax", "train", "--config", args.config, "--workdir", workdir, *args.overrides])
        print(f"gpt2jax train: {stopped}; resume with: {resume}", file=sys.stderr)
        return 128 + stopped.signum
    shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k in ("loss", "val_loss", "tokens_per_s", "mfu"))
    print(f"{workdir}: {shown}")
    return 0


def run_eval(args: argparse.Namespace) -> None:
    from gpt2jax.evaluate import evaluate

    source, result = evaluate(args.run, args.model, args.step, args.data, args.tokenizer, args.block_size,
                              args.batch_size, args.max_batches)
    print(f"{source}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
          f"bits/byte {result['bits_per_byte']:.4f}  ({result['tokens']:,} tokens)")


def run_export(args: argparse.Namespace) -> None:
    from gpt2jax.textgen import export_run

    step = export_run(args.run, args.step, args.out)
    print(f"wrote {args.out} from {args.run} step {step}")


def run_compare(args: argparse.Namespace) -> None:
    from gpt2jax.compare import compare_rows, format_rows, plot, read_runs

    records = read_runs(args.runs)
    print(format_rows(compare_rows(records), args.format))
    if args.plot:
        plot(records, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


def run_sweep(args: argparse.Namespace) -> None:
    from gpt2jax.compare import compare_rows, format_rows, read_runs, sweep

    run_dirs = sweep(args.config, args.grid, args.workdir, args.overrides, args.print_commands, not args.no_progress)
    if not args.print_commands:
        print(format_rows(compare_rows(read_runs(run_dirs)), "table"))


def run_bench(args: argparse.Namespace) -> None:
    from gpt2jax.bench import run_bench as bench

    bench(args.size, args.dtype, args.what, args.batch, args.seq, args.new_tokens, args.repeats)


def run_sample(args: argparse.Namespace) -> None:
    from gpt2jax.textgen import load_model_and_tokenizer, sample

    model, tokenizer = load_model_and_tokenizer(args.run, args.model, args.step, args.tokenizer, args.dtype)
    sample(
        model, tokenizer, args.prompt, num_samples=args.num_samples, stream=args.stream, seed=args.seed,
        max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p,
    )


def main(argv: list[str] | None = None) -> int:
    from gpt2jax.errors import UserError

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.overrides = [a for a in unknown if a.startswith("--config.")]
    rest = [a for a in unknown if not a.startswith("--config.")]
    if rest or (args.overrides and not hasattr(args, "config")):
        parser.error(f"unrecognized arguments: {' '.join(rest or args.overrides)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args) or 0
    except UserError as e:
        print(f"gpt2jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
