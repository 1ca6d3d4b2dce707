"""AMD SEV-SNP attestation reports: the byte layout, decoded into named fields.

An SNP guest asks the AMD Secure Processor (ASP, formerly PSP) for a report with
``MSG_REPORT_REQ``; the firmware answers with the 1184-byte ``ATTESTATION_REPORT``
structure defined in the *SEV Secure Nested Paging Firmware ABI Specification* (AMD
publication 56860, Table 23 "ATTESTATION_REPORT Structure" in revision 1.57; the table
number moves between revisions). All integers are little-endian.

What the report says, in the order it says it::

    0x000 version          2 (Milan/Genoa firmware < 1.55), 3 (adds CPUID), 5 (Turin era: mit vectors)
    0x008 policy           the guest policy the VM was launched with (GUEST_POLICY, ABI Table 9)
    0x038 current_tcb      firmware component versions running now
    0x040 platform_info    how the host platform is configured (SMT on, TSME on, ...)
    0x048 key_info         which key signed: VCEK (chip-unique), VLEK (cloud-provider), none
    0x050 report_data      64 bytes chosen by the guest: the verifier's nonce
    0x090 measurement      SHA-384 launch digest of the initial guest memory
    0x180 reported_tcb     the TCB the signing key was derived for (what the VCEK certifies)
    0x188 cpuid            family / model / stepping (version >= 3), which names the product
    0x1A0 chip_id          64 bytes; Turin fills only the first 8
    0x2A0 signature        ECDSA P-384 r and s, 72 bytes each, little-endian, over 0x000-0x29F

A ``TCB_VERSION`` is a u64 of per-component security patch levels (SPL). Its byte layout
changed with Turin (family 1Ah), which added the FMC component::

    byte     0           1           2     3     4  5  6     7
    Milan    bootloader  tee         -     -     -  -  snp   microcode
    Turin    fmc         bootloader  tee   snp   -  -  -     microcode

A version-2 report carries no CPUID, so it cannot say its generation: such reports come
from Milan or Genoa firmware (Turin never produced version 2), and both use the first
layout. The product is then learnt from the VCEK (its productName extension).

The extended report (``SNP_GET_EXT_REPORT`` or configfs-tsm ``auxblob``) adds a
certificate table in the GHCB specification format (AMD publication 56421, section
"SNP Extended Guest Request"): entries of GUID (16 bytes, in the mixed-endian GUID byte
order), u32 offset and u32 length, ended by an all-zero entry; offsets count from the start
of the table. :func:`parse_cert_table` reads it.

Parsing here is pure: bytes in, frozen dataclasses out, :class:`MalformedEvidence` (which
names the field and offset) for anything that does not fit. Verification lives in
:mod:`cvmattest.verify_snp`.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cvmattest.binary import FieldReader, MalformedEvidence

SNP_REPORT_SIZE = 0x4A0
"""Size of ATTESTATION_REPORT in bytes (1184)."""

SIGNED_REGION_END = 0x2A0
"""The signature covers bytes ``[0, SIGNED_REGION_END)``."""

SIGNATURE_RESERVED_START = 0x330
"""ECDSA r and s take 144 bytes of the 512-byte signature field; the rest is reserved (zero)."""

SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1
SUPPORTED_VERSIONS = (2, 3, 4, 5)
"""Version 4 is laid out like version 3; version 5 adds the mitigation vectors."""

STRUCTURE = "SNP report"


class Product(enum.Enum):
    """An EPYC generation with SEV-SNP; the value is the name AMD's KDS uses in URLs."""

    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"

    @property
    def uses_turin_tcb_layout(self) -> bool:
        return self is Product.TURIN

    @property
    def hwid_length(self) -> int:
        """How many bytes of chip_id the VCEK hwID extension carries (Turin: 8)."""
        return 8 if self is Product.TURIN else 64

    @classmethod
    def from_cpuid(cls, family: int, model: int) -> Product | None:
        """The product for a CPUID family/model pair, as reported in v3+ reports.

        Family 19h models 00h-0Fh are Milan, 10h-1Fh and A0h-AFh Genoa (and its Bergamo and
        Siena variants, which share the Genoa ARK); family 1Ah models 00h-1Fh are Turin.
        """
        if family == 0x19 and model <= 0x0F:
            return cls.MILAN
        if family == 0x19 and (0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF):
            return cls.GENOA
        if family == 0x1A and model <= 0x1F:
            return cls.TURIN
        return None

    @classmethod
    def from_name(cls, name: str) -> Product:
        """Parse "milan", "Genoa", or a VCEK productName such as "Milan-B0"."""
        base = name.split("-", 1)[0].strip().lower()
        for product in cls:
            if product.value.lower() == base:
                return product
        raise ValueError(f"unknown SEV-SNP product {name!r} (known: Milan, Genoa, Turin)")


