#!/usr/bin/env bash
# One command that measures gpt2jax on a CUDA machine (about 5 minutes on one H200) and writes the figures
# to ${OUT:-.}/gpu_check.txt:
#   versions and device; fp32 parity with the transformers fixture on the GPU (<= 1e-5) and the precision
#   in use; the attention implementation XLA compiled (cuDNN flash or not); `gpt2jax bench` forward and
#   train (124M, bf16, 16 x 1024) and decode (batch 1, 8, 64; bf16 and fp32); a 50-step `gpt2jax train` of
#   124M bf16 16 x 1024 with tokens/s and MFU from its metrics.jsonl, against the bench step; the HF forward
#   interface (hidden states, attentions, the cache) against the transformers fixture on the GPU.
#
#   bash scripts/gpu_check.sh
#
# Needs jax[cuda] and gpt2jax's dependencies. On an image that has jax but lacks the six pure-Python
# wheels listed in shared/gpu/README.md, copy them into .whl/ (git-ignored) first: they are installed
# from there without an index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
REPORT="$OUT/gpu_check.txt"
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 GPT2JAX_CACHE=${GPT2JAX_CACHE:-/tmp/gpt2jax-gpu-check}
mkdir -p "$OUT" "$GPT2JAX_CACHE"
: >"$REPORT"
say() { echo "$@" | tee -a "$REPORT"; }
section() { say; say "== $* ($(date -u +%H:%M:%S))"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps .whl/*.whl 2>&1 | tail -2
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
gpt2jax() { $PY -c 'import sys; from gpt2jax.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }

section "versions and device"
$PY - <<'EOF' 2>&1 | tee -a "$REPORT"
import importlib.metadata as md, jax
print("jax", jax.__version__, "| devices:", jax.devices())
for p in ("jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "transformers"):
    try:
        print(f"  {p} {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"  {p} -")
EOF

section "fp32 parity on the GPU, attention implementation"
$PY - <<'EOF' 2>&1 | tee -a "$REPORT"
import numpy as np, jax, jax.numpy as jnp
from gpt2jax import GPT2LMHeadModel, GPT2Config
for name in ("tiny_gpt2", "tiny_gpt2_gelu_new"):
    expected = dict(np.load(f"tests/fixtures/{name}_expected.npz"))
    model = GPT2LMHeadModel.from_pretrained(f"tests/fixtures/{name}")
    out = model(expected["input_ids"], expected["attention_mask"], expected["position_ids"], labels=expected["labels"])
    valid = expected["attention_mask"].astype(bool)
    diff = float(np.abs(np.asarray(out.logits) - expected["logits"])[valid].max())
    loss = abs(float(out.loss) - float(expected["loss"]))
    print(f"{name}: max |logits - transformers| {diff:.2e}, |loss diff| {loss:.2e}  ({'OK' if diff <= 1e-5 else 'FAIL'} at 1e-5)")
for dtype in ("bfloat16", "float32"):
    config = GPT2Config.from_size("gpt2", dtype=dtype, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    ids = jnp.zeros((16, 1024), jnp.int32)
    hlo = jax.jit(lambda p, x: model.module.apply({"params": p}, x)[0]).lower(model.params, ids).compile().as_text()
    flash = [line.split("custom_call_target=")[1].split(",")[0] for line in hlo.splitlines() if "custom_call_target=\"__cudnn" in line]
    print(f"{dtype} 124M 16x1024 forward attention: {sorted(set(flash)) or 'XLA (no cuDNN fused attention)'}")
EOF

section "the Hugging Face forward interface on the GPU (fp32, against the transformers fixture)"
$PY - <<'EOF' 2>&1 | tee -a "$REPORT"
import numpy as np
from gpt2jax import GPT2LMHeadModel
e = dict(np.load("tests/fixtures/tiny_gpt2_hf_api.npz"))
model = GPT2LMHeadModel.from_pretrained("tests/fixtures/tiny_gpt2")
ids, mask, pos = e["input_ids"], e["attention_mask"], e["position_ids"]
out = model(ids, mask, pos, output_hidden_states=True, output_attentions=True)
real = mask.astype(bool)
rows = lambda a: np.broadcast_to(real[:, None, :, None], a.shape)  # padded queries see no key: not compared
worst = {
    "hidden_states": max(float(np.abs(np.asarray(h)[real] - e[f"hidden_states:{i}"][real]).max())
                         for i, h in enumerate(out.hidden_states)),
    "attentions": max(float(np.abs(np.asarray(a)[rows(a)] - e[f"attentions:{i}"][rows(a)]).max())
                      for i, a in enumerate(out.attentions)),
    "cache keys after a prefix": max(float(np.abs(np.asarray(k) - e[f"prefix_keys:{i}"]).max()) for i, (k, _)
                                     in enumerate(model(ids[:, :5], use_cache=True).past_key_values.to_legacy_cache())),
}
full = np.asarray(model(ids, mask, pos).logits)
step = model(ids[:, :4], mask[:, :4], pos[:, :4], use_cache=True)
pieces = [step.logits]
for t in range(4, ids.shape[1]):
    step = model(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], past_key_values=step.past_key_values)
    pieces.append(step.logits)
worst["cached, one token at a time, vs the full forward"] = float(np.abs(np.concatenate(pieces, 1)[real] - full[real]).max())
for name, diff in worst.items():
    print(f"{name}: max diff {diff:.2e}  ({'OK' if diff <= 1e-5 else 'FAIL'} at 1e-5)")
EOF

section "the train loop reads device values only in its actions (transfer guard on the GPU)"
$PY - "$GPT2JAX_CACHE" <<'EOF' 2>&1 | tail -3 | tee -a "$REPORT"
import sys, tempfile, jax
from gpt2jax.experiment import load_config
from gpt2jax.trainer import run_training
config = load_config("experiments/smoke.py", [f"--config.data.cache_dir={sys.argv[1]}", "--config.train.log_every=10",
                                              "--config.train.max_steps=30"])
with jax.transfer_guard_device_to_host("disallow_explicit"):
    run_training(config, tempfile.mkdtemp() + "/run", progress=False)
print("OK: no device-to-host transfer between log steps (30 steps, log every 10)")
EOF

section "gpt2jax bench: 124M bf16 forward and train step, 16 x 1024"
gpt2jax bench --size gpt2 --dtype bfloat16 --what forward train --batch 16 --seq 1024 --repeats 5 2>&1 | tee -a "$REPORT"

section "gpt2jax bench: decode, 32-token prompt + 128 new, greedy"
gpt2jax bench --size gpt2 --what decode --repeats 3 2>&1 | tee -a "$REPORT"   # batch 1, 8, 64; bf16 and fp32

section "gpt2jax train: 124M bf16 16 x 1024, 50 steps on pystdlib"
RUN=$(mktemp -d)/run
gpt2jax train --config experiments/pystdlib_gpt2.py --workdir "$RUN" --no-progress \
  --config.model.size=gpt2 --config.model.vocab_size=50304 --config.model.n_positions=1024 \
  --config.data.block_size=1024 --config.data.cache_dir="$GPT2JAX_CACHE" --config.data.num_proc=12 \
  --config.train.global_batch_size=16 --config.train.compute_dtype=bfloat16 --config.train.max_steps=50 \
  --config.train.log_every=10 --config.train.eval_every=1000 --config.train.checkpoint_every=1000 \
  --config.train.sample_every=0 --config.optim.warmup_steps=10 --config.optim.decay_steps=50 2>&1 | tail -3 | tee -a "$REPORT"
$PY - "$RUN" <<'EOF' 2>&1 | tee -a "$REPORT"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl") if '"train"' in l]
for r in rows:
    print(f"step {r['step']}: loss {r['loss']:.4f}  {r.get('tokens_per_s', 0):,.0f} tok/s  {r.get('step_time_ms', 0):.1f} ms/step  "
          f"MFU {r.get('mfu', 0):.1%} ({r.get('mfu_peak')} peak)")
timed = [r["tokens_per_s"] for r in rows[1:] if "tokens_per_s" in r]
print(f"median after the first log: {sorted(timed)[len(timed) // 2]:,.0f} tok/s" if timed else "no timed steps")
EOF
say
say "report: $REPORT"
