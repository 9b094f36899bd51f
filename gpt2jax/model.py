"""Flax Linen GPT-2, parameter for parameter the Hugging Face `GPT2LMHeadModel`.

Legend: B batch, T query time, S key time (T, or the KV-cache length when decoding),
D model width (n_embd), H heads, K head dim, F MLP width, V vocab.

The parameter tree is Hugging Face Flax's (transformers 4.x `FlaxGPT2LMHeadModel`):
`transformer/h/0/attn/c_attn/kernel` is PyTorch's `transformer.h.0.attn.c_attn.weight`, transposed:
Linear kernels are held (out, in), as HF Flax's `FlaxConv1D` holds them and as XLA's CPU matrix-vector
products run fastest (so training, checkpoints and decoding share one layout). The LM head is tied to
`wte` and has no parameters of its own; `GPT2Module`'s tree is the `transformer` subtree.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from gpt2jax.attention import attend, upcast_float16_on_cpu
from gpt2jax.config import ACTIVATIONS, GPT2Config

IGNORE_INDEX = -100  # label value that the loss skips, as in PyTorch / Hugging Face


@flax.struct.dataclass
class KVCache:
    """Keys and values of one layer for all S cache slots, and `index`, the number of slots filled: the
    next tokens are written from there, and the slots from there on are stale."""

    key_BxSxHxK: jax.Array
    value_BxSxHxK: jax.Array
    index: jax.Array  # int32 scalar


@flax.struct.dataclass
class Cache:
    """The KV cache of every layer (a pytree: passing one to a jitted function does not retrace it).

    Indexable like the tuple of layers; `get_seq_length()` is the number of slots filled (HF's name),
    `max_length` the number of slots, `to_legacy_cache()` HF's ((key, value), ...) in (B, H, S, K)."""

    layers: tuple[KVCache, ...]

    def __getitem__(self, layer: int) -> KVCache:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def index(self) -> jax.Array:
        return self.layers[0].index

    @property
    def batch_size(self) -> int:
        return self.layers[0].key_BxSxHxK.shape[0]

    @property
    def max_length(self) -> int:
        return self.layers[0].key_BxSxHxK.shape[1]

    def get_seq_length(self) -> int:
        return int(self.index)

    def grown(self, length: int) -> Cache:
        """The same cache with `length` slots (more than now); the new ones are empty."""
        pad = lambda x: jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
        return Cache(tuple(KVCache(pad(c.key_BxSxHxK), pad(c.value_BxSxHxK), c.index) for c in self.layers))

    def to_legacy_cache(self) -> tuple[tuple[jax.Array, jax.Array], ...]:
        n = self.get_seq_length()
        heads_first = lambda x: jnp.swapaxes(x[:, :n], 1, 2)
        return tuple((heads_first(c.key_BxSxHxK), heads_first(c.value_BxSxHxK)) for c in self.layers)


def init_cache(config: GPT2Config, batch_size: int, length: int) -> Cache:
    """An empty cache of `length` slots per layer, in the compute dtype."""
    shape = (batch_size, length, config.n_head, config.head_dim)
    zeros = lambda: jnp.zeros(shape, config.compute_dtype)  # distinct buffers, so a cache can be donated
    return Cache(tuple(KVCache(zeros(), zeros(), jnp.zeros((), jnp.int32)) for _ in range(config.n_layer)))


class Linear(nn.Module):
    """HF Flax's FlaxConv1D: y = x @ kernel.T + bias with kernel (out, in) (PyTorch's Conv1D weight,
    transposed)."""

    config: GPT2Config
    features: int
    residual: bool = False  # GPT-2 scales the init of residual projections by 1/sqrt(2 n_layer)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        std = cfg.initializer_range / (math.sqrt(2 * cfg.n_layer) if self.residual else 1.0)
        kernel = self.param("kernel", nn.initializers.normal(std), (self.features, x.shape[-1]), cfg.storage_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), cfg.storage_dtype)
        kernel, bias = whole_under_mesh((kernel, bias))
        contract = ((x.ndim - 1,), (1,))
        y = lax.dot_general(x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype), (contract, ((), ())))
        return y + bias.astype(cfg.compute_dtype)


