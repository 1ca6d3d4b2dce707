"""``<program>_build_info{version,python_version} 1``: which build of a program answers a scrape.

The pattern of client_python's ``python_info`` and of Go exporters' ``*_build_info``: a
constant-1 gauge whose labels carry the version, so ``count by (version) (cvm_hostd_build_info)``
shows a fleet's upgrade and a version can be joined onto any series of the same target.
"""

from __future__ import annotations

import platform

from prometheus_client.core import GaugeMetricFamily

from cvmcore import __version__


def build_info(name: str, documentation: str) -> GaugeMetricFamily:
    """A ``<name>{version,python_version} 1`` family: this package's version and the interpreter's."""
    family = GaugeMetricFamily(name, documentation, labels=["version", "python_version"])
    family.add_metric([__version__, platform.python_version()], 1.0)
    return family
