"""The well-known numbers, paths and names of cvmctl: each written here once.

Ports and addresses are what the other side assumes when nobody says otherwise, so a
second spelling of one that drifts breaks a pairing silently. Directories follow the XDG
base directory specification: an environment variable when set and absolute, else the
documented fallback under the home directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

#: The vsock port the agent listens on inside a guest, and that the host dials.
AGENT_VSOCK_PORT: Final = 1024
#: The vsock context id of the host, the only peer the agent accepts in a VM.
HOST_CID: Final = 2
#: The agent's Prometheus ``/metrics`` port when ``--metrics-listen`` names none.
AGENT_METRICS_PORT: Final = 9464
#: The host daemon's ``/metrics`` and ``/sd`` port used in the examples and deploy files.
HOSTD_METRICS_PORT: Final = 9465

#: The virtio-blk serial of a VM's scratch disk: the host daemon attaches it, the guest finds
#: it by this in /sys/block/vd*/serial (never by a path the host names).
SCRATCH_SERIAL: Final = "cvm-scratch"
#: Where a guest mounts its scratch disk (fio's scratch file goes there).
GUEST_SCRATCH_DIR: Final = "/scratch"

#: Where the system-wide host daemon listens (systemd's RuntimeDirectory=cvm-hostd).
HOSTD_SOCKET: Final = "/run/cvm-hostd/hostd.sock"
HOSTD_ADDRESS: Final = f"unix://{HOSTD_SOCKET}"
#: Environment variables naming the daemon and the agent for every ``cvmctl`` command.
HOSTD_ENV: Final = "CVM_HOSTD"
AGENT_ENV: Final = "CVM_AGENT"
#: Overrides the results store's directory.
DATA_DIR_ENV: Final = "CVMCTL_DATA_DIR"
#: The network of the VMs cvmctl creates for built-in targets: tap, passt or user; unset,
#: the best this host allows (tap as root, else passt where installed, else user).
NETWORK_ENV: Final = "CVMCTL_NETWORK"

#: The name under which cvmctl keeps its files in each XDG directory.
APP: Final = "cvmctl"


def hostd_address(given: str | None = None) -> str:
    """The daemon to talk to: ``given`` (a --host flag), else ``$CVM_HOSTD``, else the system one."""
    return given or os.environ.get(HOSTD_ENV) or HOSTD_ADDRESS


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable)
    # The spec: a relative path in these variables is invalid and must be ignored.
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / fallback


def cache_home() -> Path:
    """``$XDG_CACHE_HOME``, else ``~/.cache``."""
    return _xdg("XDG_CACHE_HOME", ".cache")


def state_home() -> Path:
    """``$XDG_STATE_HOME``, else ``~/.local/state``."""
    return _xdg("XDG_STATE_HOME", ".local/state")


def data_home() -> Path:
    """``$XDG_DATA_HOME``, else ``~/.local/share``."""
    return _xdg("XDG_DATA_HOME", ".local/share")


def cache_dir(*parts: str) -> Path:
    """cvmctl's cache directory (``$XDG_CACHE_HOME/cvmctl/...``)."""
    return cache_home().joinpath(APP, *parts)


def state_dir(*parts: str) -> Path:
    """cvmctl's state directory (``$XDG_STATE_HOME/cvmctl/...``)."""
    return state_home().joinpath(APP, *parts)


def data_dir() -> Path:
    """The results store: ``$CVMCTL_DATA_DIR``, else ``$XDG_DATA_HOME/cvmctl``."""
    override = os.environ.get(DATA_DIR_ENV)
    return Path(override) if override else data_home() / APP
