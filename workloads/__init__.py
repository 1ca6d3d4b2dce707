"""The study's benchmark catalogue behind ``cvmctl bench``: what runs where, measured how.

Read in this order:

- :mod:`workloads.model`: ``Param``, ``Sample``, ``ServerPlan``, ``Unavailable`` and the
  ``Workload`` base class (which side runs what; the agent builds every argv itself);
- :mod:`workloads.catalogue`: ``CATALOGUE`` and ``get(name)``; the workloads live in
  :mod:`workloads.net` (nginx, iperf, ping, memcached), :mod:`workloads.system` (fio,
  memory, sysbench), :mod:`workloads.vmexit` (cpuid / port I/O / rdmsr exit latency from
  a machine-code loop) and :mod:`workloads.external` (boot phases, attestation steps);
- :mod:`workloads.capabilities`: what a workload needs of a target (ICMP, UDP, a scratch
  disk, a VM) and the refusal, before anything boots, where a target lacks it;
- :mod:`workloads.parsers`: the tools' outputs to numbers (pure);
- :mod:`workloads.stats`: summaries, outliers, paired overheads (pure);
- :mod:`workloads.execute`: running servers and commands with deadlines (shared by the
  agent and the local target);
- :mod:`workloads.runner`: the ``Target`` protocol, ``LocalTarget``, ``run_benchmark``
  (warm-ups, repetitions, A B A B interleaving);
- :mod:`workloads.store`: the SQLite results store; :mod:`workloads.metadata`: what a run
  records about the machine; :mod:`workloads.figures`: the study's figures.
"""