def whole_under_mesh(params: Any) -> Any:
    """Parameters gathered whole where they are used, when traced under a context mesh (the "fsdp" steps,
    gpt2jax.parallel, hold them sharded): each device then computes its own rows with whole weights, one
    module's weights at a time, and the gradients flow back as partial sums that are reduce-scattered to the
    parameters' shards (FSDP / ZeRO-3). Gathered in the storage dtype, so the gradients are summed across
    devices in float32, as pmap's are. Without a mesh: the parameters themselves."""
    if jax.sharding.get_abstract_mesh().empty:
        return params
    return jax.tree.map(lambda p: lax.with_sharding_constraint(p, jax.sharding.PartitionSpec()), params)


def _layer_norm(config: GPT2Config, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_epsilon, dtype=config.compute_dtype, param_dtype=config.storage_dtype, name=name
    )


class GPT2Part(nn.Module):
    """A module of GPT-2, made from its config."""

    config: GPT2Config


class Attention(GPT2Part):
    """Causal multi-head self-attention with a fused qkv projection and an optional KV cache; the attention
    itself is `gpt2jax.attention.attend`, the one home of every implementation."""

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, mask_BxS: jax.Array | None, positions_BxT: jax.Array, *, train: bool,
                 cache: KVCache | None = None,
                 segment_ids_BxT: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """`mask_BxS` marks real keys (1) and padding (0), None when nothing is padded; `segment_ids_BxT` the
        packed examples of each row (see `gpt2jax.attention.attend`).

        The probabilities are materialised when dropout applies to them, and when the "attentions"
        collection is mutable, which then receives them ((B, H, T, S) float32, as HF's `attentions`)."""
        cfg = self.config
        B, T, D = x_BxTxD.shape
        qkv_BxTx3D = Linear(cfg, 3 * D, name="c_attn")(x_BxTxD)
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = (
            part.reshape(B, T, cfg.n_head, cfg.head_dim) for part in jnp.split(qkv_BxTx3D, 3, axis=-1)
        )
        if cache is None:
            k_BxSxHxK, v_BxSxHxK, cache_index = k_BxTxHxK, v_BxTxHxK, None
        else:
            write = lambda old, new: lax.dynamic_update_slice(old, new.astype(old.dtype), (0, cache.index, 0, 0))
            cache_index = cache.index
            cache = KVCache(write(cache.key_BxSxHxK, k_BxTxHxK), write(cache.value_BxSxHxK, v_BxTxHxK), cache.index + T)
            k_BxSxHxK, v_BxSxHxK = cache.key_BxSxHxK, cache.value_BxSxHxK
        k_BxSxHxK, v_BxSxHxK = k_BxSxHxK.astype(q_BxTxHxK.dtype), v_BxSxHxK.astype(q_BxTxHxK.dtype)

        weights = self.is_mutable_collection("attentions")
        dropout_rng = self.make_rng("dropout") if train and cfg.attn_pdrop > 0 else None
        out_BxTxHxK, probs_BxHxTxS = attend(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxS, positions_BxT, config=cfg,
                                           cache_index=cache_index, dropout_rng=dropout_rng, weights=weights,
                                           segment_ids_BxT=segment_ids_BxT)
        if probs_BxHxTxS is not None:
            self.sow("attentions", "weights", probs_BxHxTxS)
        y_BxTxD = Linear(cfg, D, residual=True, name="c_proj")(
            out_BxTxHxK.reshape(B, T, D))
        return nn.Dropout(cfg.resid_pdrop)(y_BxTxD, deterministic=not train), cache


class MLP(GPT2Part):
    """fc, the activation, then the projection back to n_embd."""

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.config
        fc_BxTxF = Linear(cfg, cfg.inner_dim, name="c_fc")(x_BxTxD)
        h_BxTxF = ACTIVATIONS[cfg.activation_function](fc_BxTxF)
        y_BxTxD = Linear(cfg, cfg.n_embd, residual=True, name="c_proj")(h_BxTxF)
        return nn.Dropout(cfg.resid_pdrop)(y_BxTxD, deterministic=not train)


