"""The VM spec: what a user writes in TOML, checked and turned into frozen dataclasses.

A spec says *what* VM to run; the daemon decides *where* its files go (QMP socket, pidfile,
console log) and :func:`host_daemon.qemu_args.build_qemu_argv` turns both into a QEMU
command line. Parsing is pure: no file is opened or checked for existence here (the daemon
does that when it starts the VM), so a spec can be validated anywhere.

The smallest spec is one line::

    name = "x"

and a fuller one reads::

    name = "snp-8c"
    image = ""                 # "dev": the built-in dev guest's kernel, initramfs and 9p root;
                               # "debian": the Debian guest `cvmctl image build debian` made
                               # (systemd, the agent from /opt/cvmctl); or the path of such an
                               # image's directory (root.img, vmlinuz, initrd.img, manifest.json)
    tee = "sev-snp"            # none | sev-snp | tdx
    baseline_for = "none"      # with tee = "none": mirror the machine flags of "sev-snp" or "tdx"
    accel = "auto"             # auto | kvm | tcg
    vcpus = 8
    memory = "8G"              # K/M/G/T (binary units; "MiB" etc. also accepted) or an integer of MiB
    memory_backend = "auto"    # auto | ram | memfd | file
    memory_path = ""           # with memory_backend = "file": e.g. "/dev/hugepages"
    prealloc = false
    cpu = ""                   # QEMU -cpu model; empty = chosen from tee and accel
    console = "auto"           # auto | serial | virtio; auto = virtio (hvc0) for CVMs and their baselines

    [pinning]                  # applied by the daemon from QMP query-cpus-fast thread ids
    host_cpus = [8, 9, 10, 11, 12, 13, 14, 15]   # one host CPU per vCPU
    numa_node = 0              # QEMU runs under numactl --membind/--cpunodebind of this host node

    [boot]
    firmware = "/usr/share/ovmf/OVMF.fd"  # -bios: one SNP- and TDX-capable OVMF for both arms
    kernel = "bzImage"         # direct kernel boot; relative paths are relative to the spec file
    initrd = "initrd.img"
    cmdline = "console=hvc0"   # empty = console=hvc0 (virtio console) or console=ttyS0 (serial)

    [[disk]]                   # or a single [disk] table
    path = "/dev/nvme1n1"
    format = "raw"             # raw | qcow2
    iothread = true
    aio = "native"             # threads | native | io_uring
    cache = "none"             # none | writeback | writethrough | directsync | unsafe
    snapshot = false           # true: writes go to a temporary overlay, the image stays as it is

    [scratch]                  # a benchmark disk the daemon creates for each boot and deletes after
    size = "2G"                # K/M/G/T, whole MiB (a raw file in the VM's run directory)
    format = "raw"             # raw only
    aio = "auto"               # auto | threads | native | io_uring; auto = native when O_DIRECT works
    cache = "auto"             # auto | none | writeback | ...; auto = none when O_DIRECT works
    iothread = true            # its own QEMU I/O thread, as the study's disk
                               # the guest finds it by its virtio-blk serial "cvm-scratch"

    [network]
    mode = "user"              # none | user | passt | tap
    forwards = [{ host_port = 2222, guest_port = 22 }]   # host address defaults to 127.0.0.1
    # mode = "passt": rootless like "user", but a passt process (host_daemon.passt) as the
    # back end, which forwards UDP too ({ ..., proto = "udp" }); the guest is at 10.0.2.15
    # mode = "tap": the study's NIC, virtio-net on a multi-queue tap in a network namespace
    # the daemon creates for the VM (host_daemon.netns); the guest is at 10.213.0.2 there
    # vhost = true             # vhost-net where /dev/vhost-net exists (false: never)
    # queues = 8               # default: one per vCPU (the study's queues=<nvcpu>), at most 256
    # ifname = "tap0"          # the tap's name inside the namespace

    [[share]]                  # 9p (virtio-9p-pci)
    path = "/"
    tag = "hostroot"
    readonly = true

    [guest]                    # the study's knobs, all on the guest kernel command line
    # swiotlb_force = 524288   # normal VM only: bounce every DMA through 524288 x 2 KiB slabs
    haltpoll = false           # cpuidle_haltpoll.force=Y
    idle_poll = false          # idle=poll

    [agent]
    channel = "auto"           # auto | vhost-vsock | vhost-user-vsock | virtio-serial | none
    cid = 3                    # guest CID (vsock channels); unset = the daemon assigns one
    socket = ""                # vhost-user-vsock: the backend's socket; virtio-serial: the host socket

    [sev_snp]                  # only with tee = "sev-snp"
    cbitpos = 51
    reduced_phys_bits = 1
    policy = 0x30000
    kernel_hashes = false      # true: measured direct boot; needs a firmware with a SEV hashes
                               # area (e.g. OVMF.amdsev.fd), which the baseline cannot boot
    host_data = ""             # base64 of exactly 32 bytes; empty = none

    # [tdx]                    # only with tee = "tdx"
    # quote_generation_socket = "auto"   # auto (the daemon finds the host's QGS) | none |
    #                                    # "/var/run/tdx-qgs/qgs.socket" | "vsock:2:4050"

Errors: every problem in a spec is collected (not just the first) into one
:class:`SpecError`, whose message names each field, the bad value and what is allowed, e.g.
``vm.toml: disk[0].cache: 'fast' is not allowed; expected one of: none, writeback, ...``.
Unknown keys are errors too, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args

from cvmcore import defaults
from cvmcore.errors import UsageError

Tee = Literal["none", "sev-snp", "tdx"]
Accel = Literal["auto", "kvm", "tcg"]
MemoryBackend = Literal["auto", "ram", "memfd", "file"]
DiskFormat = Literal["raw", "qcow2"]
Aio = Literal["threads", "native", "io_uring"]
Cache = Literal["none", "writeback", "writethrough", "directsync", "unsafe"]
ScratchAio = Literal["auto", "threads", "native", "io_uring"]
ScratchCache = Literal["auto", "none", "writeback", "writethrough", "directsync", "unsafe"]
ScratchFormat = Literal["raw"]
NetMode = Literal["none", "user", "passt", "tap"]
Proto = Literal["tcp", "udp"]
Channel = Literal["auto", "vhost-vsock", "vhost-user-vsock", "virtio-serial", "none"]
Image = str
"""``""`` (nothing: the dev guest unless the spec boots something), ``"dev"``, ``"debian"``, or the
absolute path of a built image directory (:data:`IMAGE_NAMES` are the names)."""
IMAGE_NAMES = ("", "dev", "debian")
Console = Literal["auto", "serial", "virtio"]
ResolvedConsole = Literal["serial", "virtio"]
QgsChoice = Literal["auto", "none"]

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
"""VM names: lower-case letters, digits, '-' and '_', 1..63 characters, starting with a letter
or digit. Safe as a file name, a Prometheus label value, a systemd unit suffix and inside a
QEMU option value (no commas, no '=')."""

TAG_RE = re.compile(r"[A-Za-z0-9_-]{1,31}")
DEFAULT_TAP_NAME = "tap0"
"""The tap's name inside the VM's network namespace (``[network] ifname``, mode = "tap")."""
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # IFNAMSIZ is 16 including the NUL

MIN_MEMORY_MIB = 32
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB
MAX_VCPUS = 512
SNP_POLICY_RESERVED_MBO = 1 << 17  # SNP ABI: guest policy bit 17 is reserved and must be one
FIRST_GUEST_CID = 3  # 0..2 are hypervisor, local and host
MAX_GUEST_CID = 0xFFFF_FFFE  # 0xFFFFFFFF is VMADDR_CID_ANY
MIN_SCRATCH_MIB = 1
MAX_SCRATCH_MIB = 16 * 1024 * 1024  # 16 TiB
DEFAULT_SCRATCH_SIZE = "2G"
SCRATCH_SERIAL = defaults.SCRATCH_SERIAL
"""The virtio-blk serial of the scratch disk: the guest finds it as the ``/sys/block/vdX`` whose
``serial`` reads this (at most 20 bytes, VIRTIO_BLK_ID_BYTES)."""
O_DIRECT_CACHES: tuple[Cache, ...] = ("none", "directsync")
"""The ``cache`` modes that open the image with O_DIRECT (``cache.direct=on``, qemu-options.hx)."""


@dataclass(frozen=True)
class SpecProblem:
    """One thing wrong with a spec: where, what was given, and what would have been accepted."""

    field: str
    value: object
    allowed: str

    def __str__(self) -> str:
        if self.value is None:
            return f"{self.field}: missing; {self.allowed}"
        if self.value is UNKNOWN_KEY:
            return f"{self.field}: unknown key; {self.allowed}"
        return f"{self.field}: {self.value!r} is not allowed; {self.allowed}"


class _UnknownKey:
    def __repr__(self) -> str:
        return "<unknown key>"


UNKNOWN_KEY: Any = _UnknownKey()
"""The ``value`` of a :class:`SpecProblem` about a key the spec format does not have."""


class SpecError(UsageError):
    """A spec that cannot be used. ``problems`` lists every problem found, in file order."""

    def __init__(self, source: str, problems: list[SpecProblem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        super().__init__(f"{source}: " + "; ".join(str(p) for p in problems))


@dataclass(frozen=True)
class Pinning:
    host_cpus: tuple[int, ...] = ()
    numa_node: int | None = None


@dataclass(frozen=True)
class Boot:
    firmware: Path | None = None
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class Disk:
    path: Path
    format: DiskFormat = "raw"
    readonly: bool = False
    iothread: bool = False
    aio: Aio = "threads"
    cache: Cache = "writeback"
    # QEMU's -drive snapshot=on: the guest's writes go to a temporary overlay that QEMU drops
    # when it exits, so a shared image (a cached guest root) is never changed by a VM.
    snapshot: bool = False


@dataclass(frozen=True)
class ScratchDisk:
    """``[scratch]``: a raw disk the daemon creates in the VM's run directory at each start and
    deletes when QEMU exits (stop, kill, crash) and when the VM is removed. No path: the file is
    always ``<run dir>/scratch.raw`` (:mod:`host_daemon.scratch`). ``auto`` aio and cache are
    decided by the daemon from the run directory's file system (O_DIRECT or not)."""

    size_mib: int
    format: ScratchFormat = "raw"
    aio: ScratchAio = "auto"
    cache: ScratchCache = "auto"
    iothread: bool = True


