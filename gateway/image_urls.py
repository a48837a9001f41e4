"""Fetch a request's image and video URLs: allowlisted hosts and ports, public addresses, bounded
in bytes.

Validation already checked each URL against the allowlist (scheme, host, port). Here each name is
resolved once, every address it resolves to must be public (or inside
`image_url_allowed_networks`), and the connection goes to exactly those addresses, so a name cannot
resolve to a public address for the check and to a private one for the connection (DNS
rebinding). Redirects are not followed (a redirect could point anywhere). A request's URLs are
fetched concurrently with aiohttp, each within `image_url_timeout_s` in total; the caller's
deadline (the servicer's timeout scope) bounds them all. Bytes are counted while they arrive:
no image may pass `max_image_bytes`, no video `max_video_bytes`, and all images and videos of a
request together `max_request_image_bytes`. Fetched bytes get the checks sent bytes got in
validation (a video's: its header, read without decoding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver

from gateway import media_budget
from gateway.errors import invalid_argument
from gateway.settings import Settings
from gateway.validation import ImageSource, check_url

_CHUNK_BYTES = 64 * 1024


class _Refused(Exception):
    """Why an image or video cannot be had, worded for the caller."""


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Local-use NAT64 (RFC 8215): where the IPv4 address sits depends on the site's prefix length,
# so no address in it is taken for public.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to, where the network translates or tunnels it:
    IPv4-mapped, NAT64 (RFC 6052), 6to4, IPv4-compatible and Teredo (the client's address)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def address_problem(address: ipaddress.IPv4Address | ipaddress.IPv6Address, settings: Settings) -> str | None:
    """Why the gateway may not connect to `address`, or None."""
    if isinstance(address, ipaddress.IPv6Address) and embedded_ipv4(address) is not None:
        address = embedded_ipv4(address)
    if any(address in network for network in settings.image_url_allowed_networks):
        return None
    if address.is_global and not address.is_multicast and address not in _LOCAL_NAT64:
        return None
    kind = next((name for name, flag in (("loopback", address.is_loopback), ("link-local (cloud metadata)", address.is_link_local),
                                         ("private", address.is_private), ("multicast", address.is_multicast))
                 if flag), "non-public")
    return (f"a {kind} address, which image and video URLs may not reach (VLM_IMAGE_URL_ALLOWED_NETWORKS allows "
            "networks)")


class _PinnedResolver(AbstractResolver):
    """Hands aiohttp the addresses that were checked, and nothing else (its session fetches one
    URL and follows no redirect, so every lookup is for that URL's host)."""

    def __init__(self, addresses: list[dict]):
        self.addresses = addresses

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict]:
        return self.addresses

    async def close(self) -> None:
        pass


async def _checked_addresses(host: str, port: int, settings: Settings) -> list[dict]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _Refused(f"cannot resolve {host!r}: {exc.strerror}") from None
    addresses = []
    for family, _, proto, _, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])
        problem = address_problem(address, settings)
        if problem:
            raise _Refused(f"{host!r} resolves to {address}, {problem}")
        addresses.append({"hostname": host, "host": str(address), "port": port, "family": family,
                          "proto": proto, "flags": socket.AI_NUMERICHOST})
    return addresses


class _Budget:
    """Image and video bytes left for the whole request, spent as they arrive."""

    def __init__(self, limit: int, spent: int):
        self.limit = limit
        self.left = limit - spent

    def spend(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            raise invalid_argument([("messages", f"the request's images and videos add up to more than {self.limit} "
                                                 "bytes, the limit per request; send fewer or smaller ones")])


async def _download(url: str, limit: int, settings: Settings, budget: _Budget) -> bytes:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = await _checked_addresses(parts.hostname, port, settings)
    connector = aiohttp.TCPConnector(resolver=_PinnedResolver(addresses), use_dns_cache=False,
                                     force_close=True)
    timeout = aiohttp.ClientTimeout(total=settings.image_url_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
        async with session.get(url, allow_redirects=False) as response:
            if 300 <= response.status < 400:
                raise _Refused(f"redirect to {response.headers.get('Location', '?')} not followed")
            if response.status != 200:
                raise _Refused(f"the host answered HTTP {response.status} {response.reason or ''}".rstrip())
            if response.content_length is not None and response.content_length > limit:
                raise _Refused(f"{response.content_length} bytes is over the limit of {limit} bytes")
            data = bytearray()
            async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
                data += chunk
                if len(data) > limit:
                    raise _Refused(f"more than the limit of {limit} bytes")
                budget.spend(len(chunk))
                media_budget.hold_more(len(chunk))
            return bytes(data)


async def fetch(source: ImageSource, settings: Settings, budget: _Budget) -> bytes:
    """The image's or video's bytes; an INVALID_ARGUMENT naming the field when they cannot be had."""
    if source.data is not None:
        return source.data
    problem = check_url(source.url, settings, source.kind)  # defence in depth: never fetch unchecked URLs
    if problem is None:
        try:
            data = await _download(source.url, source.max_bytes(settings), settings, budget)
            # Off the event loop: a video's header takes up to 0.1 s to read (see `holds_video`).
            problem = await asyncio.to_thread(source.problem, data, settings)
            if problem is None:
                return data
        except _Refused as exc:
            problem = str(exc)
        except asyncio.TimeoutError:  # aiohttp's total timeout (the caller's deadline is a cancellation)
            problem = f"fetching the {source.kind} took longer than {settings.image_url_timeout_s:g}s"
        except aiohttp.ClientError as exc:
            problem = f"could not fetch the {source.kind}: {exc}"
    raise invalid_argument([(source.field, problem)])


async def fetch_all(sources: list[ImageSource], settings: Settings) -> list[bytes]:
    """Every image's and video's bytes in the order given, URLs fetched concurrently; the first
    failure wins."""
    budget = _Budget(settings.max_request_image_bytes, 0)
    budget.spend(sum(len(source.data) for source in sources if source.data is not None))
    # A task only for what must be fetched: bytes sent inline are the answer as they are.
    tasks = {index: asyncio.ensure_future(fetch(source, settings, budget))
             for index, source in enumerate(sources) if source.data is None}
    if not tasks:
        return [source.data for source in sources]
    try:
        fetched = dict(zip(tasks, await asyncio.gather(*tasks.values())))
    finally:
        for task in tasks.values():
            task.cancel()
    return [fetched[index] if index in fetched else source.data for index, source in enumerate(sources)]
