"""The one exception type for mistakes a user can fix.

Everything that raises `UserError` carries a message that names the problem and what to
do about it; the CLI prints it as a single line and exits with status 2.
"""


class UserError(ValueError):
    """Bad input: a missing path, an inconsistent config, a corrupt checkpoint, ..."""


class Stopped(Exception):
    """Training stopped on SIGTERM / SIGINT after saving a checkpoint at `step`."""

    def __init__(self, step: int, signum: int):
        import signal

        super().__init__(f"stopped at step {step} by {signal.Signals(signum).name}; checkpoint saved")
        self.step, self.signum = step, signum
