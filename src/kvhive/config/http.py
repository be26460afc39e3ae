"""HTTP frontend section: where the admin/metrics API listens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvhive.config.fields import PORT, flag_field, non_empty, validate_fields


@dataclass(frozen=True)
class HTTPConfig:
    """Configuration of the HTTP frontend (FastAPI/uvicorn), started with the server."""

    TITLE: ClassVar[str] = "HTTP frontend"

    host: str = flag_field(
        "--http-host",
        default="0.0.0.0",
        check=non_empty,
        help="Host the HTTP server binds (the seed's default, all interfaces; in production "
        "bind 127.0.0.1, or protect the API with --api-key-file / --http-api-token).",
    )
    port: int = flag_field(
        "--http-port", default=8080, check=PORT, help="Port the HTTP server binds."
    )

    def __post_init__(self) -> None:
        validate_fields(self)
