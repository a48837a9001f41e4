"""Fetch image URLs from allowlisted hosts only, bounded in size and time.

The URL was already checked against the allowlist by validation; redirects are not followed
(a redirect could point anywhere), and the body is read only up to the byte limit.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

from gateway.errors import invalid_argument
from gateway.settings import Settings
from gateway.validation import ImageSource, check_image_bytes, check_image_url


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {newurl} not followed", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


def _download(url: str, limit: int, timeout: float) -> bytes:
    with _OPENER.open(url, timeout=timeout) as response:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ValueError(f"{declared} bytes is over the limit of {limit} bytes")
        data = response.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"more than the limit of {limit} bytes")
        return data


async def fetch(source: ImageSource, settings: Settings) -> bytes:
    """The image's bytes; an INVALID_ARGUMENT naming the field when they cannot be had."""
    if source.data is not None:
        return source.data
    problem = check_image_url(source.url, settings)  # defence in depth: never fetch unchecked URLs
    if problem is None:
        try:
            data = await asyncio.wait_for(
                asyncio.to_thread(_download, source.url, settings.max_image_bytes, settings.image_url_timeout_s),
                timeout=settings.image_url_timeout_s,
            )
            problem = check_image_bytes(data, settings)
            if problem is None:
                return data
        except (TimeoutError, asyncio.TimeoutError):
            problem = f"fetching the image took longer than {settings.image_url_timeout_s:g}s"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            problem = f"could not fetch the image: {getattr(exc, 'reason', exc)}"
    raise invalid_argument([(source.field, problem)])
