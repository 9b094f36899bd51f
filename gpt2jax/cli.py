"""The `gpt2jax` command: argument parsing only; every command calls into the library.

A `UserError` anywhere, or an OS error on a user's path (disk full, permissions, a file where a
directory belongs), becomes one line on stderr and exit status 2; `GPT2JAX_DEBUG=1` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any


def _number(kind: type, low: float, inclusive: bool = True):
    """An argparse type: a `kind` number >= low (> low when not inclusive)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not (value >= low if inclusive else value > low) or value != value:
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low:g}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int, non_negative_int, positive_float = _number(int, 1), _number(int, 0), _number(float, 0, False)
COMPILING_COMMANDS = ("train", "sample", "eval", "bench", "sweep")  # these use the persistent compilation cache


class Parser(argparse.ArgumentParser):
    """Usage mistakes in one line ("gpt2jax sample: error: --top-k must be >= 0, got -1") and exit 2."""

    def error(self, message: str):
        if message.startswith("argument ") and ": " in message:
            name, _, reason = message.removeprefix("argument ").partition(": ")
            message = f"{name.split('/')[-1]} {reason}"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """--run RUN [--step] | --model HF_DIR, and --tokenizer: how sample and eval name a model."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a Hugging Face GPT-2 directory (or hub name, when online)")
    source.add_argument("--run", help="a gpt2jax run directory, e.g. runs/NAME")
    parser.add_argument("--step", default=None, help="with --run: latest (default), best, or a step number")
    parser.add_argument("--tokenizer", help="gpt2, byte or an HF tokenizer dir (default: the run's / beside the model)")


def build_parser() -> argparse.ArgumentParser:
    from gpt2jax import __version__

    parser = Parser(prog="gpt2jax", description="GPT-2 in JAX/Flax.")
    parser.add_argument("--version", action="version", version=f"gpt2jax {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add in (add_prepare, add_train, add_eval, add_export, add_compare, add_sweep, add_bench, add_sample):
        add(commands)
    return parser


def add_prepare(commands: Any) -> None:
    prepare = commands.add_parser("prepare", help="tokenize an experiment's dataset into token bins")
    prepare.add_argument("--config", required=True, help="experiments/NAME.py; --config.GROUP.KEY=VALUE overrides")
    prepare.set_defaults(handler=run_prepare)


def add_train(commands: Any) -> None:
    train = commands.add_parser("train", help="train (or resume) an experiment into a run directory")
    train.add_argument("--config", required=True, help="experiments/NAME.py; --config.GROUP.KEY=VALUE overrides")
    train.add_argument("--workdir", required=True, help="run directory, e.g. runs/NAME")
    train.add_argument("--coordinator-address", help="HOST:PORT of process 0, for multi-process runs")
    train.add_argument("--num-processes", type=positive_int, help="processes in a multi-process run")
    train.add_argument("--process-id", type=non_negative_int, help="this process's index in a multi-process run")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--overwrite", action="store_true", help="discard the run already in --workdir")
    train.add_argument("--fork", metavar="RUN_DIR",
                       help="start a new run in --workdir from RUN_DIR's latest checkpoint, with this config")
    train.set_defaults(handler=run_train)


def add_eval(commands: Any) -> None:
    evaluate = commands.add_parser("eval", help="loss, perplexity and bits per byte of a run or HF model")
    add_model_source(evaluate)
    evaluate.add_argument("--data", help="a text file, or a .jsonl/.json/.parquet/.arrow file of prompt/completion "
                          "rows (loss on the completions) (default: the run's validation split)")
    evaluate.add_argument("--prompt-column", help="--data rows: the prompt column (default: the run's, or 'prompt')")
    evaluate.add_argument("--completion-column",
                          help="--data rows: the completion column (default: the run's, or 'completion')")
    evaluate.add_argument("--block-size", type=positive_int, help="tokens per window (default: the run's block size, or n_positions)")
    evaluate.add_argument("--batch-size", type=positive_int, default=8)
    evaluate.add_argument("--max-batches", type=positive_int, help="evaluate at most this many batches")
    evaluate.set_defaults(handler=run_eval)


def add_export(commands: Any) -> None:
    export = commands.add_parser("export", help="write a run's checkpoint as a Hugging Face GPT-2 directory")
    export.add_argument("--run", required=True, help="a gpt2jax run directory")
    export.add_argument("--step", default="latest", help="latest (default), best, or a step number")
    export.add_argument("--out", required=True, help="the directory to write (must not exist or be empty)")
    export.set_defaults(handler=run_export)


def add_compare(commands: Any) -> None:
    compare = commands.add_parser("compare", help="compare runs: differing config keys, losses, speed")
    compare.add_argument("runs", nargs="+", help="run directories (shell globs such as runs/* work)")
    compare.add_argument("--format", default="table", choices=["table", "markdown", "csv", "json"])
    compare.add_argument("--plot", metavar="PNG", help="also plot loss against tokens and wall time")
    compare.set_defaults(handler=run_compare)


def add_sweep(commands: Any) -> None:
    sweep = commands.add_parser("sweep", help="train a grid of configs one after another, then compare them")
    sweep.add_argument("--config", required=True, help="experiments/NAME.py; --config.GROUP.KEY=VALUE overrides")
    sweep.add_argument("--grid", action="append", required=True, help="KEY=[V1,V2,...]; repeat for more axes")
    sweep.add_argument("--workdir", required=True, help="group directory: one run per grid point inside")
    sweep.add_argument("--print-commands", action="store_true", help="print one train command per point instead")
    sweep.add_argument("--no-progress", action="store_true")
    sweep.set_defaults(handler=run_sweep)


def add_bench(commands: Any) -> None:
    from gpt2jax.config import MODEL_SIZES

    bench = commands.add_parser("bench", help="forward, decode and train-step throughput here, with MFU; memory")
    bench.add_argument("--size", default="gpt2", choices=list(MODEL_SIZES))
    bench.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"],
                       help="compute dtypes (default: float32; decode alone: both)")
    bench.add_argument("--what", nargs="+", default=["forward", "decode", "train"],
                       choices=["forward", "decode", "train", "memory"],
                       help="memory: a train step's bytes per device (state by its layout; the compiled peak)")
    bench.add_argument("--parallelism", nargs="+", default=["pmap"], choices=["pmap", "fsdp"],
                       help="train and memory: how the train state is laid out (train.parallelism)")
    bench.add_argument("--gradient-checkpointing", action="store_true",
                       help="train and memory: recompute each block in the backward pass")
    bench.add_argument("--batch", type=positive_int, nargs="+",
                       help="sequences per device (default: 1; decode alone: 1 8 64)")
    bench.add_argument("--seq", type=positive_int, default=256, help="tokens per sequence")
    bench.add_argument("--new-tokens", type=positive_int, default=128, help="decode: tokens generated after a 32-token prompt")
    bench.add_argument("--repeats", type=positive_int, default=3)
    bench.add_argument("--attention", nargs="+", default=["auto"],
                       help="attention implementations to measure side by side: auto, xla, cudnn, splash")
    bench.set_defaults(handler=run_bench)


def add_sample(commands: Any) -> None:
    sample = commands.add_parser("sample", help="sample text from a model")
    add_model_source(sample)
    sample.add_argument("--prompt", required=True, help="text to continue")
    sample.add_argument("--max-new-tokens", type=positive_int, default=64)
    sample.add_argument("--temperature", type=positive_float, default=1.0)
    sample.add_argument("--top-k", type=non_negative_int, default=0, help="0: off")
    sample.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    sample.add_argument("--greedy", action="store_true", help="argmax decoding instead of sampling")
    sample.add_argument("--num-samples", type=positive_int, default=1)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--stream", action="store_true", help="print text as it is generated")
    sample.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the model's)")
    sample.add_argument("--num-beams", type=positive_int, default=1,
                        help="beam search with this many beams (deterministic: no sampling)")
    sample.add_argument("--num-return-sequences", type=positive_int, default=1,
                        help="continuations per sample (the best beams, or independent draws)")
    sample.add_argument("--repetition-penalty", type=positive_float, default=1.0, help="> 1 discourages repeats")
    sample.add_argument("--no-repeat-ngram-size", type=non_negative_int, default=0,
                        help="no n-gram of this size twice; 0: off")
    sample.add_argument("--min-new-tokens", type=non_negative_int, default=0, help="no EOS before this many")
    sample.set_defaults(handler=run_sample)


def run_prepare(args: argparse.Namespace) -> None:
    from gpt2jax.experiment import load_config
    from gpt2jax.data import prepare

    config = load_config(args.config, args.overrides)
    bins = prepare(config.data, progress=sys.stderr.isatty())
    print(f"{bins.directory}: {bins.summary()}")


def run_train(args: argparse.Namespace) -> int:
    from gpt2jax.distributed import initialize
    from gpt2jax.errors import Stopped, UserError

    if args.overwrite and args.fork:
        raise UserError("--overwrite and --fork exclude each other")
    initialize(args.coordinator_address, args.num_processes, args.process_id)
    from gpt2jax.experiment import load_config
    from gpt2jax.trainer import run_training

    config = load_config(args.config, args.overrides)
    args.workdir = os.path.expanduser(args.workdir)  # "~/runs/x" quoted: a home path, not a directory named ~
    try:
        last = run_training(config, args.workdir, progress=not args.no_progress, overwrite=args.overwrite,
                            fork_from=args.fork)
    except Stopped as stopped:
        resume = ["gpt2jax", "train", f"--config={args.config}", f"--workdir={args.workdir}",
                  *(["--no-progress"] if args.no_progress else []), *args.overrides]  # = keeps "-dashrun" a value
        print(f"gpt2jax train: {stopped}; resume with: {shlex.join(resume)}", file=sys.stderr)
        return 128 + stopped.signum
    shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k in ("loss", "val_loss", "tokens_per_s", "mfu"))
    print(f"{args.workdir}: {shown}" if shown else
          f"{args.workdir}: finished already at step {config.train.max_steps}; nothing was trained (to train further, "
          "--fork it into a new directory with a larger --config.train.max_steps)")
    return 0


def run_eval(args: argparse.Namespace) -> None:
    from gpt2jax.evaluate import evaluate

    source, result = evaluate(args.run, args.model, args.step, args.data, args.tokenizer, args.block_size,
                              args.batch_size, args.max_batches, args.prompt_column, args.completion_column)
    counted = f"{result['tokens']:,} tokens"
    if "examples" in result:
        counted += f" of {result['examples']:,} completions"
    print(f"{source}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
          f"bits/byte {result['bits_per_byte']:.4f}  ({counted})")


def run_export(args: argparse.Namespace) -> None:
    from gpt2jax.hf import export_run

    step = export_run(args.run, args.step, args.out)
    print(f"wrote {args.out} from {args.run} step {step}")


def run_compare(args: argparse.Namespace) -> None:
    from gpt2jax.compare import check_plot_path, compare_rows, format_rows, plot
    from gpt2jax.records import read_runs

    if args.plot is not None:
        check_plot_path(args.plot)  # before any run is read or anything printed
    records = read_runs(args.runs)
    print(format_rows(compare_rows(records), args.format))
    if args.plot is not None:
        plot(records, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


def run_sweep(args: argparse.Namespace) -> int:
    from gpt2jax.compare import compare_rows, format_rows
    from gpt2jax.records import read_runs
    from gpt2jax.errors import Stopped
    from gpt2jax.sweep import sweep

    try:
        run_dirs = sweep(args.config, args.grid, args.workdir, args.overrides, args.print_commands,
                         not args.no_progress)
    except Stopped as stopped:
        print(f"gpt2jax sweep: {stopped}; run the same sweep again to resume", file=sys.stderr)
        return 128 + stopped.signum
    if not args.print_commands:
        print(format_rows(compare_rows(read_runs(run_dirs)), "table"))
    return 0


def run_bench(args: argparse.Namespace) -> None:
    from gpt2jax.bench import run_bench as bench

    decode_only = args.what == ["decode"]
    dtypes = args.dtype or (["bfloat16", "float32"] if decode_only else ["float32"])
    batches = args.batch or ([1, 8, 64] if decode_only else [1])
    bench(args.size, dtypes, args.attention, args.what, batches, args.seq, args.new_tokens, args.repeats,
          tuple(args.parallelism), args.gradient_checkpointing)


def run_sample(args: argparse.Namespace) -> None:
    from gpt2jax.textgen import load_model_and_tokenizer, sample

    model, tokenizer = load_model_and_tokenizer(args.run, args.model, args.step, args.tokenizer, args.dtype)
    sample(
        model, tokenizer, args.prompt, num_samples=args.num_samples, stream=args.stream, seed=args.seed,
        max_new_tokens=args.max_new_tokens, do_sample=not args.greedy and args.num_beams == 1,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, num_beams=args.num_beams,
        num_return_sequences=args.num_return_sequences, repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size, min_new_tokens=args.min_new_tokens,
    )


def split_overrides(unknown: list[str]) -> tuple[list[str], list[str]]:
    """(--config.KEY=VALUE overrides, the rest); `--config.KEY VALUE` is read as `--config.KEY=VALUE`."""
    overrides, rest, i = [], [], 0
    while i < len(unknown):
        arg = unknown[i]
        if arg.startswith("--config.") and "=" not in arg and i + 1 < len(unknown):
            overrides.append(f"{arg}={unknown[i + 1]}")
            i += 2
            continue
        (overrides if arg.startswith("--config.") else rest).append(arg)
        i += 1
    return overrides, rest


def main(argv: list[str] | None = None) -> int:
    from gpt2jax.errors import UserError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # Python decoded the shell's bytes with the locale's encoding and surrogateescape: read them as UTF-8
        argv = [os.fsencode(arg).decode("utf-8") for arg in argv]
    except UnicodeError:
        bad = next(arg for arg in argv if not _is_utf8(arg))
        print(f"gpt2jax: error: the argument {ascii(bad)} is not UTF-8 text; every argument (prompts, paths, "
              "overrides) is read as UTF-8", file=sys.stderr)
        return 2
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.overrides, rest = split_overrides(unknown)
    if rest or (args.overrides and not hasattr(args, "config")):
        parser.error(f"unrecognized arguments: {' '.join(rest or args.overrides)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        if args.command in COMPILING_COMMANDS:
            from gpt2jax.perf import enable_compilation_cache

            enable_compilation_cache()
        return args.handler(args) or 0
    except BrokenPipeError:  # `gpt2jax compare runs/* | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 0
    except (UserError, OSError) as e:
        if os.environ.get("GPT2JAX_DEBUG"):
            raise
        print(f"gpt2jax {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _is_utf8(arg: str) -> bool:
    try:
        os.fsencode(arg).decode("utf-8")
        return True
    except UnicodeError:
        return False


def one_line(error: Exception) -> str:
    """The message of a UserError, or an OS error as "what: path" (disk full, permission denied, ...)."""
    if isinstance(error, OSError) and error.strerror:
        paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
        return f"{error.strerror}: {paths}" if paths else error.strerror
    return " ".join(str(error).split("\n")[0].split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
