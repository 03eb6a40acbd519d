"""Breaker state in Redis, shared by every gateway replica: the rules of
:class:`~ragplane.gateway.statestore.MemoryBreakerStore` as atomic Lua scripts.

One round trip per ``acquire`` and per ``record`` (``EVALSHA``; the script is loaded
on first use). Time is the Redis server's (``TIME``), so replicas with skewed clocks
still agree on cooldowns, windows and lease expiry.

Keys, all with the route as hash tag (one slot per route)::

    <prefix>breaker:{<route>}          hash: st (state), oa (opened at), cf (consecutive
                                       failures), de (window epoch of the last SLO check),
                                       seq (probe lease counter)
    <prefix>breaker:{<route>}:probes   sorted set: probe lease id → expiry
    <prefix>breaker:{<route>}:b:<n>    hash per time bucket n: c (calls), f (failures),
                                       h<bin> (successes per latency bin)

Buckets expire one window after they end; the state hash and probe set expire after
``idle_ttl_s`` without writes (an idle route starts again closed).
"""

from __future__ import annotations

import math
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ragplane.config import BreakerPolicy
from ragplane.errors import StateStoreUnavailable
from ragplane.gateway.statestore import (
    BUCKETS,
    HIST_BINS,
    Transition,
    WindowStats,
    bin_latency_ms,
    latency_bin,
    slo_bin,
)
from ragplane.gateway.types import Admission, BreakerState

__all__ = ["RedisBreakerStore"]

_LIB = """
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function window(base, e, nb)
  local calls, fails, hist = 0, 0, {}
  for k = e - nb + 1, e do
    local kv = redis.call('HGETALL', base .. string.format('%d', k))
    for i = 1, #kv, 2 do
      local f, v = kv[i], tonumber(kv[i + 1])
      if f == 'c' then calls = calls + v
      elseif f == 'f' then fails = fails + v
      else
        local b = tonumber(string.sub(f, 2))
        hist[b] = (hist[b] or 0) + v
      end
    end
  end
  return calls, fails, hist
end
local function pbin(hist, n, pct, nbins)
  if n <= 0 then return -1 end
  local rank = math.floor((n * pct + 99) / 100)
  local seen = 0
  for b = 0, nbins - 1 do
    seen = seen + (hist[b] or 0)
    if seen >= rank then return b end
  end
  return nbins - 1
end
local function latency_state(calls, fails, hist, min_calls, slo, nbins)
  local n = calls - fails
  if slo < 0 or n < min_calls then return 'closed' end
  if pbin(hist, n, 95, nbins) >= slo then return 'degraded' end
  return 'closed'
end
"""

# KEYS: state, probes, bucket prefix. ARGV: lease_s, cooldown_s, probes, window_s, buckets,
# min_calls, slo_bin, bins, ttl_ms. → {allowed, state, from, reason, calls, fails, lease}
_ACQUIRE = (
    _LIB
    + """
local S, Z, B = KEYS[1], KEYS[2], KEYS[3]
local h = redis.call('HMGET', S, 'st', 'oa', 'de')
local st = h[1] or 'closed'
if st == 'closed' then return {1, 'closed', '', '', 0, 0, ''} end
local lease_s, cooldown, probes = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local nb, min_calls = tonumber(ARGV[5]), tonumber(ARGV[6])
local slo, nbins, ttl = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local now = now_s()
local e = math.floor(now / (tonumber(ARGV[4]) / nb))
if st == 'degraded' then
  if tonumber(h[3]) == e then return {1, 'degraded', '', '', 0, 0, ''} end
  local calls, fails, hist = window(B, e, nb)
  redis.call('HSET', S, 'de', string.format('%d', e))
  if latency_state(calls, fails, hist, min_calls, slo, nbins) == 'closed' then
    redis.call('HSET', S, 'st', 'closed')
    return {1, 'closed', 'degraded', 'slo_recovered', calls, fails, ''}
  end
  return {1, 'degraded', '', '', 0, 0, ''}
end
local from, reason, calls, fails = '', '', 0, 0
if st == 'open' then
  if now < tonumber(h[2]) + cooldown then return {0, 'open', '', '', 0, 0, ''} end
  redis.call('HSET', S, 'st', 'half_open')
  redis.call('DEL', Z)
  from, reason = 'open', 'cooldown_elapsed'
  calls, fails = window(B, e, nb)
end
redis.call('ZREMRANGEBYSCORE', Z, '-inf', now)
if redis.call('ZCARD', Z) >= probes then
  return {0, 'half_open', from, reason, calls, fails, ''}
end
local id = redis.call('HINCRBY', S, 'seq', 1)
redis.call('ZADD', Z, now + lease_s, id)
redis.call('PEXPIRE', Z, ttl)
redis.call('PEXPIRE', S, ttl)
return {1, 'half_open', from, reason, calls, fails, tostring(id)}
"""
)

