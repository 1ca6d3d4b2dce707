"""Completing a spec that names no guest image with the built-in dev guest.

A spec with neither ``boot.firmware`` nor ``boot.kernel`` gets the dev guest
(:mod:`host_daemon.devguest`): the cached kernel and initramfs, the host's root shared
read-only over 9p (tag ``hostroot``) and a kernel command line that starts this very
installation's ``cvm-agent`` on the agent's vsock port. Everything else in the spec is kept, so
``name = "dev"`` alone is a bootable VM and the paper's knobs (forced swiotlb, haltpoll)
still apply.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from cvmcore.defaults import AGENT_VSOCK_PORT
from host_daemon.devguest.build import DevGuestImage, build_dev_guest
from host_daemon.devguest.init import HOST_ROOT_TAG, dev_guest_cmdline
from host_daemon.devguest.inputs import find_busybox, kernel_root
from host_daemon.netns import GUEST_ADDRESS, HOST_ADDRESS, PREFIX_LEN
from host_daemon.spec import Share, VMSpec

USER_NET_GUEST_IP = "10.0.2.15/24,10.0.2.2"
TAP_NET_GUEST_IP = f"{GUEST_ADDRESS}/{PREFIX_LEN},{HOST_ADDRESS}"
"""The guest's eth0 on the tap path: the guest end of the /30 in the VM's network namespace
(:mod:`host_daemon.netns`), the tap's address as its gateway."""


def guest_ip(mode: str) -> str | None:
    """The static ``ADDR/LEN,GATEWAY`` a guest is given on network ``mode`` (None: no NIC).

    passt is told the same configuration as user networking's (host_daemon.passt).
    """
    ips = {"user": USER_NET_GUEST_IP, "passt": USER_NET_GUEST_IP, "tap": TAP_NET_GUEST_IP}
    return ips.get(mode)


# build_dev_guest hashes every input (~0.1 s for a 12 MB kernel) to find its cached image;
# a start should not pay that each time. Remember the image per the inputs' stat().
_memo: dict[tuple[object, ...], DevGuestImage] = {}


def _inputs_fingerprint() -> tuple[object, ...]:
    parts: list[object] = []
    for path in (kernel_root(), kernel_root() / "kernel", find_busybox()):
        try:
            st = path.stat()
        except OSError:
            return ()
        parts.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(parts)


def dev_guest_image() -> DevGuestImage:
    """The built dev guest, built on first use and remembered while its inputs stay the same."""
    key = _inputs_fingerprint()
    image = _memo.get(key) if key else None
    if image is None or not (image.kernel.is_file() and image.initrd.is_file()):
        image = build_dev_guest()
        if key:
            _memo.clear()
            _memo[key] = image
    return image


def agent_executable() -> Path:
    """The cvm-agent beside the running interpreter (the project's venv)."""
    return Path(sys.executable).parent / "cvm-agent"


def wants_dev_guest(spec: VMSpec) -> bool:
    """``image = "dev"``, or a spec that names nothing to boot (no firmware, no kernel)."""
    return spec.image == "dev" or (spec.boot.firmware is None and spec.boot.kernel is None)


def complete_with_dev_guest(spec: VMSpec) -> VMSpec:
    if not wants_dev_guest(spec):
        return spec
    image = dev_guest_image()
    # QEMU user networking hands out 10.0.2.15 with the gateway at 10.0.2.2 (qemu-options.hx,
    # -netdev user); the dev guest has no DHCP client, so it is told the address. On the tap
    # path it is the guest end of the namespace's /30. The virtio-net driver enables every
    # queue pair up to the number of online CPUs by itself (virtnet_probe), so the guest needs
    # no `ethtool -L eth0 combined N`.
    ip = guest_ip(spec.network.mode)
    # The console the VM has: hvc0 on a virtio console (CVM flavours), else the 8250's ttyS0.
    console = "hvc0" if spec.console_device == "virtio" else "ttyS0"
    cmdline = dev_guest_cmdline(str(agent_executable()), port=AGENT_VSOCK_PORT, ip=ip, console=console)
    if spec.boot.cmdline:
        cmdline = f"{cmdline} {spec.boot.cmdline}"
    boot = dataclasses.replace(spec.boot, kernel=image.kernel, initrd=image.initrd, cmdline=cmdline)
    shares = spec.shares
    if not any(share.tag == HOST_ROOT_TAG for share in shares):
        shares = (*shares, Share(path=Path("/"), tag=HOST_ROOT_TAG, readonly=True))
    return dataclasses.replace(spec, boot=boot, shares=shares)
