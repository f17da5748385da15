"""All service settings in one place, read from ``KOVAE_*`` environment variables (or a .env file)."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path

from dotenv import dotenv_values
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    # hide_input_in_errors: a refused setting is logged at start-up, and it may hold an API key.
    model_config = SettingsConfigDict(env_prefix="KOVAE_", env_file=".env", extra="ignore", hide_input_in_errors=True)

    model_store: Path | None = Field(
        None,
        description="model store folder holding CURRENT and the versions; unset: ./models if it holds CURRENT, "
        "else the models folder of the source tree the service runs from (the committed default model)",
    )
    runtime_dir: Path | None = Field(
        None, description="folder shared by the workers of one server (set by `python -m service` for workers > 1)"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1)
    api_keys: list[SecretStr] = Field(default_factory=list, description="if set, /forecast needs one (X-API-Key)")
    admin_api_keys: list[SecretStr] = Field(default_factory=list, description="needed for /admin/*; none: disabled")
    protect_info: bool = Field(False, description="also require an API key (X-API-Key) for /model and /metrics")
    max_series: int = Field(64, ge=1)
    max_plans: int = Field(1000, ge=1, description="most control plans in one series")
    max_samples: int = Field(1000, ge=1)
    default_samples: int | None = Field(
        None,
        ge=1,
        description="samples drawn for quantiles when a request gives none; none: the count the served model's "
        "intervals were fitted for (its card's calibration.samples)",
    )
    max_quantiles: int = Field(9, ge=1)
    max_work: int = Field(
        1_500_000, ge=1, description="most series x samples x horizon one request may ask for (422 above it)"
    )
    chunk_work: int = Field(
        8192,
        ge=1,
        description="steps per ONNX call (service.forecasting.steps: each trajectory, a forecast's mean or one sample, "
        "counts its horizon plus half the model's max_horizon, each history its length): a request within it runs on "
        "the fast lane, a larger one in calls of at most this on its own lane; bounds their memory and time",
    )
    max_body_bytes: int = Field(8_000_000, ge=1)
    max_values: int = Field(
        600_000,
        ge=1,
        description="most JSON values a request body of 64 kB or more may hold (counted before it is parsed: "
        "parsing holds the interpreter, ~0.05 s per 600,000 values); 64 series of 256 steps hold ~440,000, 1,000 "
        "plans of 96 steps ~390,000",
    )
    max_answer_bytes: int = Field(
        64_000_000,
        ge=1,
        description="largest answer, predicted from the request's shape before any work (422 above it)",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, allow_inf_nan=False, description="close a request whose body has not all arrived by then (408)"
    )
    max_answers_in_flight_bytes: int = Field(
        128_000_000,
        ge=1,
        description="predicted bytes of the large answers (1 MB or more) a worker computes or sends at once; a large "
        "request past it is answered 503 (Retry-After), one alone always passes, small ones are never counted",
    )
    send_timeout_s: float = Field(
        30.0,
        gt=0,
        allow_inf_nan=False,
        description="drop a connection whose client has read none of its answer for this long (the socket's send "
        "buffer full): an unread answer holds its memory until then",
    )
    max_header_bytes: int = Field(32_768, ge=1024, description="request line and headers, in bytes (431 above it)")
    max_headers: int = Field(100, ge=8, description="header fields in one request (431 above it)")
    ort_threads: int = Field(1, ge=1)
    max_optimize_waiting: int = Field(
        4, ge=1, description="setpoint searches queued or running per worker; more are answered 503 (Retry-After)"
    )
    poll_interval_s: float = Field(
        5.0, ge=0, allow_inf_nan=False, description="how often to check CURRENT for a new version; 0 disables"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, allow_inf_nan=False, description="close a connection that has not sent its headers by then"
    )
    keep_alive_s: float = Field(
        5.0, gt=0, allow_inf_nan=False, description="close an idle keep-alive connection after this long"
    )
    shutdown_grace_s: float = Field(
        30.0,
        gt=0,
        allow_inf_nan=False,
        description="on SIGTERM, how long requests in flight may still run (the largest KOVAE_MAX_WORK request "
        "takes seconds); any still running then are answered 503. Keep the orchestrator's grace period above it",
    )
    log_level: str = "INFO"

    @field_validator("log_level")
    @classmethod
    def known_level(cls, level: str) -> str:
        """A level logging does not know stopped the start with a traceback, past the one-line refusal."""
        levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        if level.upper() not in levels:
            raise ValueError(f"{level!r} is no log level: one of {', '.join(levels)}")
        return level.upper()

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def no_empty_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        """An empty (or blank) key would let in anyone who sends an empty X-API-Key header: refused at start-up."""
        for k, value in enumerate(key.get_secret_value() for key in keys):
            if not value.strip():
                raise ValueError(f"key {k} is empty; every API key must have characters")
            if value != value.strip():
                # HTTP drops the blanks around a header's value: such a key never matched, its clients all refused.
                raise ValueError(f"key {k} begins or ends with a blank, which no HTTP header carries")
            if not (value.isascii() and value.isprintable()):
                # A header carries bytes: a client's UTF-8 never matched, and a key Python cannot encode was a 500.
                raise ValueError(f"key {k} has characters an HTTP header does not carry: printable ASCII only")
        return keys

    @model_validator(mode="after")
    def info_protected_by_a_key(self) -> Settings:
        """Protecting /model and /metrics without a key to protect them with left both open, without a word."""
        if self.protect_info and not self.api_keys:
            raise ValueError("KOVAE_PROTECT_INFO is true but KOVAE_API_KEYS is empty: /model and /metrics need a key")
        return self


def find_store(configured: Path | None) -> tuple[Path, str]:
    """The model store and how it was found: the setting, else ./models, else the project's own models/."""
    if configured is not None:
        return Path(configured), "KOVAE_MODEL_STORE"
    here = Path("models")
    if (here / "CURRENT").exists():
        return here, "./models"
    project = Path(__file__).resolve().parents[1] / "models"
    if (project / "CURRENT").exists():
        return project, "the project's models folder"
    return here, "default ./models (no CURRENT found there or in the project's models folder)"


