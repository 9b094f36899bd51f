"""Mutation testing: does the suite notice when the code is wrong?

Each mutation is a small, plausible bug. For each one this script copies the package to a scratch
directory, applies the bug there (the checkout is never touched), runs the tests that should catch it
with that copy first on PYTHONPATH, and reports caught (the tests failed) or MISSED (they passed).

    python scripts/mutate.py                 # every mutation; exit 1 if any is missed
    python scripts/mutate.py --list          # names only
    python scripts/mutate.py --only NAME ... # a few

Not part of CI: it re-runs tests once per mutation (about 15-25 minutes in all on 2 cores).
Add a mutation whenever a bug slips past the suite, together with the test that now catches it.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # path inside the repository, e.g. gpt2jax/model.py
    old: str  # source text that occurs exactly once in `file`
    new: str  # what replaces it
    tests: tuple[str, ...]  # pytest node ids that must fail


def M(name: str, file: str, old: str, new: str, tests: list[str]) -> Mutation:  # noqa: N802 (a table row)
    return Mutation(name, file, old, new, tuple(tests))


MUTATIONS = [
    # The five the issue found passing the whole suite.
    M("run-dir load returns a fresh init", "gpt2jax/modeling.py",
      'model = cls(config, params=jax.tree.map(jnp.asarray, restored.state["params"]))', "model = cls(config)",
      ["tests/test_checkpoint.py::test_run_dir_load_has_the_trainers_final_params"]),
    M("eval: perplexity = loss", "gpt2jax/evaluate.py",
      '"perplexity": math.exp(loss),', '"perplexity": loss,',
      ["tests/test_evaluate.py"]),
    M("eval: bits/byte with ln 10", "gpt2jax/evaluate.py",
      "(max(n_bytes, 1) * math.log(2))", "(max(n_bytes, 1) * math.log(10))",
      ["tests/test_evaluate.py"]),
    # The model, its fixtures and HF files.
    M(name="gelu_new computed as exact gelu", file="gpt2jax/config.py",
      old='"gelu_new": lambda x: jax.nn.gelu(x, approximate=True),',
      new='"gelu_new": lambda x: jax.nn.gelu(x, approximate=False),',
      tests=["tests/test_model.py::test_logits_match_transformers_fixture[gelu_new]",
             "tests/test_model.py::test_loss_matches_transformers_fixture[gelu_new]",
             "tests/test_model.py::test_grads_match_transformers_fixture[gelu_new]"]),
    M(name="sampling: no pad after a row's EOS", file="gpt2jax/sampling.py",
      old="token_B = jnp.where(state.done_B, values.pad_token_id, token_B)", new="token_B = token_B",
      tests=["tests/test_model.py::test_greedy_generation_with_eos_matches_transformers_fixture"]),
    M(name="sampling: slots after an early stop not padded", file="gpt2jax/sampling.py",
      old="return jnp.where(generated_L[None], state.tokens_BxL, pad_token_id)", new="return state.tokens_BxL",
      tests=["tests/test_model.py::test_greedy_generation_with_eos_matches_transformers_fixture"]),
    M(name="bf16 attention scaled by 1/head_dim", file="gpt2jax/model.py",
      old="out_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_BxTxS[:, None])",
      new=("out_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_BxTxS[:, None], "
           "scale=1.0 / cfg.head_dim if cfg.compute_dtype == jnp.bfloat16 else None)"),
      tests=["tests/test_model.py::test_bfloat16_logits_close_to_float32_with_peaked_attention"]),
    M(name="bf16 causal attention scaled by 1/head_dim", file="gpt2jax/model.py",
      old="jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, is_causal=True)",
      new=("jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, is_causal=True, "
           "scale=1.0 / cfg.head_dim if cfg.compute_dtype == jnp.bfloat16 else None)"),
      tests=["tests/test_model.py::test_bfloat16_logits_close_to_float32_with_peaked_attention"]),
    M(name="save_pretrained drops biases and LayerNorms", file="gpt2jax/hf.py",
      old='save_file(to_hf_state_dict(params), path + ".tmp", metadata={"format": "pt"})',
      new=('save_file({k: v for k, v in to_hf_state_dict(params).items() if not k.endswith(".bias") and "ln_" not in k}, '
           'path + ".tmp", metadata={"format": "pt"})'),
      tests=["tests/test_model.py::test_save_pretrained_writes_every_tensor_of_an_all_random_model"]),
    M(name="save_pretrained writes init values for biases and LayerNorms", file="gpt2jax/hf.py",
      old='save_file(to_hf_state_dict(params), path + ".tmp", metadata={"format": "pt"})',
      new=('save_file({k: np.zeros_like(v) if k.endswith(".bias") else np.ones_like(v) if "ln_" in k else v '
           'for k, v in to_hf_state_dict(params).items()}, path + ".tmp", metadata={"format": "pt"})'),
      tests=["tests/test_model.py::test_save_pretrained_writes_every_tensor_of_an_all_random_model",
             "tests/test_hf_parity.py::test_our_export_loads_in_transformers"]),
    M(name="decode params not cast to the compute dtype", file="gpt2jax/generation.py",
      old=".astype(compute_dtype), params", new=", params",
      tests=["tests/test_sampling.py::test_the_bfloat16_decode_loop_converts_no_weights"]),
    M(name="float32 matmuls at the default precision", file="gpt2jax/config.py",
      old='            precision = "highest"', new='            precision = None',
      tests=["tests/test_model.py::test_float32_means_float32_matmuls"]),
    M(name="causal fast path without the causal mask", file="gpt2jax/model.py",
      old="jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, is_causal=True)",
      new="jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK)",
      tests=["tests/test_model.py::test_causal_fast_path_equals_the_masked_path_forward_and_gradients"]),
    M(name="from_pretrained ignores dtype", file="gpt2jax/modeling.py",
      old='overrides = {} if dtype is None else {"dtype": dtype}', new="overrides = {}",
      tests=["tests/test_model.py::test_from_pretrained_bfloat16_keeps_float32_params"]),
    M(name="from_pretrained stores params in the compute dtype", file="gpt2jax/hf.py",
      old="jnp.asarray(found[name], dtype=config.storage_dtype)", new="jnp.asarray(found[name], dtype=config.compute_dtype)",
      tests=["tests/test_model.py::test_from_pretrained_bfloat16_keeps_float32_params"]),
    # Sampling rules, optimizer, schedule, clipping, checkpointed optimizer state, loss, tokenizer.
    M(name='temperature-multiplies', file='gpt2jax/sampling.py', old='return logits_BxV / temperature', new='return logits_BxV * temperature', tests=['tests/test_sampling.py::test_temperature_sharpens', 'tests/test_sampling.py::test_rules_equal_transformers_warpers']),
    M(name='top-k-drops-ties', file='gpt2jax/sampling.py', old='return jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)', new='return jnp.where(jnp.argsort(jnp.argsort(-logits_BxV, axis=-1), axis=-1) >= k, -jnp.inf, logits_BxV)', tests=['tests/test_sampling.py::test_top_k_keeps_ties_with_the_kth']),
    M(name='top-k-keeps-k-plus-1', file='gpt2jax/sampling.py', old='kth_Bx1 = lax.top_k(logits_BxV, k)[0][:, -1:]', new='kth_Bx1 = lax.top_k(logits_BxV, min(k + 1, logits_BxV.shape[-1]))[0][:, -1:]', tests=['tests/test_sampling.py::test_top_k_draws_stay_in_top_k', 'tests/test_sampling.py::test_top_k_keeps_ties_with_the_kth']),
    M(name='top-p-boundary-inclusive', file='gpt2jax/sampling.py', old='kept_B = jnp.maximum(jnp.sum(before_BxV < top_p, axis=-1), 1)', new='kept_B = jnp.maximum(jnp.sum(before_BxV <= top_p, axis=-1), 1)', tests=['tests/test_sampling.py::test_top_p_boundary_mass_that_exactly_reaches_top_p']),
    M(name='top-p-cumsum-excludes-crossing-token', file='gpt2jax/sampling.py', old='before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV', new='before_BxV = jnp.cumsum(probs_BxV, axis=-1)', tests=['tests/test_sampling.py::test_top_p_draws_stay_in_nucleus', 'tests/test_sampling.py::test_top_p_boundary_mass_that_exactly_reaches_top_p']),
    M(name='top-p-before-temperature', file='gpt2jax/sampling.py', old='logits_BxV = apply_top_p(logits_BxV, top_p)', new='logits_BxV = apply_top_p(logits_BxV * temperature, top_p) / temperature', tests=['tests/test_sampling.py::test_order_temperature_then_top_k_then_top_p', 'tests/test_sampling.py::test_rules_equal_transformers_warpers']),
    M(name='top-p-before-top-k', file='gpt2jax/sampling.py', old='    if rules.top_k:\n        logits_BxV = apply_top_k(logits_BxV, rules.top_k)\n    if rules.use_top_p:\n        logits_BxV = apply_top_p(logits_BxV, top_p)\n', new='    if rules.use_top_p:\n        logits_BxV = apply_top_p(logits_BxV, top_p)\n    if rules.top_k:\n        logits_BxV = apply_top_k(logits_BxV, rules.top_k)\n', tests=['tests/test_sampling.py::test_order_temperature_then_top_k_then_top_p', 'tests/test_sampling.py::test_rules_equal_transformers_warpers']),
    M(name='greedy-skips-last-vocab-id', file='gpt2jax/sampling.py', old='return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)', new='return jnp.argmax(logits_BxV[:, :-1], axis=-1).astype(jnp.int32)', tests=['tests/test_sampling.py::test_greedy_is_argmax_over_the_whole_vocabulary']),
    M(name='prefill-positions-ignore-padding', file='gpt2jax/sampling.py', old='positions_BxP = jnp.maximum(jnp.cumsum(prompt_mask_BxP, axis=-1) - 1, 0).astype(jnp.int32)', new='positions_BxP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))', tests=['tests/test_sampling.py::test_left_padded_batch_equals_greedy_by_full_recomputation', 'tests/test_sampling.py::test_greedy_matches_transformers_fixture']),
    M(name='decode-positions-from-slot', file='gpt2jax/sampling.py', old='next_position_B=positions_BxP[:, -1] + 1,', new='next_position_B=jnp.full((B,), P, jnp.int32),', tests=['tests/test_sampling.py::test_left_padded_batch_equals_greedy_by_full_recomputation', 'tests/test_sampling.py::test_cached_decoding_equals_full_recomputation']),
    M(name='decode-positions-not-advanced', file='gpt2jax/sampling.py', old='next_position_B=state.next_position_B + 1,', new='next_position_B=state.next_position_B,', tests=['tests/test_sampling.py::test_left_padded_batch_equals_greedy_by_full_recomputation', 'tests/test_sampling.py::test_cached_decoding_equals_full_recomputation']),
    M(name='fill-after-stop-off-by-one', file='gpt2jax/sampling.py', old='generated_L = jnp.arange(L) < L - state.max_new_tokens + state.step', new='generated_L = jnp.arange(L) <= L - state.max_new_tokens + state.step', tests=['tests/test_sampling.py::test_pad_value_after_eos_and_after_the_loop_stops']),
    M(name='same-key-every-step', file='gpt2jax/sampling.py', old='key = jax.random.fold_in(state.rng, state.step)', new='key = state.rng', tests=['tests/test_sampling.py::test_step_s_draws_with_fold_in_of_the_key_and_s']),
    M(name='key-of-step-s-plus-1', file='gpt2jax/sampling.py', old='key = jax.random.fold_in(state.rng, state.step)', new='key = jax.random.fold_in(state.rng, state.step + 1)', tests=['tests/test_sampling.py::test_step_s_draws_with_fold_in_of_the_key_and_s']),
    M(name='decay-mask-includes-vectors', file='gpt2jax/train.py', old='return jax.tree.map(lambda p: p.ndim >= 2, params)', new='return jax.tree.map(lambda p: p.ndim >= 1, params)', tests=['tests/test_train.py::test_weight_decay_only_on_matrices_and_embeddings', 'tests/test_optimizer.py::test_adamw_steps_equal_numpy_reference']),
    M(name='decay-mask-dropped', file='gpt2jax/train.py', old='                        mask=decay_mask)', new='                        mask=None)', tests=['tests/test_train.py::test_weight_decay_only_on_matrices_and_embeddings', 'tests/test_optimizer.py::test_adamw_steps_equal_numpy_reference']),
    M(name='schedule-no-plus-one', file='gpt2jax/train.py', old='return lambda step: curve(step + 1)', new='return curve', tests=['tests/test_train.py::test_learning_rate_schedule_is_warmup_then_cosine', 'tests/test_optimizer.py::test_schedule_equals_nanogpt_reference_at_every_step']),
    M(name='schedule-min-lr-zero', file='gpt2jax/train.py', old='decay_steps=max(decay_steps, optim.warmup_steps + 1), end_value=optim.min_lr,', new='decay_steps=max(decay_steps, optim.warmup_steps + 1), end_value=0.0,', tests=['tests/test_train.py::test_learning_rate_schedule_is_warmup_then_cosine', 'tests/test_optimizer.py::test_schedule_equals_nanogpt_reference_at_every_step']),
    M(name='schedule-linear-decay', file='gpt2jax/train.py', old='curve = optax.warmup_cosine_decay_schedule(', new='curve = (lambda init_value, peak_value, warmup_steps, decay_steps, end_value: optax.join_schedules([optax.linear_schedule(init_value, peak_value, warmup_steps), optax.linear_schedule(peak_value, end_value, decay_steps - warmup_steps)], [warmup_steps]))(', tests=['tests/test_optimizer.py::test_schedule_is_cosine_not_linear', 'tests/test_optimizer.py::test_schedule_equals_nanogpt_reference_at_every_step']),
    M(name='schedule-decay-steps-unguarded', file='gpt2jax/train.py', old='decay_steps=max(decay_steps, optim.warmup_steps + 1), end_value', new='decay_steps=decay_steps, end_value', tests=['tests/test_optimizer.py::test_schedule_equals_nanogpt_reference_at_every_step']),
    M(name='optimizer-constant-lr', file='gpt2jax/train.py', old='adamw = optax.adamw(schedule, ', new='adamw = optax.adamw(optim.lr, ', tests=['tests/test_optimizer.py::test_adamw_steps_equal_numpy_reference']),
    M(name='adamw-betas-swapped', file='gpt2jax/train.py', old='b1=optim.beta1, b2=optim.beta2,', new='b1=optim.beta2, b2=optim.beta1,', tests=['tests/test_optimizer.py::test_adamw_steps_equal_numpy_reference']),
    M(name='adamw-eps-weight-decay-swapped', file='gpt2jax/train.py', old='eps=optim.eps, weight_decay=optim.weight_decay,', new='eps=optim.weight_decay, weight_decay=optim.eps,', tests=['tests/test_optimizer.py::test_adamw_steps_equal_numpy_reference']),
    M(name='clip-off-at-one', file='gpt2jax/train.py', old='if optim.grad_clip > 0 else optax.identity()', new='if optim.grad_clip > 1 else optax.identity()', tests=['tests/test_optimizer.py::test_adamw_steps_equal_numpy_reference', 'tests/test_optimizer.py::test_clip_is_by_global_norm_before_adam']),
    M(name='clip-elementwise', file='gpt2jax/train.py', old='clip = optax.clip_by_global_norm(optim.grad_clip)', new='clip = optax.clip(optim.grad_clip)', tests=['tests/test_optimizer.py::test_adamw_steps_equal_numpy_reference', 'tests/test_optimizer.py::test_clip_is_by_global_norm_before_adam']),
    M(name='clip-after-adamw', file='gpt2jax/train.py', old='return optax.chain(clip, adamw), schedule', new='return optax.chain(adamw, clip), schedule', tests=['tests/test_optimizer.py::test_adamw_steps_equal_numpy_reference', 'tests/test_optimizer.py::test_clip_is_by_global_norm_before_adam']),
    M(name='restore-fresh-opt-state', file='gpt2jax/checkpoint.py', old='Restored(step=found[0], state=found[1].state, data=found[1].data)', new='Restored(step=found[0], state=found[1].state.replace(opt_state=jax.tree.map(lambda x: 0 * x, found[1].state.opt_state)), data=found[1].data)', tests=['tests/test_optimizer.py::test_checkpoint_restores_optimizer_state_not_a_fresh_one']),
    M(name='restore-oldest-step', file='gpt2jax/checkpoint.py', old='for step in sorted(self.all_steps() if steps is None else steps, reverse=True):', new='for step in sorted(self.all_steps() if steps is None else steps):', tests=['tests/test_optimizer.py::test_checkpoint_restores_optimizer_state_not_a_fresh_one']),
    M(name='save-drops-opt-state', file='gpt2jax/checkpoint.py', old='state=ocp.args.StandardSave(state),', new='state=ocp.args.StandardSave(state.replace(opt_state=jax.tree.map(lambda x: 0 * x, state.opt_state))),', tests=['tests/test_optimizer.py::test_checkpoint_restores_optimizer_state_not_a_fresh_one']),
    M(name='write-failure-echoes-shown', file='gpt2jax/checkpoint.py', old='for name in ("absl", "asyncio"):', new='for name in ():', tests=['tests/test_checkpoint.py::test_a_checkpoint_that_cannot_be_written_ends_the_run_with_its_cause']),
    M(name='loss-denominator-counts-ignored', file='gpt2jax/model.py', old='return jnp.sum(jnp.where(counted_BxT, losses_BxT, 0.0)), jnp.sum(counted_BxT)', new='return jnp.sum(jnp.where(counted_BxT, losses_BxT, 0.0)), counted_BxT.size', tests=['tests/test_model.py::test_loss_ignores_minus_100_and_shifts']),
    M(name='loss-not-shifted', file='gpt2jax/model.py', old='targets_BxT = labels_BxT[:, 1:]', new='targets_BxT = labels_BxT[:, :-1]', tests=['tests/test_model.py::test_loss_ignores_minus_100_and_shifts']),
    M(name='loss-mask-from-unshifted-labels', file='gpt2jax/model.py', old='counted_BxT = targets_BxT != IGNORE_INDEX', new='counted_BxT = labels_BxT[:, :-1] != IGNORE_INDEX', tests=['tests/test_model.py::test_loss_ignores_minus_100_and_shifts']),
    M(name='decode-ignores-bad-utf8', file='gpt2jax/tokenizer.py', old='return b"".join(pieces).decode("utf-8", errors="replace")', new='return b"".join(pieces).decode("utf-8", errors="ignore")', tests=['tests/test_tokenizer.py::test_decode_of_split_characters_matches_transformers', 'tests/test_tokenizer.py::test_byte_tokenizer_decodes_every_byte']),
    M(name='byte-tokenizer-drops-0xff', file='gpt2jax/tokenizer.py', old='if 0 <= token_id < 256:', new='if 0 <= token_id < 255:', tests=['tests/test_tokenizer.py::test_byte_tokenizer_decodes_every_byte']),
    M(name='byte-encode-drops-eos', file='gpt2jax/tokenizer.py', old='ids += [self.eos_token_id, *piece.encode("utf-8")]', new='ids += [*piece.encode("utf-8")]', tests=['tests/test_tokenizer.py::test_byte_tokenizer', 'tests/test_tokenizer.py::test_byte_tokenizer_decodes_every_byte']),
    M(name='right-padding-mask-on-left', file='gpt2jax/tokenizer.py', old='masks = [m + [0] * n for n, m in zip(pads, masks)]', new='masks = [[0] * n + m for n, m in zip(pads, masks)]', tests=['tests/test_tokenizer.py::test_padding_uses_pad_token_id_and_masks_on_the_padded_side']),
    M(name='pads-with-eos-not-pad', file='gpt2jax/tokenizer.py', old='ids = [seq + [self.pad_token_id] * n for n, seq in zip(pads, ids)]', new='ids = [seq + [self.eos_token_id] * n for n, seq in zip(pads, ids)]', tests=['tests/test_tokenizer.py::test_padding_uses_pad_token_id_and_masks_on_the_padded_side']),
    M(name='skip-special-keeps-pad', file='gpt2jax/tokenizer.py', old='if skip_special_tokens and i in (self.eos_token_id, self.pad_token_id):', new='if skip_special_tokens and i == self.eos_token_id:', tests=['tests/test_tokenizer.py::test_skip_special_tokens_drops_eos_and_pad_in_decode_and_batch_decode']),
    M(name='batch-decode-drops-skip', file='gpt2jax/tokenizer.py', old='return [self.decode(seq, skip_special_tokens) for seq in sequences]', new='return [self.decode(seq) for seq in sequences]', tests=['tests/test_tokenizer.py::test_skip_special_tokens_drops_eos_and_pad_in_decode_and_batch_decode']),
    M(name='rank-table-ignored', file='gpt2jax/tokenizer.py', old='return ranks if self._id_of_rank is None else self._id_of_rank[ranks].tolist()', new='return ranks', tests=['tests/test_tokenizer.py::test_custom_trained_bpe_tokenizer_json_matches_transformers']),
    # Training, checkpoints, CLI and the numbers they report.
    M(name="sample ignores --dtype", file="gpt2jax/cli.py", old="args.tokenizer, args.dtype)", new="args.tokenizer, None)",
      tests=["tests/test_cli.py::test_sample_dtype_computes_in_that_dtype"]),
    M(name="train ignores compute_dtype", file="gpt2jax/experiment.py", old="dtype=config.train.compute_dtype,",
      new='dtype="float32",', tests=["tests/test_train.py::test_bfloat16_compute_trains_like_float32"]),
    M(name="flops count the position embedding", file="gpt2jax/config.py",
      old="num_parameters(exclude_position_embeddings=True) + 12", new="num_parameters() + 12",
      tests=["tests/test_perf.py"]),
    M(name="tokens/s of one step per interval", file="gpt2jax/trainer.py",
      old="tokens_per_s = timed_steps * tokens_per_step / seconds", new="tokens_per_s = tokens_per_step / seconds",
      tests=["tests/test_perf.py"]),
    M(name="SIGINT kills instead of saving", file="gpt2jax/trainer.py",
      old="for signum in (signal.SIGTERM, signal.SIGINT):", new="for signum in (signal.SIGTERM,):",
      tests=["tests/test_checkpoint.py::test_a_real_signal_stops_the_cli_with_a_checkpoint_and_a_resume_command"]),
    M(name="processes do not agree on a stop signal", file="gpt2jax/trainer.py",
      old="return int(seen.max()) or None", new="return self.signum",
      tests=["tests/test_train.py::test_sigterm_to_one_process_stops_both_after_the_same_step"]),
    M(name="init_from a run dir starts from scratch", file="gpt2jax/trainer.py",
      old="return hf.from_hf_state_dict(hf.to_hf_state_dict(params), model)", new="return init_params(model, 0)",
      tests=["tests/test_checkpoint.py::test_fine_tuning_from_a_run_dir_starts_from_its_latest_params"]),
    M(name="export writes the latest step", file="gpt2jax/hf.py",
      old="restored = Checkpoints(run).restore_params(step)",
      new='restored = Checkpoints(run).restore_params("latest")',
      tests=["tests/test_checkpoint.py::test_export_command_writes_the_runs_params"]),
    # compare: runs read by schema, partial lines, wall time, plot paths; sweep grids.
    M(name="metrics_schema_not_checked", file="gpt2jax/records.py", old='        if (problem := record_problem(record)) is not None:', new='        if False and (problem := record_problem(record)) is not None:', tests=["tests/test_compare.py::test_a_run_that_cannot_be_read_is_reported_in_one_line_and_skipped"]),
    M(name="config_groups_not_checked", file="gpt2jax/records.py", old='    if missing:\n', new='    if False:\n', tests=["tests/test_compare.py::test_a_run_that_cannot_be_read_is_reported_in_one_line_and_skipped"]),
    M(name="json_not_object_accepted", file="gpt2jax/records.py", old='    if not isinstance(value, dict):\n        raise UserError(f"{run}: {name} is', new='    if False:\n        raise UserError(f"{run}: {name} is', tests=["tests/test_compare.py::test_a_run_that_cannot_be_read_is_reported_in_one_line_and_skipped"]),
    M(name="any_bad_last_line_ignored", file="gpt2jax/records.py", old='            if number == len(lines):', new='            if number >= len(lines) - 1:', tests=["tests/test_compare.py::test_a_run_that_cannot_be_read_is_reported_in_one_line_and_skipped"]),
    M(name="partial_last_line_fatal", file="gpt2jax/records.py", old='            if number == len(lines):', new='            if number == len(lines) + 1:', tests=["tests/test_compare.py::test_a_partial_last_line_is_left_out_and_the_run_kept"]),
    M(name="duplicates_shown_twice", file="gpt2jax/records.py", old='            if os.path.realpath(path) in seen:', new='            if False:', tests=["tests/test_compare.py::test_not_a_run_at_all_is_reported"]),
    M(name="null_val_loss_compared", file="gpt2jax/compare.py", old='[m for m in r.split("val") if is_finite(m["loss"])]', new='r.split("val")', tests=["tests/test_compare.py::test_records_with_null_or_nan_losses_do_not_break_the_row"]),
    M(name="unreadable_run_aborts_all", file="gpt2jax/records.py", old='        except UserError as e:\n            print(f"gpt2jax compare: warning', new='        except OSError as e:\n            print(f"gpt2jax compare: warning', tests=["tests/test_compare.py::test_cli_prints_the_readable_runs_and_one_line_per_unreadable_one"]),
    M(name="old_wall_formula", file="gpt2jax/compare.py", old='            "wall_s": training_time(r)[1],', new='            "wall_s": (max(m["time"] for m in r.metrics) - r.sessions[-1][0]) if r.sessions else None,', tests=["tests/test_compare.py::test_wall_time_adds_up_the_sessions_of_a_resumed_run"]),
    M(name="listed_sessions_ignored", file="gpt2jax/compare.py", old='    listed = record.sessions\n', new='    listed = record.sessions[-1:]\n', tests=["tests/test_compare.py::test_wall_time_adds_up_the_sessions_of_a_resumed_run"]),
    M(name="missing_plot_directory_not_checked", file="gpt2jax/compare.py", old='    if not os.path.isdir(parent):\n        problem', new='    if False:\n        problem', tests=["tests/test_compare.py::test_a_plot_that_cannot_be_written_is_one_error_line_and_nothing_written"]),
    M(name="plot_checked_after_the_table", file="gpt2jax/cli.py", old='        check_plot_path(args.plot)  # before any run is read or anything printed', new='        pass', tests=["tests/test_compare.py::test_a_plot_that_cannot_be_written_is_one_error_line_and_nothing_written"]),
    M(name="plot_format_from_name", file="gpt2jax/compare.py", old='        fig.savefig(path, dpi=110, format=image_format)', new='        fig.savefig(path, dpi=110)', tests=["tests/test_compare.py::test_a_plot_without_an_extension_is_a_png_at_exactly_that_path"]),
    M(name="grid_literal_errors_escape", file="gpt2jax/sweep.py", old='        except (ValueError, TypeError, SyntaxError, RecursionError):', new='        except (ValueError, SyntaxError):', tests=["tests/test_compare.py::test_a_bad_sweep_is_one_error_line_and_nothing_written"]),
    M(name="grid_duplicate_values_allowed", file="gpt2jax/sweep.py", old='        if len(set(axes[key])) < len(parsed):', new='        if False:', tests=["tests/test_compare.py::test_a_bad_sweep_is_one_error_line_and_nothing_written"]),
    M(name="workdir_file_not_checked", file="gpt2jax/rundir.py", old='    if not os.path.isdir(existing):', new='    if False:', tests=["tests/test_compare.py::test_a_bad_sweep_is_one_error_line_and_nothing_written[workdir_a_file]"]),
    # Data: formats, dtypes, the sampler's per-process slices, validation windows.
    M(name="data: bins always uint16", file="gpt2jax/data.py", old="np.dtype(np.uint16 if len(tokenizer) <= 2**16 else np.uint32)", new="np.dtype(np.uint16)", tests=["tests/test_data.py::test_vocab_over_65536_tokens_makes_uint32_bins"]),
    M(name="data: uint32 already at 65,536 tokens", file="gpt2jax/data.py", old="len(tokenizer) <= 2**16", new="len(tokenizer) < 2**16", tests=["tests/test_data.py::test_vocab_over_65536_tokens_makes_uint32_bins"]),
    M(name="data: token count misses the EOT", file="gpt2jax/data.py", old='counts[split]["tokens"] += len(ids) + 1', new='counts[split]["tokens"] += len(ids)', tests=["tests/test_data.py::test_vocab_over_65536_tokens_makes_uint32_bins"]),
    M(name="data: text_column ignored", file="gpt2jax/sources.py", old='column = "text" if source["kind"] == "local" and source["loader"] == "text" else data.text_column', new='column = "text"', tests=["tests/test_data.py::test_parquet_and_arrow_files_decode_to_the_text_column"]),
    M(name="data: text_column not in the bins fingerprint", file="gpt2jax/sources.py", old='return {"kind": "local", "loader": loader, "files": stats, "text_column": data.text_column}', new='return {"kind": "local", "loader": loader, "files": stats}', tests=["tests/test_data.py::test_parquet_and_arrow_files_decode_to_the_text_column"]),
    M(name="data: .arrow files not recognised", file="gpt2jax/sources.py", old='".parquet": "parquet", ".arrow": "arrow"}', new='".parquet": "parquet"}', tests=["tests/test_data.py::test_parquet_and_arrow_files_decode_to_the_text_column"]),
    M(name="data: .txt sample_by ignored", file="gpt2jax/sources.py", old='kwargs = {"sample_by": data.text_sample_by} if source["loader"] == "text" else {}', new="kwargs = {}", tests=["tests/test_data.py::test_txt_files_by_line_paragraph_and_document"]),
    M(name="data: .txt sample_by not in the bins fingerprint", file="gpt2jax/sources.py", old='"files": stats, "sample_by": data.text_sample_by}', new='"files": stats}', tests=["tests/test_data.py::test_txt_files_by_line_paragraph_and_document"]),
    M(name="reuse_without_verifying", file="gpt2jax/data.py", old="        damage = _damage(bins)\n", new="        damage = None\n", tests=["tests/test_data.py::test_damaged_bins_are_detected_and_rebuilt"]),
    M(name="no_checksum_check", file="gpt2jax/data.py", old='        if "blake2b_sampled" in recorded and bin_checksum(path) != recorded["blake2b_sampled"]:', new="        if False:", tests=["tests/test_data.py::test_damaged_bins_are_detected_and_rebuilt[same-size]"]),
    M(name="checksum_samples_only_the_ends", file="gpt2jax/data.py", old="            for i in range(CHECKSUM_CHUNKS):", new="            for i in (0, CHECKSUM_CHUNKS - 1):", tests=["tests/test_data.py::test_bin_checksum_reads_size_and_evenly_spaced_chunks"]),
    M(name="format_1_not_upgraded", file="gpt2jax/data.py", old='    if damage is None and bins.meta.get("format_version", 1) < FORMAT_VERSION:', new="    if False:", tests=["tests/test_data.py::test_format_1_bins_are_reused_and_get_checksums"]),
    M(name="forks_after_jax_started", file="gpt2jax/data.py", old='        documents = load_documents(data, source, temporary["hf"], progress)', new='        os.waitpid(os.fork() or os._exit(0), 0)\n        documents = load_documents(data, source, temporary["hf"], progress)', tests=["tests/test_data.py::test_prepare_forks_nothing_once_jax_runs"]),
    M(name="cause_not_walked", file="gpt2jax/sources.py", old="        following = e.__cause__ or (e.__context__ if wrapper else None)", new="        following = None", tests=["tests/test_data.py::test_malformed_jsonl_names_its_file_and_the_underlying_error"]),
    M(name="text_column_type_unchecked", file="gpt2jax/sources.py", old='    if dtype not in ("string", "large_string"):', new="    if False:", tests=["tests/test_data.py::test_hostile_inputs_fail_in_one_line_and_leave_nothing"]),
    M(name="nulls_unchecked", file="gpt2jax/sources.py", old="    if values.null_count:", new="    if False:", tests=["tests/test_data.py::test_hostile_inputs_fail_in_one_line_and_leave_nothing"]),
    M(name="temporaries_left_behind", file="gpt2jax/data.py", old="        for path in temporary.values():\n            _remove(path)\n", new="        for path in temporary.values():\n            pass\n", tests=["tests/test_data.py::test_hostile_inputs_fail_in_one_line_and_leave_nothing"]),
    M(name="batches: every process reads the first rows", file="gpt2jax/batches.py", old="self.rows = slice(process_index * local_batch, (process_index + 1) * local_batch)", new="self.rows = slice(0, local_batch)", tests=["tests/test_data.py::test_process_slices_are_disjoint_and_make_the_global_batch"]),
    M(name="batches: process slice offset by the global batch", file="gpt2jax/batches.py", old="self.rows = slice(process_index * local_batch, (process_index + 1) * local_batch)", new="self.rows = slice(process_index * global_batch_size, process_index * global_batch_size + local_batch)", tests=["tests/test_data.py::test_process_slices_are_disjoint_and_make_the_global_batch"]),
    M(name="batches: per-process random stream", file="gpt2jax/batches.py", old="rng = np.random.default_rng([self.seed, step])", new="rng = np.random.default_rng([self.seed, step, self.rows.start])", tests=["tests/test_data.py::test_process_slices_are_disjoint_and_make_the_global_batch"]),
    M(name="batches: rng seeded with seed + step", file="gpt2jax/batches.py", old="rng = np.random.default_rng([self.seed, step])", new="rng = np.random.default_rng(self.seed + step)", tests=["tests/test_data.py::test_process_slices_are_disjoint_and_make_the_global_batch"]),
    M(name="batches: last window never sampled", file="gpt2jax/batches.py", old="rng.integers(0, len(self.tokens) - self.block_size, size=self.global_batch_size)", new="rng.integers(0, len(self.tokens) - self.block_size - 1, size=self.global_batch_size)", tests=["tests/test_data.py::test_sampler_windows_reach_both_ends_of_the_split"]),
    M(name="validation: every process reads the first rows", file="gpt2jax/batches.py", old="batch_starts[rows]", new="batch_starts[:local_batch]", tests=["tests/test_data.py::test_validation_batches_are_fixed_spread_and_sliced_per_process"]),
    M(name="validation: windows stop short of the split's end", file="gpt2jax/batches.py", old="np.linspace(0, len(tokens) - block_size - 1, num_batches * global_batch_size)", new="np.linspace(0, len(tokens) - 2 * block_size, num_batches * global_batch_size)", tests=["tests/test_data.py::test_validation_batches_are_fixed_spread_and_sliced_per_process"]),
    M(name="validation: random windows each call", file="gpt2jax/batches.py", old="np.linspace(0, len(tokens) - block_size - 1, num_batches * global_batch_size)", new="np.sort(np.random.randint(0, len(tokens) - block_size, num_batches * global_batch_size))", tests=["tests/test_data.py::test_validation_batches_are_fixed_spread_and_sliced_per_process"]),
]


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
