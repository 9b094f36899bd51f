"""Batches from token bins: the deterministic sampler, the fixed validation set, prefetching.

The batch for step s is a pure function of (seed, s, process index, process count): random
windows of block_size + 1 tokens (nanoGPT style), each process reading only its slice,
shaped (local devices, per-device batch, T) for pmap.

Legend (the package's, gpt2jax/__init__.py): G global batch (sequences), C local devices, B per-device batch,
T block size, W = T + 1 tokens per window (inputs and the targets shifted by one).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any

import numpy as np

from gpt2jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where this process's part of a global batch goes: its index among `process_count` processes, each
    reading a contiguous slice of the rows, split over its `local_device_count` devices."""

    process_index: int = 0
    process_count: int = 1
    local_device_count: int = 1

    def rows(self, global_batch_size: int) -> slice:
        """This process's rows of a global batch of `global_batch_size` sequences."""
        if global_batch_size % (self.process_count * self.local_device_count):
            raise UserError(f"global batch {global_batch_size} is not divisible by {self.process_count} processes x "
                            f"{self.local_device_count} local devices")
        local_batch = global_batch_size // self.process_count
        return slice(self.process_index * local_batch, (self.process_index + 1) * local_batch)


def check_one_window(num_tokens: int, block_size: int, what: str, hint: str = "") -> None:
    """The one check that `what` holds at least one window of block_size + 1 tokens (inputs and the targets
    shifted by one): for the bins a run trains and validates on, and for the text eval reads."""
    if num_tokens < block_size + 1:
        raise UserError(f"{what} has {num_tokens} tokens, fewer than one window of block_size + 1 = "
                        f"{block_size + 1}{'; ' + hint if hint else ''}")


def windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> np.ndarray:
    """(N, W) int32: the windows of W = block_size + 1 tokens starting at the N `starts`."""
    return tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int32)


class BatchSampler:
    """Training batches as a pure function of (seed, step, placement).

    The global batch for step s is `global_batch_size` random windows of block_size + 1
    tokens; each process reads only its contiguous slice of those rows, shaped
    (local devices, per-device batch, T) for pmap.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, global_batch_size: int, seed: int,
                 placement: Placement = Placement()):
        self.rows = placement.rows(global_batch_size)
        check_one_window(len(tokens), block_size, "the train split")
        self.tokens, self.block_size, self.seed = tokens, block_size, seed
        self.global_batch_size, self.local_device_count = global_batch_size, placement.local_device_count

    def global_offsets(self, step: int) -> np.ndarray:
        """Start of every window of the global batch of `step`."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.block_size, size=self.global_batch_size)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        return windows_to_batch(self.tokens, self.global_offsets(step)[self.rows], self.block_size,
                                self.local_device_count)


def validation_batches(tokens: np.ndarray, block_size: int, global_batch_size: int, num_batches: int,
                       placement: Placement = Placement()) -> list[dict[str, np.ndarray]]:
    """The fixed validation set: num_batches global batches of windows spread evenly over the split."""
    rows = placement.rows(global_batch_size)
    check_one_window(len(tokens), block_size, "the val split")
    starts = np.linspace(0, len(tokens) - block_size - 1, num_batches * global_batch_size).astype(np.int64)
    return [
        windows_to_batch(tokens, batch_starts[rows], block_size, placement.local_device_count)
        for batch_starts in starts.reshape(num_batches, global_batch_size)
    ]


def windows_to_batch(tokens: np.ndarray, starts: np.ndarray, block_size: int, local_device_count: int) -> dict:
    """{"inputs", "targets"}: (C, B, T) int32 from the windows starting at `starts`, split over C devices."""
    windows_CxBxW = windows(tokens, starts, block_size).reshape(local_device_count, -1, block_size + 1)
    return {"inputs": windows_CxBxW[..., :-1], "targets": windows_CxBxW[..., 1:]}


class Prefetcher:
    """Runs `produce(step)` for step = start, start + 1, ... in a background thread, `depth` ahead."""

    def __init__(self, produce, start_step: int, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce, start_step), daemon=True)
        self._thread.start()

    def _run(self, produce, step: int) -> None:
        while not self._stop.is_set():
            try:
                item = (step, produce(step), None)
            except Exception as e:  # handed to the consumer, raised there
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return
            step += 1

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, Any]:
        step, value, error = self._queue.get()
        if error is not None:
            raise error
        return step, value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------------------------
