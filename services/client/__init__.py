"""The platform's Python client for its REST API: requests with an API key, errors as `ApiError` with the
API's message and code, lists followed page by page, bodies streamed. The `vers` command, the image baker and the
platform launcher are built on it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"


# Asked of every paginated list: the server's largest page, so most lists take one request.
PAGE_SIZE = 1000
# The header a gateway may give a list answered as a plain JSON array with a next page's token.
NEXT_PAGE_HEADER = "x-next-page-token"


def seg(value: str) -> str:
    """A path parameter, percent-encoded whole: `.`, `..`, `/` or `?` in a name never address another route."""
    encoded = quote(value, safe="")
    # `.` and `..` are left as they are by quote; a client or proxy would resolve them as path steps.
    return encoded.replace(".", "%2E") if not value.strip(".") else encoded


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "", body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        # The error's whole JSON body: some carry more than the message (a refused publish's findings).
        self.body = body or {}


class Unreachable(Exception):
    pass


def api_error(response: httpx.Response) -> ApiError:
    """The API's error answer (read whole) as an ApiError with its message, code and body."""
    response.read()
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return ApiError(response.status_code, response.text.strip() or response.reason_phrase)
    return ApiError(response.status_code, body.get("error") or response.text, body.get("code", ""), body)


def unreachable(url: str, error: object) -> str:
    return f"cannot reach the Vers API at {url} ({error}): is the platform running, and is that its URL (VERS_URL)?"


class ApiClient:
    def __init__(self, base_url: str, api_key: str = "", timeout: float = 600.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.api_key = api_key
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json_body

    def pages(self, path: str, params: dict[str, Any] | None = None) -> Iterator[Any]:
        """Each page of a list, following next_page_token (in the answer, or in a header for a plain array)."""
        params = {**(params or {}), "page_size": PAGE_SIZE}
        while True:
            answer = self._send("GET", path, params=params)
            body = answer.json_body
            yield body
            token = body.get("next_page_token", "") if isinstance(body, dict) else answer.headers.get(NEXT_PAGE_HEADER, "")
            if not token:
                return
            params = {**params, "page_token": token}

    def list_all(self, path: str, key: str | None = None, params: dict[str, Any] | None = None) -> Any:
        """A whole list: the items of every page, as one answer shaped as the first page was."""
        pages = list(self.pages(path, params))
        if key is None:
            return [item for page in pages for item in page]
        return {**pages[0], key: [item for page in pages for item in page[key]], "next_page_token": ""}

    def _send(self, method: str, path: str, **kwargs: Any) -> _Answer:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise Unreachable(unreachable(self.base_url, error)) from None
        if response.is_success:
            return _Answer(response.json() if response.content else None, response.headers)
        raise api_error(response)

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A response whose body is read as it arrives (a tar of any size); an error answer raises ApiError."""
        try:
            opened = self._http.stream(method, path, **kwargs)
            response = opened.__enter__()
        except httpx.TransportError as error:
            raise Unreachable(unreachable(self.base_url, error)) from None
        with contextlib.closing(response):
            if not response.is_success:
                raise api_error(response)
            yield response

    def close(self) -> None:
        self._http.close()


class _Answer:
    def __init__(self, json_body: Any, headers: httpx.Headers) -> None:
        self.json_body = json_body
        self.headers = headers
