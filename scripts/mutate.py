"""Mutation testing: does the suite notice when the code is wrong?

Each mutation is a small, plausible bug. For each one this script copies the package to a scratch
directory, applies the bug there (the checkout is never touched), runs the tests that should catch it
with that copy first on PYTHONPATH, and reports caught (the tests failed) or MISSED (they passed).

    python scripts/mutate.py                 # every mutation; exit 1 if any is missed
    python scripts/mutate.py --list          # names only
    python scripts/mutate.py --only NAME ... # a few

Not part of CI: it re-runs tests once per mutation (about 15-25 minutes in all on 2 cores).
The mutations are the table in scripts/mutations.toml: add one whenever a bug slips past the suite,
together with the test that now catches it.
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
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # path inside the repository, e.g. gpt2jax/model.py
    old: str  # source text that occurs exactly once in `file`
    new: str  # what replaces it
    tests: tuple[str, ...]  # pytest node ids that must fail


def load_mutations(path: str = os.path.join(ROOT, "scripts", "mutations.toml")) -> list[Mutation]:
    with open(path, "rb") as f:
        table = tomllib.load(f)["mutation"]
    return [Mutation(m["name"], m["file"], m["old"], m["new"], tuple(m["tests"])) for m in table]


MUTATIONS = load_mutations()


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
