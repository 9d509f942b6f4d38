"""Errors that are the user's to fix.

A `UserError` reaches the command line as one line on stderr and exit code 2,
never as a traceback: bad configs, missing files, corrupt checkpoints and the
like. Anything else that escapes is a bug in this project.
"""

import difflib


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""

    exit_code = 2


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM: the run finished its current step, saved last.ckpt and stopped (exit 128 + signal)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def did_you_mean(name: str, options) -> str:
    """" (did you mean 'X'?)" for the option closest to a misspelt name, or "" when none is close."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
