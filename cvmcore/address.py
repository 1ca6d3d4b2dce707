"""Addresses: the one parser every cvmctl program and the CLI use.

An address names where a gRPC peer listens or is dialled. Four schemes exist::

    unix:///run/cvm-agent.sock      a unix stream socket (absolute path)
    tcp://127.0.0.1:50051           TCP; IPv6 hosts go in brackets: tcp://[::1]:50051
    vsock://3:1024                  AF_VSOCK: context id (CID) and port
    vsock://any:1024                (listening only) any local CID
    hvsock:///run/vm0.vsock:1024    hybrid vsock: a unix socket on the host that
                                    forwards to guest port 1024 after the
                                    ``CONNECT 1024\\n`` -> ``OK <port>\\n`` handshake
                                    (Firecracker, Cloud Hypervisor, vhost-device-vsock)

grpcio's PyPI wheels cannot dial or bind vsock, so ``vsock://`` and ``hvsock://`` are
carried by the relays in :mod:`cvmcore.relay`; ``unix://`` and ``tcp://`` go to grpcio
directly (see :meth:`Address.grpc_target`).

:func:`parse_address` is pure and raises :class:`cvmcore.errors.UsageError` with a message
that says what was wrong and what would be right.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from cvmcore.errors import UsageError

#: VMADDR_CID_ANY and VMADDR_PORT_ANY from include/uapi/linux/vm_sockets.h.
VMADDR_CID_ANY: Final = 0xFFFFFFFF
VMADDR_PORT_ANY: Final = 0xFFFFFFFF
#: VMADDR_CID_HOST: the host, as seen from a guest.
VMADDR_CID_HOST: Final = 2
#: The guest agent's vsock port unless configured otherwise.

_U32_MAX: Final = 0xFFFFFFFF
# sun_path is 108 bytes including the terminating NUL (unix(7)).
_UNIX_PATH_MAX: Final = 107

EXAMPLES: Final = "unix:///path/to.sock, tcp://HOST:PORT, vsock://CID:PORT or hvsock:///path/to.sock:PORT"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    path: str

    scheme = "unix"

    def __str__(self) -> str:
        return f"unix://{self.path}"

    def grpc_target(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True, slots=True)
class TcpAddress:
    host: str
    port: int

    scheme = "tcp"

    def __str__(self) -> str:
        return f"tcp://{self._host_for_uri()}:{self.port}"

    def _host_for_uri(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def grpc_target(self) -> str:
        return f"{self._host_for_uri()}:{self.port}"


@dataclass(frozen=True, slots=True)
class VsockAddress:
    cid: int
    port: int

    scheme = "vsock"

    def __str__(self) -> str:
        cid = "any" if self.cid == VMADDR_CID_ANY else str(self.cid)
        return f"vsock://{cid}:{self.port}"

    def grpc_target(self) -> None:
        return None  # grpcio wheels have no vsock: a relay carries it


@dataclass(frozen=True, slots=True)
class HybridVsockAddress:
    path: str
    port: int

    scheme = "hvsock"

    def __str__(self) -> str:
        return f"hvsock://{self.path}:{self.port}"

    def grpc_target(self) -> None:
        return None  # the CONNECT handshake needs a relay


Address = UnixAddress | TcpAddress | VsockAddress | HybridVsockAddress

_SCHEME_RE: Final = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?P<rest>.*)$")


def _parse_int(text: str, what: str, address: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        raise UsageError(f"invalid address {address!r}: {what} {text!r} is not a number")
    value = int(text)
    if not low <= value <= high:
        raise UsageError(f"invalid address {address!r}: {what} {value} is out of range ({low}..{high})")
    return value


def _parse_unix_path(path: str, address: str) -> str:
    if not path.startswith("/"):
        raise UsageError(
            f"invalid address {address!r}: a unix socket path must be absolute "
            f"(unix:///path/to.sock, three slashes)"
        )
    if "\0" in path:
        raise UsageError(f"invalid address {address!r}: the path contains a NUL byte")
    if len(path.encode()) > _UNIX_PATH_MAX:
        raise UsageError(
            f"invalid address {address!r}: the socket path is {len(path.encode())} bytes, "
            f"longer than the kernel's limit of {_UNIX_PATH_MAX}"
        )
    return path


def _split_host_port(rest: str, address: str) -> tuple[str, str]:
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0 or rest[end + 1 : end + 2] != ":":
            raise UsageError(f"invalid address {address!r}: expected tcp://[IPv6]:PORT")
        return rest[1:end], rest[end + 2 :]
    host, sep, port = rest.rpartition(":")
    if not sep or not host:
        raise UsageError(f"invalid address {address!r}: expected tcp://HOST:PORT")
    if ":" in host:
        raise UsageError(f"invalid address {address!r}: put an IPv6 host in brackets, e.g. tcp://[::1]:50051")
    return host, port


def parse_address(text: str, *, listening: bool = False) -> Address:
    """Parse ``text`` into an :data:`Address`.

    ``listening`` allows the forms that only make sense for a listener: ``vsock://any:PORT``
    and TCP port 0 (pick a free port).
    """
    match = _SCHEME_RE.match(text.strip())
    if match is None:
        raise UsageError(f"invalid address {text!r}: expected one of {EXAMPLES}")
    scheme, rest = match.group("scheme").lower(), match.group("rest")

    if scheme == "unix":
        return UnixAddress(_parse_unix_path(rest, text))

    if scheme == "tcp":
        host, port_text = _split_host_port(rest, text)
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise UsageError(f"invalid address {text!r}: {host!r} is not an IPv4 address") from None
        elif ":" in host:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise UsageError(f"invalid address {text!r}: {host!r} is not an IPv6 address") from None
        elif not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
            raise UsageError(f"invalid address {text!r}: {host!r} is not a valid host name")
        port = _parse_int(port_text, "port", text, 0 if listening else 1, 65535)
        return TcpAddress(host, port)

    if scheme == "vsock":
        cid_text, sep, port_text = rest.partition(":")
        if not sep:
            raise UsageError(f"invalid address {text!r}: expected vsock://CID:PORT")
        if cid_text.lower() == "any":
            if not listening:
                raise UsageError(
                    f"invalid address {text!r}: 'any' is only valid for listening; "
                    "name the guest's CID to connect"
                )
            cid = VMADDR_CID_ANY
        else:
            cid = _parse_int(cid_text, "CID", text, 0, _U32_MAX - 1)
        port = _parse_int(port_text, "port", text, 0, _U32_MAX - 1)
        return VsockAddress(cid, port)

    if scheme == "hvsock":
        path, sep, port_text = rest.rpartition(":")
        if not sep:
            raise UsageError(f"invalid address {text!r}: expected hvsock:///path/to.sock:PORT")
        port = _parse_int(port_text, "port", text, 0, _U32_MAX - 1)
        return HybridVsockAddress(_parse_unix_path(path, text), port)

    raise UsageError(f"invalid address {text!r}: unknown scheme {scheme!r}; expected one of {EXAMPLES}")
