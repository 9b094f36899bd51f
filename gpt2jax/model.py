"""Flax Linen GPT-2, parameter for parameter the Hugging Face `GPT2LMHeadModel`.

Legend: B batch, T query time, S key time (T, or the KV-cache length when decoding),
D model width (n_embd), H heads, K head dim, F MLP width, V vocab.

Parameter names mirror Hugging Face (`transformer/h_0/attn/c_attn/kernel` is HF's
`transformer.h.0.attn.c_attn.weight`); HF's Conv1D weights are (in, out), the layout
of a Flax Dense kernel, so conversion is a rename. The LM head is tied to `wte`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from gpt2jax.config import ACTIVATIONS, GPT2Config


IGNORE_INDEX = -100  # label value that the loss skips, as in PyTorch / Hugging Face


@flax.struct.dataclass
class KVCache:
    """Keys and values of one layer for all S cache slots; slots past the write index are stale."""

    key_BxSxHxK: jax.Array
    value_BxSxHxK: jax.Array


def init_cache(config: GPT2Config, batch_size: int, length: int) -> tuple[KVCache, ...]:
    """An empty cache of `length` slots per layer, in the compute dtype."""
    shape = (batch_size, length, config.n_head, config.head_dim)
    zeros = lambda: jnp.zeros(shape, config.compute_dtype)  # distinct buffers, so a cache can be donated
    return tuple(KVCache(zeros(), zeros()) for _ in range(config.n_layer))


def attention_mask_BxTxS(attention_mask_BxS: jax.Array, query_length: int, cache_index: Any = 0) -> jax.Array:
    """Causal mask combined with key padding: query t (slot cache_index + t) sees slots <= its own."""
    key_length = attention_mask_BxS.shape[1]
    query_slot_T = cache_index + jnp.arange(query_length)
    causal_TxS = jnp.arange(key_length)[None, :] <= query_slot_T[:, None]
    return causal_TxS[None] & attention_mask_BxS.astype(bool)[:, None, :]


def dot_product_attention_with_dropout(
    q_BxTxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    mask_BxTxS: jax.Array,
    dropout_rate: float,
    dropout_rng: jax.Array,
) -> jax.Array:
    """Softmax attention with dropout on the probabilities (the training path when attn_pdrop > 0)."""
    scale = 1.0 / math.sqrt(q_BxTxHxK.shape[-1])
    logits_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK, preferred_element_type=jnp.float32)
    logits_BxHxTxS = jnp.where(mask_BxTxS[:, None], logits_BxHxTxS * scale, jnp.finfo(jnp.float32).min)
    probs_BxHxTxS = jax.nn.softmax(logits_BxHxTxS, axis=-1)
    if dropout_rate > 0.0:
        keep_BxHxTxS = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs_BxHxTxS.shape)
        probs_BxHxTxS = jnp.where(keep_BxHxTxS, probs_BxHxTxS / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhts,bshk->bthk", probs_BxHxTxS.astype(v_BxSxHxK.dtype), v_BxSxHxK)


class Linear(nn.Module):
    """HF's Conv1D: y = x @ kernel + bias with kernel (in, out), the layout HF checkpoints use.

    With `transposed` the kernel is held (out, in) instead. XLA's CPU matrix-vector products
    are about 1.4x faster in that layout, so the sampler decodes with transposed copies
    (`generation.to_decode_layout`); training and checkpoints use (in, out).
    """

    config: GPT2Config
    features: int
    residual: bool = False  # GPT-2 scales the init of residual projections by 1/sqrt(2 n_layer)
    transposed: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        std = cfg.initializer_range / (math.sqrt(2 * cfg.n_layer) if self.residual else 1.0)
        shape = (self.features, x.shape[-1]) if self.transposed else (x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.normal(std), shape, cfg.storage_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), cfg.storage_dtype)
        contract = ((x.ndim - 1,), (1 if self.transposed else 0,))
        y = lax.dot_general(x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype), (contract, ((), ())))
        return y + bias.astype(cfg.compute_dtype)


def _layer_norm(config: GPT2Config, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon, dtype=config.compute_dtype, param_dtype=config.storage_dtype, name=name
    )


class Attention(nn.Module):
    """Causal multi-head self-attention with a fused qkv projection and an optional KV cache."""

    config: GPT2Config
    transposed_kernels: bool = False

    @nn.compact
    def __call__(
        self,
        x_BxTxD: jax.Array,
        mask_BxTxS: jax.Array | None,
        *,
        train: bool,
        cache: KVCache | None = None,
        cache_index: Any = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """`mask_BxTxS` None: plain causal attention over the T inputs (no padding, no cache)."""
        cfg = self.config
        B, T, D = x_BxTxD.shape
        qkv_BxTx3D = Linear(cfg, 3 * D, transposed=self.transposed_kernels, name="c_attn")(x_BxTxD)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (
            part.reshape(B, T, cfg.n_head, cfg.head_dim) for part in jnp.split(qkv_BxTx3D, 3, axis=-1)
        )
        if cache is None:
            k_BxSxHxK, v_BxSxHxK = k_BxTxHxK, v_BxTxHxK
        else:
            start = (0, cache_index, 0, 0)
            k_BxSxHxK = lax.dynamic_update_slice(cache.key_BxSxHxK, k_BxTxHxK.astype(cache.key_BxSxHxK.dtype), start)
            v_BxSxHxK = lax.dynamic_update_slice(
                cache.value_BxSxHxK, v_BxTxHxK.astype(cache.value_BxSxHxK.dtype), start
            )
            cache = KVCache(k_BxSxHxK, v_BxSxHxK)
        k_BxSxHxK, v_BxSxHxK = k_BxSxHxK.astype(q_BxTxHxK.dtype), v_BxSxHxK.astype(q_BxTxHxK.dtype)

        if train and cfg.attn_pdrop > 0.0:  # materialises (B, H, T, S) probabilities to drop some
            if mask_BxTxS is None:
                mask_BxTxS = attention_mask_BxTxS(jnp.ones((B, T), bool), T)
            out_BxTxHxK = dot_product_attention_with_dropout(
                q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxTxS, cfg.attn_pdrop, self.make_rng("dropout")
            )
        elif mask_BxTxS is None:  # nothing padded: causal, and cuDNN flash attention on GPUs in bf16 / fp16
            out_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, is_causal=True)
        else:
            out_BxTxHxK = jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_BxTxS[:, None])
        y_BxTxD = Linear(cfg, D, residual=True, transposed=self.transposed_kernels, name="c_proj")(out_BxTxHxK.reshape(B, T, D))
        return nn.Dropout(cfg.resid_pdrop)(y_BxTxD, deterministic=not train), cache


class MLP(nn.Module):
    config: GPT2Config
    transposed_kernels: bool = False

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.config
        fc_BxTxF = Linear(cfg, cfg.inner_dim, transposed=self.transposed_kernels, name="c_fc")(x_BxTxD)
        h_BxTxF = ACTIVATIONS[cfg.activation_function](fc_BxTxF)
        y_BxTxD = Linear(cfg, cfg.n_embd, residual=True, transposed=self.transposed_kernels, name="c_proj")(h_BxTxF)
        return nn.Dropout(cfg.resid_pdrop)(y_BxTxD, deterministic=not train)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    config: GPT2Config
    transposed_kernels: bool = False

    @nn.compact
    def __call__(
        self,
        x_BxTxD: jax.Array,
        mask_BxTxS: jax.Array | None,
        *,
        train: bool,
        cache: KVCache | None = None,
        cache_index: Any = None,
    ) -> tuple[jax.Array, KVCache | None]:
        attn_BxTxD, cache = Attention(self.config, self.transposed_kernels, name="attn")(
            _layer_norm(self.config, "ln_1")(x_BxTxD), mask_BxTxS, train=train, cache=cache, cache_index=cache_index
        )
        x_BxTxD = x_BxTxD + attn_BxTxD
        mlp = MLP(self.config, self.transposed_kernels, name="mlp")
        x_BxTxD = x_BxTxD + mlp(_layer_norm(self.config, "ln_2")(x_BxTxD), train=train)
        return x_BxTxD, cache


class GPT2Model(nn.Module):
    """Embeddings, the blocks and the final LayerNorm; returns hidden states."""

    config: GPT2Config
    transposed_kernels: bool = False  # Linear kernels held (out, in): see `Linear`

    def setup(self) -> None:
        cfg = self.config
        embed = dict(
            embedding_init=nn.initializers.normal(cfg.initializer_range),
            dtype=cfg.compute_dtype,
            param_dtype=cfg.storage_dtype,
        )
        self.wte = nn.Embed(cfg.vocab_size, cfg.n_embd, **embed)
        self.wpe = nn.Embed(cfg.n_positions, cfg.n_embd, **embed)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.h = [Block(cfg, self.transposed_kernels, name=f"h_{i}") for i in range(cfg.n_layer)]
        self.ln_f = _layer_norm(cfg, "ln_f")

    def __call__(
        self,
        input_ids_BxT: jax.Array,
        position_ids_BxT: jax.Array,
        attention_mask_BxS: jax.Array | None,
        *,
        train: bool,
        cache: Sequence[KVCache] | None = None,
        cache_index: Any = None,
    ) -> tuple[jax.Array, tuple[KVCache, ...] | None]:
        """`attention_mask_BxS` None (only without a cache): no padding, so the causal fast path."""
        T = input_ids_BxT.shape[1]
        mask_BxTxS = None
        if attention_mask_BxS is not None:
            mask_BxTxS = attention_mask_BxTxS(attention_mask_BxS, T, 0 if cache is None else cache_index)
        with self.config.matmul_precision_context():
            x_BxTxD = self.wte(input_ids_BxT) + self.wpe(position_ids_BxT)
            x_BxTxD = self.drop(x_BxTxD, deterministic=not train)
            new_cache = []
            for i, block in enumerate(self.h):
                layer_cache = None if cache is None else cache[i]
                x_BxTxD, layer_cache = block(x_BxTxD, mask_BxTxS, train=train, cache=layer_cache,
                                             cache_index=cache_index)
                new_cache.append(layer_cache)
            return self.ln_f(x_BxTxD), None if cache is None else tuple(new_cache)

    def logits(self, h_BxTxD: jax.Array) -> jax.Array:
        """The tied LM head: h @ wte.T, accumulated and returned in float32."""
        wte_VxD = self.wte.embedding.astype(self.config.compute_dtype)
        with self.config.matmul_precision_context():
            return jnp.einsum("btd,vd->btv", h_BxTxD, wte_VxD, preferred_element_type=jnp.float32)


class GPT2LMHeadModule(nn.Module):
    """GPT-2 with its tied LM head: token ids -> float32 logits (and the updated cache).

    `attention_mask_BxS` marks real tokens (1) and padding (0) over the S key slots: the
    T inputs without a cache, the whole cache with one. `position_ids_BxT` default to
    `cache_index + arange(T)`.
    """

    config: GPT2Config
    transposed_kernels: bool = False  # Linear kernels held (out, in): see `Linear`

    def setup(self) -> None:
        self.transformer = GPT2Model(self.config, self.transposed_kernels)

    def __call__(
        self,
        input_ids_BxT: jax.Array,
        attention_mask_BxS: jax.Array | None = None,
        position_ids_BxT: jax.Array | None = None,
        *,
        train: bool = False,
        cache: Sequence[KVCache] | None = None,
        cache_index: Any = None,
    ) -> tuple[jax.Array, tuple[KVCache, ...] | None]:
        B, T = input_ids_BxT.shape
        if cache is not None and cache_index is None:
            raise ValueError("cache_index is required with a cache")
        if attention_mask_BxS is None and cache is not None:
            attention_mask_BxS = jnp.ones((B, cache[0].key_BxSxHxK.shape[1]), jnp.int32)
        if position_ids_BxT is None:
            offset = 0 if cache is None else cache_index
            position_ids_BxT = jnp.broadcast_to(offset + jnp.arange(T), (B, T))
        h_BxTxD, cache = self.transformer(
            input_ids_BxT, position_ids_BxT, attention_mask_BxS, train=train, cache=cache, cache_index=cache_index
        )
        return self.transformer.logits(h_BxTxD), cache


def init_params(config: GPT2Config, seed: int = 0) -> Any:
    """GPT-2 initialisation: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 n_layer)."""
    module = GPT2LMHeadModule(config)
    dummy = jnp.zeros((1, 1), jnp.int32)
    return jax.jit(lambda key: module.init(key, dummy)["params"])(jax.random.key(seed))


def next_token_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Mean cross-entropy (float32) of already-shifted targets: logits at t predict targets at t."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), targets_BxT))


def lm_loss_sum_and_count(logits_BxTxV: jax.Array, labels_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy (float32) and the number of counted tokens.

    Hugging Face semantics: logits at t predict labels at t + 1; labels equal to -100 do not count.
    """
    logits_BxTxV = logits_BxTxV[:, :-1].astype(jnp.float32)
    targets_BxT = labels_BxT[:, 1:]
    counted_BxT = targets_BxT != IGNORE_INDEX
    losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, jnp.where(counted_BxT, targets_BxT, 0))
    return jnp.sum(jnp.where(counted_BxT, losses_BxT, 0.0)), jnp.sum(counted_BxT)


def lm_loss(logits_BxTxV: jax.Array, labels_BxT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over counted tokens (NaN when none count, as in PyTorch)."""
    loss_sum, count = lm_loss_sum_and_count(logits_BxTxV, labels_BxT)
    return loss_sum / count
