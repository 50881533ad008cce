"""waitress's TCP server, changed in one respect: at its connection limit it closes the idle
connections that waited longest, instead of refusing to accept new ones.

waitress stops accepting at `connection_limit` until an idle connection reaches
`channel_timeout` (120 s by default). Anyone who can open a hundred idle connections then keeps
the kubelet's probes in the listen backlog until they time out, and the liveness probe restarts
a healthy pod. Here the probe's connection is always accepted: room is made by closing idle
ones (no request queued or running), oldest activity first, and the number of open
connections stays bounded.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

from waitress.server import TcpWSGIServer

log = logging.getLogger(__name__)

CONNECTION_LIMIT = 200
EVICTION_BATCH = 16  # closed at a time; room for a burst of new connections meanwhile
EVICTION_LOG_SECONDS = 60.0


class IdleEvictingServer(TcpWSGIServer):
    """A waitress TCP server that evicts idle connections at its connection limit.

    >>> server = IdleEvictingServer(app, host="127.0.0.1", port=0, threads=8)  # doctest: +SKIP
    """

    def __init__(self, application: Any, **kw: Any) -> None:
        kw.setdefault("connection_limit", CONNECTION_LIMIT)
        super().__init__(application, **kw)
        self.evicted = 0  # idle connections closed to make room, since start
        self._evicted_unlogged = 0
        self._next_log = 0.0

    def readable(self) -> bool:
        """Called by the event loop before each poll: make room first, then accept."""
        # waitress's stubs leave out the socket map and type active_channels wrongly.
        open_now = len(cast(Any, self)._map)
        room = self.adj.connection_limit - EVICTION_BATCH
        if self.accepting and open_now >= room:
            self._evict_idle(open_now - room + EVICTION_BATCH)
        return bool(super().readable())

    def _evict_idle(self, count: int) -> None:
        channels: dict[int, Any] = cast(Any, self).active_channels
        idle = [
            channel for channel in channels.values()
            if not channel.requests and not channel.will_close and not channel.close_when_flushed
        ]
        idle.sort(key=lambda channel: channel.last_activity)
        # Marked, not closed: the loop closes a marked channel on its next pass (closing here
        # would change the map while the loop walks it).
        for channel in idle[:count]:
            channel.will_close = True
        self.evicted += min(count, len(idle))
        self._evicted_unlogged += min(count, len(idle))
        now = time.monotonic()
        if self._evicted_unlogged and now >= self._next_log:
            log.warning(
                "closed %d idle HTTP connections to stay under the limit of %d open ones",
                self._evicted_unlogged, self.adj.connection_limit,
            )
            self._evicted_unlogged = 0
            self._next_log = now + EVICTION_LOG_SECONDS
