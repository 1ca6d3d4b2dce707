"""Which OVMF image can boot which VM: the OVMF table QEMU reads, and where distributions put images.

Two parts, both without side effects beyond reading files:

* :func:`parse_ovmf_table` reads the GUIDed table at the end of an OVMF image exactly as QEMU
  does before it launches an SEV-SNP guest or a TD, and :func:`firmware_supports` says why an
  image does not fit a TEE (an empty list: it fits).
* :func:`find_firmware` looks in the places Debian, Ubuntu and Fedora install OVMF, and in
  QEMU's firmware descriptors, and reports every path: whether it exists and, if not fitting,
  why. ``root`` stands in for ``/`` so tests can build a fake file system.

The table (QEMU ``hw/i386/pc_sysfw_ovmf.c``, ``pc_system_parse_ovmf_flash`` and
``pc_system_ovmf_table_find``; edk2 ``OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm``)::

    ... | entry | ... | entry | u16 table length | footer GUID | 32 bytes (reset vector)
                                                   ^ 48 bytes before the end of the image

The table length counts the entries, itself and the footer GUID. Each entry is
``data | u16 entry length | GUID``, walked from the footer towards the start; GUIDs are stored
in little-endian (``uuid.UUID.bytes_le``) form. QEMU ignores images smaller than 4 KiB and
tables whose length does not fit the image. Entries read here:

* SEV hashes table ``7255371f-3a3b-4b04-927b-1da6efa8d454``: ``u32 base, u32 size`` of the area
  QEMU fills with the kernel, initrd and command-line hashes for ``kernel-hashes=on``
  (``target/i386/sev.c``, ``sev_add_kernel_loader_hashes``). QEMU exits unless
  ``base != 0 and size >= 176`` (its ``PaddedSevHashTable``): "guest firmware hashes table area
  is invalid (base=0x0 size=0x0)", or "has no hashes table GUID" without the entry.
* SEV metadata ``dc886566-984a-4798-a75e-5585a7bf67cc``: ``u32 offset`` from the end of the
  image to a header that starts with ``ASEV`` and whose ``u32 len`` lies in 16..offset
  (``pc_system_parse_sev_metadata``). It lists the pages an SNP launch must validate (CPUID,
  secrets); without it QEMU fails the SNP launch ("Failed to locate SEV metadata header").
* TDX metadata offset ``e47a6535-984a-4798-865e-4685a7bf8ec2``: ``u32 offset`` from the end of
  the image to the TDVF descriptor: signature ``TDVF``, ``u32 length`` within the image,
  ``u32 version`` 1, ``u32 number of sections`` >= 2 with ``length = 16 + 32 * sections``
  (``hw/i386/tdvf.c``, ``tdvf_get_metadata`` and ``tdvf_parse_metadata``). In edk2 the
  descriptor is preceded by its own GUID ``e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae``
  (``OvmfPkg/ResetVector/X64/IntelTdxMetadata.asm``); QEMU finds it through the table entry
  and does not look at that GUID, so neither does this module.

Which files fit our launch recipe (docs/qemu-options.md, "Firmware"): one unified image loaded
with ``-bios`` on both arms of a comparison, the kernel booted directly with ``-kernel``. That
rules out, whatever their table says:

* CODE-only halves of a CODE/VARS pflash pair (``OVMF_CODE*.fd``, descriptors mapping
  ``"device": "flash"`` in split mode): ``-bios`` takes one whole image;
* Secure Boot builds with enrolled keys (``*.ms.fd``, descriptor feature ``enrolled-keys``):
  they refuse an unsigned ``-kernel`` ("Secure boot image verification failed", research on
  Debian's ``OVMF.inteltdx.ms.fd``, docs/qemu-options.md);
* the AmdSev build (``OVMF.amdsev.fd``) unless ``kernel_hashes`` is on and the baseline uses
  another file: its blob verifier refuses a kernel that QEMU did not hash, so neither an SNP
  guest without kernel hashes nor the baseline (no SEV at all) gets past the firmware;
* images whose size is not a multiple of 64 KiB (QEMU: "could not load PC BIOS").
"""

