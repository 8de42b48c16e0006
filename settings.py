"""Typed, frozen settings read from the environment and `.env`; a typo in either fails at start."""

import difflib
import os
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Keys that `.env` may hold besides the settings, because it is compose's and gunicorn's file
# too (README.md, "Production with compose"): gunicorn.conf.py reads the first seven, compose.yaml
# the database's password. The app ignores them there; any other unknown key still stops it.
DEPLOYMENT_VARIABLES = frozenset(
    {
        "WEB_CONCURRENCY", "PORT", "GRACEFUL_TIMEOUT", "WORKER_TIMEOUT", "KEEPALIVE", "MAX_REQUESTS",
        "MAX_REQUESTS_JITTER",
        "MYSQL_PASSWORD",
    }
)  # fmt: skip


class Settings(BaseSettings):
    # extra="forbid": an unknown key in .env (a typo) stops the service at start. The environment
    # is every program's, so a variable there is only ever warned of (misspelt_variables below).
    # hide_input_in_errors: that error names the setting, never its value, which may be a
    # password (DATABASE_URL, REDIS_URL) or a key, and would land in the deployment's logs.
    model_config = SettingsConfigDict(env_file=".env", extra="forbid", frozen=True, hide_input_in_errors=True)

    environment: Literal["development", "production"] = "development"
    # SQLite file in the working folder, so the service runs with no database server.
    database_url: str = "sqlite+aiosqlite:///./users.db"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Per worker. Enough connections that a burst does not queue, few enough that
    # workers x (pool + overflow) stays under the server's max_connections (151 by default).
    db_pool_size: int = Field(default=10, ge=1)
    # Extra connections for short bursts, closed again when returned.
    db_max_overflow: int = Field(default=5, ge=0)
    # Seconds; recycle before MySQL's wait_timeout (8 h) or a proxy's idle cut closes them.
    db_pool_recycle: int = Field(default=1800, ge=1)
    # Seconds a request waits for a free connection before it is answered 503.
    db_pool_timeout: float = Field(default=1.0, gt=0)
    # Seconds one statement (or a connection attempt) may take before it is answered 503;
    # together with the pool timeout it keeps every answer under 2 s when the database is gone.
    db_timeout: float = Field(default=1.0, gt=0)

    # Comma-separated URLs of MariaDB replicas of DATABASE_URL (mysql+aiomysql://user:password@host:3306/users,
    # passwords URL-encoded): GET /api/v1/users and /api/v1/users/{id} are read from them (replicas.py).
    # Empty, the default: every read goes to DATABASE_URL, and no round trip is added anywhere.
    # Secret: the URLs may carry passwords.
    database_replica_urls: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    # Seconds a GET that sends a Consistency-Token waits for a replica to apply that write before
    # it is read from the primary instead. At most 1, so that such a read still answers within 2 s.
    replica_wait: float = Field(default=0.25, ge=0, le=1.0)
    # Seconds a replica may lag behind the primary and still serve reads; past it, it gets none until it is back.
    replica_max_lag: float = Field(default=1.0, gt=0)

    # The event loop of every worker: uvloop, the faster, or Python's own asyncio loop.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    # Bytes; larger request bodies are answered 413 without being read.
    max_body_size: int = Field(default=64 * 1024, ge=0)

    # Hours an Idempotency-Key's answer is kept for retries; after that the key is new again.
    idempotency_ttl_hours: int = Field(default=24, ge=1)

    # Comma-separated bearer keys for /api/v1; several, so a key can be rotated without downtime.
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    # Comma-separated bearer keys for /metrics, apart from API_KEYS: a scraper's key reads no user
    # data, and an API key reads no metrics. Empty: /metrics is open in development, 404 in production.
    metrics_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    # Requests per client address per window, for the whole service (all workers).
    rate_limit: int = Field(default=100, ge=1)
    rate_limit_window: int = Field(default=60, ge=1)
    # redis://[:password@]host:6379/0, shared by several containers so the rate limit holds across
    # them all; unset, each container counts alone. While Redis is out, each counts alone too.
    # Secret: the URL may carry a password.
    redis_url: SecretStr | None = None
    # Prefix of the rate limit's Redis keys, so that services sharing one Redis count apart.
    redis_key_prefix: str = "users:ratelimit:"
    # Comma-separated proxy addresses whose X-Forwarded-For is believed; none by default,
    # so a client cannot dodge the rate limit by inventing the header.
    trusted_proxies: Annotated[tuple[str, ...], NoDecode] = ()
    # /docs and /redoc: on in development, off in production unless this turns them on.
    docs_enabled: bool | None = None
    # FastAPI's native OpenTelemetry (a span, metrics and log records per request), for an
    # OpenTelemetry SDK that the deployment sets up. Off, requests skip FastAPI's look for one,
    # which finds nothing when there is no SDK.
    telemetry: bool = False
    # Seconds a worker keeps serving after SIGTERM with /readyz answering 503, before it drains:
    # the time a load balancer or Kubernetes' endpoints take to stop sending it new requests.
    shutdown_delay: int = Field(default=5, ge=0)

    @model_validator(mode="before")
    @classmethod
    def deployment_variables_in_env_file(cls, data: Any) -> Any:
        """Let `.env` hold the variables compose and gunicorn read there; they are not the app's to check."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k.upper() not in DEPLOYMENT_VARIABLES}
        return data

    @field_validator("api_keys", "metrics_keys", "trusted_proxies", "database_replica_urls", mode="before")
    @classmethod
    def split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @model_validator(mode="after")
    def production_needs_keys(self) -> "Settings":
        if self.environment == "production" and not self.api_keys:
            raise ValueError(
                "ENVIRONMENT=production needs API_KEYS (comma-separated bearer keys); "
                "the service will not serve user data to anyone who can reach the port"
            )
        return self

    @model_validator(mode="after")
    def replicas_need_mariadb(self) -> "Settings":
        urls = [self.database_url, *(url.get_secret_value() for url in self.database_replica_urls)]
        if self.database_replica_urls and any(url.startswith("sqlite") for url in urls):
            raise ValueError(
                "DATABASE_REPLICA_URLS needs MariaDB, for DATABASE_URL and every replica: SQLite has no "
                "replication, so there is nothing a replica of it could serve. Leave DATABASE_REPLICA_URLS empty"
            )
        return self

    @model_validator(mode="after")
    def metrics_keys_apart_from_api_keys(self) -> "Settings":
        shared = {k.get_secret_value() for k in self.api_keys} & {k.get_secret_value() for k in self.metrics_keys}
        if shared:
            raise ValueError("a key is in both API_KEYS and METRICS_KEYS; each must open one of them only")
        return self


def misspelt_variables() -> list[tuple[str, str]]:
    """Environment variables spelt nearly as a setting is (DB_POOL_SZIE), each with the setting it resembles.

    Only warned of, never refused: the environment holds every program's variables, and a name
    that merely resembles a setting (DB_HOST, REDIS_PASSWORD) is some other program's.
    """
    names = [name.upper() for name in Settings.model_fields]
    found = []
    for variable in os.environ:
        name = variable.upper()  # pydantic-settings matches the environment regardless of case
        if name in names or name in DEPLOYMENT_VARIABLES:
            continue
        # 0.85: a letter or two swapped, lost or added; two names that only share a word score lower.
        if close := difflib.get_close_matches(name, names, n=1, cutoff=0.85):
            found.append((variable, close[0]))
    return sorted(found)


settings = Settings()
