"""Asking a running platform: ``ask``, ``smoke``; feature flags: ``flags list|set``."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from ragplane.cli._common import (
    ConfigOpt,
    DataDirOpt,
    _control,
    _settings,
    app,
    err,
    out,
    tenants_app,
)
from ragplane.errors import RagplaneError

__all__ = ["ask", "flags_app", "smoke", "tenants_policy"]

flags_app = typer.Typer(no_args_is_help=True, help="Feature flags and kill switches.")
app.add_typer(flags_app, name="flags")

UrlOpt = Annotated[str, typer.Option("--url", help="The platform's base URL.")]
TenantOpt = Annotated[
    str, typer.Option("--tenant", "-t", help="Tenant to ask as (dev mode, no credentials).")
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", help="Bearer token or API key instead (production)."),
]


def _identity(tenant: str, token: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(headers, body fields) that say who asks."""
    if token:
        return {"authorization": f"Bearer {token}"}, {}
    return {}, {"tenant_id": tenant}


def _sse_events(lines: Any) -> Any:
    import orjson

    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event is not None:
            yield event, orjson.loads(line[6:])
            event = None


def _citation_lines(citations: list[dict[str, Any]]) -> list[str]:
    seen: set[tuple[str, str]] = set()
    lines = []
    for c in citations:
        key = (c["marker"], c["source_uri"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"{c['marker']} {c['title']} ({c['source_uri']})")
    return lines


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    tenant: TenantOpt = "tnt_acme_eu",
    url: UrlOpt = "http://127.0.0.1:8080",
    kb: Annotated[str, typer.Option(help="Knowledge-base namespace.")] = "default",
    session: Annotated[
        str | None, typer.Option("--session", help="Continue this session id.")
    ] = None,
    token: TokenOpt = None,
) -> None:
    """Ask a running platform; the answer streams, then its sources."""
    import httpx

    headers, who = _identity(tenant, token)
    body: dict[str, Any] = {"query": question, "kb": kb, "stream": True, **who}
    if session:
        body["session_id"] = session
    try:
        with (
            httpx.Client(base_url=url, timeout=120) as client,
            client.stream("POST", "/v1/chat", json=body, headers=headers) as r,
        ):
            if r.status_code != 200:
                r.read()
                raise RagplaneError(f"{r.status_code}: {_error_text(r)}")
            for name, data in _sse_events(r.iter_lines()):
                if name == "meta":
                    session = data["session_id"]  # to continue: --session
                    if data.get("banner"):
                        err.print(f"[bold yellow]{data['banner']}[/]")
                    if data["cache_hit"]:
                        err.print("[dim](from the semantic cache)[/]")
                elif name == "delta":
                    out.print(data["text"], end="", highlight=False, soft_wrap=True)
                elif name == "citations":
                    out.print()
                    for line in _citation_lines(data["citations"]):
                        out.print(f"[dim]{line}[/]", highlight=False, soft_wrap=True)
                elif name == "done":
                    usage = data["usage"]
                    err.print(
                        f"[dim]{data['latency_ms']:.0f} ms · {usage['input_tokens']} in / "
                        f"{usage['output_tokens']} out tokens · session {session}[/]"
                    )
                elif name == "error":
                    out.print()
                    raise RagplaneError(
                        f"{data['code']}: {data['message']} (request {data['request_id']})"
                    )
    except httpx.HTTPError as exc:
        raise RagplaneError(f"could not reach {url}: {exc}") from exc


def _error_text(r: Any) -> str:
    try:
        e = r.json()["error"]
        return f"{e['code']}: {e['message']} (request {e['request_id']})"
    except (ValueError, KeyError, TypeError):
        return str(r.text[:300])


