"""The API's paths, and the absolute URLs replies carry (`replies.Links`), in one place."""

from __future__ import annotations

API_BASE = "/api/v1/enterprise"
EDITING = f"{API_BASE}/image_editing"
OUTPUTS = "/outputs"


class HttpLinks:
    """`replies.Links` for a service reachable at `public_url`."""

    def __init__(self, public_url: str) -> None:
        self._base = public_url.rstrip("/")

    def output(self, name: str) -> str:
        return f"{self._base}{OUTPUTS}/{name}"

    def fetch(self, job_id: int) -> str:
        return f"{self._base}{EDITING}/fetch/{job_id}"