class TcbLayout(enum.Enum):
    """Which byte of a TCB_VERSION holds which component (see the module docstring)."""

    PRE_TURIN = "pre-turin"
    TURIN = "turin"


_TCB_BYTES: dict[TcbLayout, dict[str, int]] = {
    TcbLayout.PRE_TURIN: {"bootloader": 0, "tee": 1, "snp": 6, "microcode": 7},
    TcbLayout.TURIN: {"fmc": 0, "bootloader": 1, "tee": 2, "snp": 3, "microcode": 7},
}


@dataclass(frozen=True, slots=True)
class TcbVersion:
    """A TCB_VERSION u64 and the layout to read its component SPLs with."""

    raw: int
    layout: TcbLayout

    def component(self, name: str) -> int:
        """The SPL of one component (``fmc``, ``bootloader``, ``tee``, ``snp``, ``microcode``)."""
        return (self.raw >> (8 * _TCB_BYTES[self.layout][name])) & 0xFF

    @property
    def components(self) -> dict[str, int]:
        """Every component SPL this layout defines, by name, in byte order."""
        return {name: self.component(name) for name in _TCB_BYTES[self.layout]}

    @property
    def bootloader(self) -> int:
        return self.component("bootloader")

    @property
    def tee(self) -> int:
        return self.component("tee")

    @property
    def snp(self) -> int:
        return self.component("snp")

    @property
    def microcode(self) -> int:
        return self.component("microcode")

    @property
    def fmc(self) -> int | None:
        """The FMC SPL (Turin only; ``None`` before Turin)."""
        return self.component("fmc") if self.layout is TcbLayout.TURIN else None

    def to_dict(self) -> dict[str, Any]:
        return {"raw": f"{self.raw:#018x}", **self.components}

    def __str__(self) -> str:
        parts = " ".join(f"{name}={value}" for name, value in self.components.items())
        return f"{self.raw:#018x} ({parts})"


def _bit_names(value: int, names: Mapping[int, str], first_bit: int = 0) -> tuple[str, ...]:
    """Names of the set bits of ``value`` from ``first_bit`` up; unnamed set bits as ``bitN``."""
    result = []
    bit = first_bit
    rest = value >> first_bit
    while rest:
        if rest & 1:
            result.append(names.get(bit, f"bit{bit}"))
        rest >>= 1
        bit += 1
    return tuple(result)


POLICY_BITS: Mapping[int, str] = {
    16: "SMT",
    17: "RESERVED_MUST_BE_ONE",
    18: "MIGRATE_MA",
    19: "DEBUG",
    20: "SINGLE_SOCKET",
    21: "CXL_ALLOW",
    22: "MEM_AES_256_XTS",
    23: "RAPL_DIS",
    24: "CIPHERTEXT_HIDING",
    25: "PAGE_SWAP_DISABLE",
}
"""GUEST_POLICY bits 16 and up (SNP ABI spec, Table 9); bits 0-15 are the minimum ABI version."""

