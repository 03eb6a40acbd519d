"""``ragplane mock-provider``: a provider test server speaking the OpenAI and Anthropic
wire protocols, with configurable latency and injectable faults.

It is the "direct" baseline of the gateway benchmark, so a request costs little:
aiohttp, orjson, no validation models on the hot path.

In tests and benchmarks (same event loop)::

    from ragplane.gateway.mockprovider import FaultRule, MockProviderConfig, run_mock_provider

    config = MockProviderConfig(api_key="sk-mock", ttft_ms=20, tokens_per_s=200)
    async with run_mock_provider(config) as mock:     # host 127.0.0.1, a free port
        openai.AsyncOpenAI(base_url=mock.openai_base_url, api_key="sk-mock")  # .../v1
        anthropic.AsyncAnthropic(base_url=mock.url, api_key="sk-mock")
        mock.set_faults(FaultRule("503", count=2))    # the next two requests fail
        mock.set_faults("429:retry-after=2")           # every request, until changed
        mock.set_faults()                              # no faults
        mock.stats.requests["/v1/chat/completions"], mock.stats.faults["503"]
        mock.reset()                                   # counters, configured faults, cache

As a separate process (benchmarks): ``ragplane mock-provider --port 9100 --ttft-ms 20
--tokens-per-s 200 --fault 503 --fault-rate 0.1 --api-key KEY``; it prints
``mock provider listening on http://HOST:PORT`` to stderr (``--port 0``: a free port)
and stops gracefully on SIGINT/SIGTERM.

Routes: ``POST /v1/chat/completions``, ``POST /v1/embeddings``, ``GET /v1/models``
(Anthropic's shape when ``anthropic-version`` is sent), ``POST /v1/messages``.
Admin, unauthenticated: ``GET /_mock/stats``, ``POST /_mock/faults`` (body
``{"faults": ["503", {"spec": "cut:3", "rate": 0.5, "count": 10}]}``, replaces the
rules), ``POST /_mock/reset``.

Authentication, when ``api_key`` is set: OpenAI routes ``Authorization: Bearer KEY``;
``/v1/messages`` ``x-api-key: KEY`` and ``anthropic-version``. A wrong key is a 401 in
the route's error shape.

What the answers hold (deterministic, derived from the request):

- text: the last user message's words, then lorem ipsum; ``output_tokens`` pieces
  (config or ``x-mock-output-tokens``), capped by ``max_tokens`` /
  ``max_completion_tokens`` (finish ``length`` / ``max_tokens``). One piece is one
  token and one stream event; input is counted at four characters a token.
- tools: called when ``tools`` are given and the last user message names one (or says
  "use a tool"), when ``tool_choice`` forces one, or with ``x-mock-tool-call: NAME``;
  arguments fit the tool's JSON schema. A tool result as last message gets text.
- OpenAI ``response_format`` ``json_object`` / ``json_schema``: the content is JSON.
- OpenAI usage: ``prompt_tokens_details.cached_tokens`` (config ``cached_tokens`` or
  ``x-mock-cached-tokens``), ``completion_tokens_details.reasoning_tokens`` (config or
  ``x-mock-reasoning-tokens``, counted in ``completion_tokens``); streams send it in a
  last chunk with empty ``choices`` when ``stream_options.include_usage`` is set.
- Anthropic usage: the prompt (tools, system, messages) up to the last
  ``cache_control`` breakpoint (or all of it for a top-level ``cache_control``) is
  ``cache_creation_input_tokens`` the first time that prefix is seen and
  ``cache_read_input_tokens`` afterwards; ``input_tokens`` is the rest.
- embeddings: unit vectors from a hash of each input, ``dimensions`` honoured
  (default 384), ``encoding_format`` float or base64.

Timing per request: ``x-mock-latency-ms`` (before the headers), ``x-mock-ttft-ms``
(headers to the first content token), ``x-mock-tokens-per-s`` (0: unpaced); the
config holds the defaults. A non-stream answer waits for its whole generation time.

Faults: the ``x-mock-fault`` header, else the first configured/runtime rule that fires
(``FaultRule(spec, rate=1.0, count=None)``). Specs: ``429`` (``Retry-After``:
``retry_after_s`` or ``429:2``), any other status 400-599 (``529`` is Anthropic's
``overloaded_error``), ``refuse`` (connection closed, no response), ``hang`` (no answer
until the client gives up), ``cut[:N]`` (stream: N events then the connection closes,
no terminal event; non-stream: half the body), ``stall[:N]`` (stream: N events then
silence until the client gives up, an idle timeout; non-stream: half the body, then
silence), ``malformed[:N]`` (stream: a data line that is not JSON after N events;
non-stream: a truncated JSON body). N defaults to ``cut_after`` (3). The header
``x-mock-fault: none`` turns the rules off for one request. See ``_config`` for the
grammar.
"""

from __future__ import annotations

from ragplane.gateway.mockprovider._config import (
    Fault,
    FaultRule,
    MockProviderConfig,
    parse_fault,
)
from ragplane.gateway.mockprovider._server import (
    MockProvider,
    build_app,
    run_mock_provider,
    serve_mock_provider,
)
from ragplane.gateway.mockprovider._state import MockStats

__all__ = [
    "Fault",
    "FaultRule",
    "MockProvider",
    "MockProviderConfig",
    "MockStats",
    "build_app",
    "parse_fault",
    "run_mock_provider",
    "serve_mock_provider",
]