# Task examples (data.format = "prompt_completion", gpt2jax.examples): rows of whole examples.
#
# An example of n tokens (prompt, completion, EOS; cut to W = T + 1) gives n - 1 (input, target) positions;
# the targets that are prompt tokens are -100 (IGNORE_INDEX), so the loss counts the completion only.
# Packed, several examples share a row, each with its own positions (from 0) and segment id (1, 2, ...),
# attending only to itself; the rest of a row is padding (segment 0, targets -100). Padded, each row holds
# one example: causal attention alone keeps its positions from seeing the padding after it.

IGNORE_INDEX = -100  # gpt2jax.model's: targets that do not count


def example_positions(index_Nx4: np.ndarray, block_size: int) -> np.ndarray:
    """Positions (input, target pairs) each example fills in a row: its tokens, cut to block_size + 1, less one."""
    return np.minimum(index_Nx4[:, 2], block_size + 1) - 1


def pack(lengths: np.ndarray, block_size: int, seed: int) -> list[np.ndarray]:
    """Rows of example indices whose lengths fit in block_size positions: best-fit decreasing (each example,
    longest first, goes to the fullest row it fits; ties broken by a seeded permutation), which leaves about
    as little padding as packing can while keeping every example whole."""
    order = np.random.default_rng([seed, 1]).permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]
    rows: list[list[int]] = []
    open_by_room: list[list[int]] = [[] for _ in range(block_size + 1)]  # rows by the positions they have left
    room_count = np.zeros(block_size + 1, np.int64)
    for example in order:
        length = int(lengths[example])
        fits = np.flatnonzero(room_count[length:])
        if len(fits):
            room = length + int(fits[0])
            row = open_by_room[room].pop()
            room_count[room] -= 1
        else:
            room, row = block_size, len(rows)
            rows.append([])
        rows[row].append(int(example))
        open_by_room[room - length].append(row)
        room_count[room - length] += 1
    return [np.asarray(row) for row in rows]


def lay_out(lengths: np.ndarray, block_size: int, packed: bool, seed: int) -> list[np.ndarray]:
    """The rows of examples of `lengths` positions: packed (`pack`), or one example per row."""
    return pack(lengths, block_size, seed) if packed else [np.array([i]) for i in range(len(lengths))]


def example_rows(tokens: np.ndarray, index_Nx4: np.ndarray, rows: list[np.ndarray], block_size: int, pad_id: int,
                 packed: bool) -> dict[str, np.ndarray]:
    """(len(rows), T) int32 "inputs" and "targets" (-100 on prompts and padding) of the rows, each a list of
    examples; packed rows also carry each example's "positions" and "segments"."""
    T = block_size
    out = {"inputs": np.full((len(rows), T), pad_id, np.int32),
           "targets": np.full((len(rows), T), IGNORE_INDEX, np.int32)}
    if packed:
        out.update(positions=np.zeros((len(rows), T), np.int32), segments=np.zeros((len(rows), T), np.int32))
    for r, members in enumerate(rows):
        at = 0
        for segment, example in enumerate(members, 1):
            start, prompt, length, _ = index_Nx4[example]
            ids = np.asarray(tokens[start: start + min(length, T + 1)], np.int32)
            n = len(ids) - 1
            out["inputs"][r, at: at + n] = ids[:-1]
            out["targets"][r, at + prompt - 1: at + n] = ids[prompt:]  # the completion (and EOS) only
            if packed:
                out["positions"][r, at: at + n] = np.arange(n)
                out["segments"][r, at: at + n] = segment
            at += n
    return out


