"""The one exception type for mistakes a user can fix.

Everything that raises `UserError` carries a message that names the problem and what to
do about it; the CLI prints it as a single line and exits with status 2.
"""


class UserError(ValueError):
    """Bad input: a missing path, an inconsistent config, a corrupt checkpoint, ..."""
