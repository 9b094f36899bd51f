"""Attention: the one function every caller uses (training, eval, the forward, prefill and decode), and the
implementation that runs it on each platform (`GPT2Config.attention`).

- "xla": `jax.nn.dot_product_attention(implementation="xla")`; every platform, every call.
- "cudnn": cuDNN's fused flash attention (`implementation="cudnn"`); NVIDIA GPUs, bfloat16 / float16,
  head dim a multiple of 8 up to 128. Causal; a right-padded batch goes through key lengths; packed
  examples (segment ids) through a mask, which jax hands cuDNN as a (B, 1, T, S) bias.
- "splash": Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`); TPUs, bfloat16,
  a sequence length that is a multiple of 128. Causal, unpadded; packed examples by its own SegmentIds.
- "auto" (default): the fused kernel of the platform the program is *lowered* for where it applies, XLA
  otherwise: `lax.platform_dependent` keeps one branch per platform in the traced program, so one jitted
  step is right on a GPU, a TPU and a CPU alike. (jax's own `implementation=None` is XLA everywhere.)

The fused kernels serve calls whose queries are the keys, from slot 0 (no KV cache): training, eval and
the forward. Calls with a cache (prefill and decode: T new queries against S cache slots), left padding,
and calls that materialise the probabilities (attention dropout in training, `output_attentions`) run
XLA. Attention dropout stays on XLA on every platform: jax's public fused kernels take no dropout, and
cuDNN's private one takes its seed as a static Python int (`fused_attention_stablehlo.dot_product_attention
(seed: int = 42)`), so its mask could not change from step to step without recompiling.

Packed examples (`segment_ids_BxT`: several examples in one row, each attending only to itself, as task
fine-tuning packs them, gpt2jax.examples) cost nothing extra on XLA (the causal mask is materialised there
anyway) and on splash (segment ids are its own input, blocks without a shared segment are skipped). cuDNN
takes them as the bias jax makes of a boolean mask: the fused kernel still runs, and reads a (B, 1, T, S)
bfloat16 bias (and writes its gradient, which jax always exports) per layer: 2 x 32 MiB per layer at 16 x
1024. cuDNN's own packed layout (`q_offsets` / `kv_offsets`) is in jax's private API only, unverified here.

float32 compute never takes a fused kernel: both compute in reduced precision, and float32 stays exact
(every matmul at HIGHEST on accelerators, see `GPT2Config.matmul_precision`).

Legend: B batch, T query time, S key time, H heads, K head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from gpt2jax.config import ATTENTION_IMPLEMENTATIONS, GPT2Config
from gpt2jax.errors import UserError

KERNEL_PLATFORM = {"cudnn": "cuda", "splash": "tpu"}  # each fused kernel and the platform it runs on
PLATFORM_KERNEL = {platform: kernel for kernel, platform in KERNEL_PLATFORM.items()}
NAMES = {"xla": "XLA", "cudnn": "cuDNN fused attention", "splash": "Pallas splash attention"}
SPLASH_BLOCKS = (512, 256, 128)  # splash's query / key block sizes, largest first; 128 lanes at least


@dataclasses.dataclass(frozen=True)
class Call:
    """The static facts of one attention call that decide how it runs."""

    dtype: Any  # of q, k, v: the compute dtype
    T: int  # queries
    S: int  # keys
    H: int
    K: int
    cached: bool  # with a KV cache: query t is slot cache.index + t, and S is the cache's length
    padded: bool  # a key mask was given
    dropout: bool  # attention dropout applies (training with attn_pdrop > 0)
    weights: bool  # the probabilities are returned (output_attentions)
    segmented: bool = False  # segment ids were given (packed examples)


def current_platform() -> str:
    """This process's platform by `lax.platform_dependent`'s names: cpu, cuda, rocm or tpu."""
    backend = jax.default_backend()
    if backend == "gpu":
        return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"
    return backend


def _kernel_refusal(kernel: str, call: Call) -> str | None:
    """Why `kernel` cannot run this call (None: it can), from what jax's kernels check when traced."""
    dtype = jnp.dtype(call.dtype).name
    if kernel == "cudnn":
        if dtype not in ("bfloat16", "float16"):
            return f"{dtype} compute: cuDNN's fused attention is bfloat16/float16 only (float32 stays exact)"
        if call.K % 8 or call.K > 128:
            return f"head dim {call.K}: cuDNN's flash attention takes multiples of 8 up to 128"
        return _cudnn_probe(call.T, call.H, call.K, dtype)
    if dtype != "bfloat16":
        return f"{dtype} compute: splash attention runs bfloat16 here (float32 stays exact)"
    if call.T % SPLASH_BLOCKS[-1]:
        return f"sequence length {call.T}: splash attention takes multiples of {SPLASH_BLOCKS[-1]}"
    return None