PLATFORM_INFO_BITS: Mapping[int, str] = {
    0: "SMT_EN",
    1: "TSME_EN",
    2: "ECC_EN",
    3: "RAPL_DIS",
    4: "CIPHERTEXT_HIDING_EN",
    5: "ALIAS_CHECK_COMPLETE",
    7: "SEV_TIO_EN",
}
"""PLATFORM_INFO bits (SNP ABI spec, ATTESTATION_REPORT table notes). Bits the spec revision
we follow does not name are shown as ``bitN`` rather than guessed."""


@dataclass(frozen=True, slots=True)
class GuestPolicy:
    """GUEST_POLICY: the minimum ABI version and the flags the guest owner set at launch."""

    raw: int

    @property
    def abi_minor(self) -> int:
        return self.raw & 0xFF

    @property
    def abi_major(self) -> int:
        return (self.raw >> 8) & 0xFF

    @property
    def flags(self) -> tuple[str, ...]:
        return _bit_names(self.raw, POLICY_BITS, first_bit=16)

    @property
    def debug_allowed(self) -> bool:
        return bool(self.raw >> 19 & 1)

    @property
    def smt_allowed(self) -> bool:
        return bool(self.raw >> 16 & 1)

    @property
    def migrate_ma_allowed(self) -> bool:
        return bool(self.raw >> 18 & 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "raw": f"{self.raw:#x}",
            "abi_major": self.abi_major,
            "abi_minor": self.abi_minor,
            "flags": list(self.flags),
        }


class SigningKey(enum.Enum):
    """KEY_INFO.SIGNING_KEY: which key signed the report."""

    VCEK = 0
    VLEK = 1
    NONE = 7


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """KEY_INFO (u32 at 0x48): AUTHOR_KEY_EN bit 0, MASK_CHIP_KEY bit 1, SIGNING_KEY bits 4:2."""

    raw: int

    @property
    def author_key_en(self) -> bool:
        return bool(self.raw & 1)

    @property
    def mask_chip_key(self) -> bool:
        return bool(self.raw >> 1 & 1)

    @property
    def signing_key_code(self) -> int:
        return (self.raw >> 2) & 0b111

    @property
    def signing_key(self) -> SigningKey | None:
        """The signing key, or ``None`` for a code the spec reserves."""
        try:
            return SigningKey(self.signing_key_code)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class FirmwareVersion:
    """A firmware version as the report stores it: build, minor, major (bytes 0, 1, 2)."""

    major: int
    minor: int
    build: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.build}"


@dataclass(frozen=True, slots=True)
class CpuId:
    """CPUID family, model and stepping of the chip that signed (report version >= 3)."""

    family: int
    model: int
    stepping: int


