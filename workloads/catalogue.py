"""The benchmark catalogue: every workload ``cvmctl bench`` knows, by name.

==============  =============  ==========================================================
name            kind           what
==============  =============  ==========================================================
nginx           client-server  nginx in the guest, ``wrk --latency`` on the host
iperf-tcp       client-server  iperf3 TCP, -P 32 -l 128K
iperf-udp       client-server  iperf3 UDP, -P 8 -b 0, lengths 64..1460
ping            client-server  ping from the host, sizes 64..1024 (no server)
memcached       client-server  memcached in the guest, memaslap on the host
fio             guest          the study's 9 fio jobs on a scratch file
memory          guest          mbw and sysbench memory bandwidth
vmexit          guest          cpuid / port I/O / rdmsr exit latency (in process)
sysbench        guest          sysbench cpu, threads; stress-ng stressors
boot            external       boot phases, from the host daemon
attestation     external       attestation steps, from the agent
ml-inference    guest          BERT-style and AlexNet-style inference (PyTorch, CPU)
blender         guest          Cycles rendering of a generated scene, seconds per frame
npb             guest          NAS Parallel Benchmarks: listed as unavailable (no package)
==============  =============  ==========================================================

The agent resolves a workload name the host sent with :func:`get` and validates the
parameters with :meth:`workloads.model.Workload.validate` before building any argv.
"""

from __future__ import annotations

from cvmcore.errors import UsageError
from workloads.apps import Blender, MlInference, Npb
from workloads.external import Attestation, Boot
from workloads.model import Workload
from workloads.net import IperfTcp, IperfUdp, Memcached, Nginx, Ping
from workloads.system import Fio, Memory, Sysbench
from workloads.vmexit import Vmexit

CATALOGUE: dict[str, Workload] = {
    w.name: w
    for w in (
        Nginx(),
        IperfTcp(),
        IperfUdp(),
        Ping(),
        Memcached(),
        Fio(),
        Memory(),
        Vmexit(),
        Sysbench(),
        Boot(),
        Attestation(),
        MlInference(),
        Blender(),
        Npb(),
    )
}


def get(name: str) -> Workload:
    """The workload called ``name``; :class:`UsageError` listing the known names otherwise."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise UsageError(f"unknown workload {name!r} (workloads: {', '.join(CATALOGUE)})") from None
