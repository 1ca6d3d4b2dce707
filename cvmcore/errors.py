"""The error hierarchy shared by the CLI, the agent and the daemon.

Every error a user can cause or meet carries a message meant for a person (one line, no
traceback) and, where there is one, the underlying exception as ``__cause__``. The CLI
prints ``cvmctl: error: <message>`` and exits with :attr:`CvmError.exit_code`.

    CvmError                   anything cvmctl reports to a user
    ├── UsageError             bad input: malformed address, bad option value (exit 2)
    ├── ConnectError           nothing answered at an address (exit 3)
    ├── DeadlineExceeded       an operation ran past its deadline (exit 4)
    └── RemoteError            the peer answered with an error status (exit 1)
"""

from __future__ import annotations


class CvmError(Exception):
    """Base class: an error with a message for a person and an exit code for the CLI."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(CvmError):
    """The input was malformed or out of range; retrying the same input cannot succeed."""

    exit_code = 2


class ConnectError(CvmError):
    """Nothing answered at the address (refused, no such socket, no route)."""

    exit_code = 3


class DeadlineExceeded(CvmError):
    """The operation did not finish before its deadline."""

    exit_code = 4


class RemoteError(CvmError):
    """The peer answered, with an error status."""

    exit_code = 1
