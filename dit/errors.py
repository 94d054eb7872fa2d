"""The one exception type that command-line entry points turn into a clean message and exit code."""

import sys


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix; no traceback is shown."""

    exit_code = 2


def report(error: UserError) -> int:
    """What every command does with a UserError: its one paragraph on stderr; returns the exit code."""
    print(f"error: {error}", file=sys.stderr)
    return error.exit_code
