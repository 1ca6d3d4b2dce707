"""cvmctl: run, measure and monitor confidential VMs (AMD SEV-SNP, Intel TDX) beside normal VMs.

This package is the ``cvmctl`` command line, the top layer: it drives the host daemon
(``host_daemon``) and guest agents (``guest_agent``) over gRPC, runs the benchmark
catalogue (``workloads``) and verifies evidence (``cvmattest``). What every program shares
lives in ``cvmcore``; the wire protocol in ``proto/cvm/v1``.
"""

from cvmcore import __version__

__all__ = ["__version__"]
