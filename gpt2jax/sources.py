"""Where documents come from: the embedded `pystdlib` corpus, local files (.txt, .jsonl, .parquet, .arrow)
or a Hugging Face hub dataset, loaded with `datasets` and checked (one line for each thing a user can get
wrong) before `gpt2jax.data` tokenizes them.

`data.format` says what a row is: "text" (a document, in `data.text_column`) or "prompt_completion" (a task
example, in `data.prompt_column` and `data.completion_column`, tokenized by `gpt2jax.examples`). The embedded
task of the second kind is docstring -> code from the same standard library: `docstring_to_code`.
"""

from __future__ import annotations

import ast
import contextlib
import glob
import logging
import os
import sys
import sysconfig
import textwrap
import warnings
from typing import Any, Iterator

import ml_collections

from gpt2jax.errors import UserError, describe

LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
SAMPLE_BY = ("paragraph", "document", "line")
FORMATS = ("text", "prompt_completion")  # data.format's values
TASK_VERSION = 1  # of docstring_to_code's rules: part of the examples' cache key
TASK_LIMITS = {"prompt": 400, "completion": 1600}  # characters: docstring -> code examples longer are left out


def pystdlib_documents() -> list[str]:
    """The running Python's standard library sources plus pydoc's topic texts, in a fixed order."""
    from pydoc_data.topics import topics

    return [source for _, source in _stdlib_sources()] + [topics[key] for key in sorted(topics)]


def _stdlib_sources() -> Iterator[tuple[str, str]]:
    """(relative path, text) of every .py file of the running Python's standard library, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        paths += [os.path.join(directory, f) for f in files if f.endswith(".py")]
    for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield os.path.relpath(path, root), f.read()


def docstring_to_code() -> dict[str, list[str]]:
    """The embedded task: {"prompt": [...], "completion": [...]} from every function of the standard library
    with a docstring and a body. The prompt is the function's `def` line(s) and docstring, the completion the
    rest of its body, both dedented as one; split with `ast`, in file order, each pair once. Functions whose
    prompt or completion is longer than TASK_LIMITS characters (long docstrings, long bodies) are left out, so
    that the task fits small models' windows (about 130 GPT-2 tokens of prompt at most)."""
    rows: dict[str, list[str]] = {"prompt": [], "completion": []}
    seen = set()
    for _, source in _stdlib_sources():
        for prompt, completion in _functions(source):
            if len(prompt) <= TASK_LIMITS["prompt"] and len(completion) <= TASK_LIMITS["completion"] \
                    and (prompt, completion) not in seen:
                seen.add((prompt, completion))
                rows["prompt"].append(prompt)
                rows["completion"].append(completion)
    return rows


def _functions(source: str) -> Iterator[tuple[str, str]]:
    """(signature and docstring, rest of the body) of each documented function of one module's source."""
    try:
        with warnings.catch_warnings():  # old escapes in the stdlib's own sources: not this reader's concern
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):  # the stdlib's own test data holds deliberately broken files
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        doc = node.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            continue
        if doc.lineno == node.lineno or node.body[1].lineno <= doc.end_lineno:  # one-liners share lines
            continue
        head, body = lines[node.lineno - 1: doc.end_lineno], lines[doc.end_lineno: node.end_lineno]
        text = textwrap.dedent("".join(head + body))
        prompt = "".join(text.splitlines(keepends=True)[: len(head)])
        completion = text[len(prompt):]
        if completion.strip() and prompt.endswith("\n"):
            yield prompt, completion if completion.endswith("\n") else completion + "\n"


