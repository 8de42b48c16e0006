"""The rate limit's arithmetic and its stores: one table shared by a machine's workers, and Redis.

GCRA, the generic cell rate algorithm: all it keeps per client is one float, the theoretical
arrival time (TAT) of its next request if it sent one every interval (window / limit). A
request is allowed while the TAT is less than a window ahead of now, and moves the TAT one
interval further. A fresh client may so send `limit` requests at once, then one per
interval: a token bucket, without a counter per window to reset or sweep, and small enough to
live in one Redis key or one 16-byte slot of a shared table.
"""

import asyncio
import fcntl
import logging
import math
import mmap
import os
import time
from hashlib import blake2b

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from observability import RATE_LIMIT_WORKERS

log = logging.getLogger("users.ratelimit")

# Client addresses the table holds at once (1 MiB); far more than one container sees per window.
TABLE_SLOTS = 1 << 16
# Slots looked at for one address: enough that a busy neighbourhood never evicts a live client.
TABLE_PROBES = 8
# Seconds one Redis call may take. A healthy one takes under a millisecond; the margin is for
# a busy machine, where a spurious timeout would loosen the limit to per container for a while.
REDIS_TIMEOUT = 0.25
# Failures in a row after which Redis counts as out: one slow answer on a busy machine does not.
REDIS_FAILURES_TO_PAUSE = 3
# Seconds Redis is then left alone, so an outage costs one timeout per pause, not one per request.
REDIS_PAUSE = 5.0


class RateLimiter:
    """Count a client's requests in Redis when there is one and it answers, else in this machine's table."""

    def __init__(self, limit: int, window: int, table_path: str | None, redis_url: str | None, prefix: str) -> None:
        self.window = float(window)
        self.interval = window / limit
        self.table = RateLimitTable(limit, window, table_path)
        self.redis = RedisRateLimiter(redis_url, limit, window, prefix) if redis_url else None
        self.policy = f'"default";q={limit};w={window}'.encode()

    async def start(self) -> None:
        counted_in("redis" if self.redis else "local")
        if self.redis:
            await self.redis.connect()

    async def close(self) -> None:
        if self.redis:
            await self.redis.redis.aclose()

    async def hit(self, client: str) -> tuple[bool, int, list[tuple[bytes, bytes]]]:
        """Count one request; return whether it is allowed, the seconds to wait, and the RateLimit headers."""
        verdict = await self.redis.hit(client) if self.redis else None
        if verdict is None:  # no Redis, or Redis is out: this machine's table
            verdict = self.table.hit(client)
        allowed, ahead = verdict
        # Requests left now, and "t": seconds until one more is (draft -10: "until additional
        # quota is made available"). The 1e-9 absorbs float error at whole numbers.
        quota = (self.window - ahead) / self.interval
        remaining = max(0, math.floor(quota + 1e-9)) if allowed else 0
        wait = max(1, math.ceil((remaining + 1 - quota) * self.interval - 1e-9))
        headers = [(b"ratelimit-policy", self.policy), (b"ratelimit", f'"default";r={remaining};t={wait}'.encode())]
        return allowed, wait, headers


def counted_in(where: str) -> None:
    """Say in the metrics whether this worker counts the rate limit in "redis" or "local"ly."""
    RATE_LIMIT_WORKERS.labels("redis").set(where == "redis")
    RATE_LIMIT_WORKERS.labels("local").set(where == "local")