@dataclass(frozen=True)
class HostForward:
    """A port forward from a loopback host address into the guest (modes user and passt)."""

    host_port: int
    guest_port: int
    proto: Proto = "tcp"
    host_addr: str = "127.0.0.1"


@dataclass(frozen=True)
class Network:
    mode: NetMode = "none"
    forwards: tuple[HostForward, ...] = ()
    ifname: str | None = None  # mode = "tap": the tap in the VM's namespace; None = "tap0"
    vhost: bool = True  # mode = "tap": vhost-net where the host has /dev/vhost-net
    queues: int | None = None  # mode = "tap": None = one per vCPU, at most 256

    def tap_queues(self, vcpus: int) -> int:
        """The tap's queue count: the spec's, else one per vCPU (the study's ``queues=<nvcpu>``)
        up to 256 (the tun driver's limit)."""
        return self.queues if self.queues is not None else max(1, min(vcpus, 256))


@dataclass(frozen=True)
class Share:
    path: Path
    tag: str
    readonly: bool = True


@dataclass(frozen=True)
class GuestKnobs:
    swiotlb_force: int | None = None  # slabs of 2 KiB; None = not forced
    haltpoll: bool = False
    idle_poll: bool = False


@dataclass(frozen=True)
class Agent:
    channel: Channel = "auto"
    cid: int | None = None
    socket: Path | None = None


