"""systemd's service watchdog (``WatchdogSec=``) fed from the trio event loop.

With ``WatchdogSec=30s`` in a unit, systemd passes ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``)
and expects ``WATCHDOG=1`` on ``NOTIFY_SOCKET`` at least that often; otherwise it considers
the service hung, kills it with ``WatchdogSignal=`` (SIGABRT) and applies ``Restart=``
(sd_watchdog_enabled(3), systemd.service(5)). The pings are sent from a task of the
program's own trio loop: a loop that is wedged (a blocking call on the trio thread, a
deadlock) stops pinging, which is exactly what should trigger a restart. A worker thread
pinging on its own would keep a dead loop alive.

Start it beside everything else, after ``READY=1`` or before (systemd ignores pings until
the service is started)::

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed_watchdog)
        ...

Without ``WATCHDOG_USEC`` (not under systemd, or no ``WatchdogSec=``) it returns at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import trio

from cvmcore import sdnotify

#: Ping more often than systemd's half-period minimum: one late wake-up must not be fatal.
PINGS_PER_INTERVAL = 2


async def feed_watchdog(
    *,
    environ: Mapping[str, str] | None = None,
    notify: Callable[..., bool] = sdnotify.notify,
) -> None:
    """Send ``WATCHDOG=1`` every quarter of the watchdog timeout until cancelled.

    :func:`cvmcore.sdnotify.watchdog_interval` is half the timeout; pinging twice per such
    interval leaves room for a slow loop iteration before systemd gives up.
    """
    interval = sdnotify.watchdog_interval(dict(environ) if environ is not None else None)
    if interval is None or interval <= 0:
        return
    period = interval / PINGS_PER_INTERVAL
    while True:
        notify("WATCHDOG=1", environ=dict(environ) if environ is not None else None)
        await trio.sleep(period)
