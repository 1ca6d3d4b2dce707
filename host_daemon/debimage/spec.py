"""Completing a spec with ``image = "debian"`` (or an image directory) for direct boot.

The image brings three files (:class:`~host_daemon.debimage.build.DebianImage`): the
kernel and initrd go to ``boot.kernel``/``boot.initrd`` and the root file system becomes
the VM's first disk with ``snapshot = true``, so that every VM boots the image as built and
none changes it for the next. The command line (:func:`~host_daemon.debimage.recipe.guest_cmdline`)
names the root by label, the console the VM has and, with a network, the guest's static
address (the same addresses the dev guest is given). The agent starts from its unit
(``cvm-agent.service``) on the usual vsock port, so the daemon reaches it like any agent.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from host_daemon.debimage.build import DebianImage, current_image, load_image
from host_daemon.debimage.recipe import guest_cmdline
from host_daemon.devguest.spec import guest_ip
from host_daemon.spec import Disk, VMSpec


def wants_debian_image(spec: VMSpec) -> bool:
    """``image = "debian"`` or the path of an image directory."""
    return spec.image == "debian" or spec.image.startswith("/")


def debian_image_for(spec: VMSpec) -> DebianImage:
    return current_image() if spec.image == "debian" else load_image(Path(spec.image))


def complete_with_debian_image(spec: VMSpec) -> VMSpec:
    if not wants_debian_image(spec):
        return spec
    image = debian_image_for(spec)
    ip = guest_ip(spec.network.mode)
    console = "hvc0" if spec.console_device == "virtio" else "ttyS0"
    cmdline = guest_cmdline(console=console, ip=ip)
    if spec.boot.cmdline:
        cmdline = f"{cmdline} {spec.boot.cmdline}"
    boot = dataclasses.replace(spec.boot, kernel=image.kernel, initrd=image.initrd, cmdline=cmdline)
    root = Disk(path=image.root, format="raw", snapshot=True)
    return dataclasses.replace(spec, boot=boot, disks=(root, *spec.disks))