@dataclass(frozen=True, slots=True)
class SnpReport:
    """A parsed ATTESTATION_REPORT. ``raw`` holds exactly the 1184 bytes it was parsed from."""

    raw: bytes
    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    key_info: KeyInfo
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid: CpuId | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current_fw: FirmwareVersion
    committed_fw: FirmwareVersion
    launch_tcb: TcbVersion
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: int
    signature_s: int
    certificate_table: tuple[CertTableEntry, ...] = ()
    """The extended report's certificate table, when the input carried one after the report."""

    @property
    def product(self) -> Product | None:
        """The generation named by the CPUID fields, or ``None`` (v2, or an unknown CPU)."""
        if self.cpuid is None:
            return None
        return Product.from_cpuid(self.cpuid.family, self.cpuid.model)

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_REGION_END]

    @property
    def platform_info_flags(self) -> tuple[str, ...]:
        return _bit_names(self.platform_info, PLATFORM_INFO_BITS)

    @property
    def tcb_layout(self) -> TcbLayout:
        return self.reported_tcb.layout

    def chip_id_for(self, product: Product) -> bytes:
        """The part of chip_id the product's VCEK hwID covers (8 bytes on Turin)."""
        return self.chip_id[: product.hwid_length]

    def to_dict(self) -> dict[str, Any]:
        """Every decoded field, JSON-ready (bytes as lowercase hex)."""
        signing_key = self.key_info.signing_key
        product = self.product
        return {
            "type": "sev-snp-report",
            "version": self.version,
            "product": product.value if product else None,
            "guest_svn": self.guest_svn,
            "policy": self.policy.to_dict(),
            "family_id": self.family_id.hex(),
            "image_id": self.image_id.hex(),
            "vmpl": self.vmpl,
            "signature_algo": self.signature_algo,
            "current_tcb": self.current_tcb.to_dict(),
            "platform_info": {"raw": f"{self.platform_info:#x}", "flags": list(self.platform_info_flags)},
            "key_info": {
                "raw": f"{self.key_info.raw:#x}",
                "author_key_en": self.key_info.author_key_en,
                "mask_chip_key": self.key_info.mask_chip_key,
                "signing_key": signing_key.name
                if signing_key
                else f"reserved({self.key_info.signing_key_code})",
            },
            "report_data": self.report_data.hex(),
            "measurement": self.measurement.hex(),
            "host_data": self.host_data.hex(),
            "id_key_digest": self.id_key_digest.hex(),
            "author_key_digest": self.author_key_digest.hex(),
            "report_id": self.report_id.hex(),
            "report_id_ma": self.report_id_ma.hex(),
            "reported_tcb": self.reported_tcb.to_dict(),
            "cpuid": (
                None
                if self.cpuid is None
                else {"family": self.cpuid.family, "model": self.cpuid.model, "stepping": self.cpuid.stepping}
            ),
            "chip_id": self.chip_id.hex(),
            "committed_tcb": self.committed_tcb.to_dict(),
            "current_fw": str(self.current_fw),
            "committed_fw": str(self.committed_fw),
            "launch_tcb": self.launch_tcb.to_dict(),
            "launch_mit_vector": None if self.launch_mit_vector is None else f"{self.launch_mit_vector:#x}",
            "current_mit_vector": None
            if self.current_mit_vector is None
            else f"{self.current_mit_vector:#x}",
            "signature": {"r": f"{self.signature_r:x}", "s": f"{self.signature_s:x}"},
            "certificate_table": [f"{e.kind} ({len(e.data)} bytes)" for e in self.certificate_table],
        }


def _firmware_version(reader: FieldReader, offset: int, field: str) -> FirmwareVersion:
    build, minor, major = reader.bytes(offset, 3, field)
    return FirmwareVersion(major=major, minor=minor, build=build)


def _check_reserved(reader: FieldReader, version: int) -> None:
    """Refuse reserved fields that are not zero, and policy / key-info bits the ABI reserves.

    The ranges are go-sev-guest's (``abi.ReportToProto``, ``ParseSnpPolicy``,
    ``ParseSignerInfo``), which follow the ATTESTATION_REPORT table of AMD's SNP ABI spec:
    a field the spec reserves carries nothing the firmware vouches for, and the signature
    reserve after r and s (0x330-0x49F) is not even signed, so a host could hide anything
    there. Which bytes are reserved depends on the report version: v3 added the CPUID bytes
    at 0x188-0x18A, v5 the mitigation vectors at 0x1F8-0x207.
    """
    policy = reader.u64(0x008, "policy")
    if not policy >> 17 & 1:
        raise reader.invalid(0x008, "policy", f"is {policy:#x}: bit 17 is reserved and must be 1")
    if policy >> 26:
        raise reader.invalid(0x008, "policy", f"is {policy:#x}: bits 63:26 are reserved and must be 0")
    key_info = reader.u32(0x048, "key_info")
    if key_info >> 5:
        raise reader.invalid(0x048, "key_info", f"is {key_info:#x}: bits 31:5 are reserved and must be 0")
    if 2 <= (key_info >> 2) & 0b111 <= 6:
        raise reader.invalid(
            0x048, "key_info", f"names signing key {(key_info >> 2) & 0b111}; 2-6 are reserved"
        )
    algo = reader.u32(0x034, "signature_algo")
    for start, end in _reserved_ranges(version, algo):
        chunk = reader.bytes(start, end - start, f"reserved {start:#x}-{end - 1:#x}")
        nonzero = next((i for i, byte in enumerate(chunk) if byte), None)
        if nonzero is not None:
            raise reader.invalid(
                start + nonzero,
                f"reserved {start:#x}-{end - 1:#x}",
                f"holds {chunk[nonzero]:#04x}; reserved bytes must be zero",
            )