def _cudnn_probe(T: int, H: int, K: int, dtype: str) -> str | None:
    """None when jax's cuDNN attention traces for these shapes (cuDNN found, shapes accepted), else why not.
    Tracing is what fails on a machine without cuDNN, so `auto` falls back there instead of failing."""
    spec = jax.ShapeDtypeStruct((1, T, H, K), jnp.dtype(dtype))
    try:
        jax.eval_shape(functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"),
                       spec, spec, spec)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        return f"cuDNN unavailable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def choose(requested: str, platform: str, call: Call) -> tuple[str, str]:
    """(implementation, why) for one call lowered for `platform`. An explicit fused kernel that this model
    cannot use at all (dtype, head dim, dropout, sequence length) is a `UserError`; calls that no fused
    kernel serves (a KV cache, padding the kernel does not take, returned weights) run XLA."""
    if requested == "xla":
        return "xla", "attention='xla'"
    kernel = PLATFORM_KERNEL.get(platform) if requested == "auto" else requested
    if kernel is None:
        return "xla", f"no fused kernel on {platform}"
    if call.dropout:
        _refuse_dropout(requested)
        return "xla", "attention dropout needs the materialised path (attn_pdrop > 0 in training)"
    refusal = _kernel_refusal(kernel, call)
    if refusal is not None:
        if requested != "auto":
            raise UserError(f"attention={requested!r} cannot run this model: {refusal}")
        return "xla", refusal
    if call.weights:
        return "xla", "output_attentions materialises the probabilities"
    if call.cached:
        return "xla", "a KV cache (prefill and decode)"
    if call.padded and kernel == "splash":
        return "xla", "padding (splash runs unpadded causal attention)"
    how = ", right padding by key lengths" if call.padded else ""
    if call.segmented:
        how += ", packed examples by segment ids" if kernel == "splash" else ", packed examples as a segment mask"
    return kernel, f"{jnp.dtype(call.dtype).name}, causal{how}"


def _refuse_dropout(requested: str) -> None:
    if requested in KERNEL_PLATFORM:
        raise UserError(f"attention={requested!r} takes no attention dropout; set model.attn_pdrop=0, or "
                        "attention='auto' to run XLA then")


def check_platform(requested: str, platform: str) -> None:
    """A `UserError` when `requested` is not an implementation, or a fused kernel of another platform."""
    if requested not in ATTENTION_IMPLEMENTATIONS:
        raise UserError(f"attention={requested!r} is not one of {', '.join(map(repr, ATTENTION_IMPLEMENTATIONS))}")
    if requested in KERNEL_PLATFORM and platform != KERNEL_PLATFORM[requested]:
        needs = {"cuda": "an NVIDIA GPU (cuda)", "tpu": "a TPU"}[KERNEL_PLATFORM[requested]]
        raise UserError(f"attention={requested!r} needs {needs}, and this process runs on {platform}; "
                        "use attention='auto' or 'xla'")


def check(config: GPT2Config, platform: str, seq_len: int, train: bool, packed: bool = False) -> tuple[str, str]:
    """(implementation, why) of the steps a training run on `platform` runs (T = S = seq_len, no cache;
    `packed`: with segment ids); a `UserError` when an explicit choice cannot be honoured there. Called before
    anything is written."""
    check_platform(config.attention, platform)
    call = Call(config.compute_dtype, seq_len, seq_len, config.n_head, config.head_dim, cached=False, padded=False,
                dropout=train and config.attn_pdrop > 0, weights=False, segmented=packed)
    return choose(config.attention, platform, call)


