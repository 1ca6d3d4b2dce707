"""Property tests of the address parser: any text gives an address or ``UsageError``; every
address prints as text that parses back to it. ``benchmarks/fuzz.py --target address`` runs
the same property coverage-guided."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cvmcore.address import (
    VMADDR_CID_ANY,
    Address,
    HybridVsockAddress,
    TcpAddress,
    UnixAddress,
    VsockAddress,
    parse_address,
)
from cvmcore.errors import UsageError

SETTINGS = settings(max_examples=300, deadline=None)
U32 = 0xFFFFFFFF

unix_paths = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=0, max_size=40).map(
    lambda rest: "/" + rest.rstrip()
)  # parse_address strips the text it is given
hostnames = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,20}[A-Za-z0-9])?", fullmatch=True).filter(
    lambda h: not all(c in "0123456789." for c in h)
)
hosts = st.one_of(hostnames, st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
addresses = st.one_of(
    unix_paths.map(UnixAddress),
    st.builds(TcpAddress, hosts, st.integers(1, 65535)),
    st.builds(VsockAddress, st.integers(0, U32 - 1), st.integers(0, U32 - 1)),
    st.builds(HybridVsockAddress, unix_paths, st.integers(0, U32 - 1)),
)


def parse(text: str, listening: bool) -> Address | None:
    try:
        return parse_address(text, listening=listening)
    except UsageError as exc:
        assert str(exc).startswith("invalid address"), exc
        return None


@SETTINGS
@given(text=st.text(max_size=80), listening=st.booleans())
def test_any_text_gives_an_address_or_a_usage_error(text: str, listening: bool) -> None:
    address = parse(text, listening)
    if address is not None:
        assert parse_address(str(address), listening=listening) == address


@SETTINGS
@given(
    scheme=st.sampled_from(["unix", "tcp", "vsock", "hvsock", "UNIX", "Tcp", "http"]),
    rest=st.text(st.sampled_from("/:[]0123456789abcdefany.-\0 "), max_size=30),
    listening=st.booleans(),
)
def test_near_miss_addresses(scheme: str, rest: str, listening: bool) -> None:
    address = parse(f"{scheme}://{rest}", listening)
    if address is not None:
        assert parse_address(str(address), listening=listening) == address


@SETTINGS
@given(addresses)
def test_every_address_round_trips(address: Address) -> None:
    text = str(address)
    if isinstance(address, UnixAddress | HybridVsockAddress) and len(address.path.encode()) > 107:
        assert parse(text, listening=True) is None  # sun_path's limit
        return
    assert parse_address(text, listening=True) == address
    if not (isinstance(address, VsockAddress) and address.cid == VMADDR_CID_ANY):
        assert parse_address(text) == address
