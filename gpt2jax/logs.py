"""What a run writes besides checkpoints: metrics.jsonl, samples.jsonl, TensorBoard events, run.json."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from typing import Any

import jax


class RunLog:
    """Metrics to `metrics.jsonl` and TensorBoard, samples to `samples.jsonl`; only process 0 writes."""

    def __init__(self, run_dir: str, enabled: bool = True):
        self.run_dir, self.enabled = run_dir, enabled
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def metrics(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": round(_now(), 3), **values}
        _append_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), record)
        for name, value in values.items():
            if isinstance(value, (int, float)):  # not labels such as mfu_peak
                self._tb.add_scalar(f"{split}/{name}", value, step)

    def sample(self, step: int, prompt: str, text: str, reference: str | None = None) -> None:
        """A sample: `text` generated after `prompt`; for a task, a held-out prompt's `reference` completion."""
        if not self.enabled:
            return
        record = {"step": step, "prompt": prompt, "text": text}
        if reference is not None:
            record["reference"] = reference
        _append_jsonl(os.path.join(self.run_dir, "samples.jsonl"), record)
        shown = f"```\n{prompt}{text}\n```"
        if reference is not None:
            shown += f"\n\nreference:\n```\n{prompt}{reference}\n```"
        self._tb.add_text("sample", shown, step)

    def hparams(self, flat_config: dict[str, Any], final: dict[str, float]) -> None:
        if self.enabled:
            values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_config.items()}
            self._tb.add_hparams(values, {f"hparams/{k}": v for k, v in final.items()}, name="hparams")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Progress:
    """The loop's progress: a tqdm bar on a terminal, else one line per log step (no carriage returns in logs)."""

    def __init__(self, total_steps: int, enabled: bool = True):
        self.total_steps, self.enabled = total_steps, enabled
        self._bar = None

    def start(self, step: int) -> None:
        if self.enabled and sys.stdout.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        """At log steps only: between them dispatch runs ahead of the device."""
        if not self.enabled:
            return
        text = f"loss {metrics['loss']:.4f}"
        if "tokens_per_s" in metrics:
            text += f", {metrics['tokens_per_s']:,.0f} tok/s, MFU {metrics['mfu']:.1%} of the {metrics['mfu_peak']} peak"
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(text)
        else:
            print(f"step {step}/{self.total_steps}: {text}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _now() -> float:
    return datetime.datetime.now(datetime.timezone.utc).timestamp()


def run_info() -> dict[str, Any]:
    """Versions, devices, processes, XLA flags and the git commit of the code that ran."""
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "datasets", "tiktoken"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    devices = jax.devices()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git_commit": _git_commit(),
        "argv": sys.argv,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _git_commit() -> str | None:
    source = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", source, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", source, "status", "--porcelain"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