def describe(implementation: str, why: str) -> str:
    """One line for the start of a run: `attention: XLA (float32 compute: ...)`."""
    return f"attention: {NAMES[implementation]} ({why})"


# ------------------------------------------------------------------------------------------------------------
# The function every caller uses.


def attend(
    q_BxTxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    key_mask_BxS: jax.Array | None,
    positions_BxT: jax.Array,
    *,
    config: GPT2Config,
    cache_index: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
    weights: bool = False,
    segment_ids_BxT: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Causal softmax attention of the T queries over the S keys; returns the output (B, T, H, K) and, with
    `weights`, the float32 probabilities (B, H, T, S) (after dropout, as Hugging Face returns them).

    `key_mask_BxS`: 1 for real keys, 0 for padding; None: nothing padded. `cache_index`: None without a KV
    cache (query t is key t), else the slot of the first query. `segment_ids_BxT` (no cache, T = S): packed
    examples, query t seeing key s only where their ids are equal (and s <= t); None: one sequence per row.
    `dropout_rng`: attention dropout (`config.attn_pdrop`) with this key, None for none. `positions_BxT` are the
    queries' positions: GPT-2's learned positions are added to the embeddings, so they are unused here; a rotary
    or ALiBi variant applies them in this function."""
    del positions_BxT
    if segment_ids_BxT is not None and (cache_index is not None or key_mask_BxS is not None):
        raise ValueError("segment ids mark packed examples: they take neither a KV cache nor a padding mask")
    attention = functools.partial(_attend, key_mask_BxS=key_mask_BxS, config=config, cache_index=cache_index,
                                  dropout_rng=dropout_rng, weights=weights, segment_ids_BxT=segment_ids_BxT)
    return upcast_float16_on_cpu(attention, q_BxTxHxK, k_BxSxHxK, v_BxSxHxK)


def upcast_float16_on_cpu(fn: Callable[..., Any], *arrays: jax.Array) -> Any:
    """`fn(*arrays)`, with float16 arrays cast to float32 first where the program runs on a CPU: XLA's CPU dots
    take no float16 inputs with a float32 result (F16_F16_F32), which jax's attention and the LM head ask
    for. The results keep the dtypes `fn` gives them, on every platform."""
    if not any(a.dtype == jnp.float16 for a in arrays):
        return fn(*arrays)

    def upcast(*xs: jax.Array) -> Any:
        out = fn(*(x.astype(jnp.float32) if x.dtype == jnp.float16 else x for x in xs))
        return jax.tree.map(lambda o, like: o.astype(like.dtype), out, jax.eval_shape(fn, *xs))

    return lax.platform_dependent(*arrays, cpu=upcast, default=fn)


def _attend(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array, *, key_mask_BxS: jax.Array | None,
            config: GPT2Config, cache_index: jax.Array | None, dropout_rng: jax.Array | None,
            weights: bool, segment_ids_BxT: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    B, T, H, K = q_BxTxHxK.shape
    S = k_BxSxHxK.shape[1]
    dropout = dropout_rng is not None and config.attn_pdrop > 0
    if dropout or weights:
        if dropout:
            _refuse_dropout(config.attention)
        mask_BxTxS = full_mask_BxTxS(key_mask_BxS, B, T, S, cache_index, segment_ids_BxT)
        return materialised(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxTxS, config.attn_pdrop if dropout else 0.0,
                            dropout_rng)
    call = Call(q_BxTxHxK.dtype, T, S, H, K, cached=cache_index is not None, padded=key_mask_BxS is not None,
                dropout=False, weights=False, segmented=segment_ids_BxT is not None)
    run = functools.partial(_bound, key_mask_BxS=key_mask_BxS, cache_index=cache_index, segment_ids_BxT=segment_ids_BxT)
    if config.attention != "auto":
        implementation, _ = choose(config.attention, KERNEL_PLATFORM.get(config.attention, "cpu"), call)
        return run(implementation)(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK), None
    by_platform = {p: choose("auto", p, call)[0] for p in ("cuda", "tpu", "cpu")}
    if len(set(by_platform.values())) == 1:  # one program for every platform: nothing to branch on
        return run(by_platform["cpu"])(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK), None
    branches = {"cuda": run(by_platform["cuda"]), "tpu": run(by_platform["tpu"]), "default": run(by_platform["cpu"])}
    return lax.platform_dependent(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, **branches), None


def _bound(name: str, *, key_mask_BxS: jax.Array | None, cache_index: Any, segment_ids_BxT: jax.Array | None) -> Any:
    """The implementation `name` as a function of (q, k, v), bound to this call's mask, segments and cache slot."""
    if name == "xla":
        return functools.partial(xla, key_mask_BxS=key_mask_BxS, cache_index=cache_index,
                                 segment_ids_BxT=segment_ids_BxT)
    kernel, check_vma = (cudnn, True) if name == "cudnn" else (splash, False)  # Pallas' outputs carry no vma types
    extra = {"key_mask_BxS": key_mask_BxS, "segment_ids_BxT": segment_ids_BxT}
    extra = {key: array for key, array in extra.items() if array is not None}  # arrays, split per device too
    per_device = per_device_under_mesh(lambda q, k, v, *arrays: kernel(q, k, v, **dict(zip(extra, arrays))),
                                       check_vma=check_vma)
    return lambda q, k, v: per_device(q, k, v, *extra.values())


def per_device_under_mesh(kernel: Callable[..., jax.Array], check_vma: bool = True) -> Callable[..., jax.Array]:
    """`kernel` as each device's own call when traced under a context mesh (`jax.set_mesh`, as the "fsdp"
    train and eval steps are, gpt2jax.parallel): a fused kernel is a custom call that XLA's partitioner cannot
    split by itself, so it runs inside `shard_map` over every mesh axis. The steps map one row group per
    device (`jax.vmap(..., spmd_axis_name=mesh axes)`), so each device gets its own rows whole, exactly as
    under pmap; traced under a mesh without such a map, every device computes the whole (gathered) batch.
    Without a mesh: `kernel` itself."""

    @functools.wraps(kernel)
    def call(*arrays: jax.Array) -> jax.Array:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return kernel(*arrays)
        whole = jax.sharding.PartitionSpec()
        return jax.shard_map(kernel, mesh=mesh, in_specs=(whole,) * len(arrays), out_specs=whole,
                             check_vma=check_vma)(*arrays)

    return call


def full_mask_BxTxS(key_mask_BxS: jax.Array | None, B: int, T: int, S: int, cache_index: Any,
                    segment_ids_BxT: jax.Array | None = None) -> jax.Array:
    """Causality (query t, at slot cache_index + t, sees the slots up to its own), key padding and packed
    examples (a query sees only keys of its own segment), as one boolean mask."""
    query_slot_T = (0 if cache_index is None else cache_index) + jnp.arange(T)
    causal_TxS = jnp.arange(S)[None, :] <= query_slot_T[:, None]
    mask_BxTxS = jnp.broadcast_to(causal_TxS, (B, T, S))
    if key_mask_BxS is not None:
        mask_BxTxS = mask_BxTxS & key_mask_BxS.astype(bool)[:, None, :]
    if segment_ids_BxT is not None:
        mask_BxTxS = mask_BxTxS & same_segment_BxTxS(segment_ids_BxT)
    return mask_BxTxS


def same_segment_BxTxS(segment_ids_BxT: jax.Array) -> jax.Array:
    """Query t and key s belong to the same packed example."""
    return segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]


