"""What every adapter shares: JSON in and out, upstream URLs and headers, usage parsing.

Usage is normalised as docs/gateway.md says: OpenAI's ``prompt_tokens`` include the
cached ones, so ``input_tokens = prompt_tokens - cached_tokens``; Anthropic's
``input_tokens`` already exclude cache reads and writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from ragplane.errors import UpstreamProtocolError
from ragplane.gateway.types import Route, Usage

__all__ = [
    "ANTHROPIC_VERSION",
    "StreamState",
    "anthropic_headers",
    "anthropic_url",
    "dumps",
    "loads_object",
    "openai_headers",
    "openai_url",
    "usage_from_anthropic",
    "usage_from_openai",
]

ANTHROPIC_VERSION = "2023-06-01"

dumps = orjson.dumps


class StreamState:
    """What every stream translator reports to the relay: the usage seen so far and
    whether the provider's stream has ended (set by the subclass as events arrive)."""

    __slots__ = ("_finished", "_usage")

    def __init__(self) -> None:
        self._usage: Usage | None = None
        self._finished = False

    @property
    def usage(self) -> Usage | None:
        return self._usage

    @property
    def finished(self) -> bool:
        return self._finished


def loads_object(raw: bytes | str, route: Route, what: str) -> dict[str, Any]:
    """Parse one upstream JSON object; anything else is the provider's protocol error."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UpstreamProtocolError(
            f"{route.provider_name} sent {what} that is not JSON",
            provider=route.provider_name,
            route=route.name,
        ) from exc
    if not isinstance(value, dict):
        raise UpstreamProtocolError(
            f"{route.provider_name} sent {what} that is not a JSON object",
            provider=route.provider_name,
            route=route.name,
        )
    return value


def openai_url(route: Route, path: str) -> str:
    """``base_url`` (which includes ``/v1``) + path; in-process providers get ``local:``."""
    base = route.provider.base_url
    if base is None:
        return "local:/v1" + path
    return base.rstrip("/") + path


def anthropic_url(route: Route) -> str:
    """``/v1/messages`` under ``base_url``, given with or without its ``/v1``."""
    base = (route.provider.base_url or "").rstrip("/")
    return base + "/messages" if base.endswith("/v1") else base + "/v1/messages"


def openai_headers(route: Route) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    key = route.provider.api_key
    if key is not None:
        headers["authorization"] = "Bearer " + key.get_secret_value()
    headers.update(route.provider.headers)
    return headers


def anthropic_headers(route: Route, caller: Mapping[str, str] | None = None) -> dict[str, str]:
    """x-api-key, anthropic-version (the caller's, else 2023-06-01), the caller's
    anthropic-beta merged with the provider's, then the provider's extra headers."""
    headers = {"content-type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
    key = route.provider.api_key
    if key is not None:
        headers["x-api-key"] = key.get_secret_value()
    beta = ""
    if caller:
        for name, value in caller.items():
            low = name.lower()
            if low == "anthropic-version":
                headers["anthropic-version"] = value
            elif low == "anthropic-beta":
                beta = value
    for name, value in route.provider.headers.items():
        if name.lower() == "anthropic-beta" and beta:
            beta = beta + "," + value
        else:
            headers[name] = value
    if beta:
        headers["anthropic-beta"] = beta
    return headers


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_from_openai(usage: Mapping[str, Any]) -> Usage:
    prompt = _int(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    out_details = usage.get("completion_tokens_details")
    reasoning = _int(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else 0
    return Usage(
        input_tokens=max(prompt - cached, 0),
        output_tokens=_int(usage.get("completion_tokens")),
        cache_read_tokens=cached,
        reasoning_tokens=reasoning,
    )


def usage_from_anthropic(usage: Mapping[str, Any], before: Usage | None = None) -> Usage:
    """Anthropic usage; fields missing here keep their value in ``before`` (a stream's
    ``message_delta`` repeats only what changed)."""
    base = before or Usage()
    details = usage.get("output_tokens_details")
    reasoning = base.reasoning_tokens
    if isinstance(details, dict) and "thinking_tokens" in details:
        reasoning = _int(details["thinking_tokens"])

    def pick(key: str, old: int) -> int:
        value = usage.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else old

    return Usage(
        input_tokens=pick("input_tokens", base.input_tokens),
        output_tokens=pick("output_tokens", base.output_tokens),
        cache_read_tokens=pick("cache_read_input_tokens", base.cache_read_tokens),
        cache_write_tokens=pick("cache_creation_input_tokens", base.cache_write_tokens),
        reasoning_tokens=reasoning,
    )
