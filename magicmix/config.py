"""All configuration, read once from `MAGICMIX_*` environment variables.

Nothing else in the package reads `os.environ`: code asks `get_settings()`.
"""

from __future__ import annotations

import os
import secrets
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from magicmix.capacity import queue_limit, seconds_per_image
from magicmix.families import ModelFamily, family_named, guess_family, resolve_family

# Standard Webhooks' recommended schedule, as offsets in seconds after the job ended.
WEBHOOK_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0)


class Settings(BaseSettings):
    """Service settings; the first block is the contract's, the rest are our own knobs."""

    model_config = SettingsConfigDict(env_prefix="MAGICMIX_", extra="ignore")

    # --- contract section 3 ---
    model: str = "toy"  # the shipped toy model; "tiny": random weights, for plumbing
    data_dir: Path = Path(".magicmix")
    api_keys: SecretStr = SecretStr("")
    public_url: str = "http://127.0.0.1:8000"
    retention_hours: float = Field(24.0, gt=0)
    allow_private_urls: bool = False
    sync_wait_s: float = Field(30.0, ge=0, le=140)
    # every magic_mix answer leaves within this of the request's arrival (Modal cuts web
    # requests at 150 s): the fetch and the sync wait are shortened to fit
    request_deadline_s: float = Field(120.0, ge=5, le=145)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    store_url: str | None = None
    s3_endpoint_url: str | None = None
    secret_key: SecretStr | None = None

    # --- engine ---
    model_revision: str | None = None  # pin a hub model to a commit
    model_family: str = "auto"  # a name in families.FAMILIES; auto: read from the model
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    compile: bool = False
    # compiled at load for these sizes ("768x768,1024x1024"); none: the family's size
    compile_sizes: Annotated[tuple[tuple[int, int], ...], NoDecode] = ()
    compile_cache_dir: Path | None = None  # default: DATA_DIR/compile-cache
    compile_work_dir: Path | None = None  # where torch writes; default: the cache itself
    cuda_graphs: bool = False  # with compile on CUDA: the UNet in CUDA graphs
    pinned_transfers: bool = False  # host-to-GPU copies from pinned memory
    channels_last: bool = True
    batch_invariant: bool = False  # bit-identical results whatever shares the batch (slower)
    text_cache_size: int = Field(256, ge=0)
    store_threads: int = Field(4, ge=1, le=32)  # a batch's PNGs encoded and stored at once

    # --- capacity: sized together (capacity.py); max_queue follows unless set ---
    gpu: str = "cpu"  # MAGICMIX_GPU: the GPU type on Modal, "cpu" locally
    max_gpus: int = Field(1, ge=1)  # GPU containers at most (Modal); locally one worker
    batch_size: int = Field(4, ge=1, le=64)
    batch_wait_ms: int = Field(25, ge=0)
    queue_minutes: float = Field(5.0, gt=0)  # queued work accepted, at full scale
    seconds_per_image: float | None = Field(None, gt=0)  # default: capacity's table
    max_queue: int = Field(0, ge=0)  # 0: derived from the four above
    max_queued_per_key: int = Field(0, ge=0)  # 0: the whole queue
    sweep_interval_s: float = Field(60.0, gt=0)  # local: expire outputs, release lapsed claims
    stale_queued_s: float = Field(3600.0, gt=0)  # a job not started by then is failed
    # a worker holds its claim on a job for this long at a time, renewing it as it runs; a
    # claim not renewed (the worker died) is requeued by the sweep, or failed after this
    # many runs (a job that keeps killing its workers)
    lease_s: float = Field(60.0, ge=1)
    max_run_attempts: int = Field(3, ge=1, le=20)

    # --- database (contract section 8) ---
    # postgresql://user:pass@host:port/db or sqlite:///path; default: a SQLite file in
    # DATA_DIR. Every process given the same URL (and output store) is one service.
    database_url: SecretStr | None = None
    db_pool_size: int = Field(5, ge=1)  # connections a process keeps open (PostgreSQL)
    db_max_overflow: int = Field(10, ge=0)  # and may open beyond those at peaks

    # --- inputs ---
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    body_timeout_s: float = Field(60.0, gt=0)  # the whole body must arrive within this
    header_timeout_s: float = Field(10.0, gt=0)  # the request line and headers, likewise
    max_json_containers: int = Field(1000, ge=16)  # `[` and `{` in a body: ours are flat
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=64 * 64)
    max_image_decoded_bytes: int = Field(128 * 1024 * 1024, ge=1024 * 1024)
    fetch_timeout_s: float = Field(15.0, gt=0)

    # --- webhooks ---
    webhook_timeout_s: float = Field(10.0, gt=0)
    # comma-separated seconds after the job ended; one attempt at each (see webhooks.py)
    webhook_schedule: Annotated[tuple[float, ...], NoDecode] = WEBHOOK_SCHEDULE

    log_level: str = "INFO"

    @field_validator("compile_sizes", mode="before")
    @classmethod
    def _parse_sizes(cls, value: Any) -> Any:
        if isinstance(value, str):
            sizes = [part.lower().split("x") for part in value.replace(" ", "").split(",") if part]
            value = [(int(width), int(height)) for width, height in sizes]
        return value

    @field_validator("webhook_schedule", mode="before")
    @classmethod
    def _parse_schedule(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part for part in value.replace(" ", "").split(",") if part]
        return value

    @field_validator("webhook_schedule")
    @classmethod
    def _schedule_increases(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or value[0] < 0 or any(b < a for a, b in pairwise(value)):
            raise ValueError("webhook_schedule must be non-negative offsets in increasing order")
        return value

    @field_validator("model_family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        if value != "auto":
            family_named(value)  # a ValueError naming the known families
        return value

    @field_validator("public_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @model_validator(mode="after")
    def _absolute_data_dir(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        return self

    @model_validator(mode="after")
    def _size_the_queue(self) -> Settings:
        if not self.max_queue:
            self.max_queue = queue_limit(
                max_gpus=self.max_gpus,
                seconds_per_image=self.seconds_per_image
                or seconds_per_image(self.gpu, self.family_guess),
                queue_minutes=self.queue_minutes,
            )
        if not self.max_queued_per_key:
            self.max_queued_per_key = self.max_queue
        return self

    @property
    def family_guess(self) -> ModelFamily:
        """The family as configured, else as the model's name suggests: no file is read
        (the engine and `families.resolve_family` read the model's own index)."""
        if self.model_family == "auto":
            return guess_family(self.model)
        return family_named(self.model_family)

    def resolved_family(self) -> ModelFamily:
        """The configured model's family: as configured, else read from its folder or the
        hub cache at its revision, else guessed from its name (no torch)."""
        return resolve_family(self.model, self.model_family, revision=self.model_revision)

    @property
    def static_api_keys(self) -> list[str]:
        """Keys from `MAGICMIX_API_KEYS`, accepted besides those in the database."""
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]

    @property
    def effective_store_url(self) -> str:
        return self.store_url or f"file://{self.data_dir / 'outputs'}"

    @property
    def compile_cache_path(self) -> Path:
        return self.compile_cache_dir or self.data_dir / "compile-cache"

    @property
    def database_path(self) -> Path:
        """The default database: a SQLite file in the data dir."""
        return self.data_dir / "magicmix.sqlite3"

    @property
    def effective_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{self.database_path}"

    def secret_key_bytes(self) -> bytes:
        """The service secret: from the environment, else generated once into the data dir.

        Never generated for a shared (PostgreSQL) database: every process using it must
        hash keys and decrypt secrets alike, and a secret made up here would not match.
        """
        if self.secret_key is not None:
            return self.secret_key.get_secret_value().encode()
        path = self.data_dir / "secret.key"
        if not path.exists() and not self.effective_database_url.startswith("sqlite"):
            raise ValueError(
                "MAGICMIX_SECRET_KEY is not set: every process that shares a PostgreSQL"
                " database needs the same service secret (the one the deployment was given)"
            )
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            # written aside then linked into place, so no process ever reads a half-written key
            partial = path.with_name(f".secret.key.{os.getpid()}")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32))
            try:
                os.link(partial, path)
            except FileExistsError:  # another process won the race; use its key
                pass
            finally:
                partial.unlink()
        return path.read_text().strip().encode()


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
