"""The training loop: `gpt2jax train` calls `run_training`.

It reads top to bottom. `plan_run` validates and resolves the experiment, prepares the data and the
initial parameters, and checks the run directory, writing nothing. `Run` then owns the resources of
the run (lock, run.json status, checkpoints, logs, batches, progress) in one `ExitStack` and the
named actions of the loop, each on its cadence: `log` (the only host sync between log steps: metrics
and the finiteness check), `evaluate`, `sample`, `save`. The run-directory rules live in
`gpt2jax.rundir`, the pure steps in `gpt2jax.train`, the Orbax checkpoints in `gpt2jax.checkpoint`.

Stop signals: SIGTERM and SIGINT set a flag (`StopSignals`); the loop finishes its step, saves and
raises `Stopped`. With several processes the flag is agreed at log steps, so all stop together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from gpt2jax import attention, hf, perf, rundir
from gpt2jax import batches, textgen
from gpt2jax.batches import Placement, Prefetcher
from gpt2jax.checkpoint import Checkpoints, check_steps_are_directories
from gpt2jax.config import GPT2Config
from gpt2jax.data import TokenBins, prepare
from gpt2jax.errors import Stopped, UserError
from gpt2jax.experiment import RESUME_SAFE_KEYS, base_config, experiment_model, resolve, validate_experiment
from gpt2jax.logs import Progress, RunLog, run_info
from gpt2jax.model import GPT2LMHeadModule, init_params
from gpt2jax.tokenizer import Tokenizer, load_tokenizer
from gpt2jax.parallel import Layout, first_copy, make_layout, state_shards
from gpt2jax.train import TrainState, init_state, make_optimizer


def host_sync() -> Any:
    """Marks the loop's host syncs (its actions): device-to-host transfers are allowed inside. Run under
    `jax.transfer_guard_device_to_host("disallow_explicit")` on an accelerator, the loop proves it has no
    others (scripts/gpu_check.sh does; CPU arrays are never transferred, so the guard sees nothing there)."""
    return jax.transfer_guard_device_to_host("allow")


class StopSignals:
    """SIGTERM and SIGINT set `received` instead of killing: the loop finishes its step, saves and stops."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def poll(self, step: int, log_step: bool) -> int | None:
        """The signal to stop on after `step`, if any: checked every step with one process; with several,
        agreed at log steps (a collective), so that every process stops after the same step."""
        if jax.process_count() == 1:
            return self.received
        return self.agreed() if log_step else None

    def agreed(self) -> int | None:
        """The signal, once any process has seen one (a collective: every process must call it)."""
        from jax.experimental import multihost_utils

        with host_sync():
            seen = multihost_utils.process_allgather(np.array(self.received or 0, np.int32))
        return int(seen.max()) or None


@dataclasses.dataclass
class Plan:
    """Everything decided before the run directory is touched."""

    config: ml_collections.ConfigDict
    resolved: dict[str, Any]  # the config as it runs (config.json)
    model: GPT2Config
    bins: TokenBins
    tokenizer: Tokenizer
    initial_params: Any  # None: a scratch init (`init_params(model, train.seed)`), computed where the state goes
    attention: tuple[str, str]  # (implementation, why) of the train step's attention
    overwrite: list[str]  # run entries --overwrite removes
    fork_from: str | None
    placeholder: bool = False  # the run's start is not initial_params (its init_from is gone): restore must succeed


def plan_run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool, fork_from: str | None,
             progress: bool) -> Plan:
    """Validate and resolve everything a run needs; raises UserError before anything is written."""
    resuming = workdir if not overwrite and not fork_from and _has_a_step(workdir) else None
    validate_experiment(config, jax.device_count(), resuming)
    platform = attention.current_platform()
    attention.check_platform(config.model.attention, platform)  # before minutes of tokenizing
    rundir.check_workdir(workdir)
    if not overwrite and os.path.isfile(os.path.join(workdir, "config.json")):
        rundir.read_resolved_config(workdir)  # a damaged run is reported before minutes of tokenizing
    if fork_from is not None:
        rundir.check_fork_target(workdir, fork_from)
    removed = rundir.check_overwrite(workdir) if overwrite else []
    if not overwrite:
        check_steps_are_directories(workdir)
    tokenizer = load_tokenizer(config.data.tokenizer)
    t = config.train
    perf.check_fits(experiment_model(config, len(tokenizer), tokenizer.eos_token_id, resuming),  # before tokenizing
                    t.global_batch_size // (jax.device_count() * t.grad_accum_steps), config.data.block_size,
                    train=True, what="training this model", state_shards=state_shards(t.parallelism, t.fsdp_size))
    # data.prepare's bars redraw with carriage returns: on a terminal only
    bins = prepare(config.data, progress=progress and jax.process_index() == 0 and sys.stderr.isatty())
    model = experiment_model(config, bins.meta["vocab_size"], bins.meta["eos_token_id"], resuming)
    packed = config.data.format == "prompt_completion" and config.data.packing
    runs = attention.check(model, platform, config.data.block_size, train=uses_dropout(model), packed=packed)
    resolved = resolve(config, model)
    if not overwrite and not fork_from:
        rundir.check_resumable(workdir, resolved, RESUME_SAFE_KEYS, rundir.flatten(base_config().to_dict()))
        check_same_data(workdir, bins)
    source_gone = config.init_from != "scratch" and not os.path.isdir(os.path.expanduser(config.init_from))
    # a resumed fine-tune whose init_from is gone starts from its checkpoint, never from a scratch init
    initial = None if source_gone else initial_params(config, model)
    return Plan(config, resolved, model, bins, tokenizer, initial, runs, removed, fork_from, placeholder=source_gone)


