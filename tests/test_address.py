"""The one address parser: every accepted form, and a clear message for every rejected one."""

from __future__ import annotations

import pytest

from cvmcore.address import (
    VMADDR_CID_ANY,
    HybridVsockAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)
from cvmcore.errors import UsageError


@pytest.mark.parametrize(
    ("text", "expected", "grpc_target"),
    [
        ("unix:///run/cvm-agent.sock", UnixAddress("/run/cvm-agent.sock"), "unix:/run/cvm-agent.sock"),
        ("tcp://127.0.0.1:50051", TcpAddress("127.0.0.1", 50051), "127.0.0.1:50051"),
        ("tcp://[::1]:50051", TcpAddress("::1", 50051), "[::1]:50051"),
        ("tcp://localhost:1", TcpAddress("localhost", 1), "localhost:1"),
        ("vsock://3:1024", VsockAddress(3, 1024), None),
        ("VSOCK://2:1", VsockAddress(2, 1), None),
        ("hvsock:///run/vm0.vsock:1024", HybridVsockAddress("/run/vm0.vsock", 1024), None),
        ("hvsock:///a:b/c.sock:7", HybridVsockAddress("/a:b/c.sock", 7), None),
    ],
)
def test_valid_addresses(text: str, expected: object, grpc_target: str | None) -> None:
    address = parse_address(text)
    assert address == expected
    assert address.grpc_target() == grpc_target
    assert parse_address(str(address)) == address  # str() round-trips


def test_listening_forms() -> None:
    assert parse_address("vsock://any:1024", listening=True) == VsockAddress(VMADDR_CID_ANY, 1024)
    assert str(parse_address("vsock://any:1024", listening=True)) == "vsock://any:1024"
    assert parse_address("tcp://127.0.0.1:0", listening=True) == TcpAddress("127.0.0.1", 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("foo", "expected one of unix:///path/to.sock"),
        ("", "expected one of"),
        ("http://x:1", "unknown scheme 'http'"),
        ("unix://relative.sock", "must be absolute"),
        ("unix:///" + "x" * 200, "longer than the kernel's limit of 107"),
        ("tcp://127.0.0.1:99999", "port 99999 is out of range (1..65535)"),
        ("tcp://127.0.0.1:0", "port 0 is out of range (1..65535)"),
        ("tcp://127.0.0.1:http", "port 'http' is not a number"),
        ("tcp://127.0.0.1", "expected tcp://HOST:PORT"),
        ("tcp://::1:80", "put an IPv6 host in brackets"),
        ("tcp://[::1]80", "expected tcp://[IPv6]:PORT"),
        ("tcp://300.1.1.1:80", "'300.1.1.1' is not an IPv4 address"),
        ("tcp://[::g]:80", "'::g' is not an IPv6 address"),
        ("tcp://bad_host:80", "'bad_host' is not a valid host name"),
        ("vsock://3", "expected vsock://CID:PORT"),
        ("vsock://any:1024", "'any' is only valid for listening"),
        ("vsock://x:1024", "CID 'x' is not a number"),
        ("vsock://3:4294967295", "port 4294967295 is out of range"),
        ("vsock://-1:1024", "CID '-1' is not a number"),
        ("hvsock:///run/vm.sock", "expected hvsock:///path/to.sock:PORT"),
        ("hvsock://run/vm.sock:1024", "must be absolute"),
    ],
)
def test_invalid_addresses(text: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_address(text)
    assert message in str(info.value)
    assert str(info.value).startswith("invalid address") or "cannot" in str(info.value)
