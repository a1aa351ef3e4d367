"""The project's one user-facing error type."""


class MmkdError(Exception):
    """A mistake in the user's input or environment, reported as one line without a traceback.

    The CLIs catch it and print ``error: <message>``; library callers can catch it too. Messages name the
    file, sample or option at fault and, where it helps, how to fix it.
    """
