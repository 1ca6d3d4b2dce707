"""OVMF images: the table QEMU reads at their end, what each TEE needs of it, and the host search.

The synthetic images are written here byte by byte from the layout QEMU reads
(``hw/i386/pc_sysfw_ovmf.c``): the footer GUID 48 bytes before the end, the u16 table length
just before it, entries ``data | u16 length | GUID`` before that, GUIDs in little-endian form.
"""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path

import pytest

from host_daemon.firmware import (
    FirmwareCandidate,
    OvmfTable,
    check_firmware,
    find_firmware,
    firmware_supports,
    first_fit,
    parse_ovmf_table,
    read_ovmf_table,
)

FOOTER = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
HASHES = uuid.UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
SEV_META = uuid.UUID("dc886566-984a-4798-a75e-5585a7bf67cc")
TDX_OFFSET = uuid.UUID("e47a6535-984a-4798-865e-4685a7bf8ec2")
TDX_META = uuid.UUID("e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae")
SEV_INFO_BLOCK = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")  # an entry we do not read

SIZE = 64 * 1024
ASEV_AT = SIZE - 0x800  # where the synthetic images put the SEV metadata header
TDVF_AT = SIZE - 0x1000  # and the TDVF descriptor


def entry(guid: uuid.UUID, data: bytes) -> bytes:
    return data + struct.pack("<H", len(data) + 2 + 16) + guid.bytes_le


def image(
    *entries: bytes, size: int = SIZE, put: dict[int, bytes] | None = None, length: int | None = None
) -> bytes:
    """An image with ``entries`` (the last one nearest the footer) and bytes ``put`` at offsets;
    ``length`` overrides the table length (entries + 2 + 16)."""
    buf = bytearray(b"\xff" * size)
    for at, data in (put or {}).items():
        buf[at : at + len(data)] = data
    table = b"".join(entries)
    end = size - 48 - 2
    buf[end - len(table) : end] = table
    buf[end : end + 2] = struct.pack("<H", len(table) + 2 + 16 if length is None else length)
    buf[size - 48 : size - 32] = FOOTER.bytes_le
    buf[size - 32 :] = b"\0" * 32
    return bytes(buf)


def asev(length: int = 16, signature: bytes = b"ASEV") -> bytes:
    return signature + struct.pack("<III", length, 1, 0)


def tdvf(sections: int = 2, version: int = 1, signature: bytes = b"TDVF", length: int | None = None) -> bytes:
    body = b"\0" * 32 * sections
    size = 16 + len(body) if length is None else length
    return TDX_META.bytes_le + signature + struct.pack("<III", size, version, sections) + body


def offset_entry(guid: uuid.UUID, at: int, size: int = SIZE) -> bytes:
    return entry(guid, struct.pack("<I", size - at))


def generic_ovmf(hashes: tuple[int, int] = (0, 0)) -> bytes:
    """Like Debian's unified OVMF.fd: SEV + TDX metadata, a hashes entry (empty in 2022.11)."""
    return image(
        offset_entry(TDX_OFFSET, TDVF_AT + 16),  # the offset points past the descriptor's GUID
        entry(SEV_INFO_BLOCK, b"\0\0\0\0"),
        entry(HASHES, struct.pack("<II", *hashes)),
        offset_entry(SEV_META, ASEV_AT),
        put={ASEV_AT: asev(), TDVF_AT: tdvf()},
    )


def amdsev_ovmf() -> bytes:
    """Like OVMF.amdsev.fd: SEV metadata and a real hashes area, no TDX metadata."""
    return image(
        entry(HASHES, struct.pack("<II", 0x810C00, 0x400)),
        offset_entry(SEV_META, ASEV_AT),
        put={ASEV_AT: asev()},
    )


def tdx_only_ovmf() -> bytes:
    return image(offset_entry(TDX_OFFSET, TDVF_AT + 16), put={TDVF_AT: tdvf()})


# --------------------------------------------------------------------------------------------
# The table


def test_generic_image() -> None:
    table = parse_ovmf_table(generic_ovmf())
    assert table == OvmfTable(sev_hashes_area=(0, 0), sev_metadata=True, tdx_metadata=True)
    assert not table.sev_hashes_area_usable
    assert firmware_supports("sev-snp", table) == []
    assert firmware_supports("tdx", table) == []
    assert firmware_supports("none", table) == []
    assert firmware_supports("sev-snp", table, kernel_hashes=True) == [
        "kernel_hashes needs a non-empty SEV hashes area: this one is base=0x0 size=0x0"
    ]


