"""Attention's one home (gpt2jax.attention): which implementation each platform's program holds, proven on
this CPU by lowering the real train and eval steps for CUDA and TPU; splash's numerics in Pallas interpret
mode; the choices that cannot be honoured, each refused in one line."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2jax import GPT2Config, GPT2LMHeadModel, attention
from gpt2jax.errors import UserError
from gpt2jax.experiment import base_config
from gpt2jax.model import GPT2LMHeadModule, init_params
from gpt2jax.parallel import make_layout
from gpt2jax.train import init_state, make_optimizer, pmapped_steps

# 124M's width (12 heads of 64), two blocks, and a sequence splash takes (a multiple of 128)
WIDE = GPT2Config(vocab_size=512, n_positions=256, n_embd=768, n_layer=2, n_head=12, dtype="bfloat16",
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
T = 256
CUDNN_FORWARD, CUDNN_BACKWARD = "@__cudnn$fmhaSoftmax(", "@__cudnn$fmhaSoftmaxBackward("
TPU_KERNEL = "tpu_custom_call"


@pytest.fixture
def cudnn_found(monkeypatch):
    """jax asks cuDNN for its version when it traces cuDNN attention; this machine has none, so the probe
    answers as cuDNN 9.10 would (what DESIGN.md prescribes for lowering for CUDA on a CPU)."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)


def lowered_steps(config, platform, dropout=False, packed=False):
    """The text of the pmapped train and eval steps the loop runs, lowered for `platform` (`packed`: batches of
    packed task examples, with positions and segment ids)."""
    n = jax.local_device_count()
    optimizer, schedule = make_optimizer(base_config().optim, 10)
    p_train, p_eval = pmapped_steps(GPT2LMHeadModule(config), optimizer, schedule, 1, dropout=dropout)
    state = jax.eval_shape(lambda: init_state(init_params(config), optimizer, 0))
    per_device = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape, x.dtype), tree)
    names = ("inputs", "targets") + (("positions", "segments") if packed else ())
    batch = {name: jax.ShapeDtypeStruct((n, 2, T), jnp.int32) for name in names}
    lower = lambda f, *args: jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return lower(p_train, per_device(state), batch), lower(p_eval, per_device(state.params), batch)


@pytest.mark.parametrize("requested", ["auto", "cudnn"])
def test_bfloat16_steps_lowered_for_cuda_hold_cudnn_flash_attention(requested, cudnn_found):
    train, evaluate = lowered_steps(WIDE.replace(attention=requested), "cuda")
    assert train.count(CUDNN_FORWARD) == WIDE.n_layer and train.count(CUDNN_BACKWARD) == WIDE.n_layer
    assert evaluate.count(CUDNN_FORWARD) == WIDE.n_layer and CUDNN_BACKWARD not in evaluate
    assert '\\22mask_type\\22: \\22CAUSAL\\22' in train and TPU_KERNEL not in train


@pytest.mark.parametrize("requested", ["auto", "splash"])
def test_bfloat16_steps_lowered_for_tpu_hold_pallas_splash_attention(requested, cudnn_found):
    train, evaluate = lowered_steps(WIDE.replace(attention=requested), "tpu")
    kernels = lambda text: set(re.findall(r'kernel_name = "(splash_mha_[a-z]+)', text))
    assert kernels(train) == {"splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"}  # forward and backward
    assert kernels(evaluate) == {"splash_mha_fwd"} and TPU_KERNEL in train and "cudnn" not in train


CUDNN_BIAS_FORWARD, CUDNN_BIAS_BACKWARD = "@__cudnn$fmhaScaleBiasSoftmax(", "@__cudnn$fmhaScaleBiasSoftmaxBackward("


