"""Errors a person sees as one line. Anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input or a missing resource: print the message, exit 2, change nothing."""

    exit_code = 2


class WeightsMissing(UserError):
    """Model weights are neither on disk nor in the Hugging Face cache."""


class Cancelled(UserError):
    """The person stopped a running edit; nothing of it was stored."""

    exit_code = 130
