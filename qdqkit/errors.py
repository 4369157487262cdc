"""Errors that reach the user.

A `UserError` is the one kind of failure the command line reports as a single line with exit code 2 and no
traceback: bad input, bad usage, a missing piece the user can supply. Anything else is a bug in qdqkit or in a
plugin, and keeps its traceback.
"""


class UserError(Exception):
    """Bad input or usage. The message is one line that says what is wrong and what to do about it."""

    exit_code = 2


class ValidationFailed(Exception):
    """A quantized model did not meet the fidelity thresholds the user asked for (exit code 1).

    ``stats`` carries the figures of the failing step, so that the report still shows them.
    """

    exit_code = 1

    def __init__(self, message: str, stats: dict | None = None) -> None:
        super().__init__(message)
        self.stats = stats or {}


class PassContractError(Exception):
    """A pass broke its own contract (a bug in the pass, addressed to its author, not to the user)."""
