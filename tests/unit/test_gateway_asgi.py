"""The gateway app's own request and response over raw ASGI messages."""

from __future__ import annotations

from typing import Any

import pytest

from ragplane.errors import BadRequest
from ragplane.gateway.app import Request, Response


def _receiver(*messages: dict[str, Any]) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    return receive


async def test_headers_are_read_once_and_the_first_of_repeated_ones_wins() -> None:
    scope = {"headers": [(b"x-tenant-id", b"tnt_a"), (b"x-tenant-id", b"tnt_b"), (b"a", b"1")]}
    request = Request(scope, _receiver())
    assert request.headers == {"x-tenant-id": "tnt_a", "a": "1"}


async def test_a_body_in_several_messages_is_joined() -> None:
    receive = _receiver(
        {"type": "http.request", "body": b'{"mo', "more_body": True},
        {"type": "http.request", "body": b'del": 1}', "more_body": False},
    )
    assert await Request({"headers": []}, receive).body() == b'{"model": 1}'


async def test_a_caller_gone_before_the_body_is_a_bad_request() -> None:
    receive = _receiver(
        {"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}
    )
    with pytest.raises(BadRequest, match="disconnected"):
        await Request({"headers": []}, receive).body()


async def test_a_response_is_one_start_and_one_body_with_its_length() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await Response(b'{"ok":true}', 201, {"x-request-id": "req_1"})({}, _receiver(), send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 201
    assert dict(sent[0]["headers"]) == {
        b"content-type": b"application/json",
        b"x-request-id": b"req_1",
        b"content-length": b"11",
    }
    assert sent[1]["body"] == b'{"ok":true}'


async def test_a_response_that_names_its_type_sends_one_content_type() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await Response(b"ok", headers={"content-type": "text/plain"})({}, _receiver(), send)
    types = [v for k, v in sent[0]["headers"] if k == b"content-type"]
    assert types == [b"text/plain"]