# KEYS: state, probes, bucket prefix. ARGV: ok, latency bin, lease, window_s, buckets,
# min_calls, failure_rate, consecutive limit, slo_bin, bins, ttl_ms, bucket ttl_ms.
# → {state, from, reason, calls, fails}
_RECORD = (
    _LIB
    + """
local S, Z, B = KEYS[1], KEYS[2], KEYS[3]
local ok, lease = ARGV[1] == '1', ARGV[3]
local nb, min_calls, rate = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local limit, slo, nbins = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local ttl = tonumber(ARGV[11])
local now = now_s()
local e = math.floor(now / (tonumber(ARGV[4]) / nb))
local h = redis.call('HMGET', S, 'st', 'cf')
local st = h[1] or 'closed'
if st == 'half_open' and lease ~= '' and redis.call('ZREM', Z, lease) == 1 then
  local calls, fails = window(B, e, nb)
  redis.call('DEL', Z)
  if ok then
    for k = e - nb + 1, e do redis.call('DEL', B .. string.format('%d', k)) end
    redis.call('HSET', S, 'st', 'closed', 'cf', 0)
    redis.call('PEXPIRE', S, ttl)
    return {'closed', 'half_open', 'probe_succeeded', calls, fails}
  end
  redis.call('HSET', S, 'st', 'open', 'oa', tostring(now), 'cf', 0)
  redis.call('PEXPIRE', S, ttl)
  return {'open', 'half_open', 'probe_failed', calls, fails}
end
local bk = B .. string.format('%d', e)
redis.call('HINCRBY', bk, 'c', 1)
if ok then redis.call('HINCRBY', bk, 'h' .. ARGV[2], 1) else redis.call('HINCRBY', bk, 'f', 1) end
redis.call('PEXPIRE', bk, tonumber(ARGV[12]))
if st == 'open' or st == 'half_open' then return {st, '', '', 0, 0} end
local cf = tonumber(h[2] or '0')
if ok then
  if cf > 0 then redis.call('HSET', S, 'cf', 0) end
  if slo < 0 then return {st, '', '', 0, 0} end
else
  cf = cf + 1
  redis.call('HSET', S, 'cf', cf)
  redis.call('PEXPIRE', S, ttl)
end
local calls, fails, hist = window(B, e, nb)
if not ok then
  local reason = ''
  if cf >= limit then reason = 'consecutive_failures'
  elseif calls >= min_calls and fails >= rate * calls then reason = 'failure_rate' end
  if reason ~= '' then
    redis.call('HSET', S, 'st', 'open', 'oa', tostring(now), 'cf', 0)
    redis.call('PEXPIRE', S, ttl)
    return {'open', st, reason, calls, fails}
  end
end
local ls = latency_state(calls, fails, hist, min_calls, slo, nbins)
if ls ~= st then
  redis.call('HSET', S, 'st', ls, 'de', string.format('%d', e))
  redis.call('PEXPIRE', S, ttl)
  local reason = 'slo_recovered'
  if ls == 'degraded' then reason = 'slo_breached' end
  return {ls, st, reason, calls, fails}
end
if st == 'degraded' then redis.call('HSET', S, 'de', string.format('%d', e)) end
return {st, '', '', 0, 0}
"""
)

