"""cvmctl: run, measure and monitor confidential VMs (AMD SEV-SNP, Intel TDX) beside normal VMs.

This package holds the ``cvmctl`` command line and the pieces every program shares:
address parsing (:mod:`cvmctl.address`), the socket relays (:mod:`cvmctl.relay`), the
trio/grpcio bridge (:mod:`cvmctl.grpc_bridge`), logging (:mod:`cvmctl.log`) and the error
hierarchy (:mod:`cvmctl.errors`). The two long-running programs live in ``host_daemon``
and ``guest_agent``; the wire protocol in ``proto/cvm/v1``.
"""

import os

# Every program here forks only to exec (subprocess), so grpcio's fork handlers, which
# exist for children that go on using gRPC, have nothing to do, and with grpc.aio serving
# they can crash a child between fork and exec (a benchmark server died with SIGSEGV in
# the dev guest). grpc's doc/fork_support.md: set this when every fork is followed by
# exec. It must be in the environment before grpc is first imported: the programs' entry
# modules import this package before anything that imports grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

# The one place the version is written; pyproject.toml reads it from here. A constant
# rather than importlib.metadata, whose import costs the agent ~3 MiB of resident memory.
__version__ = "0.1.0"