@app.command()
def smoke(
    url: Annotated[str, typer.Argument(help="The platform's base URL.")],
    tenant: TenantOpt = "tnt_acme_eu",
    token: TokenOpt = None,
    query: Annotated[
        str, typer.Option(help="The question asked twice.")
    ] = "What is our refund policy for EU customers?",
) -> None:
    """The platform smoke test: /ready is 200; a question gets citations; the same question
    again is a cache hit."""
    import httpx

    headers, who = _identity(tenant, token)
    failures = 0

    def check(name: str, ok: bool, detail: str) -> None:
        nonlocal failures
        failures += not ok
        mark = "[green]ok[/]  " if ok else "[red]FAIL[/]"
        out.print(f"{mark} {name}: {detail}", highlight=False, soft_wrap=True)

    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            r = client.get("/ready")
            check("GET /ready", r.status_code == 200, str(r.status_code))
            answers = []
            for attempt in ("first", "again"):
                t0 = time.perf_counter()
                r = client.post("/v1/chat", json={"query": query, **who}, headers=headers)
                ms = (time.perf_counter() - t0) * 1000
                if r.status_code != 200:
                    check(f"POST /v1/chat ({attempt})", False, f"{r.status_code} {_error_text(r)}")
                    break
                answers.append((r.json(), ms))
    except httpx.HTTPError as exc:
        raise RagplaneError(f"could not reach {url}: {exc}") from exc
    if answers:
        first, ms = answers[0]
        check(
            "citations present",
            bool(first["citations"]),
            f"{len(first['citations'])} citations, {ms:.0f} ms",
        )
    if len(answers) > 1:
        again, ms = answers[1]
        check("same request again is a cache hit", again["cache_hit"] is True, f"{ms:.0f} ms")
    if failures or len(answers) < 2:
        sys.exit(1)


@flags_app.command("list")
def flags_list(data_dir: DataDirOpt = None, config: ConfigOpt = None) -> None:
    """Every flag and its state."""
    from rich.table import Table

    from ragplane.control.flags import list_flags

    flags = _control(_settings(config, data_dir=data_dir), list_flags)
    table = Table("flag", "enabled", "rollout %", "tenants", "updated", "by", "description")
    for f in flags:
        table.add_row(
            f.name,
            "on" if f.enabled else "off",
            str(f.rollout_percent),
            ", ".join(f.tenants),
            f.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
            f.updated_by,
            f.description,
        )
    out.print(table)


@flags_app.command("set")
def flags_set(
    name: Annotated[str, typer.Argument(help="The flag, e.g. ai-inference-enabled.")],
    enabled: Annotated[bool, typer.Option("--on/--off", help="Turn it on or off.")],
    rollout: Annotated[
        int | None, typer.Option("--rollout", min=0, max=100, help="Percent of tenants.")
    ] = None,
    tenant: Annotated[
        list[str] | None, typer.Option("--tenant", help="Always on for this tenant (repeat).")
    ] = None,
    by: Annotated[str, typer.Option(help="Who changes it (audit trail).")] = "cli",
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Change a flag (audited; running processes see it within a second)."""
    from ragplane.control.flags import set_flag

    async def change(session: Any) -> Any:
        return await set_flag(
            session,
            name,
            enabled=enabled,
            by=by,
            rollout_percent=rollout,
            tenants=tuple(tenant) if tenant else None,
        )

    flag = _control(_settings(config, data_dir=data_dir), change, as_owner=True)
    out.print(
        f"{flag.name}: {'on' if flag.enabled else 'off'} for {flag.rollout_percent}% of tenants"
        + (f" and {', '.join(flag.tenants)}" if flag.tenants else "")
    )


@tenants_app.command("policy")
def tenants_policy(
    tenant_id: Annotated[str, typer.Argument(help="The tenant.")],
    guard: Annotated[
        str | None,
        typer.Option(
            help='Guard policy JSON, e.g. \'{"actions": {"email": "block"}, '
            '"blocked_topics": ["crypto"]}\' (replaces the current one).'
        ),
    ] = None,
    output_mode: Annotated[
        str | None,
        typer.Option(help="stream, or buffered: nothing is sent before the output guard."),
    ] = None,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Show or set a tenant's guard policy and output mode (pushed to running processes)."""
    import orjson

    from ragplane.control.tenants import set_tenant_policy
    from ragplane.service.guardrails import GuardPolicy

    if output_mode is not None and output_mode not in ("stream", "buffered"):
        raise typer.BadParameter("expected stream or buffered", param_hint="--output-mode")
    parsed_policy = None
    if guard is not None:
        try:
            parsed = orjson.loads(guard)
        except orjson.JSONDecodeError as exc:
            raise typer.BadParameter(f"not JSON: {exc}", param_hint="--guard") from None
        GuardPolicy.from_mapping(parsed)  # a wrong key or action is refused here, by name
        parsed_policy = parsed

    async def apply(session: Any) -> Any:
        return await set_tenant_policy(
            session, tenant_id, guard_policy=parsed_policy, output_mode=output_mode
        )

    tenant = _control(_settings(config, data_dir=data_dir), apply, as_owner=True)
    out.print(f"{tenant_id}: output_mode {tenant.output_mode}", highlight=False)
    out.print(f"guard_policy {orjson.dumps(tenant.guard_policy).decode()}", highlight=False)
