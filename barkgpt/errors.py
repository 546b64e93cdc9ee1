"""One exception type for problems a user can fix; the CLI prints it without a traceback."""


class BarkError(Exception):
    """Bad input or configuration: the message names the problem and the fix. CLI exit code 2."""

    exit_code = 2
