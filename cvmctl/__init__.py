"""cvmctl: run, measure and monitor confidential VMs (AMD SEV-SNP, Intel TDX) beside normal VMs.

This package holds the ``cvmctl`` command line and the pieces every program shares:
address parsing (:mod:`cvmctl.address`), the socket relays (:mod:`cvmctl.relay`), the
trio/grpcio bridge (:mod:`cvmctl.grpc_bridge`), logging (:mod:`cvmctl.log`) and the error
hierarchy (:mod:`cvmctl.errors`). The two long-running programs live in ``host_daemon``
and ``guest_agent``; the wire protocol in ``proto/cvm/v1``.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("cvmctl")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