def test_packed_examples_lowered_for_cuda_run_cudnn_with_the_segment_mask_as_a_bias(cudnn_found):
    """Packed task examples keep the fused kernel on CUDA: jax hands cuDNN the segment mask as a bias (forward and
    backward of every layer), and no layer falls back to XLA's materialised attention."""
    train, evaluate = lowered_steps(WIDE, "cuda", packed=True)
    assert train.count(CUDNN_BIAS_FORWARD) == WIDE.n_layer and train.count(CUDNN_BIAS_BACKWARD) == WIDE.n_layer
    assert evaluate.count(CUDNN_BIAS_FORWARD) == WIDE.n_layer and CUDNN_FORWARD not in train
    assert "tensor<2x1x256x256xbf16>" in train  # the bias: one (T, S) mask per row, broadcast over heads


def test_packed_examples_lowered_for_tpu_run_splash_with_its_segment_ids(cudnn_found):
    train, evaluate = lowered_steps(WIDE, "tpu", packed=True)
    kernels = lambda text: set(re.findall(r'kernel_name = "(splash_mha_[a-z]+)', text))
    assert kernels(train) == {"splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"}
    assert kernels(evaluate) == {"splash_mha_fwd"}


def test_splash_with_segment_ids_equals_xla_with_the_segment_mask_in_interpret_mode():
    B, H, K = 2, 2, 64
    q, k, v = (jax.random.normal(jax.random.key(i), (B, T, H, K)).astype(jnp.bfloat16) for i in range(3))
    segments = jnp.stack([jnp.repeat(jnp.arange(1, 5), T // 4), jnp.where(jnp.arange(T) < 100, 1, 2)])
    splash = attention.splash(q, k, v, segment_ids_BxT=segments, interpret=True).astype(jnp.float32)
    xla = attention.xla(q, k, v, segment_ids_BxT=segments).astype(jnp.float32)
    unsegmented = attention.xla(q, k, v).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(splash - xla)) / jnp.max(jnp.abs(xla))) < 0.02
    assert float(jnp.max(jnp.abs(splash - unsegmented)) / jnp.max(jnp.abs(xla))) > 0.1  # the segments matter


def lowered_fsdp_step(config, platform):
    """The text of the "fsdp" train step (state split over the 8 devices, 16 rows of T) lowered for `platform`."""
    optimizer, schedule = make_optimizer(base_config().optim, 10)
    abstract = jax.eval_shape(lambda: init_state(init_params(config), optimizer, 0))
    layout = make_layout("fsdp", None, GPT2LMHeadModule(config), optimizer, schedule, 1, False, abstract)
    return layout.lower(abstract, 16, T, lowering_platforms=(platform,)).as_text()


PER_DEVICE = "tensor<2x256x12x64xbf16>"  # one device's 2 of the 16 rows, as (rows, T, heads, head dim)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_the_fsdp_step_runs_each_fused_kernel_per_device_on_its_own_rows(platform, cudnn_found):
    """Under the mesh the kernels run inside shard_map over both mesh axes (XLA cannot split a custom call):
    forward and backward of every layer, each on one device's rows, never on the gathered batch."""
    text = lowered_fsdp_step(WIDE, platform)
    assert text.count("sdy.manual_computation(") == 2 * WIDE.n_layer  # forward and backward, per layer
    if platform == "cuda":
        calls = [line for line in text.splitlines() if "@__cudnn$fmhaSoftmax" in line]
        assert len(calls) == 2 * WIDE.n_layer and TPU_KERNEL not in text
    else:
        calls = [line for line in text.splitlines() if "tpu_custom_call" in line]
        assert set(re.findall(r'kernel_name = "(splash_mha_[a-z]+)', text)) == {"splash_mha_fwd", "splash_mha_dq",
                                                                                 "splash_mha_dkv"}
    heads_first = PER_DEVICE.replace("2x256x12x64", "2x12x256x64")  # splash's layout
    assert calls and all(PER_DEVICE in line or heads_first in line for line in calls)
    assert not any("16x256x12x64" in line or "16x12x256x64" in line for line in calls)


def test_auto_lowered_for_cpu_holds_neither_kernel(cudnn_found):
    for text in lowered_steps(WIDE, "cpu"):
        assert "cudnn" not in text and TPU_KERNEL not in text


def test_without_cudnn_auto_traces_xla_for_cuda_and_runs_here():
    """No cuDNN on this machine (nothing stubbed): the CUDA branch of "auto" is XLA, nothing fails to trace,
    and the bfloat16 forward here equals "xla"'s."""
    train, _ = lowered_steps(WIDE, "cuda")
    assert "cudnn" not in train
    small = WIDE.replace(n_embd=64, n_head=4)
    params = init_params(small, seed=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, small.vocab_size, (2, T)))
    auto = GPT2LMHeadModule(small).apply({"params": params}, ids)[0]
    xla = GPT2LMHeadModule(small.replace(attention="xla")).apply({"params": params}, ids)[0]
    np.testing.assert_array_equal(auto, xla)