# ------------------------------------------------------------------------------------------------------------
# The implementations, each a function of (q, k, v) -> (B, T, H, K).


def xla(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array, *, key_mask_BxS: jax.Array | None = None,
        cache_index: Any = None, segment_ids_BxT: jax.Array | None = None) -> jax.Array:
    """XLA's attention: causal alone when nothing is padded, packed or cached, else with the full mask."""
    if key_mask_BxS is None and cache_index is None and segment_ids_BxT is None:
        return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, is_causal=True, implementation="xla")
    B, T, S = q_BxTxHxK.shape[0], q_BxTxHxK.shape[1], k_BxSxHxK.shape[1]
    mask_BxTxS = full_mask_BxTxS(key_mask_BxS, B, T, S, cache_index, segment_ids_BxT)
    return jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_BxTxS[:, None],
                                        implementation="xla")


def cudnn(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array, *,
          key_mask_BxS: jax.Array | None = None, segment_ids_BxT: jax.Array | None = None) -> jax.Array:
    """cuDNN's fused causal attention. A padded batch runs it with key lengths when every row is right-padded
    (its keys a prefix of ones), which masks exactly as causality & padding do; otherwise XLA (a `lax.cond`
    on the mask, so both are in the program). Packed examples: the segment mask, which jax turns into a bias."""
    fused = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")
    if segment_ids_BxT is not None:
        return fused(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=same_segment_BxTxS(segment_ids_BxT)[:, None])
    if key_mask_BxS is None:
        return fused(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK)
    real_BxS = key_mask_BxS.astype(bool)
    lengths_B = real_BxS.sum(-1, dtype=jnp.int32)
    prefix_BxS = jnp.arange(real_BxS.shape[1])[None, :] < lengths_B[:, None]
    right_padded = jnp.all(real_BxS == prefix_BxS) & jnp.all(lengths_B > 0)
    return lax.cond(
        right_padded,
        lambda q, k, v: fused(q, k, v, key_value_seq_lengths=lengths_B),
        lambda q, k, v: xla(q, k, v, key_mask_BxS=key_mask_BxS),
        q_BxTxHxK, k_BxSxHxK, v_BxSxHxK,
    )


