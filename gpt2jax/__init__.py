"""gpt2jax: GPT-2 in JAX/Flax with a Hugging Face-compatible API."""

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
