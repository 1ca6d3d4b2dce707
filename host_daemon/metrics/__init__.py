"""Host-side metrics of the daemon's VMs, for Prometheus.

The pieces, from the kernel to Prometheus::

    VMManager --provider--> HostCollector --snapshots--> collect()  --> /metrics
    (records, QMP)           | trio task every 1 s:                --> /metrics/vm/<name>
                             |  procfs.py  QEMU, vCPU, vhost threads   (guest series)
                             |  QMP        query-stats (KVM)        --> /sd (http_sd)
                             |  agent      GetMetrics (its own task)
                             parse.py: every parser, pure

- :mod:`.parse`      procfs lines, QMP ``query-stats`` / ``query-stats-schemas``, guest text;
- :mod:`.procfs`     the blocking reads of one QEMU process (injectable procfs root);
- :mod:`.state`      :class:`~.state.VMView` (what is followed) and the per-VM readings;
- :mod:`.families`   the metric families, pure functions of the states;
- :mod:`.collector`  :class:`~.collector.HostCollector`, the trio refresher and client_python collector;
- :mod:`.http`       the HTTP endpoint and the service discovery;
- :mod:`.wiring`     :func:`~.wiring.serve_host_metrics`, what ``cvm-hostd`` starts.

Metric names follow the project's conventions (``cvm_vm_*`` per VM with the label ``vm``;
base units; ``_total`` on counters; ``cvm_scrape_collector_*`` self-monitoring) and
prometheus.io/docs/practices/naming.
"""