class RateLimitTable:
    """GCRA state per client address in a fixed-size hash table, on this machine.

    Under gunicorn the table is a file in shared memory that the master created before it
    forked the workers (gunicorn.conf.py passes its path in RATE_LIMIT_TABLE). Every worker
    maps it and locks it with fcntl for the microseconds of one update, so the limit is the
    service's, however many workers share the counting. Without it (uvicorn in development,
    tests over ASGI) the table is this process's own memory, and needs no lock.
    """

    def __init__(self, limit: int, window: int, path: str | None) -> None:
        self.window = float(window)
        self.interval = window / limit
        size = TABLE_SLOTS * 16  # per slot: 8 bytes of the address's hash, 8 of its TAT
        if path:
            # A POSIX lock belongs to the process, not to the descriptor: it excludes the
            # other workers even if this descriptor was inherited, and dies with its holder.
            self.lock_fd: int | None = os.open(path, os.O_RDWR)
            os.ftruncate(self.lock_fd, size)  # zeros the first time; the same size again is a no-op
            memory = mmap.mmap(self.lock_fd, size)
        else:
            self.lock_fd = None
            memory = mmap.mmap(-1, size)
        self.keys = memoryview(memory)[: size // 2].cast("Q")  # 0: a slot never used
        self.tats = memoryview(memory)[size // 2 :].cast("d")

    def hit(self, client: str) -> tuple[bool, float]:
        """Count one request; return whether it is allowed, and how far ahead of now the TAT is."""
        # A hash that every process computes alike (Python's own hash() is salted per process).
        key = int.from_bytes(blake2b(client.encode(), digest_size=8).digest()) or 1
        # CLOCK_MONOTONIC: one clock for every process on the machine, and never set back.
        now = time.monotonic()
        if self.lock_fd is not None:
            fcntl.lockf(self.lock_fd, fcntl.LOCK_EX)
        try:
            slot = self.slot(key)
            tat = max(self.tats[slot], now) if self.keys[slot] == key else now
            if tat - now > self.window - self.interval:
                return False, tat - now
            self.keys[slot], self.tats[slot] = key, tat + self.interval
            return True, tat + self.interval - now
        finally:
            if self.lock_fd is not None:
                fcntl.lockf(self.lock_fd, fcntl.LOCK_UN)

    def slot(self, key: int) -> int:
        """The slot holding key; else the first never used; else the one with the oldest TAT.

        A TAT in the past means a full quota, the same as no entry at all, so expired slots
        need no sweeping: they are simply the first to be taken over. Slots are never
        emptied, so a key is never stored past the first empty slot of its run.
        """
        oldest = key % TABLE_SLOTS
        for i in range(key, key + TABLE_PROBES):
            slot = i % TABLE_SLOTS
            if self.keys[slot] == key or self.keys[slot] == 0:
                return slot
            if self.tats[slot] < self.tats[oldest]:
                oldest = slot
        return oldest


# The same GCRA in Redis, atomic because Redis runs one script at a time. The time is
# Redis's own, so containers whose clocks differ still agree. Numbers go back as strings:
# Redis would cut Lua's floats down to integers.
GCRA_SCRIPT = """
local time = redis.call("TIME")
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local interval, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = math.max(tonumber(redis.call("GET", KEYS[1])) or now, now)
if tat - now > window - interval then
    return {0, tostring(tat - now)}
end
tat = tat + interval
redis.call("SET", KEYS[1], tostring(tat), "PX", math.ceil((tat - now) * 1000))
return {1, tostring(tat - now)}
"""


class RedisRateLimiter:
    """GCRA in Redis, so that the limit holds across every container that shares it."""

    def __init__(self, url: str, limit: int, window: int, prefix: str) -> None:
        # No retries of redis-py's own: while Redis fails, the request is counted locally at once.
        self.redis = Redis.from_url(
            url, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT, retry=Retry(NoBackoff(), 0)
        )
        self.gcra = self.redis.register_script(GCRA_SCRIPT)
        self.args = (window / limit, window)
        self.prefix = prefix
        self.failures = 0  # in a row
        self.paused_until = 0.0

    async def connect(self) -> None:
        """Open a connection and load the script at start, so the first requests do not wait for it."""
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self.redis.script_load(GCRA_SCRIPT)
        except (RedisError, OSError) as exc:
            self.failed(exc)

    async def hit(self, client: str) -> tuple[bool, float] | None:
        """Count one request in Redis; None when Redis is out, for the caller to count it locally."""
        if time.monotonic() < self.paused_until:
            return None
        try:
            # Also bounds the wait for a free connection, which the socket timeouts do not.
            async with asyncio.timeout(REDIS_TIMEOUT):
                allowed, ahead = await self.gcra(keys=[self.prefix + client], args=self.args)
        except (RedisError, OSError) as exc:  # OSError: TimeoutError, and a refused connection
            self.failed(exc)
            return None
        if self.failures >= REDIS_FAILURES_TO_PAUSE:
            log.warning("Redis is back: the rate limit is shared again")
            counted_in("redis")
        self.failures = 0
        return allowed == 1, float(ahead)

    def failed(self, exc: Exception) -> None:
        """Count a failure; after REDIS_FAILURES_TO_PAUSE in a row, leave Redis alone for REDIS_PAUSE.

        A circuit breaker: a stalled Redis then costs one timeout per pause, not one per request.
        """
        self.failures += 1
        if self.failures == REDIS_FAILURES_TO_PAUSE:  # requests that waited together fail together: log once
            log.warning("Redis is out (%r): the rate limit is per container for a while", exc)
            counted_in("local")
        if self.failures >= REDIS_FAILURES_TO_PAUSE:
            self.paused_until = time.monotonic() + REDIS_PAUSE