def test_amdsev_image() -> None:
    table = parse_ovmf_table(amdsev_ovmf())
    assert table == OvmfTable(sev_hashes_area=(0x810C00, 0x400), sev_metadata=True, tdx_metadata=False)
    assert table.sev_hashes_area_usable
    assert firmware_supports("sev-snp", table, kernel_hashes=True) == []
    assert firmware_supports("tdx", table) == ["no TDX metadata: not a TDVF, cannot launch a TD"]


def test_no_table() -> None:
    for data in (b"\0" * SIZE, b"\xff" * 100, image(size=2048)):  # no footer; shorter than QEMU reads
        assert parse_ovmf_table(data) == OvmfTable()
    table = OvmfTable()
    assert firmware_supports("sev-snp", table, kernel_hashes=True) == [
        "no SEV metadata: not SNP-capable",
        "kernel_hashes needs a SEV hashes table: this image has none",
    ]
    assert parse_ovmf_table(image()) == OvmfTable()  # a footer with an empty table


def test_hashes_area_must_hold_the_padded_table() -> None:
    """QEMU: base != 0 and size >= sizeof(PaddedSevHashTable) = 176."""
    assert parse_ovmf_table(generic_ovmf((0x810C00, 176))).sev_hashes_area_usable
    assert not parse_ovmf_table(generic_ovmf((0x810C00, 175))).sev_hashes_area_usable
    assert not parse_ovmf_table(generic_ovmf((0, 0x400))).sev_hashes_area_usable


@pytest.mark.parametrize(
    "put",
    [
        {ASEV_AT: asev(signature=b"XSEV")},
        {ASEV_AT: asev(length=8)},  # shorter than its own header
        {ASEV_AT: asev(length=0x801)},  # runs past the end of the image
    ],
)
def test_bad_sev_metadata(put: dict[int, bytes]) -> None:
    assert not parse_ovmf_table(image(offset_entry(SEV_META, ASEV_AT), put=put)).sev_metadata


def test_sev_metadata_offset_outside_the_image() -> None:
    assert not parse_ovmf_table(image(entry(SEV_META, struct.pack("<I", SIZE + 16)))).sev_metadata
    assert not parse_ovmf_table(image(entry(SEV_META, struct.pack("<I", 0)))).sev_metadata
    assert not parse_ovmf_table(image(entry(SEV_META, b"\1"))).sev_metadata  # data too short


@pytest.mark.parametrize(
    "descriptor",
    [
        tdvf(signature=b"OVMF"),
        tdvf(version=2),
        tdvf(sections=1),  # QEMU needs at least two sections
        tdvf(length=16 + 32 * 2 + 4),  # length must be 16 + 32 * sections
    ],
)
def test_bad_tdx_metadata(descriptor: bytes) -> None:
    data = image(offset_entry(TDX_OFFSET, TDVF_AT + 16), put={TDVF_AT: descriptor})
    assert not parse_ovmf_table(data).tdx_metadata


def test_tdx_metadata_is_found_through_the_table_not_the_guid() -> None:
    """QEMU (hw/i386/tdvf.c) follows the e47a6535 entry; the descriptor's own GUID alone is not enough."""
    assert not parse_ovmf_table(image(put={TDVF_AT: tdvf()})).tdx_metadata
    assert parse_ovmf_table(tdx_only_ovmf()).tdx_metadata


def test_corrupt_tables() -> None:
    # a table length larger than the image: QEMU reports "OVMF table has invalid size" and reads none
    assert parse_ovmf_table(image(entry(HASHES, b"\0" * 8), length=0xFFFF)) == OvmfTable()
    assert parse_ovmf_table(image(entry(HASHES, b"\0" * 8), length=17)) == OvmfTable()  # negative size
    # a length that covers only the entry nearest the footer: the one before it is not read
    sev = offset_entry(SEV_META, ASEV_AT)
    truncated = image(
        entry(HASHES, struct.pack("<II", 1, 2)), sev, length=len(sev) + 18, put={ASEV_AT: asev()}
    )
    assert parse_ovmf_table(truncated) == OvmfTable(sev_metadata=True)
    # an entry claiming fewer bytes than its own GUID and length: the walk stops there
    broken = image(
        entry(HASHES, struct.pack("<II", 1, 2)), b"\0\0" + struct.pack("<H", 3) + SEV_META.bytes_le
    )
    assert parse_ovmf_table(broken) == OvmfTable()


