"""The REST client the `vers` command and the platform launcher use."""

from __future__ import annotations

from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class Unreachable(Exception):
    pass


def unreachable(url: str, error: object) -> str:
    return f"cannot reach the Vers API at {url} ({error}): is the platform running, and is VERS_URL (or `vers login --url`) right?"


class ApiClient:
    def __init__(self, base_url: str, api_key: str = "", timeout: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.api_key = api_key
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise Unreachable(unreachable(self.base_url, error)) from None
        if response.is_success:
            return response.json() if response.content else None
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ApiError(response.status_code, response.text.strip() or response.reason_phrase)
        raise ApiError(response.status_code, body.get("error") or response.text, body.get("code", ""))

    def close(self) -> None:
        self._http.close()
