"""gpt2jax: GPT-2 in JAX/Flax with a Hugging Face-compatible API.

The package's shape legend (array names end in their shape, e.g. `logits_BxTxV`): B batch, T query time,
S key time, D width (n_embd), H heads, K head dim, F MLP width, V vocab. Modules add letters of their own,
each with one meaning in the whole package: A accumulation steps, U micro-batch, R row groups (train); G global batch,
C local devices, W = T + 1 tokens per window (batches, evaluate); M attention-mask columns (forward);
P prompt slots, N new tokens, L = P + N slots (generation, sampling).
"""

from gpt2jax.config import GPT2Config
from gpt2jax.errors import UserError
from gpt2jax.forward import BaseModelOutput, CausalLMOutput
from gpt2jax.generation import GenerationConfig
from gpt2jax.model import Cache, GPT2LMHeadModule, GPT2Module
from gpt2jax.modeling import GPT2LMHeadModel, GPT2Model
from gpt2jax.tokenizer import ByteTokenizer, GPT2Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "BaseModelOutput",
    "ByteTokenizer",
    "Cache",
    "CausalLMOutput",
    "GPT2Config",
    "GenerationConfig",
    "GPT2LMHeadModel",
    "GPT2LMHeadModule",
    "GPT2Model",
    "GPT2Module",
    "GPT2Tokenizer",
    "UserError",
    "load_tokenizer",
]