def test_the_entry_nearest_the_footer_wins() -> None:
    twice = image(entry(HASHES, struct.pack("<II", 1, 1)), entry(HASHES, struct.pack("<II", 2, 2)))
    assert parse_ovmf_table(twice).sev_hashes_area == (2, 2)


DEBIAN_OVMF = Path("/usr/share/ovmf/OVMF.fd")


@pytest.mark.skipif(not DEBIAN_OVMF.is_file(), reason="no /usr/share/ovmf/OVMF.fd (Debian package ovmf)")
def test_debian_ovmf_fd() -> None:
    """Debian bookworm's edk2 2022.11 unified image: SNP- and TDX-capable, empty hashes area."""
    table = read_ovmf_table(DEBIAN_OVMF)
    assert table.sev_metadata and table.tdx_metadata
    assert table.sev_hashes_area is not None
    assert firmware_supports("sev-snp", table) == [] and firmware_supports("tdx", table) == []
    data = DEBIAN_OVMF.read_bytes()
    at = data.find(TDX_META.bytes_le)
    assert at > 0 and data[at + 16 : at + 20] == b"TDVF"  # edk2 puts the GUID before the descriptor
    if DEBIAN_OVMF.stat().st_size == 2 * 1024 * 1024:  # bookworm's 2 MiB build (newer ones have an area)
        assert table.sev_hashes_area == (0, 0)


# --------------------------------------------------------------------------------------------
# Searching a host


def put_file(root: Path, path: str, data: bytes | str) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        target.write_text(data)
    else:
        target.write_bytes(data)


def descriptor(filename: str, features: list[str], device: str = "memory", arch: str = "x86_64") -> str:
    mapping: dict[str, object] = {"device": device}
    if device == "memory":
        mapping["filename"] = filename
    else:
        mapping["executable"] = {"filename": filename, "format": "raw"}
        mapping["nvram-template"] = {"filename": filename.replace("CODE", "VARS"), "format": "raw"}
    return json.dumps(
        {
            "interface-types": ["uefi"],
            "mapping": mapping,
            "targets": [{"architecture": arch, "machines": ["pc-q35-*"]}],
            "features": features,
        }
    )


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A file system like Debian unstable's with ovmf-generic, ovmf-amdsev and ovmf-inteltdx."""
    put_file(tmp_path, "/usr/share/ovmf/OVMF.fd", generic_ovmf())
    put_file(tmp_path, "/usr/share/ovmf/OVMF.amdsev.fd", amdsev_ovmf())
    put_file(tmp_path, "/usr/share/ovmf/OVMF.inteltdx.ms.fd", tdx_only_ovmf())
    put_file(tmp_path, "/usr/share/OVMF/OVMF_CODE_4M.fd", generic_ovmf())
    put_file(tmp_path, "/usr/share/OVMF/OVMF_VARS_4M.fd", b"\0" * SIZE)
    put_file(tmp_path, "/usr/share/OVMF/odd.fd", generic_ovmf() + b"\0" * 512)
    qemu_fw = "/usr/share/qemu/firmware"
    put_file(
        tmp_path,
        f"{qemu_fw}/60-edk2-x86_64-amdsev.json",
        descriptor("/usr/share/ovmf/OVMF.amdsev.fd", ["amd-sev", "amd-sev-es", "amd-sev-snp"]),
    )
    put_file(
        tmp_path,
        f"{qemu_fw}/60-edk2-x86_64-inteltdx.json",
        descriptor("/usr/share/ovmf/OVMF.inteltdx.ms.fd", ["enrolled-keys", "intel-tdx", "secure-boot"]),
    )
    put_file(
        tmp_path,
        f"{qemu_fw}/60-edk2-x86_64.json",
        descriptor("/usr/share/OVMF/OVMF_CODE_4M.fd", ["acpi-s3", "amd-sev"], device="flash"),
    )
    put_file(
        tmp_path,
        f"{qemu_fw}/60-edk2-aarch64.json",
        descriptor("/usr/share/AAVMF/AAVMF_CODE.fd", [], arch="aarch64"),
    )
    put_file(tmp_path, f"{qemu_fw}/70-only-here.json", descriptor("/opt/fw/OVMF.fd", ["amd-sev-snp"]))
    put_file(tmp_path, "/opt/fw/OVMF.fd", generic_ovmf())
    put_file(tmp_path, "/etc/qemu/firmware/70-only-here.json", "")  # an empty override hides it
    return tmp_path