def _has_a_step(workdir: str) -> bool:
    return rundir.has_checkpoints(workdir) and Checkpoints(workdir, read_only=True).latest_step() is not None


def check_same_data(workdir: str, bins: TokenBins) -> None:
    """Resuming continues on the data the run's latest checkpoint was trained on, or refuses in one line: the
    config can name the same file while its text changed. Checkpoints written before runs recorded their data
    carry no fingerprint and are not checked."""
    if not rundir.has_checkpoints(workdir):
        return
    checkpoints = Checkpoints(workdir, read_only=True)
    step = checkpoints.latest_step()
    recorded = None if step is None else checkpoints.data_position(step).get("data")
    if recorded is not None and recorded != bins.fingerprint:
        raise UserError(f"{workdir} was trained on other data: its step {step} recorded token bins {recorded}, the "
                        f"data now gives {bins.fingerprint} (the text changed since); use --fork NEW_DIR to continue "
                        "from its checkpoint on this data, or --overwrite")


def uses_dropout(model: GPT2Config) -> bool:
    return max(model.resid_pdrop, model.embd_pdrop, model.attn_pdrop) > 0


def initial_params(config: ml_collections.ConfigDict, model: GPT2Config) -> Any:
    """None for a scratch init (computed later, where the state goes: sharded under fsdp), or the params of an
    HF directory or a run's latest checkpoint, checked name by name."""
    source = os.path.expanduser(config.init_from)
    if config.init_from == "scratch":
        return None
    if rundir.has_checkpoints(source):
        params = Checkpoints(source, read_only=True).restore_params("latest").state["params"]
        return hf.checked_params(params, model)
    return hf.from_hf_state_dict(hf.load_state_dict(source), model)


def run_training(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    progress: bool = True,
    overwrite: bool = False,
    fork_from: str | None = None,
    stop_signals: StopSignals | None = None,
) -> dict[str, Any]:
    """Train as `config` says into `workdir`, resuming from its latest good checkpoint.

    `overwrite` discards a run already in `workdir` (only a run's own files); `fork_from` starts a new
    run in `workdir` from the latest checkpoint of another run directory (state, optimizer and step).
    Raises `Stopped` after SIGTERM / SIGINT (or whatever `stop_signals` reports) once the checkpoint of
    the current step is saved. Returns the last metrics."""
    t = config.train
    with contextlib.ExitStack() as stack:
        with host_sync():  # setting up may read device values; the loop below only at its actions
            plan = plan_run(config, workdir, overwrite, fork_from, progress)
            stop = stack.enter_context(stop_signals or StopSignals())
            run = Run(plan, workdir, stack, progress)
            start, p_state = run.restore()
        prefetched = stack.enter_context(contextlib.closing(
            Prefetcher(lambda step: run.layout.batch(run.sampler(step)), start_step=start)))
        for step in range(start, t.max_steps):
            _, batch = next(prefetched)
            p_state, metrics = run.layout.train(p_state, batch)
            done = step + 1
            run.record(metrics, compiled=step == start)
            signum = stop.poll(done, log_step=done % t.log_every == 0)
            saving = done % t.checkpoint_every == 0 or done == t.max_steps or signum is not None
            logging = done % t.log_every == 0 or done == t.max_steps
            if logging or saving:  # metrics are checked before every save; written at log steps only
                run.log(done, write=logging)
            actions_start = time.perf_counter()
            val_loss = run.evaluate(done, p_state.params) if run.eval_due(done) else None
            if t.sample_every and done % t.sample_every == 0:
                run.sample(done, p_state.params)
            if saving:
                run.save(done, p_state, val_loss)
            if signum is not None:
                raise Stopped(done, signum)
            if not run.pending:  # logged: eval, sample and save stay out of the next interval's throughput
                run.restart_clock()
            elif logging or saving:  # checked, so the device was idle: the actions' time stays out of it too
                run.interval_start += time.perf_counter() - actions_start
        run.finished()
    return run.last


