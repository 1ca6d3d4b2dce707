"""The foundation every cvmctl program stands on: the CLI, the host daemon and the guest agent.

Nothing here knows about VMs, benchmarks or evidence; it is the plumbing the programs
share, each piece in one place:

``address``       the one address syntax (unix, tcp, vsock, hybrid vsock) and its parser
``relay``         socket relays: AF_VSOCK in front of a private gRPC socket, hybrid vsock
``grpc_bridge``   grpc.aio calls handed to trio, with deadlines and cancellation
``serve``         a gRPC server with health, on any address, started and stopped cleanly
``client``        a gRPC channel to any address, errors mapped to :mod:`.errors`
``daemon``        flags, logging and signals of a long-running program
``errors``        the exception hierarchy and the exit code each maps to
``defaults``      ports, socket paths and directories: the one home of each
``durable``       writing a file so that a crash leaves the old or the new, never half
``metrics_http``  a small HTTP server for Prometheus' text exposition
``instance``      one daemon per state directory; private directories a killed process cannot leak
``affinity``, ``cpuinfo``, ``log``, ``sdnotify``, ``watchdog``, ``tee``
"""

import os

# Every program here forks only to exec (subprocess), so grpcio's fork handlers, which
# exist for children that go on using gRPC, have nothing to do, and with grpc.aio serving
# they can crash a child between fork and exec. grpc's doc/fork_support.md: set this when
# every fork is followed by exec. It must be in the environment before grpc is first
# imported: the programs' entry modules import this package before anything that imports
# grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

# The one place the version is written; pyproject.toml reads it from here. A constant
# rather than importlib.metadata, whose import costs the agent resident memory.
__version__ = "0.1.0"