@dataclass(frozen=True)
class SevSnpOptions:
    cbitpos: int = 51
    reduced_phys_bits: int = 1
    policy: int = 0x30000
    kernel_hashes: bool = False  # QEMU's default; on = measured direct boot (see docs/qemu-options.md)
    host_data: str | None = None  # base64, 32 bytes once decoded


@dataclass(frozen=True)
class QgsAddress:
    """Where QEMU reaches the TDX Quote Generation Service (a QAPI SocketAddress)."""

    kind: Literal["unix", "vsock"]
    path: str = ""
    cid: int = 0
    port: int = 0


@dataclass(frozen=True)
class TdxOptions:
    # "auto": the daemon's Runtime.qgs (what the host check found); "none": no quotes
    quote_generation_socket: QgsAddress | QgsChoice = "auto"


@dataclass(frozen=True)
class VMSpec:
    name: str
    image: Image = ""
    tee: Tee = "none"
    baseline_for: Tee = "none"
    accel: Accel = "auto"
    vcpus: int = 1
    memory_mib: int = 512
    memory_backend: MemoryBackend = "auto"
    memory_path: Path | None = None
    prealloc: bool = False
    cpu: str = ""
    console: Console = "auto"
    pinning: Pinning = field(default_factory=Pinning)
    boot: Boot = field(default_factory=Boot)
    disks: tuple[Disk, ...] = ()
    scratch: ScratchDisk | None = None
    network: Network = field(default_factory=Network)
    shares: tuple[Share, ...] = ()
    guest: GuestKnobs = field(default_factory=GuestKnobs)
    agent: Agent = field(default_factory=Agent)
    sev_snp: SevSnpOptions = field(default_factory=SevSnpOptions)
    tdx: TdxOptions = field(default_factory=TdxOptions)

    @property
    def confidential(self) -> bool:
        return self.tee != "none"

    @property
    def flavour(self) -> Tee:
        """The platform whose machine flags this VM uses: its TEE, or the TEE it is a baseline for."""
        return self.tee if self.tee != "none" else self.baseline_for

    @property
    def console_device(self) -> ResolvedConsole:
        """``virtio`` (hvc0) or ``serial`` (ttyS0): the spec's choice; ``auto`` = virtio for CVM flavours.

        In a CVM every access to the 8250 UART's I/O ports is an exit through #VC (SNP) or #VE
        (TDX); a virtio console moves bytes through shared rings instead (docs/qemu-options.md).
        """
        if self.console != "auto":
            return self.console
        return "virtio" if self.flavour != "none" else "serial"


# --------------------------------------------------------------------------------------------
# Entry points


