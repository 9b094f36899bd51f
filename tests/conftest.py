"""Force CPU with 8 fake devices before JAX is imported anywhere, so pmap paths are exercised."""

import os
import tempfile

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI's persistent compilation cache: one per test session, never the user's ~/.cache
os.environ["GPT2JAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="gpt2jax-test-jax-cache-")


# Shared fixtures. Imported lazily: JAX must not start before the environment above is set.
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments", "smoke.py")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """The token-bin cache of the whole test session: the smoke experiment's pystdlib bins, prepared once."""
    from gpt2jax.data import prepare
    from gpt2jax.experiment import load_config

    directory = str(tmp_path_factory.mktemp("data-cache"))
    prepare(load_config(SMOKE, [f"--config.data.cache_dir={directory}"]).data, progress=False)
    return directory


@pytest.fixture(scope="session")
def smoke_run(cache_dir, tmp_path_factory):
    """The smoke experiment trained once on 8 devices (pmap, the default): the reference other runs equal."""
    import jax

    from gpt2jax.trainer import run_training
    from helpers import smoke

    run_dir = str(tmp_path_factory.mktemp("runs") / "smoke")
    assert jax.device_count() == 8
    run_training(smoke(cache_dir), run_dir, progress=False)
    return run_dir
