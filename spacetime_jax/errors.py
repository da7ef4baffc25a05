"""The user-facing error type: the CLI prints its message as one line and exits non-zero."""
import sys

# The exit status of bad input, distinct from a crash (1) and from a preempted run (143).
USER_ERROR_STATUS = 2


class UserError(Exception):
    """Bad input a person can fix (a path, a config key, a prompt, a checkpoint)."""


def exit_with(message: str) -> None:
    """Ends a command: `error: message` as one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(USER_ERROR_STATUS)
