"""Boot phases from the clock and the console: marks, the guest's uptime, the fallbacks."""

from __future__ import annotations

from pathlib import Path

import trio

from host_daemon.boottiming import BootClock, console_marks, tail_lines

KERNEL_LINE = "[    0.000000] Linux version 6.12.95+deb12-amd64 (debian-kernel@lists.debian.org)\n"


def test_phases_from_marks() -> None:
    clock = BootClock(requested_at=10.0, spawned_at=10.1)
    clock.mark("qmp", 10.2)
    clock.mark("kernel", 11.0)
    clock.mark("init", 13.0)
    assert (
        clock.phase("daemon") and clock.phase("spawn") and clock.phase("firmware") and clock.phase("kernel")
    )
    assert not clock.phase("userspace")  # no agent mark: not guessed
    assert clock.phases == {"daemon": 0.1, "spawn": 0.1, "firmware": 0.8, "kernel": 2.0}


def test_the_guest_uptime_places_the_kernel_start() -> None:
    """hvc0 replays the log late: the console's kernel line at 12.5 s, but uptime says 11.0 s."""
    clock = BootClock(requested_at=10.0, spawned_at=10.1)
    clock.mark("qmp", 10.2)
    clock.mark("kernel", 12.5)
    clock.mark("init", 13.0)
    assert clock.kernel_started(2.0)
    clock.phase("firmware")
    clock.phase("kernel")
    assert clock.phases == {"firmware": 0.8, "kernel": 2.0}
    # an uptime that would start the kernel before QMP answered keeps the console's mark
    late = BootClock(10.0, 10.1)
    late.mark("qmp", 10.2)
    late.mark("kernel", 11.0)
    late.mark("init", 13.0)
    assert not late.kernel_started(5.0) and not late.kernel_started(None)
    assert late.marks["kernel"] == 11.0


async def test_console_marks_read_a_growing_log(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("SeaBIOS\n")
    seen: list[tuple[str, float | None]] = []

    async def writer() -> None:
        await trio.sleep(0.05)
        with console.open("a") as f:
            f.write(KERNEL_LINE)
            f.flush()
            await trio.sleep(0.05)
            f.write("noise\ncvm-boot: init-start 2.58\n")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        with trio.fail_after(5):
            async for mark in console_marks(console):
                seen.append(mark)
    assert seen == [("kernel", None), ("init", 2.58)]


async def test_an_init_marker_without_a_kernel_line(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("\r\ncvm-boot: init-start 1.5\r\n")
    with trio.fail_after(5):
        marks = [m async for m in console_marks(console)]
    assert marks == [("init", 1.5)]


async def test_systemd_start_is_the_init_mark_of_a_systemd_guest(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text(
        "[    0.000000] Linux version 6.12.95+deb12-amd64 (debian-kernel@lists.debian.org)\r\n"
        "Loading, please wait...\r\n"
        "[    4.120301] systemd[1]: systemd 252.39-1~deb12u2 running in system mode (+PAM +AUDIT)\r\n"
    )
    with trio.fail_after(5):
        marks = [m async for m in console_marks(console)]
    assert marks == [("kernel", None), ("init", 4.120301)]


def test_tail_lines(tmp_path: Path) -> None:
    log = tmp_path / "c.log"
    log.write_bytes(b"a\r\n\nb\n\xff c\n")
    assert tail_lines(log, 2) == ("b", "\ufffd c")
    assert tail_lines(tmp_path / "missing") == ()