def splash(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array, *,
           segment_ids_BxT: jax.Array | None = None, interpret: bool = False) -> jax.Array:
    """Pallas splash attention (TPU), causal, per batch row, packed examples by its SegmentIds; `interpret` runs
    the kernel on any platform (slowly), for tests. Splash does not scale the logits: the queries are scaled by
    1/sqrt(K) first, as MaxText does."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, T, H, K = q_BxTxHxK.shape
    block = next(b for b in SPLASH_BLOCKS if T % b == 0)
    blocks = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                           block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = sa.MultiHeadMask([sa.CausalMask((T, T)) for _ in range(H)])
    kernel = sa.make_splash_mha_single_device(mask, block_sizes=blocks, interpret=interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # (B, H, T, K), the kernel's layout
    q_BxHxTxK = heads_first(q_BxTxHxK * jnp.asarray(1.0 / math.sqrt(K), q_BxTxHxK.dtype))
    if segment_ids_BxT is None:
        out_BxHxTxK = jax.vmap(kernel)(q_BxHxTxK, heads_first(k_BxSxHxK), heads_first(v_BxSxHxK))
    else:
        by_row = lambda q, k, v, ids_T: kernel(q, k, v, segment_ids=sa.SegmentIds(q=ids_T, kv=ids_T))
        out_BxHxTxK = jax.vmap(by_row)(q_BxHxTxK, heads_first(k_BxSxHxK), heads_first(v_BxSxHxK),
                                       segment_ids_BxT.astype(jnp.int32))
    return heads_first(out_BxHxTxK)


def materialised(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array, mask_BxTxS: jax.Array,
                 dropout_rate: float, dropout_rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Softmax attention that materialises its (B, H, T, S) float32 probabilities, with dropout on them: the
    path for attention dropout in training and for `output_attentions`."""
    scale = 1.0 / math.sqrt(q_BxTxHxK.shape[-1])
    logits_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK, preferred_element_type=jnp.float32)
    logits_BxHxTxS = jnp.where(mask_BxTxS[:, None], logits_BxHxTxS * scale, jnp.finfo(jnp.float32).min)
    probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1)
    if dropout_rate > 0.0:
        keep_BxHxTxS = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BxHxTxS.shape)
        probs_BxHxTxS = jnp.where(keep_BxHxTxS, probs_BxHxTxS / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhts,bshk->bthk", probs_BxHxTxS.astype(v_BxSxHxK.dtype), v_BxSxHxK), probs_BxHxTxS