class Block(GPT2Part):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, mask_BxS: jax.Array | None, positions_BxT: jax.Array, train: bool,
                 cache: KVCache | None = None,
                 segment_ids_BxT: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        attention = Attention(self.config, name="attn")
        attn_BxTxD, cache = attention(_layer_norm(self.config, "ln_1")(x_BxTxD), mask_BxS, positions_BxT,
                                      train=train, cache=cache, segment_ids_BxT=segment_ids_BxT)
        x_BxTxD = x_BxTxD + attn_BxTxD
        mlp = MLP(self.config, name="mlp")
        x_BxTxD = x_BxTxD + mlp(_layer_norm(self.config, "ln_2")(x_BxTxD), train=train)
        return x_BxTxD, cache


class Blocks(GPT2Part):
    """The n_layer blocks, named "0", "1", ... (HF Flax's `FlaxGPT2BlockCollection`, named "h"). With
    `config.gradient_checkpointing` each block's activations are recomputed in the backward pass instead of
    stored (`nn.remat`). With the "hidden_states" collection mutable, each block's input is sown."""

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, mask_BxS: jax.Array | None, positions_BxT: jax.Array, train: bool,
                 cache: Cache | None, segment_ids_BxT: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
        block = nn.remat(Block, static_argnums=(4,)) if self.config.gradient_checkpointing else Block  # self is 0
        new_cache = []
        for i in range(self.config.n_layer):
            self.sow("hidden_states", "states", x_BxTxD)
            x_BxTxD, layer_cache = block(self.config, name=str(i))(x_BxTxD, mask_BxS, positions_BxT, train,
                                                                   None if cache is None else cache[i], segment_ids_BxT)
            new_cache.append(layer_cache)
        return x_BxTxD, None if cache is None else Cache(tuple(new_cache))


class GPT2Module(GPT2Part):
    """Embeddings, the blocks and the final LayerNorm; returns hidden states."""

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
        self.h = Blocks(cfg)
        self.ln_f = _layer_norm(cfg, "ln_f")

    def __call__(
        self,
        input_ids_BxT: jax.Array | None,
        attention_mask_BxS: jax.Array | None = None,
        position_ids_BxT: jax.Array | None = None,
        *,
        train: bool = False,
        cache: Cache | None = None,
        inputs_embeds_BxTxD: jax.Array | None = None,
        token_type_ids_BxT: jax.Array | None = None,
        segment_ids_BxT: jax.Array | None = None,
    ) -> tuple[jax.Array, Cache | None]:
        """Hidden states after `ln_f`, and the updated cache.

        `attention_mask_BxS` marks real tokens (1) and padding (0) over the S key slots: the T inputs
        without a cache, all the cache's slots with one; None: nothing padded (without a cache, the causal
        path that fused kernels take, see `gpt2jax.attention`). `position_ids_BxT` default to
        `cache.index + arange(T)`.
        `inputs_embeds_BxTxD` replace the token embeddings; `token_type_ids_BxT` add theirs (from `wte`, as
        GPT-2 does). `segment_ids_BxT` packs several examples in a row, each attending only to itself (pass each
        example's own positions as `position_ids_BxT`; no cache, no `attention_mask_BxS`: padding is a segment of
        its own). With the "hidden_states" collection mutable it receives HF's `hidden_states`: the
        input of every block, then the output of `ln_f`."""
        B, T = (input_ids_BxT if inputs_embeds_BxTxD is None else inputs_embeds_BxTxD).shape[:2]
        offset = 0 if cache is None else cache.index
        if position_ids_BxT is None:
            position_ids_BxT = jnp.broadcast_to(offset + jnp.arange(T), (B, T))
        with self.config.matmul_precision_context():
            x_BxTxD = self.embed(self.wte, input_ids_BxT) if inputs_embeds_BxTxD is None else inputs_embeds_BxTxD
            x_BxTxD = x_BxTxD.astype(self.config.compute_dtype) + self.embed(self.wpe, position_ids_BxT)
            if token_type_ids_BxT is not None:
                x_BxTxD = x_BxTxD + self.embed(self.wte, token_type_ids_BxT)
            x_BxTxD = self.drop(x_BxTxD, deterministic=not train)
            x_BxTxD, cache = self.h(x_BxTxD, attention_mask_BxS, position_ids_BxT, train, cache, segment_ids_BxT)
            h_BxTxD = self.ln_f(x_BxTxD)
            self.sow("hidden_states", "states", h_BxTxD)
            return h_BxTxD, cache

    def embed(self, table: nn.Embed, ids_BxT: jax.Array) -> jax.Array:
        """Rows of an embedding table in the compute dtype (what `nn.Embed` computes, the table whole under
        a mesh: `whole_under_mesh`)."""
        if not jnp.issubdtype(ids_BxT.dtype, jnp.integer):
            raise ValueError("input type must be an integer or unsigned integer")  # nn.Embed's check
        return jnp.take(whole_under_mesh(table.embedding).astype(self.config.compute_dtype), ids_BxT, axis=0)

    def logits(self, h_BxTxD: jax.Array) -> jax.Array:
        """The tied LM head: h @ wte.T, accumulated and returned in float32."""
        wte_VxD = whole_under_mesh(self.wte.embedding).astype(self.config.compute_dtype)
        accumulated = lambda h, w: jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32)
        with self.config.matmul_precision_context():
            return upcast_float16_on_cpu(accumulated, h_BxTxD, wte_VxD)


