"""The training loop and its run directory: `gpt2jax train` calls `run_training`.

runs/NAME/ holds config.json (resolved config), run.json (versions, devices, times, status),
metrics.jsonl, samples.jsonl, tb/ (TensorBoard) and checkpoints/. Starting the same command
again resumes from the latest checkpoint; a different config refuses.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import shutil
import signal
import time
from typing import Any, TextIO

import jax
import ml_collections
import numpy as np

from gpt2jax import hf
from gpt2jax.batches import BatchSampler, Prefetcher, validation_batches
from gpt2jax.checkpoint import Checkpoints
from gpt2jax.config import RESUME_SAFE_KEYS, GPT2Config, flatten, model_config, validate_experiment
from gpt2jax.data import prepare
from gpt2jax.errors import UserError
from gpt2jax.logs import RunLog, run_info, write_json
from gpt2jax.model import GPT2LMHeadModule
from gpt2jax.modeling import GPT2LMHeadModel, init_params, is_run_dir
from gpt2jax import perf
from gpt2jax.tokenizer import load_tokenizer
from gpt2jax.train import (global_replicated_sharding, init_state, make_optimizer, pmapped_steps, replicate,
                           shard_batch, to_global, unreplicate_to_host)

def resolve(config: ml_collections.ConfigDict, model: GPT2Config) -> dict[str, Any]:
    """The config as it runs: model sizes and vocab filled in, decay_steps made explicit."""
    resolved = json.loads(config.to_json())
    resolved["model"].update({k: v for k, v in dataclasses.asdict(model).items() if k not in ("dtype", "param_dtype")})
    resolved["optim"]["decay_steps"] = config.optim.decay_steps or config.train.max_steps
    return resolved


class Stopped(Exception):
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint at `step`."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped at step {step} by {signal.Signals(signum).name}; checkpoint saved")
        self.step, self.signum = step, signum


class StopSignals:
    """SIGTERM and SIGINT set a flag instead of killing: the loop finishes its step, saves and stops."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def agreed(self) -> int | None:
        """The signal, once every process has seen one (a collective when there are several)."""
        if jax.process_count() == 1:
            return self.signum
        from jax.experimental import multihost_utils

        seen = multihost_utils.process_allgather(np.array(self.signum or 0, np.int32))
        return int(seen.max()) or None


def lock_run_dir(workdir: str) -> TextIO:
    """Hold runs/NAME/.lock for the life of the trainer; a second trainer on the same run refuses."""
    os.makedirs(workdir, exist_ok=True)
    handle = open(os.path.join(workdir, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"{workdir} is in use by another trainer (pid {owner}); wait for it or use another --workdir")
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def check_run_dir(workdir: str, resolved: dict[str, Any]) -> None:
    """A new or empty directory, or one holding this same experiment (training then resumes)."""
    path = os.path.join(workdir, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            before = flatten(json.load(f))
        now = flatten(resolved)
        keys = (before.keys() | now.keys()) - RESUME_SAFE_KEYS
        changed = sorted(k for k in keys if before.get(k) != now.get(k))
        if changed:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4])
            raise UserError(f"{workdir} holds a run with a different config ({shown}); use another --workdir, "
                            "--fork NEW_DIR to continue from its checkpoint with this config, or --overwrite")
    elif os.path.exists(workdir) and set(os.listdir(workdir)) - {".lock"}:
        raise UserError(f"{workdir} exists and is not a gpt2jax run directory (no config.json); use another --workdir")


def clear_run_dir(workdir: str) -> None:
    """--overwrite: remove what an earlier run wrote (the lock stays, it is ours)."""
    for name in os.listdir(workdir):
        path = os.path.join(workdir, name)
        if name != ".lock":
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def initial_params(config: ml_collections.ConfigDict, model: GPT2Config) -> Any:
    """Scratch init, or the params of an HF directory or a run's latest checkpoint, checked name by name."""
    source = os.path.expanduser(config.init_from)
    if config.init_from == "scratch":
        return init_params(model, config.train.seed)
    if is_run_dir(source):
        params, _, _ = Checkpoints(source).restore_params("latest")
        return hf.from_hf_state_dict(hf.to_hf_state_dict(params), model)
    return hf.from_hf_state_dict(hf.load_state_dict(source), model)