def _reserved_ranges(version: int, signature_algo: int) -> list[tuple[int, int]]:
    """The must-be-zero byte ranges ``[start, end)`` of a report of ``version``."""
    ranges = [
        (0x04C, 0x050),
        (0x18B if version >= 3 else 0x188, 0x1A0),
        (0x1EB, 0x1EC),
        (0x1EF, 0x1F0),
        (0x208 if version >= 5 else 0x1F8, SIGNED_REGION_END),
    ]
    if signature_algo == SIGNATURE_ALGO_ECDSA_P384_SHA384:
        ranges.append((SIGNATURE_RESERVED_START, SNP_REPORT_SIZE))
    return ranges


def parse_snp_report(data: bytes, *, product: Product | None = None) -> SnpReport:
    """Decode an ATTESTATION_REPORT.

    ``data`` must be exactly 1184 bytes: bytes after the report are not covered by its
    signature and are refused (see :func:`parse_snp_attestation` for a report followed by
    its certificate table). Reserved fields must be zero (:func:`_check_reserved`).
    ``product`` chooses the TCB layout for a version-2 report, which cannot say it itself;
    for v3+ the CPUID fields decide and a contradicting ``product`` is an error.
    """
    reader = FieldReader(data, STRUCTURE)
    version = reader.u32(0x000, "version")
    if version not in SUPPORTED_VERSIONS:
        raise reader.invalid(
            0x000,
            "version",
            f"is {version}; this parser knows versions {', '.join(map(str, SUPPORTED_VERSIONS))}",
        )
    # Read the last field first so that a truncated report fails on the earliest field that
    # is cut, reading forward: every field before it is then known to be present.
    if len(data) < SNP_REPORT_SIZE:
        for offset, size, field in _LAYOUT:
            if offset + size > len(data):
                reader.bytes(offset, size, field)  # raises, naming the field
    cpuid: CpuId | None = None
    if version >= 3:
        cpuid = CpuId(
            family=reader.u8(0x188, "cpuid_fam_id"),
            model=reader.u8(0x189, "cpuid_mod_id"),
            stepping=reader.u8(0x18A, "cpuid_step"),
        )
        from_cpuid = Product.from_cpuid(cpuid.family, cpuid.model)
        if product is not None and from_cpuid is not None and product is not from_cpuid:
            raise reader.invalid(
                0x188,
                "cpuid_fam_id",
                f"names {from_cpuid.value} (family {cpuid.family:#x} model {cpuid.model:#x}), "
                f"not {product.value} as requested",
            )
        product = from_cpuid or product
    layout = TcbLayout.TURIN if product is Product.TURIN else TcbLayout.PRE_TURIN
    if version == 2 and product is Product.TURIN:
        raise reader.invalid(0x000, "version", "is 2, which Turin firmware does not produce")

    def tcb(offset: int, field: str) -> TcbVersion:
        return TcbVersion(reader.u64(offset, field), layout)

    _check_reserved(reader, version)
    if len(data) > SNP_REPORT_SIZE:
        raise reader.invalid(
            SNP_REPORT_SIZE,
            "end",
            f"has {len(data) - SNP_REPORT_SIZE} bytes after the report, which its signature does not "
            "cover (an extended report's certificate table goes to parse_snp_attestation)",
        )
    return SnpReport(
        raw=bytes(data[:SNP_REPORT_SIZE]),
        version=version,
        guest_svn=reader.u32(0x004, "guest_svn"),
        policy=GuestPolicy(reader.u64(0x008, "policy")),
        family_id=reader.bytes(0x010, 16, "family_id"),
        image_id=reader.bytes(0x020, 16, "image_id"),
        vmpl=reader.u32(0x030, "vmpl"),
        signature_algo=reader.u32(0x034, "signature_algo"),
        current_tcb=tcb(0x038, "current_tcb"),
        platform_info=reader.u64(0x040, "platform_info"),
        key_info=KeyInfo(reader.u32(0x048, "key_info")),
        report_data=reader.bytes(0x050, 64, "report_data"),
        measurement=reader.bytes(0x090, 48, "measurement"),
        host_data=reader.bytes(0x0C0, 32, "host_data"),
        id_key_digest=reader.bytes(0x0E0, 48, "id_key_digest"),
        author_key_digest=reader.bytes(0x110, 48, "author_key_digest"),
        report_id=reader.bytes(0x140, 32, "report_id"),
        report_id_ma=reader.bytes(0x160, 32, "report_id_ma"),
        reported_tcb=tcb(0x180, "reported_tcb"),
        cpuid=cpuid,
        chip_id=reader.bytes(0x1A0, 64, "chip_id"),
        committed_tcb=tcb(0x1E0, "committed_tcb"),
        current_fw=_firmware_version(reader, 0x1E8, "current_build/minor/major"),
        committed_fw=_firmware_version(reader, 0x1EC, "committed_build/minor/major"),
        launch_tcb=tcb(0x1F0, "launch_tcb"),
        launch_mit_vector=reader.u64(0x1F8, "launch_mit_vector") if version >= 5 else None,
        current_mit_vector=reader.u64(0x200, "current_mit_vector") if version >= 5 else None,
        signature_r=reader.uint(0x2A0, 72, "signature.r"),
        signature_s=reader.uint(0x2E8, 72, "signature.s"),
    )