class Run:
    """The resources of one training run and the named actions of its loop."""

    def __init__(self, plan: Plan, workdir: str, stack: contextlib.ExitStack, progress: bool):
        c, t = plan.config, plan.config.train
        self.plan, self.workdir, self.t = plan, workdir, t
        self.main = jax.process_index() == 0
        if self.main:
            stack.enter_context(contextlib.closing(rundir.lock(workdir)))
            rundir.remove_run_entries(workdir, plan.overwrite)
            rundir.write_json(os.path.join(workdir, "config.json"), plan.resolved)
        implementation, why = plan.attention
        if self.main:
            print(attention.describe(implementation, why), flush=True)
        info = run_info() | {"forked_from": plan.fork_from, "attention": {"implementation": implementation, "why": why}}
        self.status = stack.enter_context(rundir.RunStatus(workdir, info, enabled=self.main))
        self.checkpoints = stack.enter_context(contextlib.closing(
            Checkpoints(workdir, keep=t.keep_checkpoints, keep_best=t.keep_best)))
        self.log_file = stack.enter_context(contextlib.closing(RunLog(workdir, enabled=self.main)))
        stack.callback(lambda: self.log_file.hparams(rundir.flatten(plan.resolved), {
            k: v for k, v in self.last.items() if k in ("loss", "val_loss")}))
        self.progress = stack.enter_context(contextlib.closing(
            Progress(t.max_steps, enabled=progress and self.main)))
        module = GPT2LMHeadModule(plan.model)
        self.optimizer, schedule = make_optimizer(c.optim, t.max_steps)
        m = plan.model
        self.abstract_state = jax.eval_shape(self.initial_state, plan.initial_params)
        self.layout: Layout = make_layout(t.parallelism, t.fsdp_size, module, self.optimizer, schedule,
                                          t.grad_accum_steps, uses_dropout(m), self.abstract_state)
        if self.main:
            print(self.layout.describe(self.abstract_state, m.num_parameters()), flush=True)
        block = c.data.block_size
        where = Placement(jax.process_index(), jax.process_count(), jax.local_device_count())
        self.sampler, val = batches.for_run(plan.bins, c.data, t, where)
        self.val = [self.layout.batch(b) for b in val]
        if self.main and hasattr(self.sampler, "describe"):
            print(self.sampler.describe(), flush=True)
        self.tokens_per_step, self.flops_per_token = t.global_batch_size * block, m.flops_per_token(block)
        self.peak = perf.device_peak()
        self.pending: list[dict] = []
        self.last: dict[str, Any] = {}
        self.restart_clock()

    def initial_state(self, params: Any) -> TrainState:
        """The state of step 0: `params`, or the scratch init when None."""
        params = init_params(self.plan.model, self.t.seed) if params is None else params
        return init_state(params, self.optimizer, self.t.seed)

    def restore(self) -> tuple[int, TrainState]:
        """(first step, state placed for the step): the latest good checkpoint of this run (or of the run it
        forks), restored straight into the layout's shardings, else step 0 with the planned initial
        parameters."""
        target = self.layout.restore_target(self.abstract_state)
        source = Checkpoints(self.plan.fork_from, read_only=True) if self.plan.fork_from else self.checkpoints
        found = source.restore_latest_good(target)
        if found is None and self.plan.placeholder:
            raise UserError(f"{self.workdir} has no readable checkpoint and its init_from="
                            f"{self.plan.config.init_from!r} is gone: there is nothing to start from")
        start = 0 if found is None else found.step
        if found is None:
            state = self.layout.initial_state(self.initial_state, self.plan.initial_params)
        else:
            state = self.layout.place(found.state)
            if not self.plan.fork_from:  # the steps since the last log step, for the next record to average
                self.pending = list(found.data.get("unlogged_metrics", []))
            if self.main:
                print(f"{'forking ' + self.plan.fork_from if self.plan.fork_from else 'resuming ' + self.workdir} "
                      f"from step {start}")
        self._set_aside_unreadable()
        if self.main:
            rundir.repair_metrics(self.workdir, start)
        self.progress.start(start)
        self.plan = dataclasses.replace(self.plan, initial_params=None)  # not kept on a device for the whole run
        return start, state

    def _set_aside_unreadable(self) -> None:
        """Steps of this run that failed to restore are moved aside, so the loop can save those steps again."""
        if self.main:
            for path in self.checkpoints.set_aside_unreadable():
                print(f"gpt2jax: moved the unreadable checkpoint to {path}", file=sys.stderr)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("gpt2jax: unreadable checkpoints set aside")
            self.checkpoints.manager.reload()

    def record(self, metrics: dict, compiled: bool) -> None:
        """Keep a step's device metrics for the next log; the first step's compile is not timed."""
        self.pending.append(metrics)
        if compiled:
            with host_sync():  # the compile is not timed
                jax.block_until_ready(metrics)
            self.restart_clock()
        else:
            self.timed_steps += 1

    def log(self, done: int, write: bool = True) -> None:
        """Fetch the pending metrics (the host sync) and refuse non-finite values; with `write`, write and show
        them. Checked but not written (a save between log steps), they stay pending as host floats, which the
        checkpoint keeps: a run stopped there and resumed logs the same records as one that never stopped."""
        with host_sync():
            host = jax.device_get(self.pending)
        bad = first_non_finite(host, done)
        if bad is not None:
            raise UserError(f"non-finite {bad[1]} at step {bad[0]}; stopped without checkpointing it "
                            f"(latest good checkpoint: {self.checkpoints.latest_step()})")
        if not write:
            self.pending = [{key: first_copy(value) for key, value in metrics.items()} for metrics in host]
            return
        self.last = summarize(host, done, self.timed_steps, time.perf_counter() - self.interval_start,
                              self.tokens_per_step, self.flops_per_token, self.peak.flops_per_second * perf.chips(),
                              self.peak.source)
        self.log_file.metrics(done, "train", self.last)
        self.progress.update(done, self.last)
        self.pending = []

    def restart_clock(self) -> None:
        self.timed_steps, self.interval_start = 0, time.perf_counter()

    def eval_due(self, done: int) -> bool:
        return bool(self.val) and (done % self.t.eval_every == 0 or done == self.t.max_steps)

    def evaluate(self, done: int, device_params: Any) -> float:
        with host_sync():
            sums, counts = zip(*[self.layout.evaluate(device_params, b) for b in self.val])
            val_loss = float(np.sum(sums) / max(np.sum(counts), 1))
        self.last["val_loss"] = val_loss
        self.log_file.metrics(done, "val", {"loss": val_loss, "perplexity": float(np.exp(val_loss)),
                                            "tokens_seen": done * self.tokens_per_step})
        return val_loss

    def sample(self, done: int, device_params: Any) -> None:
        with host_sync():
            params = self.layout.host_params(device_params)  # a collective under fsdp: every process takes part
            if self.main:
                for sample in textgen.training_samples(self.plan.model, params, self.plan.tokenizer, self.plan.bins,
                                                       self.t, seed=done):
                    self.log_file.sample(done, **sample)

    def save(self, done: int, p_state: TrainState, val_loss: float | None) -> None:
        with host_sync():
            self.checkpoints.save(done, self.layout.for_checkpoint(p_state),
                                  data={"step": done, "seed": self.t.seed, "data": self.plan.bins.fingerprint,
                                        "unlogged_metrics": self.pending},  # host floats: `log` checked them
                                  config=self.plan.resolved, meta={"loss": self.last.get("loss")}, val_loss=val_loss)

    def finished(self) -> None:
        self.status.finish()


