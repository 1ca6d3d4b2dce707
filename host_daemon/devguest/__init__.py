"""The built-in dev guest: a kernel plus a small initramfs that boots the host's own root.

A user without a guest image of their own still gets a VM that runs the project's agent:
the dev guest boots Debian's bookworm-backports kernel (6.12: SEV_GUEST, TDX_GUEST_DRIVER,
TSM_REPORTS, the haltpoll governor) with an initramfs made here from three things:

* ``busybox-static`` as the only userspace binary (``/bin/busybox``, a shell for ``/init``);
* the kernel modules the guest needs that the Debian kernel builds as modules (9p over
  virtio, overlayfs, vsock over virtio, virtio-net, virtio-blk; the SNP and TDX guest
  drivers only when the CPU flags show SNP or TDX), decompressed, with every module they
  depend on;
* ``/init``, a shell script that mounts the host's root read-only over 9p with a tmpfs
  overlay on top, switches into it with ``chroot`` and runs the agent from the project's
  venv. Because the whole host root is visible, workloads (nginx, fio, iperf3...) installed
  on the host run in the guest unchanged.

``scripts/install-guest-kernel.sh`` extracts the kernel and busybox packages into
``/var/cache/cvmctl/guest-kernel`` (``$CVM_GUEST_KERNEL_DIR``) without installing them; this
package finds them there. The built image is cached under ``$XDG_CACHE_HOME/cvmctl/dev-guest/
<key>/``, where the key hashes every input (file contents, the init script, the format
version), so a second build is a lookup and a changed kernel or init makes a new image.

Guest console protocol
----------------------
``/init`` prints one line per phase on the console, ``cvm-boot: <phase> <uptime> [detail]``
where ``<uptime>`` is the first field of ``/proc/uptime`` (seconds since the kernel started,
10 ms resolution). Phases, in order (:data:`BOOT_PHASES`): ``init-start``,
``modules-loaded tee=<none|sev-snp|tdx>``, ``root-mounted <overlay|tmpfs-dirs>``,
``agent-exec <path>``; then ``agent-exit <rc>`` and ``poweroff`` when the agent ends
(``no-agent`` when none was given). Along the way: ``module-skipped <name>`` (an optional
module failed), ``net-failed``, and ``fail <what>`` (then ``poweroff``).
:func:`parse_boot_marker` reads such a line. A daemon gets the "kernel" boot phase from
QEMU's spawn to ``init-start`` and "userspace" from there to the agent answering over vsock.

Kernel command line (see :func:`dev_guest_cmdline`): ``cvm.agent=PATH`` (an executable in the
host root), ``cvm.port=N`` (its vsock port, passed as ``--listen vsock://any:N``),
``cvm.root=TAG`` (the 9p mount tag, default ``hostroot``), ``cvm.ip=ADDR/LEN,GATEWAY`` (static
address for ``eth0``, e.g. QEMU user networking's ``10.0.2.15/24,10.0.2.2``),
``cvm.debug=shell`` (a shell on the console instead of powering off), ``cvm.9pcache=MODE``
(the 9p ``cache=`` option, default ``loose``: the host root is read-only to the guest, so
caching is safe, and it cuts the many small reads of Python's start-up), ``cvm.overlay=off`` (skip the
overlay, use the fallback root). The kernel keeps keys with a dot out of init's argv and
environment, but they stay readable in ``/proc/cmdline``. The matching QEMU options:
``-virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on``, a vsock device
(``vhost-vsock-pci,guest-cid=N``, or ``vhost-user-vsock-pci`` with vhost-device-vsock
holding the CID), ``-no-reboot`` (a panic then ends QEMU) and ``-serial`` for the console.

Why the initramfs is written in Python rather than with ``cpio``: the newc format is a
110-byte ASCII header per entry (``Documentation/driver-api/early-userspace/buffer-format.rst``
in the kernel tree), so the writer is short and pure; it needs no ``cpio`` package (not
installed on a minimal Debian), can record root ownership and the ``/dev/console`` device
node without running as root or under fakeroot, and fixes inode numbers and mtimes so that
the same inputs give the same bytes (a reproducible image, and a cache key that means it).

Why module dependencies come from ``.modinfo`` rather than ``modules.dep``: Debian's kernel
package does not ship ``modules.dep`` (``depmod`` writes it in the package's postinst, which
extraction skips, and ``kmod`` may not be installed). Each module records its direct
dependencies itself, as the ``depends=`` string in its ELF ``.modinfo`` section (the field
``modinfo -F depends`` prints); :func:`resolve_module_order` takes the closure. A
``modules.dep`` is used when present (:func:`parse_modules_dep`).
"""

from host_daemon.devguest.base import FORMAT_VERSION, ImageError
from host_daemon.devguest.build import (
    DevGuestImage,
    build_dev_guest,
    default_cache_dir,
    initramfs_entries,
    remove_cached_images,
)
from host_daemon.devguest.cpio import CpioEntry, newc_archive, parse_newc, with_parent_dirs
from host_daemon.devguest.init import (
    BOOT_PHASES,
    HOST_ROOT_TAG,
    MARKER_PREFIX,
    BootMarker,
    InitModule,
    dev_guest_cmdline,
    parse_boot_marker,
    render_init,
)
from host_daemon.devguest.inputs import (
    GuestKernel,
    ModuleTree,
    find_busybox,
    find_guest_kernel,
    is_static_elf,
    kernel_root,
    plan_modules,
)
from host_daemon.devguest.modules import (
    OPTIONAL_MODULES,
    REQUIRED_MODULES,
    elf_section,
    modinfo,
    modinfo_depends,
    module_name,
    parse_modules_dep,
    resolve_module_order,
)
from host_daemon.devguest.spec import complete_with_dev_guest, dev_guest_image, wants_dev_guest

__all__ = [
    "BOOT_PHASES",
    "FORMAT_VERSION",
    "HOST_ROOT_TAG",
    "MARKER_PREFIX",
    "OPTIONAL_MODULES",
    "REQUIRED_MODULES",
    "BootMarker",
    "CpioEntry",
    "DevGuestImage",
    "GuestKernel",
    "ImageError",
    "InitModule",
    "ModuleTree",
    "build_dev_guest",
    "complete_with_dev_guest",
    "default_cache_dir",
    "dev_guest_cmdline",
    "dev_guest_image",
    "elf_section",
    "find_busybox",
    "find_guest_kernel",
    "initramfs_entries",
    "is_static_elf",
    "kernel_root",
    "modinfo",
    "modinfo_depends",
    "module_name",
    "newc_archive",
    "parse_boot_marker",
    "parse_modules_dep",
    "parse_newc",
    "plan_modules",
    "remove_cached_images",
    "render_init",
    "resolve_module_order",
    "wants_dev_guest",
    "with_parent_dirs",
]
