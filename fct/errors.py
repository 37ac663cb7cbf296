"""The one exception type for errors a user can cause and fix."""

from __future__ import annotations


class FCTError(Exception):
    """A user-facing error: bad input, missing data, unknown name, bad config.

    The message is one line that names the problem and the fix. The CLI prints it as
    ``error: <message>`` and exits with status 2, without a traceback.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