from __future__ import annotations

import json
import re
import stat
import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .spec import Tee

FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_HASH_TABLE_GUID = uuid.UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
SEV_METADATA_GUID = uuid.UUID("dc886566-984a-4798-a75e-5585a7bf67cc")
TDX_METADATA_OFFSET_GUID = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2")
TDX_METADATA_GUID = uuid.UUID("e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae")
"""The GUID in front of the TDVF descriptor in edk2 images (not checked by QEMU, nor here)."""

FOOTER_FROM_END = 48  # the footer GUID starts 48 bytes before the end (32 bytes follow it)
MIN_IMAGE_SIZE = 4096  # QEMU: flash_size < TARGET_PAGE_SIZE -> no table
PADDED_SEV_HASH_TABLE_SIZE = 176  # sizeof(PaddedSevHashTable): 16 + 2 + 3 * (16 + 2 + 32), 16-aligned
SEV_METADATA_HEADER_SIZE = 16  # "ASEV", u32 len, u32 version, u32 number of descriptors
TDVF_DESCRIPTOR_SIZE = 16  # "TDVF", u32 length, u32 version, u32 number of sections
TDVF_SECTION_SIZE = 32
BIOS_SIZE_MULTIPLE = 64 * 1024  # QEMU x86_bios_rom_init: -bios images are whole 64 KiB blocks
MAX_IMAGE_SIZE = 64 * 1024 * 1024  # larger files are not read (no OVMF image is near this)


@dataclass(frozen=True)
class OvmfTable:
    """What QEMU finds in an image's OVMF table (all empty when the image has none)."""

    sev_hashes_area: tuple[int, int] | None = None  # (base, size); None = no hashes-table entry
    sev_metadata: bool = False  # a valid "ASEV" header: SNP-capable
    tdx_metadata: bool = False  # a valid "TDVF" descriptor: TDX-capable (TDVF)

    @property
    def sev_hashes_area_usable(self) -> bool:
        """Whether QEMU accepts ``kernel-hashes=on`` with this image."""
        if self.sev_hashes_area is None:
            return False
        base, size = self.sev_hashes_area
        return base != 0 and size >= PADDED_SEV_HASH_TABLE_SIZE


def ovmf_table_entries(image: bytes) -> dict[uuid.UUID, bytes]:
    """GUID -> entry data, walking the table from the footer as QEMU does (first hit wins)."""
    size = len(image)
    if size < MIN_IMAGE_SIZE:
        return {}
    footer = size - FOOTER_FROM_END
    if image[footer : footer + 16] != FOOTER_GUID.bytes_le:
        return {}
    end = footer - 2  # the u16 table length sits just before the footer GUID
    (length,) = struct.unpack_from("<H", image, end)
    total = length - 16 - 2
    if total < 0 or total > end:
        return {}  # QEMU: "OVMF table has invalid size"
    entries: dict[uuid.UUID, bytes] = {}
    ptr, left = end, total
    while left >= 16 + 2:
        guid = uuid.UUID(bytes_le=image[ptr - 16 : ptr])
        (entry_len,) = struct.unpack_from("<H", image, ptr - 18)
        if entry_len < 16 + 2 or entry_len > left:
            break  # a corrupt table: QEMU stops looking
        entries.setdefault(guid, image[ptr - entry_len : ptr - 18])
        ptr -= entry_len
        left -= entry_len
    return entries


def _offset_from_end(data: bytes | None, size: int) -> int | None:
    """A u32 entry value that counts bytes back from the end of the image, as an offset from its start."""
    if data is None or len(data) < 4:
        return None
    (back,) = struct.unpack_from("<I", data)
    return size - back if 0 < back <= size else None


def _has_sev_metadata(image: bytes, data: bytes | None) -> bool:
    start = _offset_from_end(data, len(image))
    if start is None or start + SEV_METADATA_HEADER_SIZE > len(image):
        return False
    header: tuple[bytes, int] = struct.unpack_from("<4sI", image, start)
    signature, length = header
    return signature == b"ASEV" and SEV_METADATA_HEADER_SIZE <= length <= len(image) - start