def experiment_model(config: ml_collections.ConfigDict, vocab_size: int, eos_token_id: int) -> GPT2Config:
    """The experiment's model; fine-tuning takes the shape of the model it starts from."""
    model = model_config(config, vocab_size, eos_token_id)
    if config.init_from == "scratch":
        return model
    path = os.path.join(os.path.expanduser(config.init_from), "config.json")
    if is_run_dir(config.init_from):
        with open(path) as f:
            fields = json.load(f)["model"]
        source = GPT2Config(**{k: v for k, v in fields.items() if k in GPT2Config.__dataclass_fields__})
    else:
        source = GPT2Config.from_json_file(path)
    if source.vocab_size < vocab_size:
        raise UserError(f"init_from has vocab_size={source.vocab_size} but the tokenizer has {vocab_size} tokens")
    shape = {k: getattr(source, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                                             "activation_function", "layer_norm_epsilon")}
    return model.replace(**shape)


def run_training(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    progress: bool = True,
    overwrite: bool = False,
    fork_from: str | None = None,
) -> dict[str, float]:
    """Train as `config` says into `workdir`, resuming from its latest good checkpoint.

    `overwrite` discards a run already in `workdir`; `fork_from` starts a new run in `workdir`
    from the latest checkpoint of another run directory (state, optimizer and step). Raises
    `Stopped` after SIGTERM / SIGINT once the checkpoint of the current step is saved.
    Returns the last metrics."""
    from tqdm.auto import tqdm

    t = config.train
    validate_experiment(config, jax.device_count())
    main = jax.process_index() == 0
    bins = prepare(config.data, progress=progress and main)
    tokenizer = load_tokenizer(config.data.tokenizer)
    model = experiment_model(config, bins.meta["vocab_size"], bins.meta["eos_token_id"])
    resolved = resolve(config, model)
    if fork_from is not None and not is_run_dir(fork_from):
        raise UserError(f"--fork: {fork_from} is not a gpt2jax run directory")
    if fork_from is not None and os.path.isdir(workdir) and set(os.listdir(workdir)) - {".lock"}:
        raise UserError(f"--fork writes a new run into {workdir}, which is not empty")
    if not overwrite:
        check_run_dir(workdir, resolved)
    module = GPT2LMHeadModule(model)
    optimizer, schedule = make_optimizer(config.optim, t.max_steps)
    state = init_state(initial_params(config, model), optimizer, t.seed)
    lock = lock_run_dir(workdir) if main else None  # after everything that can fail on a user error
    info = run_info() | {"status": "running", "forked_from": fork_from}
    stop, prefetch, bar, checkpoints, log = StopSignals(), None, None, None, None
    last: dict[str, float] = {}
    try:
        if overwrite and main:
            clear_run_dir(workdir)
        if main:
            write_json(os.path.join(workdir, "config.json"), resolved)
            write_json(os.path.join(workdir, "run.json"), info)

        checkpoints = Checkpoints(workdir, keep=t.keep_checkpoints, keep_best=t.keep_best)
        replicated = global_replicated_sharding()
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
        found = (Checkpoints(fork_from) if fork_from else checkpoints).restore_latest_good(target)
        start = 0
        if found is not None:
            start, state, _ = found
            if main:
                print(f"{'forking ' + fork_from if fork_from else 'resuming ' + workdir} from step {start}")
        p_state = replicate(state)
        p_train, p_eval = pmapped_steps(module, optimizer, schedule, t.grad_accum_steps,
                                        dropout=max(model.resid_pdrop, model.embd_pdrop, model.attn_pdrop) > 0)

        local_devices, block = jax.local_device_count(), config.data.block_size
        sampler = BatchSampler(bins.tokens("train"), block, t.global_batch_size, t.seed, jax.process_index(),
                               jax.process_count(), local_devices)
        val_batch_size = t.global_batch_size // t.grad_accum_steps
        val = [] if config.data.val_fraction == 0 else [
            shard_batch(b) for b in validation_batches(bins.tokens("val"), block, val_batch_size, t.eval_batches,
                                                       jax.process_index(), jax.process_count(), local_devices)]
        log = RunLog(workdir, enabled=main)
        flops_per_token = model.flops_per_token(block)
        device_peak = perf.device_peak()
        peak = device_peak.flops_per_second * perf.chips()
        prefetch = Prefetcher(lambda step: shard_batch(sampler(step)), start_step=start)
        bar = tqdm(total=t.max_steps, initial=start, disable=not (progress and main), unit="step", dynamic_ncols=True)
        pending: list = []
        timed_steps, interval_start = 0, time.perf_counter()
        stop.__enter__()
        for step in range(start, t.max_steps):
            _, batch = next(prefetch)
            p_state, metrics = p_train(p_state, batch)
            pending.append(metrics)
            done = step + 1
            if step == start:  # keep compilation out of the throughput figures
                jax.block_until_ready(metrics)
                timed_steps, interval_start = 0, time.perf_counter()
            else:
                timed_steps += 1
            logging = done % t.log_every == 0
            stopping = stop.agreed() if (logging or jax.process_count() == 1) else None
            saving = done % t.checkpoint_every == 0 or done == t.max_steps or stopping is not None
            if logging or saving:  # metrics are checked before every save
                host = jax.device_get(pending)  # the only host sync of the train loop
                last = summarize(host, done, timed_steps, time.perf_counter() - interval_start,
                                 t.global_batch_size * block, flops_per_token, peak, device_peak.source)
                if not np.isfinite(last["loss"] + last["grad_norm"]):
                    raise UserError(f"non-finite loss or gradient at step {first_bad_step(host, done)}; stopped "
                                    f"without checkpointing it (latest good checkpoint: {checkpoints.latest_step()})")
                log.metrics(done, "train", last)
                bar.update(done - bar.n)  # at syncs only: between them dispatch runs ahead of the device
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last.get('tokens_per_s', 0):,.0f}",
                                mfu=f"{last.get('mfu', 0):.1%} of {device_peak.source} peak")
                pending = []
            val_loss = None
            if val and (done % t.eval_every == 0 or done == t.max_steps):
                val_loss = float(np.mean([np.asarray(p_eval(p_state.params, b))[0] for b in val]))
                last["val_loss"] = val_loss
                log.metrics(done, "val", {"loss": val_loss, "perplexity": float(np.exp(val_loss)),
                                          "tokens_seen": done * t.global_batch_size * block})
            if main and t.sample_every and done % t.sample_every == 0:
                log.sample(done, t.sample_prompt, sample_text(model, p_state.params, tokenizer, t, seed=done))
            if saving:
                checkpoints.save(done, to_global(p_state), data={"step": done, "seed": t.seed}, config=resolved,
                                 meta={"loss": last.get("loss")}, val_loss=val_loss)
            if stopping is not None:
                raise Stopped(done, stopping)
            if not pending:
                timed_steps, interval_start = 0, time.perf_counter()
        info["status"] = "finished"
    except (Stopped, KeyboardInterrupt):
        info["status"] = "stopped"
        raise
    except BaseException:
        info["status"] = "failed"
        raise
    finally:
        stop.__exit__()
        for resource in (prefetch, bar, checkpoints):
            if resource is not None:
                resource.close()
        if log is not None:
            log.hparams(flatten(resolved), {k: v for k, v in last.items() if k in ("loss", "val_loss")})
            log.close()
        if main:
            info["stopped"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            write_json(os.path.join(workdir, "run.json"), info)
        if lock is not None:
            lock.close()
    return last


def summarize(host: list[dict], done: int, timed_steps: int, seconds: float, tokens_per_step: int,
              flops_per_token: float, peak: float, peak_source: str = "measured") -> dict[str, Any]:
    """Train metrics of the steps since the last log (throughput only over steps timed without compiling)."""
    losses, norms = (np.array([m[k][0] for m in host]) for k in ("loss", "grad_norm"))
    out = {"loss": float(losses.mean()), "lr": float(host[-1]["lr"][0]), "grad_norm": float(norms.mean()),
           "tokens_seen": done * tokens_per_step}
    if timed_steps:
        tokens_per_s = timed_steps * tokens_per_step / seconds
        out.update(tokens_per_s=tokens_per_s, step_time_ms=1e3 * seconds / timed_steps,
                   mfu=perf.mfu(tokens_per_s, flops_per_token, peak), mfu_peak=peak_source)
    return out


def first_bad_step(host: list[dict], done: int) -> int:
    finite = [np.isfinite(m["loss"][0]) and np.isfinite(m["grad_norm"][0]) for m in host]
    return done - len(host) + 1 + finite.index(False)


def sample_text(
    model: GPT2Config, replicated_params: Any, tokenizer: Any, train: ml_collections.ConfigDict, seed: int
) -> str:
    """A text sample from the current params (process 0), logged during training."""
    prompt = tokenizer.encode(train.sample_prompt) or [tokenizer.eos_token_id]
    new_tokens = min(train.sample_tokens, model.n_positions - len(prompt))
    if new_tokens < 1:
        return ""
    lm = GPT2LMHeadModel(model, params=unreplicate_to_host(replicated_params))
    ids = lm.generate(np.array([prompt]), max_new_tokens=new_tokens, do_sample=True, top_k=50, seed=seed,
                      eos_token_id=-1)
    return tokenizer.decode(ids[0, len(prompt):])
