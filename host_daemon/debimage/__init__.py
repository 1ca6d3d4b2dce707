"""The Debian guest: a bootable Debian 12 image with systemd and the agent installed as a package.

Where the dev guest (:mod:`host_daemon.devguest`) runs the host's own checkout over 9p, this
image is what a production CVM runs: Debian's packages only, laid down by ``mmdebstrap``
(systemd, bookworm-backports' 6.12 kernel for the SEV-SNP and TDX guest drivers, configfs-tsm
and the haltpoll governor, the catalogue's benchmark tools, man-db), cvmctl installed from a
wheel of this checkout into the venv ``/opt/cvmctl``, and ``systemd/cvm-agent.service``
enabled. Its output is the form CVMs measure: a kernel and initrd for direct boot and an ext4
root file system image.

* :mod:`.recipe` (pure): the package list and suites, the ``mmdebstrap`` command, the
  customize hook script, the kernel command line;
* :mod:`.build` (I/O): the build, cached under ``$XDG_CACHE_HOME/cvmctl/debian-guest/<key>``
  where the key hashes every input, and ``current`` naming the last image built;
* :mod:`.spec`: ``image = "debian"`` (or an image directory) in a VM spec.

``cvmctl image build debian`` is the command; ``scripts/install-image-tools.sh`` installs
``mmdebstrap``.
"""

from host_daemon.debimage.base import ImageBuildError
from host_daemon.debimage.build import (
    DebianImage,
    build_debian_image,
    current_image,
    current_key,
    default_cache_dir,
    load_image,
    remove_cached_images,
)
from host_daemon.debimage.recipe import Recipe, customize_script, guest_cmdline, mmdebstrap_argv
from host_daemon.debimage.spec import complete_with_debian_image, wants_debian_image

__all__ = [
    "DebianImage",
    "ImageBuildError",
    "Recipe",
    "build_debian_image",
    "complete_with_debian_image",
    "current_image",
    "current_key",
    "customize_script",
    "default_cache_dir",
    "guest_cmdline",
    "load_image",
    "mmdebstrap_argv",
    "remove_cached_images",
    "wants_debian_image",
]