class ExampleSampler:
    """Training batches of task examples as a pure function of (seed, step, placement), as `BatchSampler`'s
    are: the examples are laid in rows once (packed, or one per row), and epoch e visits the rows in the
    order of a permutation seeded by (seed, e); the global batch of step s is rows s*G ... s*G + G - 1 of
    that endless sequence, each process reading its contiguous slice."""

    def __init__(self, tokens: np.ndarray, index_Nx4: np.ndarray, block_size: int, global_batch_size: int, seed: int,
                 placement: Placement = Placement(), packed: bool = True, pad_id: int = 0):
        self.rows = placement.rows(global_batch_size)
        if len(index_Nx4) == 0:
            raise UserError("the train split has no examples; lower data.val_fraction or add examples")
        self.tokens, self.index, self.block_size, self.seed = tokens, index_Nx4, block_size, seed
        self.global_batch_size, self.local_device_count = global_batch_size, placement.local_device_count
        self.packed, self.pad_id = packed, pad_id
        self.validation = ""  # what the run's validation set scores of the held-out examples (`for_run`)
        self.lengths = example_positions(index_Nx4, block_size)
        self.layout = lay_out(self.lengths, block_size, packed, seed)
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.layout))}
        return self._orders[epoch]

    def global_rows(self, step: int) -> list[np.ndarray]:
        """The rows (lists of examples) of the global batch of `step`."""
        positions = step * self.global_batch_size + np.arange(self.global_batch_size)
        R = len(self.layout)
        return [self.layout[self._order(int(p // R))[p % R]] for p in positions]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        batch = example_rows(self.tokens, self.index, self.global_rows(step)[self.rows], self.block_size,
                             self.pad_id, self.packed)
        return {name: x.reshape(self.local_device_count, -1, self.block_size) for name, x in batch.items()}

    def describe(self) -> str:
        """One line for the start of a run: how the examples fill the rows."""
        lengths = self.lengths
        prompts = np.minimum(self.index[:, 1], lengths + 1) - 1
        positions = len(self.layout) * self.block_size
        cut = int(np.sum(self.index[:, 2] > self.block_size + 1))
        how = "packed" if self.packed else "one per row, padded"
        return (f"data: {len(self.index):,} train examples in {len(self.layout):,} rows of {self.block_size} ({how}): "
                f"{lengths.sum() / positions:.1%} of positions filled, {(lengths - prompts).sum() / positions:.1%} "
                f"counted (completions)" + (f"; {cut:,} examples cut to block_size + 1 tokens" if cut else "")
                + (f"\n{self.validation}" if self.validation else ""))


def example_validation_batches(tokens: np.ndarray, index_Nx4: np.ndarray, block_size: int, global_batch_size: int,
                               num_batches: int, placement: Placement = Placement(), packed: bool = True,
                               pad_id: int = 0) -> tuple[list[dict[str, np.ndarray]], int]:
    """(batches, examples in them): the fixed validation set of task examples, the rows (packed as training packs
    them, or one per row) of as many of the split's first examples as num_batches global batches hold
    (`validation_layout`), the last batch filled with empty rows (nothing counted)."""
    rows = placement.rows(global_batch_size)
    layout, count = validation_layout(index_Nx4, block_size, num_batches * global_batch_size, packed)
    layout += [np.zeros(0, np.int64)] * (-len(layout) % global_batch_size)
    batches = []
    for first in range(0, len(layout), global_batch_size):
        batch = example_rows(tokens, index_Nx4, layout[first: first + global_batch_size][rows], block_size, pad_id,
                             packed)
        batches.append({k: x.reshape(placement.local_device_count, -1, block_size) for k, x in batch.items()})
    return batches, count


def validation_layout(index_Nx4: np.ndarray, block_size: int, max_rows: int,
                      packed: bool) -> tuple[list[np.ndarray], int]:
    """(rows, examples in them): all the examples, or the longest prefix of them (in source order, a fair sample:
    the split is a hash of the text) whose rows fit in max_rows. Never the rows packing fills first, which are
    its longest examples."""
    if len(index_Nx4) == 0:
        raise UserError("the val split has no examples; raise data.val_fraction or add examples")
    lengths = example_positions(index_Nx4, block_size)
    lay = lambda n: lay_out(lengths[:n], block_size, packed, seed=0)
    count = len(index_Nx4)
    layout = lay(count)
    while len(layout) > max_rows:
        count = max(1, min(count - 1, count * max_rows // len(layout)))
        layout = lay(count)
    return layout, count


def for_run(store: Any, data: Any, train: Any, placement: Placement) -> tuple[Any, list[dict[str, np.ndarray]]]:
    """(sampler, validation batches) of a run: windows of text bins, or rows of task examples (a store with
    an `index`, gpt2jax.examples), as the run's `data` and `train` groups say."""
    T, eval_batch = data.block_size, train.global_batch_size // train.grad_accum_steps
    no_val = data.val_fraction == 0
    if not hasattr(store, "index"):
        sampler = BatchSampler(store.tokens("train"), T, train.global_batch_size, train.seed, placement)
        val = [] if no_val else validation_batches(store.tokens("val"), T, eval_batch, train.eval_batches, placement)
        return sampler, val
    rows = dict(packed=data.packing, pad_id=store.meta["eos_token_id"])
    sampler = ExampleSampler(store.tokens("train"), store.index("train"), T, train.global_batch_size, train.seed,
                             placement, **rows)
    if no_val:
        return sampler, []
    held_out = store.index("val")
    val, scored = example_validation_batches(store.tokens("val"), held_out, T, eval_batch, train.eval_batches,
                                             placement, **rows)
    sampler.validation = (f"validation: {scored:,} of the {len(held_out):,} held-out examples"
                          + ("" if scored == len(held_out) else " (the first ones; raise train.eval_batches for all)"))
    return sampler, val
