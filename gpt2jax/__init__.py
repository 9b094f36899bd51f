"""gpt2jax: GPT-2 in JAX/Flax with a Hugging Face-compatible API."""

from gpt2jax.config import GPT2Config
from gpt2jax.errors import UserError
from gpt2jax.generation import GenerationConfig
from gpt2jax.model import GPT2LMHeadModule, GPT2Model
from gpt2jax.modeling import CausalLMOutput, GPT2LMHeadModel
from gpt2jax.tokenizer import ByteTokenizer, GPT2Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "ByteTokenizer",
    "CausalLMOutput",
    "GPT2Config",
    "GenerationConfig",
    "GPT2LMHeadModel",
    "GPT2LMHeadModule",
    "GPT2Model",
    "GPT2Tokenizer",
    "UserError",
    "load_tokenizer",
]
