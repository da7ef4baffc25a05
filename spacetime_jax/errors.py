"""The user-facing error type: the CLI prints its message as one line and exits non-zero."""


class UserError(Exception):
    """Bad input a person can fix (a path, a config key, a prompt, a checkpoint)."""
