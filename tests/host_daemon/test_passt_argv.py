"""passt's argv (host_daemon.passt): what the daemon asks of it, option by option."""

from __future__ import annotations

from pathlib import Path

from host_daemon.passt import GATEWAY, GUEST_ADDRESS, passt_argv
from host_daemon.spec import HostForward


def test_argv_forwards_tcp_and_udp_from_loopback_and_ends_with_qemu() -> None:
    forwards = [
        HostForward(host_port=40001, guest_port=7175),
        HostForward(host_port=40001, guest_port=7175, proto="udp"),
        HostForward(host_port=2222, guest_port=22, host_addr="127.0.0.2"),
    ]
    argv = passt_argv(Path("/run/x/vms/a"), forwards, (0, 0), "/usr/bin/passt")
    assert argv[:6] == ["/usr/bin/passt", "--foreground", "--one-off", "--quiet", "--runas", "0:0"]
    flags = [a for a in argv[6:] if a != "-4"]  # the one flag without a value
    pairs = list(zip(flags[::2], flags[1::2], strict=True))
    assert ("--socket", "/run/x/vms/a/passt.sock") in pairs
    assert ("--address", GUEST_ADDRESS) in pairs and ("--gateway", GATEWAY) in pairs
    assert ("--netmask", "24") in pairs
    assert [p for p in pairs if p[0] in ("-t", "-u")] == [
        ("-t", "127.0.0.1/40001:7175"),
        ("-u", "127.0.0.1/40001:7175"),
        ("-t", "127.0.0.2/2222:22"),
    ]
    assert "-4" in argv  # IPv4 only: the guest is configured for 10.0.2.15/24 alone
    assert "--pid" not in argv  # the daemon knows the pid it spawned


def test_argv_runs_as_the_daemons_user() -> None:
    """Never passt's default drop to nobody, who could not bind in the daemon's run dir."""
    argv = passt_argv(Path("/r"), [], (1000, 1000))
    assert argv[argv.index("--runas") + 1] == "1000:1000"
