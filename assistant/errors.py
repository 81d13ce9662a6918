"""Errors a person sees as one line. Anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """Bad input or a missing resource: print the message, exit 2, change nothing."""

    exit_code = 2


class WeightsMissing(UserError):
    """Model weights are neither on disk nor in the Hugging Face cache."""


class Cancelled(UserError):
    """The person stopped a running edit; nothing of that edit was stored (the steps or attempts that
    landed before it stay: `Stopped`)."""

    exit_code = 130


class Stopped(UserError):
    """A plan or the self-check's attempts ended early: what landed before it is kept (`exit_code`: that of
    the error that stopped it, 130 for a cancel)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
