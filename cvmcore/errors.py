"""The error hierarchy shared by the CLI, the agent and the daemon.

Every error a user can cause or meet carries a message meant for a person (one line, no
traceback) and, where there is one, the underlying exception as ``__cause__``. The CLI
prints ``cvmctl: error: <message>`` and exits with :attr:`CvmError.exit_code`.

    CvmError                   anything cvmctl reports to a user
    ├── UsageError             bad input: malformed address, bad option value (exit 2)
    ├── ConnectError           nothing answered at an address (exit 3)
    ├── DeadlineExceeded       an operation ran past its deadline (exit 4)
    ├── HostNotReady           this host cannot run what was asked, e.g. a TEE it lacks (exit 5)
    ├── AlreadyRunning         a live daemon owns that socket or state directory (exit 6)
    └── RemoteError            the peer answered with an error status (exit 1)

Over gRPC an error becomes a status code; a class with a :attr:`CvmError.wire_kind` also
travels by name in the trailing metadata key :data:`WIRE_KIND_KEY`, so the client raises
the same class (and the CLI exits with the same code) as the daemon did.
"""

from __future__ import annotations


class CvmError(Exception):
    """Base class: an error with a message for a person and an exit code for the CLI."""

    exit_code: int = 1
    #: The name this class travels under over gRPC, when it must survive the trip.
    wire_kind: str | None = None

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


class HostNotReady(CvmError):
    """This host lacks what the request needs (a TEE, its firmware, a QEMU that knows it).

    The message lists each missing requirement, as ``cvmctl host check`` words it.
    """

    exit_code = 5
    wire_kind = "host-not-ready"


class AlreadyRunning(CvmError):
    """Another live process owns the socket or the state directory this one was asked to use.

    A daemon refuses to start rather than take either over (:mod:`cvmcore.instance`).
    """

    exit_code = 6


WIRE_KIND_KEY = "cvm-error-kind"
WIRE_KINDS: dict[str, type[CvmError]] = {
    cls.wire_kind: cls for cls in (HostNotReady,) if cls.wire_kind is not None
}
