"""The `gpt2jax` command: argument parsing only; every command calls into the library.

A `UserError` anywhere becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from gpt2jax import __version__

    parser = argparse.ArgumentParser(prog="gpt2jax", description="GPT-2 in JAX/Flax.")
    parser.add_argument("--version", action="version", version=f"gpt2jax {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    from gpt2jax.errors import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args) or 0
    except UserError as e:
        print(f"gpt2jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