def _has_tdx_metadata(image: bytes, data: bytes | None) -> bool:
    start = _offset_from_end(data, len(image))
    if start is None or start + TDVF_DESCRIPTOR_SIZE > len(image):
        return False
    descriptor: tuple[bytes, int, int, int] = struct.unpack_from("<4sIII", image, start)
    signature, length, version, sections = descriptor
    return (
        signature == b"TDVF"
        and start + length <= len(image)
        and version == 1
        and sections >= 2
        and length == TDVF_DESCRIPTOR_SIZE + TDVF_SECTION_SIZE * sections
    )


def parse_ovmf_table(image: bytes) -> OvmfTable:
    """The SEV hashes area, SEV metadata and TDX metadata of an OVMF image (see the module doc)."""
    entries = ovmf_table_entries(image)
    hashes = entries.get(SEV_HASH_TABLE_GUID)
    area = struct.unpack_from("<II", hashes) if hashes is not None and len(hashes) >= 8 else None
    return OvmfTable(
        sev_hashes_area=(area[0], area[1]) if area is not None else None,
        sev_metadata=_has_sev_metadata(image, entries.get(SEV_METADATA_GUID)),
        tdx_metadata=_has_tdx_metadata(image, entries.get(TDX_METADATA_OFFSET_GUID)),
    )


def read_ovmf_table(path: Path) -> OvmfTable:
    """:func:`parse_ovmf_table` of a file (raises OSError when it cannot be read)."""
    with path.open("rb") as f:
        return parse_ovmf_table(f.read(MAX_IMAGE_SIZE + 1))


def firmware_supports(tee: Tee, table: OvmfTable, *, kernel_hashes: bool = False) -> list[str]:
    """Why an image with ``table`` cannot launch a ``tee`` guest; empty when it can.

    ``tee = "none"`` needs nothing from the table (a normal VM boots any OVMF).
    """
    reasons: list[str] = []
    if tee == "sev-snp":
        if not table.sev_metadata:
            reasons.append("no SEV metadata: not SNP-capable")
        if kernel_hashes:
            if table.sev_hashes_area is None:
                reasons.append("kernel_hashes needs a SEV hashes table: this image has none")
            elif not table.sev_hashes_area_usable:
                base, size = table.sev_hashes_area
                reasons.append(
                    "kernel_hashes needs a non-empty SEV hashes area:"
                    f" this one is base={base:#x} size={size:#x}"
                )
    elif tee == "tdx" and not table.tdx_metadata:
        reasons.append("no TDX metadata: not a TDVF, cannot launch a TD")
    return reasons


# --------------------------------------------------------------------------------------------
# Finding images on a host

KNOWN_PATHS: tuple[str, ...] = (
    "/usr/share/ovmf/OVMF.fd",  # Debian/Ubuntu unified image (bookworm ovmf, later ovmf-generic)
    "/usr/share/qemu/OVMF.fd",  # Debian's link to it; canonical/tdx's libvirt template
    "/usr/share/edk2/ovmf/OVMF.fd",
    "/usr/share/ovmf/OVMF.amdsev.fd",  # Debian ovmf-amdsev
    "/usr/share/edk2/ovmf/OVMF.amdsev.fd",  # Fedora edk2-ovmf (libvirt's SNP fixture)
    "/usr/share/ovmf/OVMF.inteltdx.fd",  # Ubuntu ovmf-inteltdx
    "/usr/share/ovmf/OVMF.inteltdx.ms.fd",  # Debian ovmf-inteltdx (Microsoft keys enrolled)
    "/usr/share/edk2/ovmf/OVMF.inteltdx.fd",
)
"""Always reported, found or not, so a host check can say where it looked."""

SEARCH_DIRS: tuple[str, ...] = ("/usr/share/ovmf", "/usr/share/OVMF", "/usr/share/edk2/ovmf")
"""Other ``*.fd`` images here are reported when they exist (``*VARS*`` files are not firmware)."""

