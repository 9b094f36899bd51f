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