def load_spec(path: Path) -> VMSpec:
    """Read and check a spec file; relative paths inside it are relative to its folder."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the spec: {exc.strerror or exc}") from exc
    return parse_spec(text, source=str(path), base_dir=path.resolve().parent)


def parse_spec(text: str, *, source: str = "<spec>", base_dir: Path | None = None) -> VMSpec:
    """Parse TOML text into a :class:`VMSpec`, or raise :class:`SpecError` listing every problem.

    ``base_dir`` anchors relative paths; without it, a relative path is a problem.
    """
    too_deep = SpecProblem(
        "<toml>", "nested too deeply", f"arrays and inline tables nest at most {MAX_SPEC_NESTING} levels"
    )
    if value_nesting(text, stop_above=MAX_SPEC_NESTING) > MAX_SPEC_NESTING:
        raise SpecError(source, [too_deep])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(source, [SpecProblem("<toml>", str(exc), "the file must be valid TOML")]) from exc
    except RecursionError:  # the bound above is checked by a scanner, not the parser: a backstop
        raise SpecError(source, [too_deep]) from None
    return spec_from_mapping(data, source=source, base_dir=base_dir)


#: tomllib recurses once per level of nested arrays and inline tables, so a spec from an
#: untrusted caller (the daemon's API) could exhaust the interpreter's recursion limit
#: (RecursionError at a depth that depends on the caller's stack). A spec needs two or three.
MAX_SPEC_NESTING = 32


#: What the nesting scanner steps over (strings, comments) and what it counts (runs of
#: brackets). Each string's body stops only where its terminator, the end of its line or
#: the end of the text matches, so no match ever backtracks or rescans an unterminated
#: string: the scan is linear whatever the input. (Atomic groups rather than possessive
#: quantifiers: Python 3.11.2 matches a possessive group with alternatives wrongly.)
_NESTING_TOKENS = re.compile(
    r'"""(?>[^"\\]+|\\.?|"(?!""))*(?:"""|\Z)'
    r"|'''(?>[^']+|'(?!''))*(?:'''|\Z)"
    r'|"(?>[^"\\\n]+|\\.?)*(?:"|\n|\Z)'
    r"|'[^'\n]*(?:'|\n|\Z)"
    r"|#[^\n]*"
    r"|[\[{]+|[\]}]+",
    re.DOTALL,
)


def value_nesting(text: str, stop_above: int | None = None) -> int:
    """The deepest nesting of ``[`` / ``{`` in TOML ``text`` outside strings and comments.

    A scanner, not a parser: table headers (``[a]``, ``[[a]]``) count as one or two levels
    on their own line, which is all the bound needs. With ``stop_above`` it returns as soon
    as the depth passes that.
    """
    deepest = depth = 0
    for token in _NESTING_TOKENS.finditer(text):
        run = token.group()
        if run[0] in "[{":
            depth += len(run)
            deepest = max(deepest, depth)
            if stop_above is not None and deepest > stop_above:
                break
        elif run[0] in "]}":
            depth = max(depth - len(run), 0)
    return deepest


def spec_from_mapping(
    data: Mapping[str, Any], *, source: str = "<spec>", base_dir: Path | None = None
) -> VMSpec:
    """Check an already-decoded mapping (e.g. from JSON over the API) the same way."""
    problems: list[SpecProblem] = []
    top = _Table(data, "", problems, base_dir)
    spec = _read_spec(top)
    top.finish()
    _check_combinations(spec, problems)
    if problems:
        raise SpecError(source, problems)
    return spec


@functools.lru_cache(maxsize=256)
def spec_tee(spec_toml: str) -> str:
    """The TEE a stored spec asks for, or "unknown" if this version no longer accepts it.

    Cached: the API and the exporter ask for every VM again and again, and a stored spec
    never changes after CreateVM validated it.
    """
    try:
        return parse_spec(spec_toml).tee
    except UsageError:
        return "unknown"


@functools.lru_cache(maxsize=256)
def spec_size(spec_toml: str) -> tuple[int, int]:
    """``(vcpus, memory MiB)`` of a stored spec, ``(0, 0)`` if this version no longer accepts it."""
    try:
        spec = parse_spec(spec_toml)
    except UsageError:
        return 0, 0
    return spec.vcpus, spec.memory_mib


def parse_memory(value: object) -> int | None:
    """``"2G"`` -> 2048 (MiB); ``"512M"``, ``"512MiB"``, ``"1T"``, ``1024`` (an integer is MiB).

    Returns ``None`` for anything else, including sizes that are not whole MiB.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT])(?:i?B)?\s*", value, re.IGNORECASE)
    if not m:
        return None
    kib = int(m.group(1)) * {"K": 1, "M": 1024, "G": 1024**2, "T": 1024**3}[m.group(2).upper()]
    return kib // 1024 if kib % 1024 == 0 else None


# --------------------------------------------------------------------------------------------
# Reading tables

T = TypeVar("T")
S = TypeVar("S", bound=str)
_MISSING: Any = object()


class _Table:
    """A TOML table being read: typed getters that record problems instead of raising.

    Every getter returns a usable value (the default when the given one is bad), so reading
    carries on and all problems are found in one pass; :meth:`finish` reports unknown keys.
    """

    def __init__(
        self, data: Mapping[str, Any], prefix: str, problems: list[SpecProblem], base_dir: Path | None
    ) -> None:
        self.data = data
        self.prefix = prefix
        self.problems = problems
        self.base_dir = base_dir
        self.seen: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def problem(self, key: str, value: object, allowed: str) -> None:
        self.problems.append(SpecProblem(self.where(key), value, allowed))

    def has(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key, _MISSING)

    def choice(self, key: str, default: S, choices: tuple[S, ...]) -> S:
        value = self._get(key)
        if value is _MISSING:
            return default
        if value not in choices:
            self.problem(key, value, "expected one of: " + ", ".join(choices))
            return default
        return cast(S, value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.problem(key, value, "expected true or false")
            return default
        return value

    def integer(self, key: str, default: T, lo: int, hi: int) -> int | T:
        value = self._get(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.problem(key, value, f"expected an integer from {lo} to {hi}")
            return default
        return value

    def string(
        self, key: str, default: str, *, pattern: re.Pattern[str] | None = None, what: str = ""
    ) -> str:
        value = self._get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
            self.problem(key, value, what or "expected a string")
            return default
        return value

    def path(self, key: str) -> Path | None:
        value = self._get(key)
        if value is _MISSING or value == "":
            return None
        if not isinstance(value, str) or "\n" in value or "\0" in value:
            self.problem(key, value, "expected a file path (a string)")
            return None
        p = Path(value)
        if not p.is_absolute():
            if self.base_dir is None:
                self.problem(key, value, "expected an absolute path (relative paths need a spec file)")
                return None
            p = self.base_dir / p
        return p

    def custom(self, key: str, default: T, convert: Callable[[object], T | None], allowed: str) -> T:
        value = self._get(key)
        if value is _MISSING:
            return default
        out = convert(value)
        if out is None:
            self.problem(key, value, allowed)
            return default
        return out

    def table(self, key: str) -> _Table:
        value = self._get(key)
        if value is _MISSING:
            value = {}
        elif not isinstance(value, dict):
            self.problem(key, value, f"expected a table ([{self.where(key)}])")
            value = {}
        return _Table(value, self.where(key), self.problems, self.base_dir)

    def tables(self, key: str) -> list[_Table]:
        """An array of tables ``[[key]]``; a single ``[key]`` table is accepted as a list of one."""
        value = self._get(key)
        if value is _MISSING:
            return []
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problem(key, value, f"expected a table or an array of tables ([[{self.where(key)}]])")
            return []
        return [
            _Table(v, f"{self.where(key)}[{i}]", self.problems, self.base_dir) for i, v in enumerate(value)
        ]

    def finish(self) -> None:
        for key in self.data:
            if key not in self.seen:
                known = ", ".join(sorted(self.seen)) or "none"
                self.problems.append(SpecProblem(self.where(key), UNKNOWN_KEY, f"known keys: {known}"))


def _read_spec(t: _Table) -> VMSpec:
    name = t.string(
        "name", "", pattern=NAME_RE, what="expected 1..63 of a-z 0-9 - _, starting with a-z or 0-9"
    )
    if not t.has("name"):
        t.problem("name", None, "a name is required (1..63 of a-z 0-9 - _)")
    raw_image = t.data.get("image")
    if isinstance(raw_image, str) and raw_image not in IMAGE_NAMES:
        # Not a name: the path of an image directory, relative to the spec file like every path
        # ("./debian" for a directory that has a name's spelling).
        image_dir = t.path("image")
        image = str(image_dir) if image_dir is not None else ""
    else:
        image = t.custom(
            "image",
            "",
            lambda v: v if v in IMAGE_NAMES else None,
            'expected "dev", "debian" or an image directory',
        )
    tee = t.choice("tee", "none", get_args(Tee))
    baseline_for = t.choice("baseline_for", "none", get_args(Tee))
    accel = t.choice("accel", "auto", get_args(Accel))
    vcpus = t.integer("vcpus", 1, 1, MAX_VCPUS)
    memory_mib = t.custom(
        "memory",
        512,
        lambda v: m if (m := parse_memory(v)) is not None and MIN_MEMORY_MIB <= m <= MAX_MEMORY_MIB else None,
        f'expected a size of whole MiB from {MIN_MEMORY_MIB}M to 16T, e.g. "512M" or "2G"',
    )
    memory_backend = t.choice("memory_backend", "auto", get_args(MemoryBackend))
    memory_path = t.path("memory_path")
    prealloc = t.boolean("prealloc", False)
    cpu = t.string(
        "cpu",
        "",
        pattern=re.compile(r"[A-Za-z0-9_.,=+-]*"),
        what="expected a QEMU -cpu value (e.g. host,pmu=off)",
    )
    console = t.choice("console", "auto", get_args(Console))

    pinning = _read_pinning(t.table("pinning"))
    boot = _read_boot(t.table("boot"))
    disks = tuple(d for d in (_read_disk(dt) for dt in t.tables("disk")) if d is not None)
    scratch = _read_scratch(t.table("scratch")) if t.has("scratch") else None
    network = _read_network(t.table("network"))
    shares = tuple(s for s in (_read_share(st) for st in t.tables("share")) if s is not None)
    guest = _read_guest(t.table("guest"))
    agent = _read_agent(t.table("agent"))
    sev_snp = _read_sev_snp(t.table("sev_snp"))
    if t.has("sev_snp") and tee != "sev-snp":
        t.problem("sev_snp", "<table>", 'the [sev_snp] table needs tee = "sev-snp"')
    tdx = _read_tdx(t.table("tdx"))
    if t.has("tdx") and tee != "tdx":
        t.problem("tdx", "<table>", 'the [tdx] table needs tee = "tdx"')
    return VMSpec(  # with a bad name this is still built, so that cross-field rules run too
        name=name,
        image=image,
        tee=tee,
        baseline_for=baseline_for,
        accel=accel,
        vcpus=vcpus,
        memory_mib=memory_mib,
        memory_backend=memory_backend,
        memory_path=memory_path,
        prealloc=prealloc,
        cpu=cpu,
        console=console,
        pinning=pinning,
        boot=boot,
        disks=disks,
        scratch=scratch,
        network=network,
        shares=shares,
        guest=guest,
        agent=agent,
        sev_snp=sev_snp,
        tdx=tdx,
    )


def _read_pinning(t: _Table) -> Pinning:
    cpus: tuple[int, ...] = ()
    raw = t._get("host_cpus")
    if raw is not _MISSING:
        ok = (
            isinstance(raw, list)
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 8192 for c in raw)
            and len(set(raw)) == len(raw)
        )
        if ok:
            cpus = tuple(raw)
        else:
            t.problem("host_cpus", raw, "expected a list of distinct host CPU numbers (0..8191)")
    numa = t.integer("numa_node", None, 0, 1023)
    t.finish()
    return Pinning(host_cpus=cpus, numa_node=numa)


def _read_boot(t: _Table) -> Boot:
    boot = Boot(
        firmware=t.path("firmware"),
        kernel=t.path("kernel"),
        initrd=t.path("initrd"),
        cmdline=t.string("cmdline", "", pattern=re.compile(r"[^\n\0]*"), what="expected one line of text"),
    )
    t.finish()
    return boot


def _read_disk(t: _Table) -> Disk | None:
    path = t.path("path")
    if path is None and not t.has("path"):
        t.problem("path", None, "a disk needs a path (an image file or a block device)")
    disk = Disk(
        path=path or Path("/"),
        format=t.choice("format", "raw", get_args(DiskFormat)),
        readonly=t.boolean("readonly", False),
        iothread=t.boolean("iothread", False),
        aio=t.choice("aio", "threads", get_args(Aio)),
        cache=t.choice("cache", "writeback", get_args(Cache)),
        snapshot=t.boolean("snapshot", False),
    )
    if disk.aio == "native" and disk.cache not in ("none", "directsync"):
        # QEMU refuses aio=native without O_DIRECT (qemu-options.hx, -drive aio=).
        t.problem("aio", "native", 'aio = "native" needs cache = "none" or "directsync" (O_DIRECT)')
    t.finish()
    return disk if path is not None else None


def _read_scratch(t: _Table) -> ScratchDisk:
    if t.has("path"):
        t.problem(
            "path",
            t._get("path"),
            "a scratch disk has no path: the daemon creates it in the VM's run directory and"
            " deletes it with the VM (a disk of your own is a [[disk]])",
        )
    size_mib = t.custom(
        "size",
        parse_memory(DEFAULT_SCRATCH_SIZE) or 0,
        lambda v: (
            m if (m := parse_memory(v)) is not None and MIN_SCRATCH_MIB <= m <= MAX_SCRATCH_MIB else None
        ),
        f'expected a size of whole MiB from {MIN_SCRATCH_MIB}M to 16T, e.g. "{DEFAULT_SCRATCH_SIZE}"',
    )
    scratch = ScratchDisk(
        size_mib=size_mib,
        format=t.choice("format", "raw", get_args(ScratchFormat)),
        aio=t.choice("aio", "auto", get_args(ScratchAio)),
        cache=t.choice("cache", "auto", get_args(ScratchCache)),
        iothread=t.boolean("iothread", True),
    )
    if scratch.aio == "native" and scratch.cache not in ("auto", *O_DIRECT_CACHES):
        # QEMU refuses aio=native without O_DIRECT (qemu-options.hx, -drive aio=).
        t.problem("aio", "native", 'aio = "native" needs cache = "auto", "none" or "directsync" (O_DIRECT)')
    t.finish()
    return scratch


def _loopback_v4(addr: object) -> str | None:
    try:
        return addr if isinstance(addr, str) and ipaddress.IPv4Address(addr).is_loopback else None
    except ValueError:
        return None


def _read_forward(t: _Table) -> HostForward | None:
    host_port = t.integer("host_port", 0, 1, 65535)
    guest_port = t.integer("guest_port", 0, 1, 65535)
    for key in ("host_port", "guest_port"):
        if not t.has(key):
            t.problem(key, None, "a forward needs host_port and guest_port (1..65535)")
    proto = t.choice("proto", "tcp", get_args(Proto))
    host_addr = t.custom(
        "host_addr",
        "127.0.0.1",
        _loopback_v4,
        "expected an IPv4 loopback address (127.0.0.0/8): forwards never listen beyond this host",
    )
    t.finish()
    if host_port and guest_port:
        return HostForward(host_port=host_port, guest_port=guest_port, proto=proto, host_addr=host_addr)
    return None


def _read_network(t: _Table) -> Network:
    mode = t.choice("mode", "none", get_args(NetMode))
    forwards = tuple(f for f in (_read_forward(ft) for ft in t.tables("forwards")) if f is not None)
    ifname = t.string(
        "ifname", "", pattern=IFNAME_RE, what="expected an interface name (1..15 of A-Z a-z 0-9 _ . -)"
    )
    vhost = t.boolean("vhost", True)
    queues = t.integer("queues", None, 1, 256)
    if forwards and mode not in ("user", "passt"):
        t.problem("forwards", "<list>", 'host forwards need mode = "user" or "passt"')
    if mode != "tap":
        for key in ("ifname", "vhost", "queues"):
            if t.has(key):
                t.problem(key, t.data[key], 'only with mode = "tap"')
    t.finish()
    return Network(mode=mode, forwards=forwards, ifname=ifname or None, vhost=vhost, queues=queues)


def _read_share(t: _Table) -> Share | None:
    path = t.path("path")
    tag = t.string("tag", "", pattern=TAG_RE, what="expected a 9p mount tag (1..31 of A-Z a-z 0-9 _ -)")
    for key in ("path", "tag"):
        if not t.has(key):
            t.problem(key, None, "a share needs a path and a tag")
    readonly = t.boolean("readonly", True)
    t.finish()
    return Share(path=path, tag=tag, readonly=readonly) if path is not None and tag else None


def _read_guest(t: _Table) -> GuestKnobs:
    knobs = GuestKnobs(
        swiotlb_force=t.integer("swiotlb_force", None, 1, 1 << 24),
        haltpoll=t.boolean("haltpoll", False),
        idle_poll=t.boolean("idle_poll", False),
    )
    t.finish()
    return knobs


def _read_agent(t: _Table) -> Agent:
    agent = Agent(
        channel=t.choice("channel", "auto", get_args(Channel)),
        cid=t.integer("cid", None, FIRST_GUEST_CID, MAX_GUEST_CID),
        socket=t.path("socket"),
    )
    t.finish()
    return agent


def _parse_policy(value: object) -> int | None:
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        return None
    return value if value & SNP_POLICY_RESERVED_MBO else None


def _parse_host_data(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return value if len(raw) == 32 else None


def _read_sev_snp(t: _Table) -> SevSnpOptions:
    opts = SevSnpOptions(
        cbitpos=t.integer("cbitpos", 51, 32, 63),
        reduced_phys_bits=t.integer("reduced_phys_bits", 1, 1, 63),
        policy=t.custom(
            "policy",
            0x30000,
            _parse_policy,
            "expected a 64-bit SNP guest policy (integer or hex string)"
            " with bit 17 (reserved, must be one) set",
        ),
        kernel_hashes=t.boolean("kernel_hashes", False),
        host_data=t.custom(
            "host_data",
            "",
            lambda v: "" if v == "" else _parse_host_data(v),
            "expected base64 of exactly 32 bytes (or empty for none)",
        )
        or None,
    )
    t.finish()
    return opts


def _parse_qgs(value: object) -> QgsAddress | QgsChoice | None:
    if value in get_args(QgsChoice):
        return cast(QgsChoice, value)
    if not isinstance(value, str) or not value:
        return None
    m = re.fullmatch(r"vsock:(\d+):(\d+)", value)
    if m:
        cid, port = int(m.group(1)), int(m.group(2))
        return QgsAddress("vsock", cid=cid, port=port) if cid <= MAX_GUEST_CID and port < 1 << 32 else None
    path = value.removeprefix("unix:")
    return QgsAddress("unix", path=path) if path.startswith("/") and "\n" not in path else None


def _read_tdx(t: _Table) -> TdxOptions:
    opts = TdxOptions(
        quote_generation_socket=t.custom(
            "quote_generation_socket",
            "auto",
            _parse_qgs,
            'expected "auto", "none", an absolute unix socket path or "vsock:CID:PORT"',
        )
    )
    t.finish()
    return opts


# --------------------------------------------------------------------------------------------
# Cross-field rules


def _check_combinations(spec: VMSpec, problems: list[SpecProblem]) -> None:
    def bad(where: str, value: object, allowed: str) -> None:
        problems.append(SpecProblem(where, value, allowed))

    if spec.tee != "none" and spec.baseline_for != "none":
        bad(
            "baseline_for",
            spec.baseline_for,
            'only for a normal VM (tee = "none"); a CVM is its own platform',
        )
    if spec.tee != "none" and spec.accel == "tcg":
        bad("accel", "tcg", f'tee = "{spec.tee}" runs only under KVM: use "kvm" or "auto"')
    if spec.tee != "none" and spec.boot.firmware is None:
        fw = "an SNP-capable OVMF" if spec.tee == "sev-snp" else "TDVF (OVMF built with TDX support)"
        bad("boot.firmware", None, f'tee = "{spec.tee}" boots {fw} with -bios: set its path')
    if spec.image and (spec.boot.kernel is not None or spec.boot.initrd is not None):
        bad(
            "image",
            spec.image,
            "an image brings its own kernel and initrd: unset boot.kernel and boot.initrd",
        )
    if spec.boot.initrd is not None and spec.boot.kernel is None:
        bad("boot.initrd", str(spec.boot.initrd), "an initrd needs boot.kernel (direct kernel boot)")
    if spec.boot.cmdline and spec.boot.kernel is None and not spec.image:
        bad("boot.cmdline", spec.boot.cmdline, "a command line needs boot.kernel (direct kernel boot)")
    if spec.pinning.host_cpus and len(spec.pinning.host_cpus) != spec.vcpus:
        bad(
            "pinning.host_cpus",
            list(spec.pinning.host_cpus),
            f"expected one host CPU per vCPU ({spec.vcpus} entries)",
        )
    if spec.memory_backend == "file" and spec.memory_path is None:
        bad("memory_path", None, 'memory_backend = "file" needs memory_path (e.g. "/dev/hugepages")')
    if spec.memory_path is not None and spec.memory_backend != "file":
        bad("memory_path", str(spec.memory_path), 'only with memory_backend = "file"')
    if spec.memory_backend == "ram" and spec.tee == "sev-snp":
        bad("memory_backend", "ram", 'tee = "sev-snp" uses "memfd" (or "auto")')
    if spec.agent.channel == "vhost-user-vsock" and spec.memory_backend == "ram":
        bad(
            "memory_backend",
            "ram",
            'the vhost-user-vsock channel needs guest RAM the backend can map: "auto", "memfd" or "file"',
        )

    kernel_knobs = [
        ("guest.swiotlb_force", spec.guest.swiotlb_force is not None),
        ("guest.haltpoll", spec.guest.haltpoll),
        ("guest.idle_poll", spec.guest.idle_poll),
    ]
    for where, on in kernel_knobs:
        if on and spec.boot.kernel is None and not spec.image:
            bad(
                where,
                True,
                'goes on the guest kernel command line, so it needs boot.kernel (or image = "dev")',
            )
    if spec.guest.swiotlb_force is not None and spec.tee != "none":
        bad(
            "guest.swiotlb_force",
            spec.guest.swiotlb_force,
            "only for a normal VM: a CVM bounces every DMA already (its swiotlb is sized by the kernel)",
        )
    if spec.guest.haltpoll and spec.guest.idle_poll:
        bad(
            "guest.idle_poll",
            True,
            "choose one of guest.haltpoll and guest.idle_poll (idle=poll bypasses cpuidle)",
        )

    if spec.network.mode == "tap" and spec.network.queues is not None and spec.network.queues > spec.vcpus:
        bad(
            "network.queues",
            spec.network.queues,
            f"expected at most one queue per vCPU (vcpus = {spec.vcpus})",
        )
    if spec.agent.channel == "vhost-vsock" and spec.agent.socket is not None:
        bad("agent.socket", str(spec.agent.socket), "vhost-vsock uses /dev/vhost-vsock, not a socket")
    if spec.agent.channel in ("virtio-serial", "none") and spec.agent.cid is not None:
        bad(
            "agent.cid", spec.agent.cid, f'a guest CID is only for vsock channels, not "{spec.agent.channel}"'
        )

    tags = [s.tag for s in spec.shares]
    for i, tag in enumerate(tags):
        if tag in tags[:i]:
            bad(f"share[{i}].tag", tag, "expected a tag not used by another share")
    if spec.tee == "sev-snp" and spec.sev_snp.kernel_hashes and spec.boot.kernel is None and not spec.image:
        bad("sev_snp.kernel_hashes", True, "kernel hashes measure a directly booted kernel: set boot.kernel")

    # The console the kernel is told about must be one QEMU gives it: with a virtio console
    # there is no 8250 (ttyS0), with a serial console no virtconsole (hvc0).
    device = spec.console_device
    right, wrong = ("hvc", "ttyS") if device == "virtio" else ("ttyS", "hvc")
    words = spec.boot.cmdline.split()
    if any(w.startswith(f"console={wrong}") for w in words) and not any(
        w.startswith(f"console={right}") for w in words
    ):
        why = f'console = "{spec.console}"'
        if spec.console == "auto":
            why += f" and a {spec.flavour} flavour"
        bad(
            "boot.cmdline",
            spec.boot.cmdline,
            f"with {why} the guest console is {right}0, not {wrong}0: use console={right}0 or set console",
        )
