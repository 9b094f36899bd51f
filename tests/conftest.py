"""Force CPU with 8 fake devices before JAX is imported anywhere, so pmap paths are exercised."""

import os
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI's persistent compilation cache: one per test session, never the user's ~/.cache
os.environ["GPT2JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="gpt2jax-test-jax-cache-")
