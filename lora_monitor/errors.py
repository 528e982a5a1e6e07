"""Errors a user can cause: shown as one clear line (what, where, how to fix), exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment; the message is the whole story, no traceback."""

    exit_code = 2


class EvalError(Exception):
    """A checkpoint could not be evaluated; recorded as a row with the reason, never fatal to the run."""
