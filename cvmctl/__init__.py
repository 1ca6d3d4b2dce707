"""cvmctl: run, measure and monitor confidential VMs (AMD SEV-SNP, Intel TDX) beside normal VMs.

This package holds the ``cvmctl`` command line and the pieces every program shares:
address parsing (:mod:`cvmctl.address`), the socket relays (:mod:`cvmctl.relay`), the
trio/grpcio bridge (:mod:`cvmctl.grpc_bridge`), logging (:mod:`cvmctl.log`) and the error
hierarchy (:mod:`cvmctl.errors`). The two long-running programs live in ``host_daemon``
and ``guest_agent``; the wire protocol in ``proto/cvm/v1``.
"""

# The one place the version is written; pyproject.toml reads it from here. A constant
# rather than importlib.metadata, whose import costs the agent ~3 MiB of resident memory.
__version__ = "0.1.0"
