"""The one exception type that command-line entry points turn into a clean message and exit code."""

import sys


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix; no traceback is shown."""

    exit_code = 2


def report(error: UserError) -> int:
    """What every command does with a UserError: its one paragraph on stderr; returns the exit code."""
    print(f"error: {error}", file=sys.stderr)
    return error.exit_code


def check_sizes(sizes: dict[str, tuple[int, int]]) -> None:
    """Command-line sizes {flag: (value, an example)}: a size below 1 makes nothing, so it is refused
    before anything slow or written, every bad flag named."""
    bad = [f"{flag} {value}" for flag, (value, _) in sizes.items() if value < 1]
    if bad:
        raise UserError(f"{' and '.join(bad)}: sizes must be positive whole numbers, such as "
                        + " ".join(f"{flag} {example}" for flag, (_, example) in sizes.items()) + ".")


def key_mismatch(expected, given) -> str:
    """How a weight file's keys differ from the ones a loader expects, for its error ("" when they match)."""
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    problems = [f"{len(keys)} keys are {what}, such as {', '.join(keys[:5])}"
                for keys, what in ((missing, "missing"), (unexpected, "unexpected")) if keys]
    return "; ".join(problems)


def check_weights(expected: dict, given, error: type[UserError], not_what: str, fix: str) -> None:
    """Raises `error` unless `given` (a state dict) holds every key of `expected` ({key: shape}) with its
    shape and no other: "{not_what}: <the missing and unexpected keys, or the first of a wrong shape>. {fix}"."""
    problems = key_mismatch(expected, given)
    if not problems:
        wrong = next((key for key, shape in expected.items() if tuple(given[key].shape) != shape), None)
        if wrong is not None:
            problems = f"{wrong} in the file has shape {tuple(given[wrong].shape)}, expected {expected[wrong]}"
    if problems:
        raise error(f"{not_what}: {problems}. {fix}")
