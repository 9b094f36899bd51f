"""The one exception type for mistakes a user can fix.

Everything that raises `UserError` carries a message that names the problem and what to
do about it; the CLI prints it as a single line and exits with status 2.
"""

from typing import Any


class UserError(ValueError):
    """Bad input: a missing path, an inconsistent config, a corrupt checkpoint, ..."""


def check_ids(name: str, ids: Any, upper: int, what: str) -> None:
    """Integer ids (token or position ids) must lie in [0, upper); `what` names the limit. Arrays being
    traced by JAX have no values to check."""
    import jax
    import numpy as np

    if ids is None or isinstance(ids, jax.core.Tracer):
        return
    array = np.asarray(ids)
    if array.size and (array.min() < 0 or array.max() >= upper):
        raise UserError(f"{name} has values in [{array.min()}, {array.max()}] but {what} is {upper}")


class Stopped(Exception):
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint at `step`."""

    def __init__(self, step: int, signum: int):
        import signal

        super().__init__(f"stopped at step {step} by {signal.Signals(signum).name}; checkpoint saved")
        self.step, self.signum = step, signum