DESCRIPTOR_DIRS: tuple[str, ...] = ("/etc/qemu/firmware", "/usr/share/qemu/firmware")
"""QEMU firmware descriptors (docs/interop/firmware.json); a file in /etc hides the one with
the same name in /usr/share, an empty one hides it without replacement."""

_CODE_ONLY = re.compile(r"_CODE", re.IGNORECASE)
_ENROLLED = re.compile(r"\.ms\.|snakeoil", re.IGNORECASE)
_AMDSEV = re.compile(r"amdsev", re.IGNORECASE)


@dataclass(frozen=True)
class FirmwareCandidate:
    """One image a host check looked at, and why it does not fit (nothing: it fits)."""

    path: Path  # as the host names it (absolute, not under the test root)
    exists: bool
    found_by: tuple[str, ...]  # "known path", "search of <dir>", or a descriptor file
    table: OvmfTable | None = None  # None when missing or unreadable
    features: tuple[str, ...] = ()  # from descriptors: e.g. amd-sev-snp, intel-tdx, enrolled-keys
    problems: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return self.exists and not self.problems


@dataclass
class _Found:
    found_by: list[str] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    mappings: list[str] = field(default_factory=list)  # "memory", "flash/split", ...


def _under(root: Path, path: str | Path) -> Path:
    return root / Path(path).relative_to("/")


def _descriptors(root: Path) -> list[tuple[str, dict[str, object]]]:
    chosen: dict[str, tuple[str, Path]] = {}
    for directory in DESCRIPTOR_DIRS:
        try:
            files = sorted(_under(root, directory).glob("*.json"))
        except OSError:
            continue
        for file in files:
            chosen.setdefault(file.name, (f"{directory}/{file.name}", file))
    out: list[tuple[str, dict[str, object]]] = []
    for name in sorted(chosen):
        shown, file = chosen[name]
        try:
            text = file.read_text(encoding="utf-8")
            data = json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            out.append((shown, data))
    return out


def _descriptor_image(data: dict[str, object]) -> tuple[str, str] | None:
    """(file name, mapping) of an x86_64 descriptor; None for other targets or no file."""
    targets = data.get("targets")
    if not isinstance(targets, list) or not any(
        isinstance(t, dict) and t.get("architecture") == "x86_64" for t in targets
    ):
        return None
    mapping = data.get("mapping")
    if not isinstance(mapping, dict):
        return None
    device = mapping.get("device")
    if device == "memory":
        filename = mapping.get("filename")
        return (filename, "memory") if isinstance(filename, str) else None
    if device == "flash":
        executable = mapping.get("executable")
        filename = executable.get("filename") if isinstance(executable, dict) else None
        mode = mapping.get("mode", "split")
        return (filename, f"flash/{mode}") if isinstance(filename, str) else None
    return None


def _problems(
    name: str, found: _Found, size: int, table: OvmfTable, tee: Tee, kernel_hashes: bool, pair: bool
) -> list[str]:
    problems: list[str] = []
    if size % BIOS_SIZE_MULTIPLE:
        problems.append(f"size {size} is not a multiple of 64 KiB: QEMU's -bios refuses it")
    if _CODE_ONLY.search(name) or "flash/split" in found.mappings:
        problems.append(
            "the CODE half of a CODE/VARS pflash pair:"
            " cvmctl loads one unified image with -bios (e.g. OVMF.fd)"
        )
    if "enrolled-keys" in found.features or _ENROLLED.search(name):
        problems.append(
            "Secure Boot with enrolled keys: refuses the unsigned -kernel of a direct boot"
            ' ("Secure boot image verification failed")'
        )
    if "requires-smm" in found.features:
        problems.append(
            "needs SMM (descriptor feature requires-smm), which cvmctl does not enable and CVMs do not have"
        )
    if _AMDSEV.search(name):
        if tee != "sev-snp":
            problems.append("AmdSev build: boots a -kernel only as an SEV guest with kernel hashes")
        elif not kernel_hashes:
            problems.append(
                "AmdSev build: its blob verifier refuses a -kernel that QEMU did not hash"
                " (kernel_hashes is off)"
            )
        if tee == "sev-snp" and pair:
            problems.append(
                "AmdSev build: the baseline arm (no SEV, no kernel hashes) cannot boot it;"
                " both arms need one image (e.g. OVMF.fd)"
            )
    problems += firmware_supports(tee, table, kernel_hashes=kernel_hashes)
    return problems


