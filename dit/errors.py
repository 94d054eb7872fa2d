"""The one exception type that command-line entry points turn into a clean message and exit code."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix; no traceback is shown."""

    exit_code = 2