LAST_VALUE_METRICS = ("lr", "param_norm")  # states at the step logged, not quantities of each step


def summarize(host: list[dict], done: int, timed_steps: int, seconds: float, tokens_per_step: int,
              flops_per_token: float, peak: float, peak_source: str = "measured") -> dict[str, Any]:
    """Train metrics of the steps since the last log: every scalar the step returns, averaged over those steps
    (states such as lr and param_norm: their value at the log step), and throughput, only over steps timed
    without compiling. A metric added to `train.train_step` reaches metrics.jsonl and TensorBoard as is."""
    out = {key: first_copy(host[-1][key]) if key in LAST_VALUE_METRICS
           else float(np.mean([first_copy(m[key]) for m in host if key in m])) for key in host[-1]}
    out["tokens_seen"] = done * tokens_per_step
    if timed_steps:
        tokens_per_s = timed_steps * tokens_per_step / seconds
        out.update(tokens_per_s=tokens_per_s, step_time_ms=1e3 * seconds / timed_steps,
                   mfu=perf.mfu(tokens_per_s, flops_per_token, peak), mfu_peak=peak_source)
    return out


def first_non_finite(host: list[dict], done: int) -> tuple[int, str] | None:
    """(step, what) of the first step whose loss, gradient norm or updated parameters are not finite."""
    for i, metrics in enumerate(host):
        for key, what in (("loss", "loss"), ("grad_norm", "gradient"), ("param_norm", "parameters after the update")):
            if not np.isfinite(first_copy(metrics[key])):
                return done - len(host) + 1 + i, what
    return None
