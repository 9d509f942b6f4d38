"""Errors that are the user's to fix.

A `UserError` reaches the command line as one line on stderr and exit code 2,
never as a traceback: bad configs, missing files, corrupt checkpoints and the
like. Anything else that escapes is a bug in this project.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""

    exit_code = 2