class GPT2LMHeadModule(GPT2Part):
    """GPT-2 with its tied LM head: token ids -> float32 logits (and the updated cache).

    `attention_mask_BxS` marks real tokens (1) and padding (0) over the S key slots: the
    T inputs without a cache, the whole cache with one. `position_ids_BxT` default to
    `cache.index + arange(T)` (the slots the cache has filled, then the T new ones).
    """

    def setup(self) -> None:
        self.transformer = GPT2Module(self.config)

    def __call__(self, input_ids_BxT: jax.Array | None, attention_mask_BxS: jax.Array | None = None,
                 position_ids_BxT: jax.Array | None = None, **options: Any) -> tuple[jax.Array, Cache | None]:
        """`GPT2Module`'s arguments (`options`: train, cache, inputs_embeds_BxTxD, token_type_ids_BxT,
        segment_ids_BxT), and
        the float32 logits (B, T, V) in place of the hidden states."""
        h_BxTxD, cache = self.transformer(input_ids_BxT, attention_mask_BxS, position_ids_BxT, **options)
        return self.transformer.logits(h_BxTxD), cache


def init_params(config: GPT2Config, seed: int | jax.Array = 0) -> Any:
    """`GPT2LMHeadModule`'s parameters from a seed or a key: GPT-2's initialisation, N(0, 0.02) weights,
    residual projections scaled by 1/sqrt(2 n_layer), biases 0, LayerNorms (1, 0)."""
    module = GPT2LMHeadModule(config)
    dummy = jnp.zeros((1, 1), jnp.int32)
    key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
    return jax.jit(lambda key: module.init(key, dummy)["params"])(key)


def next_token_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Mean cross-entropy (float32) of already-shifted targets: logits at t predict targets at t."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), targets_BxT))


def lm_loss_sum_and_count(logits_BxTxV: jax.Array, labels_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy (float32) and the number of counted tokens.

    Hugging Face semantics: logits at t predict labels at t + 1; labels equal to -100 do not count.
    """
    return target_loss_sum_and_count(logits_BxTxV[:, :-1], labels_BxT[:, 1:])


def target_loss_sum_and_count(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed cross-entropy (float32) of already-shifted targets (logits at t predict targets at t) and the number
    of targets counted: those equal to -100 (IGNORE_INDEX: prompts and padding in task fine-tuning) do not count."""
    counted_BxT = targets_BxT != IGNORE_INDEX
    losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32),
                                                                 jnp.where(counted_BxT, targets_BxT, 0))
    return jnp.sum(jnp.where(counted_BxT, losses_BxT, 0.0)), jnp.sum(counted_BxT)


def lm_loss(logits_BxTxV: jax.Array, labels_BxT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over counted tokens (NaN when none count, as in PyTorch)."""
    loss_sum, count = lm_loss_sum_and_count(logits_BxTxV, labels_BxT)
    return loss_sum / count