def by_path(candidates: list[FirmwareCandidate]) -> dict[str, FirmwareCandidate]:
    return {str(c.path): c for c in candidates}


def test_find_firmware_for_an_snp_pair(host: Path) -> None:
    found = find_firmware("sev-snp", root=host)
    paths = by_path(found)
    assert first_fit(found) is paths["/usr/share/ovmf/OVMF.fd"]
    generic = paths["/usr/share/ovmf/OVMF.fd"]
    assert generic.exists and generic.fits and generic.found_by == ("known path",)
    amdsev = paths["/usr/share/ovmf/OVMF.amdsev.fd"]
    assert amdsev.exists and not amdsev.fits
    assert amdsev.features == ("amd-sev", "amd-sev-es", "amd-sev-snp")
    assert amdsev.found_by == ("known path", "/usr/share/qemu/firmware/60-edk2-x86_64-amdsev.json")
    problems = " | ".join(amdsev.problems)
    assert "kernel_hashes is off" in problems and "baseline arm" in problems
    # known paths are reported even when missing, so a host check can say where it looked
    assert not paths["/usr/share/edk2/ovmf/OVMF.amdsev.fd"].exists
    assert not paths["/usr/share/ovmf/OVMF.inteltdx.fd"].exists
    code = paths["/usr/share/OVMF/OVMF_CODE_4M.fd"]
    assert any("CODE half" in p for p in code.problems)
    assert any("64 KiB" in p for p in paths["/usr/share/OVMF/odd.fd"].problems)
    assert "/usr/share/OVMF/OVMF_VARS_4M.fd" not in paths
    assert "/usr/share/AAVMF/AAVMF_CODE.fd" not in paths  # another architecture's descriptor
    assert "/opt/fw/OVMF.fd" not in paths  # its descriptor is hidden by the empty one in /etc
    assert all(not str(c.path).startswith(str(host)) for c in found)


def test_find_firmware_for_a_measured_snp_boot(host: Path) -> None:
    """kernel_hashes with separate baseline firmware: AmdSev fits, the empty-area generic image does not."""
    paths = by_path(find_firmware("sev-snp", root=host, kernel_hashes=True, pair=False))
    assert paths["/usr/share/ovmf/OVMF.amdsev.fd"].fits
    generic = paths["/usr/share/ovmf/OVMF.fd"]
    assert generic.problems == (
        "kernel_hashes needs a non-empty SEV hashes area: this one is base=0x0 size=0x0",
    )


def test_find_firmware_for_a_td(host: Path) -> None:
    found = find_firmware("tdx", root=host)
    paths = by_path(found)
    assert first_fit(found) is paths["/usr/share/ovmf/OVMF.fd"]
    ms = paths["/usr/share/ovmf/OVMF.inteltdx.ms.fd"]
    assert ms.table is not None and ms.table.tdx_metadata and not ms.fits
    assert any("Secure Boot" in p for p in ms.problems)
    amdsev = paths["/usr/share/ovmf/OVMF.amdsev.fd"]
    assert "no TDX metadata: not a TDVF, cannot launch a TD" in amdsev.problems


def test_find_firmware_on_an_empty_host(tmp_path: Path) -> None:
    found = find_firmware("sev-snp", root=tmp_path)
    assert found and not any(c.exists for c in found) and first_fit(found) is None


def test_check_firmware(tmp_path: Path) -> None:
    put_file(tmp_path, "/fw/OVMF.amdsev.fd", amdsev_ovmf())
    verdict = check_firmware(tmp_path / "fw/OVMF.amdsev.fd", "sev-snp", kernel_hashes=True, pair=False)
    assert verdict.fits and verdict.table is not None and verdict.table.sev_hashes_area_usable
    assert not check_firmware(tmp_path / "fw/OVMF.amdsev.fd", "sev-snp").fits
    missing = check_firmware(tmp_path / "nothing.fd", "tdx")
    assert not missing.exists and not missing.fits