def _examine(
    shown: Path, host_path: Path, found: _Found, tee: Tee, kernel_hashes: bool, pair: bool
) -> FirmwareCandidate:
    found_by, features = tuple(found.found_by), tuple(found.features)
    if not host_path.is_file():
        return FirmwareCandidate(shown, exists=False, found_by=found_by, features=features)
    try:
        size = host_path.stat().st_size
        if size > MAX_IMAGE_SIZE:
            raise ValueError(f"{size} bytes, larger than any OVMF image")
        table = read_ovmf_table(host_path)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return FirmwareCandidate(
            shown, exists=True, found_by=found_by, features=features, problems=(f"cannot read it: {reason}",)
        )
    problems = _problems(host_path.name, found, size, table, tee, kernel_hashes, pair)
    return FirmwareCandidate(
        shown, exists=True, found_by=found_by, table=table, features=features, problems=tuple(problems)
    )


def check_firmware(
    path: Path, tee: Tee, *, kernel_hashes: bool = False, pair: bool = True
) -> FirmwareCandidate:
    """The same verdict as :func:`find_firmware` gives, for one file (e.g. a spec's ``boot.firmware``).

    Descriptor features are not consulted here; the name and the table are. The daemon runs
    this as root on a path a client named, so a file that not everyone may read is refused
    unread: its size or contents must not leak into the refusal (firmware images are public).
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = None
    if mode is not None and stat.S_ISREG(mode) and not mode & stat.S_IROTH:
        problem = "not readable by everyone (firmware images are public: make it world-readable)"
        return FirmwareCandidate(path, exists=True, found_by=("given",), problems=(problem,))
    return _examine(path, path, _Found(["given"]), tee, kernel_hashes, pair)


def find_firmware(
    tee: Tee, root: Path = Path("/"), *, kernel_hashes: bool = False, pair: bool = True
) -> list[FirmwareCandidate]:
    """Every OVMF image looked at for a ``tee`` guest booted with ``-bios`` and ``-kernel``.

    ``pair``: the same file also boots the comparison's baseline (the study's choice, and the
    default), so builds that only boot under SEV are refused. ``kernel_hashes``: the SNP guest
    measures its kernel (``[sev_snp] kernel_hashes = true``). Order: :data:`KNOWN_PATHS`, then
    other images in :data:`SEARCH_DIRS`, then images only a descriptor names; the first
    candidate that :attr:`~FirmwareCandidate.fits` is the one to use (:func:`first_fit`).
    """
    found: dict[str, _Found] = {path: _Found(["known path"]) for path in KNOWN_PATHS}
    for directory in SEARCH_DIRS:
        try:
            images = sorted(_under(root, directory).glob("*.fd"))
        except OSError:
            continue
        for image in images:
            if "VARS" in image.name.upper():
                continue
            entry = found.setdefault(f"{directory}/{image.name}", _Found())
            if not entry.found_by:
                entry.found_by.append(f"search of {directory}")
    for shown, data in _descriptors(root):
        described = _descriptor_image(data)
        if described is None or not described[0].startswith("/"):
            continue
        filename, mapping = described
        entry = found.setdefault(filename, _Found())
        entry.found_by.append(shown)
        entry.mappings.append(mapping)
        features = data.get("features")
        if isinstance(features, list):
            entry.features += [f for f in features if isinstance(f, str) and f not in entry.features]
    return [
        _examine(Path(shown), _under(root, shown), entry, tee, kernel_hashes, pair)
        for shown, entry in found.items()
    ]


def first_fit(candidates: list[FirmwareCandidate]) -> FirmwareCandidate | None:
    """The first candidate that fits, in :func:`find_firmware`'s order of preference."""
    return next((c for c in candidates if c.fits), None)
