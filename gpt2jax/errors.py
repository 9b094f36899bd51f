"""The one exception type for mistakes a user can fix.

Everything that raises `UserError` carries a message that names the problem and what to
do about it; the CLI prints it as a single line and exits with status 2.
"""

from typing import Any


class UserError(ValueError):
    """Bad input: a missing path, an inconsistent config, a corrupt checkpoint, ..."""


def check_ids(name: str, ids: Any, upper: int, what: str, also: tuple[int, ...] = ()) -> None:
    """Integer ids (token or position ids, labels) must lie in [0, upper) or be one of `also` (labels' -100);
    `what` names the limit. Floats are refused rather than truncated. Arrays being traced by JAX have no
    values to check, only their dtype."""
    import jax
    import numpy as np

    if ids is None:
        return
    dtype = ids.dtype if isinstance(ids, jax.core.Tracer) else np.asarray(ids).dtype
    if np.dtype(dtype).kind not in "iu":
        raise UserError(f"{name} must hold integer ids, got {np.dtype(dtype).name} values")
    if isinstance(ids, jax.core.Tracer):
        return
    array = np.asarray(ids)
    outside = array[((array < 0) | (array >= upper)) & ~np.isin(array, also)] if array.size else array
    if outside.size:
        allowed = f"; {' and '.join(map(str, also))} also allowed" if also else ""
        raise UserError(f"{name} has values in [{array.min()}, {array.max()}] but {what} is {upper} (such as "
                        f"{outside.flat[0]}: ids must lie in [0, {upper}){allowed})")


def describe(error: BaseException) -> str:
    """"Type: first line of the message" (at most 200 characters of it): how gpt2jax quotes an exception from a
    library inside its own one-line messages."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


class Stopped(Exception):
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint at `step`."""

    def __init__(self, step: int, signum: int):
        import signal

        super().__init__(f"stopped at step {step} by {signal.Signals(signum).name}; checkpoint saved")
        self.step, self.signum = step, signum
