"""Typed, frozen settings read from the environment and `.env`; a typo fails at start."""

from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    # extra="forbid": an unknown key in .env (a typo) stops the service at start.
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

    # Bytes; larger request bodies are answered 413 without being read.
    max_body_size: int = Field(default=64 * 1024, ge=0)

    # Comma-separated bearer keys for /api/v1; several, so a key can be rotated without downtime.
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
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

    @field_validator("api_keys", "trusted_proxies", mode="before")
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


settings = Settings()