_LAYOUT: tuple[tuple[int, int, str], ...] = (
    (0x004, 4, "guest_svn"),
    (0x008, 8, "policy"),
    (0x010, 16, "family_id"),
    (0x020, 16, "image_id"),
    (0x030, 4, "vmpl"),
    (0x034, 4, "signature_algo"),
    (0x038, 8, "current_tcb"),
    (0x040, 8, "platform_info"),
    (0x048, 4, "key_info"),
    (0x050, 64, "report_data"),
    (0x090, 48, "measurement"),
    (0x0C0, 32, "host_data"),
    (0x0E0, 48, "id_key_digest"),
    (0x110, 48, "author_key_digest"),
    (0x140, 32, "report_id"),
    (0x160, 32, "report_id_ma"),
    (0x180, 8, "reported_tcb"),
    (0x188, 24, "cpuid_fam_id/mod_id/step and reserved"),
    (0x1A0, 64, "chip_id"),
    (0x1E0, 8, "committed_tcb"),
    (0x1E8, 4, "current_build/minor/major"),
    (0x1EC, 4, "committed_build/minor/major"),
    (0x1F0, 8, "launch_tcb"),
    (0x1F8, 168, "launch_mit_vector/current_mit_vector and reserved"),
    (0x2A0, 72, "signature.r"),
    (0x2E8, 72, "signature.s"),
    (0x330, 368, "signature reserved"),
)
"""Every region of the report after ``version``, in offset order, for truncation messages."""


# -- the extended-report certificate table ---------------------------------------------

CERT_GUIDS: Mapping[uuid.UUID, str] = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "VCEK",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "VLEK",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ASK",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ARK",
}
"""Certificate table GUIDs (GHCB spec, SNP Extended Guest Request). The ASK GUID also
carries the ASVK when the table holds a VLEK."""

