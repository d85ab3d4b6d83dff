"""REST client for ``/v1/images/generations`` and ``/v1/images/edits`` (OpenAI Images API shape).

Plain httpx, so it shows exactly what goes over the wire; the ``openai`` package works as well
(``openai.OpenAI(base_url=".../v1")``). Imports neither ``engine`` nor ``server``.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger(__name__)


class APIError(RuntimeError):
    """An error answer from the server, with its status and OpenAI-shaped body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"HTTP {status}: {err.get('code')}: {err.get('message')}")
        self.status = status
        self.body = body


def generate(base_url: str, prompt: str, *, image: str | Path | None = None, size: str | None = None,
             n: int = 1, seed: int | None = None, steps: int | None = None, strength: float | None = None,
             guidance_scale: float | None = None, output_format: str = "png", api_key: str | None = None,
             timeout: float = 300.0) -> list[bytes]:
    """Make ``n`` images (txt2img, or img2img when ``image`` is given); returns the encoded images."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    extra = {k: v for k, v in dict(size=size, seed=seed, steps=steps, guidance_scale=guidance_scale).items()
             if v is not None}
    with httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout) as client:
        if image is None:
            r = client.post("/v1/images/generations", json={"prompt": prompt, "n": n, "response_format": "b64_json",
                                                            "output_format": output_format, **extra})
        else:
            data = {"prompt": prompt, "n": str(n), "output_format": output_format,
                    **{k: str(v) for k, v in extra.items()}}
            if strength is not None:
                data["strength"] = str(strength)
            path = Path(image)
            r = client.post("/v1/images/edits", data=data,
                            files={"image": (path.name, path.read_bytes(), "application/octet-stream")})
    if r.status_code != 200:
        try:
            body = r.json()
        except ValueError:
            body = {"error": {"message": r.text}}
        raise APIError(r.status_code, body)
    return [base64.b64decode(d["b64_json"]) for d in r.json()["data"]]
