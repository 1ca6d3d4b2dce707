"""The tap network path: namespace names, addresses and ``ip`` commands (pure), the argv QEMU
gets, and for real (slow, root): the dev guest on a multi-queue tap in the daemon's namespace,
answering ICMP and UDP from inside it, and the namespace gone after ``vm rm``.

Test traffic goes only to the guest's address inside the namespace the daemon made for the
test's VM; nothing leaves that namespace.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_daemon import netns
from host_daemon.devguest.spec import TAP_NET_GUEST_IP, complete_with_dev_guest
from host_daemon.qemu_args import Runtime, build_qemu_argv
from host_daemon.spec import parse_spec
from tests.host_daemon.test_lifecycle import START_WAIT, Daemon, _missing, require_tools


def test_namespace_name_is_per_daemon_and_vm() -> None:
    a, b = Path("/var/lib/a"), Path("/var/lib/b")
    assert netns.plan("dev", a).namespace == f"cvm-{netns.daemon_tag(a)}-dev"
    assert netns.plan("dev", a).namespace != netns.plan("dev", b).namespace
    assert netns.plan("dev", a) == netns.plan("dev", a)
    longest = netns.plan("x" * 63, a).namespace
    assert len(longest) == 4 + 6 + 1 + 63 and "/" not in longest  # a file name under /run/netns
    for bad in ("", "Dev", "a/b", "../x", "x" * 64):
        with pytest.raises(ValueError):
            netns.namespace_name(bad, "abcdef")


def test_addresses_are_one_private_slash_30() -> None:
    import ipaddress

    net = netns.plan("dev", Path("/s"))
    host = ipaddress.ip_interface(f"{net.host_address}/{net.prefix_len}")
    guest = ipaddress.ip_interface(f"{net.guest_address}/{net.prefix_len}")
    assert host.network == guest.network and host.network.is_private and host.network.num_addresses == 4
    assert host.ip != guest.ip and {host.ip, guest.ip} == set(host.network.hosts())
    assert net.guest_cmdline_ip == "10.213.0.2/30,10.213.0.1" == TAP_NET_GUEST_IP


def test_ip_commands() -> None:
    net = netns.TapNetwork(namespace="cvm-abcdef-dev")
    assert netns.create_argvs(net, 1) == [
        ["ip", "netns", "add", "cvm-abcdef-dev"],
        ["ip", "-n", "cvm-abcdef-dev", "link", "set", "lo", "up"],
        ["ip", "-n", "cvm-abcdef-dev", "tuntap", "add", "dev", "tap0", "mode", "tap"],
        ["ip", "-n", "cvm-abcdef-dev", "addr", "add", "10.213.0.1/30", "dev", "tap0"],
        ["ip", "-n", "cvm-abcdef-dev", "link", "set", "tap0", "up"],
    ]
    # multi_queue only with more than one queue: QEMU asks for IFF_MULTI_QUEUE only then
    assert netns.create_argvs(net, 8, ip="/sbin/ip")[2][-1] == "multi_queue"
    assert netns.delete_argv("cvm-abcdef-dev") == ["ip", "netns", "del", "cvm-abcdef-dev"]
    assert netns.exec_prefix("cvm-abcdef-dev") == ["ip", "netns", "exec", "cvm-abcdef-dev"]


def test_owned_namespaces_are_this_daemons_only() -> None:
    state = Path("/s")
    mine = netns.plan("dev", state).namespace
    other = netns.plan("dev", Path("/t")).namespace
    assert netns.owned(state, [mine, other, "cvm-dev", "blue"]) == [mine]


TAP_SPEC = 'name = "dev"\naccel = "tcg"\nvcpus = 2\n[network]\nmode = "tap"\n[agent]\nchannel = "none"\n'


def _runtime(**changes: object) -> Runtime:
    base = Runtime(
        accel="tcg", qmp_socket=Path("/r/q.sock"), pidfile=Path("/r/q.pid"), serial_log=Path("/r/c.log")
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec_vhost", "host_has", "option", "path"),
    [
        ("", True, "vhost=on", "tap+vhost"),
        ("", False, "vhost=off", "tap"),
        ("vhost = false\n", True, "vhost=off", "tap"),
    ],
)
def test_vhost_where_the_host_has_it(
    spec_vhost: str, host_has: bool, option: str, path: netns.NetPath
) -> None:
    spec = parse_spec(TAP_SPEC.replace('mode = "tap"\n', f'mode = "tap"\n{spec_vhost}'))
    argv = build_qemu_argv(spec, _runtime(vhost_net=host_has))
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev == f"tap,id=net0,ifname=tap0,script=no,downscript=no,{option},queues=2"
    assert (
        argv[argv.index("-device", argv.index("-netdev")) + 1] == "virtio-net-pci,netdev=net0,mq=on,vectors=6"
    )
    recorded = [*netns.exec_prefix("cvm-abcdef-dev", "/usr/sbin/ip"), *argv]
    assert netns.network_from_argv(recorded) == netns.GuestNetwork(
        path,
        "cvm-abcdef-dev",
        "10.213.0.2",
        "10.213.0.1",
        2,
        "tap0",
    )


def test_single_queue_and_restricted_virtio() -> None:
    spec = parse_spec(
        'name = "x"\ntee = "sev-snp"\n[boot]\nfirmware = "/f"\n[network]\nmode = "tap"\nifname = "t1"\n'
        '[agent]\nchannel = "none"'
    )
    argv = build_qemu_argv(spec, _runtime(accel="kvm", vhost_net=True))
    assert "tap,id=net0,ifname=t1,script=no,downscript=no,vhost=on" in argv
    assert (
        "virtio-net-pci,netdev=net0,iommu_platform=on,disable-modern=off,disable-legacy=on" in argv
    )  # the CVM's restricted virtio, as every other device


def test_network_from_argv_of_other_paths() -> None:
    user = build_qemu_argv(
        parse_spec('name = "x"\n[network]\nmode = "user"\n[agent]\nchannel = "none"'), _runtime()
    )
    assert netns.network_from_argv(user) == netns.GuestNetwork("user", queues=1)
    assert netns.network_from_argv(["qemu-system-x86_64", "-m", "1G"]) == netns.GuestNetwork("none")
    assert netns.network_from_argv([]) == netns.GuestNetwork("none")


def test_dev_guest_gets_the_tap_address() -> None:
    spec = complete_with_dev_guest(parse_spec(TAP_SPEC))
    assert "cvm.ip=10.213.0.2/30,10.213.0.1" in spec.boot.cmdline.split()


# --------------------------------------------------------------------------------------------
# For real


def _ns(*argv: str, namespace: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", namespace, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def tap_daemon(tmp_path: Path) -> Iterator[Daemon]:
    if os.geteuid() != 0:
        _missing("the tap path needs root (ip netns)")
    require_tools("qemu-system-x86_64", "vhost-device-vsock", "ip")
    d = Daemon(tmp_path / "s", tmp_path / "h.sock")
    d.start()
    try:
        yield d
    finally:
        d.shutdown(remove=True)
        for namespace in netns.owned(d.state_dir):
            netns.delete(namespace)


@pytest.mark.slow
def test_dev_guest_on_the_tap_path(tap_daemon: Daemon, tmp_path: Path) -> None:
    """ICMP (which SLIRP cannot carry) and UDP between the namespace and the guest; then the
    namespace goes with the VM."""
    spec = tmp_path / "tap.toml"
    spec.write_text('name = "tapdev"\nvcpus = 2\nmemory = "1G"\n[network]\nmode = "tap"\n')
    assert tap_daemon.cvmctl("vm", "create", "-f", str(spec)).returncode == 0
    namespace = netns.plan("tapdev", tap_daemon.state_dir).namespace
    started = tap_daemon.cvmctl(
        "vm", "start", "tapdev", "--json", "--wait-timeout", str(START_WAIT), timeout=START_WAIT + 30
    )
    assert started.returncode == 0, started.stderr + started.stdout
    vm = json.loads(started.stdout)
    assert vm["state"] == "running", vm
    assert vm["qemu_argv"][:4] == [shutil.which("ip"), "netns", "exec", namespace]
    network = netns.network_from_argv(vm["qemu_argv"])
    expected_path = "tap+vhost" if netns.vhost_net_available() else "tap"
    assert (network.path, network.namespace, network.guest_address, network.queues) == (
        expected_path,
        namespace,
        "10.213.0.2",
        2,
    )
    assert netns.exists(namespace)
    # The namespace holds lo and the tap only: nothing routes out of it.
    links = _ns("ip", "-o", "link", "show", namespace=namespace).stdout
    assert sorted(line.split(":")[1].strip() for line in links.splitlines()) == ["lo", "tap0"]
    # QEMU attached both queues and the guest's virtio-net enabled both (none disabled).
    detail = _ns("ip", "-d", "link", "show", "tap0", namespace=namespace).stdout
    assert "multi_queue" in detail and "numqueues 2" in detail and "numdisabled 0" in detail, detail

    ping = _ns("ping", "-c", "3", "-W", "2", network.guest_address, namespace=namespace)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "3 received" in ping.stdout

    # UDP: the dev guest runs no UDP server of its own (the catalogue's iperf3 -s is started
    # through the agent, the client side's part), so the round trip is a datagram to the
    # discard port, which the guest's kernel answers with ICMP port unreachable: a connected
    # UDP socket sees it as ECONNREFUSED on its next receive.
    probe = _ns(
        sys.executable,
        "-c",
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(2)\n"
        "s.connect((sys.argv[1],9))\n"
        "for _ in range(10):\n"
        "    s.send(b'cvm-udp-probe')\n"
        "    try: s.recv(64)\n"
        "    except ConnectionRefusedError: print('refused'); break\n"
        "    except TimeoutError: continue\n"
        "else: sys.exit('no answer')\n",
        network.guest_address,
        namespace=namespace,
    )
    assert probe.returncode == 0 and "refused" in probe.stdout, probe.stdout + probe.stderr

    # `vm show` names the path, the namespace and the guest's address.
    assert tap_daemon.vm("tapdev")["network"] == {
        "path": expected_path,
        "namespace": namespace,
        "guest_address": "10.213.0.2",
        "host_address": "10.213.0.1",
        "queues": 2,
    }

    # A daemon killed and restarted keeps the running VM's namespace and deletes a stale one of
    # its own (a VM it no longer has), but never another daemon's.
    stale = netns.plan("ghost", tap_daemon.state_dir).namespace
    foreign = netns.plan("ghost", tmp_path / "another-daemon").namespace
    for name in (stale, foreign):
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        tap_daemon.kill9()
        tap_daemon.start()
        assert not netns.exists(stale) and netns.exists(foreign) and netns.exists(namespace)
    finally:
        netns.delete(foreign)
    assert tap_daemon.vm("tapdev")["state"] == "running"
    again = _ns("ping", "-c", "1", "-W", "2", network.guest_address, namespace=namespace)
    assert again.returncode == 0, again.stdout + again.stderr

    stopped = tap_daemon.cvmctl("vm", "stop", "tapdev", timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 10
    while netns.exists(namespace) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not netns.exists(namespace), "the namespace outlived QEMU"
    removed = tap_daemon.cvmctl("vm", "rm", "tapdev")
    assert removed.returncode == 0, removed.stderr
    assert not netns.exists(namespace) and netns.owned(tap_daemon.state_dir) == []