def test_float32_never_takes_a_fused_kernel_and_stays_at_highest_precision(cudnn_found, monkeypatch):
    """Traced as on a GPU (the precision follows the process's backend): no cuDNN attention, every matmul of
    the train step at HIGHEST."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    train, evaluate = lowered_steps(WIDE.replace(dtype="float32"), "cuda")
    assert "cudnn" not in train + evaluate
    dots = [line for line in train.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) >= 8 * WIDE.n_layer and all("precision = [HIGHEST, HIGHEST]" in d for d in dots), dots[:2]


def test_attention_dropout_runs_xla_in_training_and_the_fused_kernel_in_eval(cudnn_found):
    train, evaluate = lowered_steps(WIDE.replace(attn_pdrop=0.1), "cuda", dropout=True)
    assert "cudnn" not in train and evaluate.count(CUDNN_FORWARD) == WIDE.n_layer


def test_right_padded_forward_lowered_for_cuda_takes_cudnn_by_key_lengths(cudnn_found):
    module = GPT2LMHeadModule(WIDE)
    params = jax.eval_shape(lambda: init_params(WIDE))
    ids = jax.ShapeDtypeStruct((2, T), jnp.int32)
    text = jax.jit(lambda p, x, m: module.apply({"params": p}, x, m)[0]).trace(params, ids, ids).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count(CUDNN_FORWARD) == WIDE.n_layer and "PADDING_CAUSAL" in text


def test_decoding_with_a_cache_runs_xla_everywhere(cudnn_found):
    from gpt2jax.model import init_cache

    module = GPT2LMHeadModule(WIDE.replace(attention="cudnn"))
    params = jax.eval_shape(lambda: init_params(WIDE))
    cache = jax.eval_shape(lambda: init_cache(WIDE, 2, T))
    step = lambda p, x, c: module.apply({"params": p}, x, cache=c)[0]
    for length in (1, 16):  # a decode step, a prefill
        ids = jax.ShapeDtypeStruct((2, length), jnp.int32)
        text = jax.jit(step).trace(params, ids, cache).lower(lowering_platforms=("cuda",)).as_text()
        assert "cudnn" not in text


def test_splash_equals_xla_in_interpret_mode_outputs_and_gradients():
    """Splash's Pallas kernels run on this CPU in interpret mode. bfloat16 inputs, against XLA on the same
    inputs, max |difference| / max |value| over seeds 0-2: at most 0.55% for outputs and 0.58% for gradients
    (a bfloat16 ulp is 0.4-0.8%); without the 1/sqrt(K) scale the outputs are off by 100-130%."""
    B, H, K = 2, 4, 64
    q, k, v = (jax.random.normal(jax.random.key(i), (B, T, H, K)).astype(jnp.bfloat16) for i in range(3))
    weights = jax.random.normal(jax.random.key(3), (B, T, H, K))
    splash = jax.jit(lambda q, k, v: attention.splash(q, k, v, interpret=True))
    xla = jax.jit(attention.xla)
    relative = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) /
                                  jnp.max(jnp.abs(b.astype(jnp.float32))))
    assert relative(splash(q, k, v), xla(q, k, v)) < 0.02
    loss = lambda f: lambda *qkv: jnp.sum(f(*qkv).astype(jnp.float32) * weights)
    grads_splash = jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v)
    grads_xla = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
    for mine, reference in zip(grads_splash, grads_xla):
        assert relative(mine, reference) < 0.02


def test_the_xla_path_equals_the_materialised_one():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 6, 3, 8)) for i in range(3))
    mask = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]])
    full = attention.full_mask_BxTxS(mask, 2, 6, 6, None)
    manual, probs = attention.materialised(q, k, v, full, 0.0, None)
    np.testing.assert_allclose(attention.xla(q, k, v, key_mask_BxS=mask)[:, 2:], manual[:, 2:], atol=1e-5)
    np.testing.assert_allclose(attention.xla(q, k, v)[0], manual[0], atol=1e-5)
    assert float(probs[1, :, 3, :2].max()) == 0.0  # padding gets no weight
    dropped, _ = attention.materialised(q, k, v, full, 0.5, jax.random.key(0))
    assert np.abs(dropped - manual).max() > 1e-2


REFUSED = {
    "cudnn on a CPU": (dict(attention="cudnn"), "cpu", 1024,
                       "needs an NVIDIA GPU (cuda), and this process runs on cpu"),
    "splash on a GPU": (dict(attention="splash"), "cuda", 1024, "needs a TPU, and this process runs on cuda"),
    "cudnn in float32": (dict(attention="cudnn", dtype="float32"), "cuda", 1024, "float32 compute: cuDNN"),
    "splash in float32": (dict(attention="splash", dtype="float32"), "tpu", 1024, "float32 compute: splash"),
    "cudnn with attention dropout": (dict(attention="cudnn", attn_pdrop=0.1), "cuda", 1024,
                                     "takes no attention dropout"),
    "splash with attention dropout": (dict(attention="splash", attn_pdrop=0.1), "tpu", 1024,
                                      "takes no attention dropout"),
    "splash at a length it cannot block": (dict(attention="splash"), "tpu", 1000,
                                           "sequence length 1000: splash attention takes multiples of 128"),
    "cudnn with a head dim it refuses": (dict(attention="cudnn", n_embd=96, n_head=8), "cuda", 1024,
                                         "head dim 12: cuDNN's flash attention takes multiples of 8 up to 128"),
    "cudnn without cuDNN": (dict(attention="cudnn"), "cuda", 1024, "cuDNN unavailable (cuDNN is not detected"),
    "an unknown name": (dict(attention="flash"), "cuda", 1024, "attention='flash' is not one of"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_an_explicit_choice_that_cannot_be_honoured_is_one_line(case):
    fields, platform, seq_len, message = REFUSED[case]
    with pytest.raises(UserError, match=None) as raised:
        config = GPT2Config(**{"dtype": "bfloat16", "attn_pdrop": 0.0, **fields})
        attention.check(config, platform, seq_len, train=True)
    assert message in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("platform, dtype, fields, expected", [
    ("cuda", "bfloat16", {}, "cudnn"),
    ("tpu", "bfloat16", {}, "splash"),
    ("cpu", "bfloat16", {}, "xla"),
    ("cuda", "float32", {}, "xla"),
    ("tpu", "float32", {}, "xla"),
    ("cuda", "bfloat16", dict(attn_pdrop=0.1), "xla"),
    ("cuda", "bfloat16", dict(attention="xla"), "xla"),
])
def test_auto_falls_back_to_xla_and_says_why(platform, dtype, fields, expected, cudnn_found):
    config = GPT2Config(**{"dtype": dtype, "attn_pdrop": 0.0, **fields})
    implementation, why = attention.check(config, platform, 1024, train=True)
    assert implementation == expected and why
    line = attention.describe(implementation, why)
    assert line.startswith("attention: ") and "\n" not in line


def test_an_explicit_kernel_that_cannot_run_here_fails_in_one_line_through_the_api():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, dtype="bfloat16",
                                       attention="cudnn"))
    with pytest.raises(UserError, match="cuDNN unavailable"):
        model(np.zeros((1, 8), np.int32))


def test_the_choice_lives_in_the_run_config_and_not_in_hugging_face_config(tmp_path):
    import json

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, attention="xla"))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "attention" not in json.loads(text) and "xla" not in text
    assert GPT2LMHeadModel.from_pretrained(tmp_path).config.attention == "auto"