def _local_files(dataset: str) -> list[str] | None:
    """The files a local source names (a file, directory or glob), or None if it names none."""
    expanded = os.path.expanduser(dataset)
    if os.path.isfile(expanded):
        return [os.path.abspath(expanded)]
    if os.path.isdir(expanded):
        found = [os.path.join(d, f) for d, _, files in os.walk(expanded, onerror=_unlistable) for f in files]
        return sorted(os.path.abspath(p) for p in found if os.path.splitext(p)[1] in LOADERS)
    if glob.has_magic(expanded):
        return sorted(os.path.abspath(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    return None


def _unlistable(error: OSError) -> None:
    raise UserError(f"{error.filename}: cannot be listed ({error.strerror}), so data.dataset would miss its files")


def _is_local(dataset: str) -> bool:
    return dataset.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(dataset)) or glob.has_magic(dataset)


def data_format(data: ml_collections.ConfigDict) -> str:
    """data.format, "text" in configs written before it existed."""
    return data.get("format", "text")


def columns(data: ml_collections.ConfigDict) -> dict[str, str]:
    """The columns a row is read from: {"text": ...}, or {"prompt": ..., "completion": ...} for task examples."""
    if data_format(data) == "prompt_completion":
        return {"prompt": data.prompt_column, "completion": data.completion_column}
    return {"text": data.text_column}


def source_fingerprint(data: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the bins depend on: the source's identity (and for local files, their sizes and mtimes)."""
    if data.dataset == "pystdlib":
        fingerprint = {"kind": "pystdlib", "python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"]}
        if data_format(data) == "prompt_completion":
            fingerprint["task"] = {"name": "docstring_to_code", "version": TASK_VERSION}
        return fingerprint
    if _is_local(data.dataset):
        files = _local_files(data.dataset)
        if not files:
            raise UserError(f"data.dataset={data.dataset!r}: no such file, or no {'/'.join(LOADERS)} files there")
        kinds = {LOADERS.get(os.path.splitext(f)[1]) for f in files}
        if None in kinds or len(kinds) > 1:
            raise UserError(f"data.dataset={data.dataset!r}: mixes or has unsupported file types "
                            f"({', '.join(sorted({os.path.splitext(f)[1] or '(none)' for f in files}))})")
        loader = kinds.pop()
        unreadable = next((f for f in files if not (os.path.isfile(f) and os.access(f, os.R_OK))), None)
        if unreadable:
            raise UserError(f"{unreadable}: not a readable file (a broken link? permissions?)")
        stats = [[f, os.path.getsize(f), os.path.getmtime(f)] for f in files]
        if loader == "text":
            if data_format(data) != "text":
                raise UserError(f"data.dataset={data.dataset!r}: .txt files hold text, not prompt/completion rows "
                                "(data.format='prompt_completion' reads .jsonl, .parquet, .arrow or the hub)")
            return {"kind": "local", "loader": loader, "files": stats, "sample_by": data.text_sample_by}
        return {"kind": "local", "loader": loader, "files": stats, **_column_keys(data)}
    return {"kind": "hub", "name": data.dataset, "config": data.dataset_config, "split": data.split,
            **_column_keys(data)}


def _column_keys(data: ml_collections.ConfigDict) -> dict[str, str]:
    """How the fingerprint names the columns read (text bins keep their old key, so their caches stay valid)."""
    if data_format(data) == "text":
        return {"text_column": data.text_column}
    return {"prompt_column": data.prompt_column, "completion_column": data.completion_column}


def load_documents(data: ml_collections.ConfigDict, source: dict[str, Any], datasets_cache: str,
                   progress: bool = True):
    """A `datasets.Dataset` of string columns named as `columns(data)`'s keys ("text", or "prompt" and
    "completion"), one row per document or example, in source order."""
    import datasets

    if source["kind"] == "pystdlib":
        rows = docstring_to_code() if data_format(data) == "prompt_completion" else {"text": pystdlib_documents()}
        return datasets.Dataset.from_dict(rows)
    files = [f for f, _, _ in source["files"]] if source["kind"] == "local" else []
    try:
        with _datasets_quiet(progress):
            if source["kind"] == "hub":
                ds = datasets.load_dataset(data.dataset, data.dataset_config, split=data.split)
            else:
                with_rows = _files_with_rows(files) if source["loader"] == "parquet" else files
                if not with_rows:
                    raise UserError(f"data.dataset={data.dataset!r} has no documents (its .parquet files have no rows)")
                kwargs = {"sample_by": data.text_sample_by} if source["loader"] == "text" else {}
                ds = datasets.load_dataset(source["loader"], data_files=with_rows, split="train",
                                           cache_dir=datasets_cache, **kwargs)
    except UserError:
        raise
    except Exception as e:  # offline, unknown dataset, malformed file: one line for the user, naming the cause
        raise UserError(_load_failure(data.dataset, files, e)) from None
    wanted = {"text": "text"} if source["kind"] == "local" and source["loader"] == "text" else columns(data)
    for role, column in wanted.items():
        if column not in ds.column_names:
            raise UserError(f"data.{role}_column={column!r} is not a column of {data.dataset!r} "
                            f"(it has {', '.join(ds.column_names)})")
        _check_text_column(ds, column, data.dataset, role)
    ds = ds.select_columns(list(wanted.values()))
    return ds.rename_columns({column: role for role, column in wanted.items() if column != role})


@contextlib.contextmanager
def _datasets_quiet(progress: bool) -> Iterator[None]:
    """`datasets` without its error log lines (the UserError names the cause) and, unless `progress`, its bars."""
    import datasets

    logger, bars_were_on = logging.getLogger("datasets"), datasets.is_progress_bar_enabled()
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    if not progress:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def _files_with_rows(parquet_files: list[str]) -> list[str]:
    """The .parquet files that have rows (`datasets` fails on one without); an unreadable one is named."""
    import pyarrow.parquet as pq

    with_rows = []
    for path in parquet_files:
        try:
            with_rows += [path] if pq.read_metadata(path).num_rows else []
        except Exception as e:
            raise UserError(f"{path}: not a readable .parquet file ({describe(e)})") from None
    return with_rows


def _load_failure(dataset: str, files: list[str], error: BaseException) -> str:
    """One line for a failed `datasets.load_dataset`: the underlying cause and, when known, its file."""
    causes = _causes(error)
    no_rows = type(causes[-1]).__name__ in ("SchemaInferenceError", "StopIteration")  # datasets' ways of saying
    if no_rows or "corresponds to no data" in str(causes[-1]):  # that the files hold not one row
        return f"data.dataset={dataset!r} has no documents"
    where = "local files" if files else "the Hugging Face Hub (offline?)"
    named = []  # the source file being read: datasets' loaders hold it in a local variable where they fail
    for cause in causes:
        tb = cause.__traceback__
        while tb is not None:
            named += [v for v in tb.tb_frame.f_locals.values() if isinstance(v, str) and v in files]
            tb = tb.tb_next
    return (f"data.dataset={dataset!r}: could not be loaded from {where}: "
            f"{named[-1] + ': ' if named else ''}{describe(causes[-1])}")


def _causes(error: BaseException) -> list[BaseException]:
    """`error` and what it stands for, outermost first: explicit causes (`raise ... from`), and implicit
    contexts out of `datasets`' own exceptions only (DatasetGenerationError hides the real error there);
    the context of a real error is a failed fallback (datasets' JSON loader re-raises pyarrow's error
    from inside its pandas retry), not the reason."""
    chain = [error]
    while True:
        e = chain[-1]
        wrapper = type(e).__module__.split(".")[0] == "datasets" and not e.__suppress_context__
        following = e.__cause__ or (e.__context__ if wrapper else None)
        if following is None or any(following is seen for seen in chain):
            return chain
        chain.append(following)


def _check_text_column(ds: Any, column: str, dataset: str, role: str = "text") -> None:
    """Documents (prompts, completions) must be strings: not numbers, lists or bytes, and not null."""
    dtype = getattr(ds.features[column], "dtype", type(ds.features[column]).__name__)
    if dtype not in ("string", "large_string"):
        raise UserError(f"data.{role}_column={column!r} of {dataset!r} holds {dtype} values, not text")
    values = ds.data.column(column)
    if values.null_count:
        import pyarrow.compute as pc

        first = pc.index(values.is_null(), True).as_py()
        raise UserError(f"data.{role}_column={column!r} of {dataset!r} is null in {values.null_count:,} row(s), "
                        f"the first is row {first:,}: give them text or drop them")


