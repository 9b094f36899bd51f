#!/usr/bin/env bash
# One command that measures gpt2jax on a CUDA machine (about 5 minutes on one H200) and writes the figures
# to ${OUT:-.}/gpu_check.txt:
#   versions and device; fp32 parity with the transformers fixture on the GPU (<= 1e-5); the attention each
#   compiled train and eval step runs (bf16 auto: cuDNN flash; bf16 xla; fp32: XLA) and cuDNN's outputs and
#   gradients against XLA's (causal, right-padded); `gpt2jax bench` forward and train (124M, bf16,
#   16 x 1024, attention auto and xla side by side) and decode (batch 1, 8, 64; bf16 and fp32); a 50-step `gpt2jax train` of
#   124M bf16 16 x 1024 with tokens/s and MFU from its metrics.jsonl, against the bench step; the HF forward
#   interface (hidden states, attentions, the cache) against the transformers fixture on the GPU; the train
#   step and its memory under fsdp against pmap (124M bf16 16 x 1024); packed task examples' attention on
#   cuDNN (segment mask as a bias) against XLA, and its cost against causal-only attention.
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

section "fp32 parity on the GPU"
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
EOF

section "attention: what each compiled step runs, cuDNN against XLA (outputs, gradients)"
$PY - <<'EOF' 2>&1 | tee -a "$REPORT"
import re, jax, jax.numpy as jnp
from gpt2jax import GPT2Config, attention
from gpt2jax.experiment import base_config
from gpt2jax.model import GPT2LMHeadModule, init_params
from gpt2jax.train import init_state, make_optimizer, pmapped_steps
n = jax.local_device_count()
kernels = lambda hlo: sorted(set(re.findall(r'custom_call_target="(__cudnn[^"]*)"', hlo))) or "XLA (no cuDNN attention)"
for dtype, requested in (("bfloat16", "auto"), ("bfloat16", "xla"), ("float32", "auto")):
    config = GPT2Config.from_size("gpt2", dtype=dtype, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  attention=requested)
    runs = attention.check(config, attention.current_platform(), 1024, False)
    print(f"{dtype} attention={requested}: {attention.describe(*runs)}")
    optimizer, schedule = make_optimizer(base_config().optim, 10)
    p_train, p_eval = pmapped_steps(GPT2LMHeadModule(config), optimizer, schedule, 1, dropout=False)
    state = jax.eval_shape(lambda: init_state(init_params(config), optimizer, 0))
    lead = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape, x.dtype), t)
    batch = {k: jax.ShapeDtypeStruct((n, 16, 1024), jnp.int32) for k in ("inputs", "targets")}
    print("  train step:", kernels(jax.jit(p_train).lower(lead(state), batch).compile().as_text()))
    print("  eval step: ", kernels(jax.jit(p_eval).lower(lead(state.params), batch).compile().as_text()))
# the kernels themselves, bf16 16x1024x12x64, causal and right-padded: cuDNN against XLA on the same inputs
q, k, v = (jax.random.normal(jax.random.key(i), (16, 1024, 12, 64)).astype(jnp.bfloat16) for i in range(3))
w = jax.random.normal(jax.random.key(3), q.shape)
lengths = jnp.arange(16, dtype=jnp.int32) * 60 + 100
mask = (jnp.arange(1024)[None] < lengths[:, None]).astype(jnp.int32)
rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                         / jnp.max(jnp.abs(b.astype(jnp.float32))))
for name, m in (("causal", None), ("right-padded", mask)):
    fused = jax.jit(lambda q, k, v: attention.cudnn(q, k, v, key_mask_BxS=m))
    xla = jax.jit(lambda q, k, v: attention.xla(q, k, v, key_mask_BxS=m))
    loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w)
    rows = jnp.ones((16, 1024), bool) if m is None else mask.astype(bool)  # padded queries are not compared
    out = rel(fused(q, k, v)[rows], xla(q, k, v)[rows])
    grads = [rel(a, b) for a, b in zip(jax.grad(loss(fused), (0, 1, 2))(q, k, v),
                                       jax.grad(loss(xla), (0, 1, 2))(q, k, v))]
    ok = out < 0.02 and max(grads) < 0.02
    print(f"cuDNN vs XLA, {name}: max|diff|/max|xla| output {out:.2e}, grads dq/dk/dv "
          f"{', '.join(f'{g:.2e}' for g in grads)}  ({'OK' if ok else 'FAIL'} at 2e-2)")
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

section "gpt2jax bench: 124M bf16 forward and train step, 16 x 1024, cuDNN (auto) and XLA attention side by side"
gpt2jax bench --size gpt2 --dtype bfloat16 --what forward train --batch 16 --seq 1024 --repeats 5 \
  --attention auto xla 2>&1 | tee -a "$REPORT"

section "gpt2jax bench: 124M bf16 train step under pmap and fsdp (one device), and the memory each needs"
gpt2jax bench --size gpt2 --dtype bfloat16 --what train memory --batch 16 --seq 1024 --repeats 5 \
  --parallelism pmap fsdp 2>&1 | tee -a "$REPORT"

section "packed task examples: cuDNN with the segment mask (a bias) against XLA, and what the bias costs"
$PY - <<'EOF' 2>&1 | tee -a "$REPORT"
import time, jax, jax.numpy as jnp
from gpt2jax import attention
B, T, H, K = 16, 1024, 12, 64
q, k, v = (jax.random.normal(jax.random.key(i), (B, T, H, K), jnp.bfloat16) for i in range(3))
segments = jnp.cumsum(jax.random.bernoulli(jax.random.key(3), 0.01, (B, T)), axis=1).astype(jnp.int32) + 1
weights = jax.random.normal(jax.random.key(4), (B, T, H, K), jnp.float32)
def loss(f):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * weights), argnums=(0, 1, 2)))
runs = {"cudnn, packed (bias)": lambda q, k, v: attention.cudnn(q, k, v, segment_ids_BxT=segments),
        "xla, packed (mask)": lambda q, k, v: attention.xla(q, k, v, segment_ids_BxT=segments),
        "cudnn, causal only": attention.cudnn, "xla, causal only": attention.xla}
results = {}
for name, f in runs.items():
    step = loss(f)
    out = step(q, k, v); jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(20):
        out = step(q, k, v)
    jax.block_until_ready(out)
    results[name] = out
    print(f"{name}: forward + backward {1e3 * (time.perf_counter() - start) / 20:.2f} ms ({B} x {T}, {H} heads of {K})")
(a, ga), (b, gb) = results["cudnn, packed (bias)"], results["xla, packed (mask)"]
rel = max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))) / jnp.max(jnp.abs(y.astype(jnp.float32))))
          for x, y in zip(ga, gb))
print(f"packed cuDNN vs XLA: loss {float(a):.4f} vs {float(b):.4f}, gradients max relative diff {rel:.2e} "
      f"({'OK' if rel < 0.02 else 'FAIL'} at 2e-2, bf16)")
EOF

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