CERT_TABLE_ENTRY_SIZE = 24


@dataclass(frozen=True, slots=True)
class CertTableEntry:
    guid: uuid.UUID
    offset: int
    data: bytes

    @property
    def kind(self) -> str:
        """``VCEK``, ``VLEK``, ``ASK``, ``ARK`` or ``unknown``."""
        return CERT_GUIDS.get(self.guid, "unknown")


def parse_cert_table(data: bytes) -> tuple[CertTableEntry, ...]:
    """Decode the certificate table of an extended report (the configfs-tsm ``auxblob``).

    A table made only of zero bytes (a host that provides no certificates) gives ``()``.
    An entry whose certificate runs past the end of the table is an error naming it.
    """
    reader = FieldReader(data, "SNP certificate table")
    entries: list[CertTableEntry] = []
    offset = 0
    while True:
        field = f"entry[{len(entries)}]"
        guid_bytes = reader.bytes(offset, 16, f"{field}.guid")
        cert_offset = reader.u32(offset + 16, f"{field}.offset")
        cert_length = reader.u32(offset + 20, f"{field}.length")
        if guid_bytes == bytes(16) and cert_offset == 0 and cert_length == 0:
            break
        cert = reader.bytes(cert_offset, cert_length, f"{field}.certificate")
        entries.append(CertTableEntry(uuid.UUID(bytes_le=guid_bytes), cert_offset, cert))
        offset += CERT_TABLE_ENTRY_SIZE
    header_end = offset + CERT_TABLE_ENTRY_SIZE
    for index, entry in enumerate(entries):
        # As go-sev-guest's ParseSnpCertTableHeader: a certificate inside the header is a lie.
        if entry.offset < header_end:
            raise reader.invalid(
                index * CERT_TABLE_ENTRY_SIZE + 16,
                f"entry[{index}].offset",
                f"is {entry.offset:#x}, inside the table's own header (which ends at {header_end:#x})",
            )
    return tuple(entries)


def parse_snp_attestation(data: bytes, *, product: Product | None = None) -> SnpReport:
    """A report optionally followed by its certificate table (the extended report's layout).

    This is the layout go-sev-guest's ``check`` tool reads: the 1184-byte report, then the
    table. Bytes after the report that are not a well-formed certificate table are refused,
    since nothing vouches for them; an empty remainder is no table.
    """
    report = parse_snp_report(data[:SNP_REPORT_SIZE], product=product)
    rest = data[SNP_REPORT_SIZE:]
    if not rest:
        return report
    try:
        table = parse_cert_table(rest)
    except MalformedEvidence as exc:
        raise MalformedEvidence(
            STRUCTURE,
            "end",
            SNP_REPORT_SIZE,
            f"is followed by {len(rest)} bytes that its signature does not cover and that are not a "
            f"certificate table ({exc.field}: {exc.problem})",
        ) from None
    return dataclasses.replace(report, certificate_table=table)


def build_cert_table(certificates: Mapping[str, bytes]) -> bytes:
    """Encode a certificate table from ``{"VCEK": der, "ASK": der, ...}`` (for tests and tools)."""
    guid_by_kind = {kind: guid for guid, kind in CERT_GUIDS.items()}
    header_size = CERT_TABLE_ENTRY_SIZE * (len(certificates) + 1)
    header = bytearray()
    body = bytearray()
    for kind, der in certificates.items():
        if kind not in guid_by_kind:
            raise MalformedEvidence("SNP certificate table", kind, 0, "is not a known certificate kind")
        header += guid_by_kind[kind].bytes_le
        header += (header_size + len(body)).to_bytes(4, "little") + len(der).to_bytes(4, "little")
        body += der
    header += bytes(CERT_TABLE_ENTRY_SIZE)
    return bytes(header + body)