@lru_cache
def get_settings() -> Settings:
    return Settings()


def unknown_settings(
    environ: Mapping[str, str | None], env_file: Mapping[str, str | None]
) -> Iterator[tuple[str, str, str]]:
    """Each ``KOVAE_*`` variable that names no setting, once even where both the environment and the .env file
    set it (it was warned about twice): its name, where it was found (``""``: the environment, ``" (in .env)"``,
    or both) and a hint at the setting meant (a typo such as ``KOVAE_API_KEY`` would otherwise leave /forecast
    open without a word). Names are matched as the settings read them: in any case."""
    prefix = Settings.model_config["env_prefix"]
    known = {f"{prefix}{name.upper()}" for name in Settings.model_fields}

    def unknown(variables: Mapping[str, str | None]) -> dict[str, str]:
        """The ``KOVAE_*`` names that are no setting, by their upper case (the first spelling, sorted, kept)."""
        names = (name for name in sorted(variables, reverse=True) if name.upper().startswith(prefix))
        return {name.upper(): name for name in names if name.upper() not in known}

    in_environ, in_env_file = unknown(environ), unknown(env_file)
    for key in sorted(in_environ.keys() | in_env_file.keys()):
        if key in in_environ:
            name, where = in_environ[key], " (in the environment and .env)" if key in in_env_file else ""
        else:
            name, where = in_env_file[key], " (in .env)"
        close = difflib.get_close_matches(key, sorted(known), n=1)
        yield name, where, f" (did you mean {close[0]}?)" if close else ""


def env_file_settings() -> dict[str, str | None]:
    """The variables of the .env file the settings read (in the working directory), if there is one."""
    path = Path(Settings.model_config["env_file"])
    return dict(dotenv_values(path)) if path.is_file() else {}