# KEYS: state, bucket prefix. ARGV: window_s, buckets, bins → {state, calls, fails, p50, p95}
_STATS = (
    _LIB
    + """
local nb, nbins = tonumber(ARGV[2]), tonumber(ARGV[3])
local st = redis.call('HGET', KEYS[1], 'st') or 'closed'
local e = math.floor(now_s() / (tonumber(ARGV[1]) / nb))
local calls, fails, hist = window(KEYS[2], e, nb)
local n = calls - fails
return {st, calls, fails, pbin(hist, n, 50, nbins), pbin(hist, n, 95, nbins)}
"""
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _transition(to: str, from_: Any, reason: Any, calls: Any, fails: Any) -> Transition | None:
    if not from_:
        return None
    return Transition(
        BreakerState(_text(from_)), BreakerState(to), _text(reason), int(calls), int(fails)
    )


class RedisBreakerStore:
    """Breaker state in Redis; ``client`` is a ``redis.asyncio.Redis`` this store does not own
    unless ``owns_client``."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "ragplane:",
        idle_ttl_s: float = 3600.0,
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._idle_ttl_s = idle_ttl_s
        self._owns_client = owns_client
        self._acquire = client.register_script(_ACQUIRE)
        self._record = client.register_script(_RECORD)
        self._stats = client.register_script(_STATS)
        self._keys: dict[str, tuple[str, str, str]] = {}

    def _keys_of(self, route: str) -> tuple[str, str, str]:
        keys = self._keys.get(route)
        if keys is None:
            state = f"{self._prefix}breaker:{{{route}}}"
            keys = self._keys[route] = (state, state + ":probes", state + ":b:")
        return keys

    def _ttl_ms(self, policy: BreakerPolicy, lease_s: float = 0.0) -> int:
        span = 2 * (policy.window_s + policy.cooldown_s + lease_s)
        return math.ceil(1000 * max(self._idle_ttl_s, span))

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> list[Any]:
        try:
            result: list[Any] = await script(keys=keys, args=args)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StateStoreUnavailable(f"breaker state store: {exc}") from exc
        return result

    async def acquire(
        self, route: str, policy: BreakerPolicy, lease_s: float
    ) -> tuple[Admission, Transition | None]:
        args = [
            lease_s,
            policy.cooldown_s,
            policy.half_open_probes,
            policy.window_s,
            BUCKETS,
            policy.min_calls,
            slo_bin(policy.slo_p95_ms),
            HIST_BINS,
            self._ttl_ms(policy, lease_s),
        ]
        allowed, state, from_, reason, calls, fails, lease = await self._call(
            self._acquire, list(self._keys_of(route)), args
        )
        to = _text(state)
        lease_id = _text(lease) or None
        admission = Admission(bool(allowed), BreakerState(to), lease_id is not None, lease_id)
        return admission, _transition(to, from_, reason, calls, fails)

    async def record(
        self,
        route: str,
        policy: BreakerPolicy,
        *,
        ok: bool,
        latency_ms: float,
        lease: str | None,
    ) -> tuple[BreakerState, Transition | None]:
        args = [
            1 if ok else 0,
            latency_bin(latency_ms),
            lease or "",
            policy.window_s,
            BUCKETS,
            policy.min_calls,
            policy.failure_rate,
            policy.consecutive_failures,
            slo_bin(policy.slo_p95_ms),
            HIST_BINS,
            self._ttl_ms(policy),
            math.ceil(1000 * policy.window_s * (1 + 1 / BUCKETS)) + 1000,
        ]
        state, from_, reason, calls, fails = await self._call(
            self._record, list(self._keys_of(route)), args
        )
        to = _text(state)
        return BreakerState(to), _transition(to, from_, reason, calls, fails)

    async def release(self, route: str, lease: str) -> None:
        try:
            await self._client.zrem(self._keys_of(route)[1], lease)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StateStoreUnavailable(f"breaker state store: {exc}") from exc

    async def stats(self, route: str, policy: BreakerPolicy) -> WindowStats:
        state_key, _, buckets = self._keys_of(route)
        st, calls, fails, p50, p95 = await self._call(
            self._stats, [state_key, buckets], [policy.window_s, BUCKETS, HIST_BINS]
        )
        return WindowStats(
            state=BreakerState(_text(st)),
            calls=int(calls),
            failures=int(fails),
            p50_ms=bin_latency_ms(int(p50)) if int(p50) >= 0 else None,
            p95_ms=bin_latency_ms(int(p95)) if int(p95) >= 0 else None,
        )

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
