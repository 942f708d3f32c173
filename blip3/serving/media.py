"""The images a chat request names, fetched and decoded without letting the request reach where it must not.

An `image_url` part carries either

    data:image/png;base64,....   decoded here, its size checked before the base64 is decoded, or
    http(s)://...                only when the server enables remote images, and only from listed domains.

Fetching URLs for a client is where multimodal servers have been attacked: image URLs that reached
private addresses and cloud metadata (vLLM CVE-2025-6242), redirects and link-local addresses (vLLM
#57157), base64 and decompression bombs that pinned a CPU for minutes (SGLang #28587). The rules, in
the order they apply to every hop of a fetch:

    1. the scheme is http or https (data: is handled apart; file:, ftp:, gopher: ... are refused), and
       the URL carries no credentials;
    2. the host is on the allow-list: an exact name, `*.example.com` for its subdomains, `*` for any;
    3. the host is resolved ONCE, and every address it resolves to must be public: not loopback,
       private, shared (CGNAT), link-local, multicast, reserved, unspecified or a cloud-metadata
       endpoint, also when an IPv4 address hides inside an IPv6 one (mapped, NAT64, 6to4, Teredo).
       A host that is an IP literal in any spelling libc accepts (2130706433, 0177.0.0.1, 0x7f.1) is
       read as the address it names;
    4. the connection goes to that checked address (the TLS name and the Host header stay the
       domain's), so a DNS answer that changes between the check and the use (rebinding) changes nothing;
    5. redirects are followed by hand, each new URL checked again from rule 1, at most `max_redirects`;
    6. the body is read up to `max_image_bytes`, within `fetch_timeout_s` for the whole fetch.

Decoding then takes only PNG, JPEG, GIF, WebP and BMP (by their magic bytes: fewer decoders exposed
to untrusted bytes) and refuses any image over `max_image_pixels` from its header, before a single
pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, urljoin, urlsplit

import certifi
import httpcore
from PIL import Image

from blip3.processing.image import ImageError, load_image

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[IPAddress]]

REDIRECT_STATUSES = (301, 302, 303, 307, 308)

# Cloud metadata services reachable at addresses the generic rules below do not all catch: AWS, GCP,
# Azure, OCI and DigitalOcean at 169.254.169.254 (link-local anyway), AWS over IPv6 at fd00:ec2::254
# (unique-local anyway), Alibaba at 100.100.100.200 (shared space anyway) and Azure's WireServer at
# 168.63.129.16, which is a *public* address. Named so that the refusal says what was reached for.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "168.63.129.16")
)
METADATA_HOSTNAMES = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data"})
NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")

# Magic bytes of the formats accepted; everything else is refused before PIL picks a decoder for it.
IMAGE_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
ACCEPTED_FORMATS = "PNG, JPEG, GIF, WebP or BMP"
_HOSTNAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_URL_SAFE = "/%:@!$&'()*+,;=?-._~"  # characters left as they are in a request target; others are %-encoded
_LEGACY_IPV4 = re.compile(r"[0-9a-fx.]+")  # what inet_aton may read as an address: 2130706433, 0x7f.1, 0177.0.0.1


class MediaError(ValueError):
    """An image of a request that cannot be used. The message is written for the client that sent it."""


@dataclass(frozen=True)
class MediaPolicy:
    """What images a request may bring, and how far the server goes to get them."""

    max_image_bytes: int = 10 * 2**20  # encoded size, before base64 decoding and after fetching
    max_image_pixels: int = 4096 * 4096  # decoded size, read from the header before decoding
    allow_remote: bool = False  # fetch http(s) image URLs at all
    allowed_domains: tuple[str, ...] = ()  # "example.com", "*.example.com", or "*" (any public host)
    fetch_timeout_s: float = 10.0  # for all the hops of one fetch together
    max_redirects: int = 3


# ---------------------------------------------------------------------------------------------------
# Addresses


def address_problem(address: IPAddress) -> str | None:
    """Why a connection to `address` is refused (e.g. "a loopback address"), or None for a public address."""
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None and (problem := address_problem(embedded)) is not None:
            return f"{problem} inside an IPv6 address"
    for flag, name in (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
    ):
        if getattr(address, flag):
            return name
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "a site-local address"
    if not address.is_global:  # shared (100.64/10), benchmarking and the other special-purpose ranges
        return "a non-public address"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to, for the forms that carry one."""
    if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d
        return address.ipv4_mapped
    if address in NAT64_PREFIX:  # 64:ff9b::a.b.c.d, translated by a NAT64 gateway
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:  # 2002:aabb:ccdd::
        return address.sixtofour
    if address.teredo is not None:  # 2001:0::/32 (server, client)
        return address.teredo[1]
    if int(address) >> 32 == 0 and int(address) > 1:  # ::a.b.c.d, the deprecated IPv4-compatible form
        return ipaddress.IPv4Address(int(address))
    return None


def ip_literal(host: str) -> IPAddress | None:
    """The address `host` names when it is an IP literal in any spelling libc accepts, else None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(host):
        try:  # the forms getaddrinfo would quietly read as addresses: 2130706433, 0177.0.0.1, 0x7f.1, 127.1
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            pass
    return None


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (the one place that asks DNS)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in infos))


def domain_allowed(host: str, allowed_domains: tuple[str, ...]) -> bool:
    for pattern in allowed_domains:
        pattern = pattern.lower().rstrip(".")
        if pattern == "*" or pattern == host:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]):
            return True
    return False


# ---------------------------------------------------------------------------------------------------
# Loading


class MediaLoader:
    """Turns an `image_url` into an RGB PIL image under a `MediaPolicy`.

    network: the httpcore backend that opens TCP connections (tests pass one that records them);
    resolve: the DNS lookup, `resolve_host` by default. Both are only ever used as rules 3 and 4 say.
    ssl_context: whom to trust for https (default: certifi's CA bundle), e.g. to add a private CA.
    """

    def __init__(
        self,
        policy: MediaPolicy,
        network: httpcore.NetworkBackend | None = None,
        resolve: Resolver = resolve_host,
        ssl_context: ssl.SSLContext | None = None,
    ):
        self.policy = policy
        self.network = network or httpcore.SyncBackend()
        self.resolve = resolve
        self._ssl_context = ssl_context

    def load(self, url: str) -> Image.Image:
        return decode_image(self.load_bytes(url), self.policy.max_image_pixels)

    def load_bytes(self, url: str) -> bytes:
        url = url.strip()
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return decode_data_url(url, self.policy.max_image_bytes)
        if scheme not in ("http", "https"):
            raise MediaError(
                f"image URL scheme {scheme or '(none)'!r} is not allowed: send the image as a data: URL "
                "(data:image/png;base64,...)"
            )
        if not self.policy.allow_remote:
            raise MediaError(
                "this server does not fetch remote image URLs: send the image inline as a data: URL "
                "(data:image/png;base64,...)"
            )
        return self.fetch(url)

    def fetch(self, url: str) -> bytes:
        """The body of an http(s) URL, under rules 1–6."""
        deadline = time.monotonic() + self.policy.fetch_timeout_s
        for _hop in range(self.policy.max_redirects + 1):
            target = self._check(url)
            status, location, body = self._get(target, deadline)
            if status in REDIRECT_STATUSES:
                if not location:
                    raise MediaError(f"fetching the image failed: HTTP {status} without a Location")
                url = urljoin(url, location)
                continue
            if status != 200:
                raise MediaError(f"fetching the image failed: HTTP {status}")
            return body
        raise MediaError(f"fetching the image failed: more than {self.policy.max_redirects} redirects")

    def _check(self, url: str) -> _Target:
        """Rules 1–3 for one URL: the checked address to connect to, or a `MediaError`."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as err:
            raise MediaError(f"invalid image URL: {err}") from None
        if parts.scheme not in ("http", "https"):
            raise MediaError(f"image URL scheme {parts.scheme or '(none)'!r} is not allowed (http or https only)")
        if parts.username is not None or parts.password is not None:
            raise MediaError("image URLs must not carry credentials")
        host = _normalise_host(parts.hostname)
        port = port or (443 if parts.scheme == "https" else 80)
        literal = ip_literal(host)
        if not domain_allowed(str(literal) if literal else host, self.policy.allowed_domains):
            raise MediaError(f"image host {host!r} is not on this server's list of allowed domains")
        if literal is not None:
            if (problem := address_problem(literal)) is not None:
                spelled = host if host == str(literal) else f"{host} (= {literal})"  # 2130706433 (= 127.0.0.1)
                raise MediaError(f"image URL refused: {spelled} is {problem}")
            return _Target(parts, host, port, literal)
        if host in METADATA_HOSTNAMES or host == "localhost" or host.endswith((".internal", ".localhost")):
            raise MediaError(f"image URL refused: {host} is an internal host name")
        try:
            addresses = self.resolve(host, port)
        except (OSError, UnicodeError):
            raise MediaError(f"image host {host!r} could not be resolved") from None
        if not addresses:
            raise MediaError(f"image host {host!r} could not be resolved")
        for address in addresses:  # all of them: which one a client would pick is not ours to guess
            if (problem := address_problem(address)) is not None:
                # the address itself is not echoed: it would map the server's private network for the client
                raise MediaError(f"image URL refused: {host} resolves to {problem}")
        return _Target(parts, host, port, addresses[0])

    def _get(self, target: _Target, deadline: float) -> tuple[int, str | None, bytes]:
        """One GET to the checked address: (status, Location, body); the body only for a 200."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MediaError(f"fetching the image took longer than {self.policy.fetch_timeout_s:g} s")
        https = target.parts.scheme == "https"
        default_port = 443 if https else 80
        host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
        if ":" in target.host:  # an IPv6 literal (allowed by "*")
            host_header = f"[{target.host}]" + ("" if target.port == default_port else f":{target.port}")
        request_target = quote(target.parts.path or "/", safe=_URL_SAFE)
        if target.parts.query:
            request_target += "?" + quote(target.parts.query, safe=_URL_SAFE)
        extensions = {"timeout": dict.fromkeys(("connect", "read", "write", "pool"), remaining)}
        if https:
            extensions["sni_hostname"] = target.host  # the certificate is checked against the name, not the IP
        backend = _PinnedBackend(self.network, target.address)
        limit = self.policy.max_image_bytes
        try:
            with httpcore.ConnectionPool(
                ssl_context=self._ssl() if https else None, network_backend=backend, max_connections=1, retries=0
            ) as pool:
                with pool.stream(
                    "GET",
                    httpcore.URL(
                        scheme=target.parts.scheme,
                        host=str(target.address),
                        port=target.port,
                        target=request_target,
                    ),
                    headers=[
                        (b"Host", host_header.encode("ascii")),
                        (b"Accept", b"image/*"),
                        (b"Accept-Encoding", b"identity"),  # no decompression on our side, no gzip bombs
                        (b"User-Agent", b"blip3-serve"),
                    ],
                    extensions=extensions,
                ) as response:
                    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
                    if response.status != 200:
                        return response.status, headers.get("location"), b""
                    declared = headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > limit:
                        raise MediaError(f"the image is {int(declared)} bytes, over the limit of {limit}")
                    chunks, size = [], 0
                    for chunk in response.iter_stream():
                        size += len(chunk)
                        if size > limit:
                            raise MediaError(f"the image is over the limit of {limit} bytes")
                        if time.monotonic() > deadline:
                            raise MediaError(f"fetching the image took longer than {self.policy.fetch_timeout_s:g} s")
                        chunks.append(chunk)
                    return 200, None, b"".join(chunks)
        except httpcore.TimeoutException:
            raise MediaError(f"fetching the image took longer than {self.policy.fetch_timeout_s:g} s") from None
        except (httpcore.NetworkError, httpcore.ProtocolError, UnicodeError) as err:
            raise MediaError(f"fetching the image failed: {type(err).__name__}") from None

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context(cafile=certifi.where())
        return self._ssl_context


@dataclass(frozen=True)
class _Target:
    parts: SplitResult
    host: str  # normalised: lower-case ASCII, no trailing dot
    port: int
    address: IPAddress  # checked; the only address the fetch may connect to


def _normalise_host(hostname: str | None) -> str:
    if not hostname:
        raise MediaError("image URL has no host")
    try:  # IDNA maps look-alikes to ASCII first (e.g. '①②⑦.0.0.1' -> '127.0.0.1'), so the checks see the real name
        host = hostname.rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise MediaError(f"image URL has an invalid host name {hostname!r}") from None
    if ":" not in host and not _HOSTNAME.fullmatch(host):
        raise MediaError(f"image URL has an invalid host name {hostname!r}")
    return host


class _PinnedBackend(httpcore.NetworkBackend):
    """Opens TCP connections to one address, already checked, and refuses every other."""

    def __init__(self, inner: httpcore.NetworkBackend, address: IPAddress):
        self.inner = inner
        self.address = address

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            same = ipaddress.ip_address(host) == self.address
        except ValueError:
            same = False
        if not same or address_problem(self.address) is not None:
            raise httpcore.ConnectError(f"connection to {host} refused: not the checked address")
        return self.inner.connect_tcp(str(self.address), port, timeout, local_address, socket_options)

    def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are never used for images")

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


# ---------------------------------------------------------------------------------------------------
# Bytes to pixels


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL; its length is checked before anything is decoded."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise MediaError("invalid data URL: no ',' before the data")
    media_type, *parameters = header[len("data:") :].split(";")
    if "base64" not in (p.strip().lower() for p in parameters):
        raise MediaError("data URLs must be base64-encoded (data:image/png;base64,...)")
    if media_type.strip() and not media_type.strip().lower().startswith("image/"):
        raise MediaError(f"data URL media type {media_type.strip()!r} is not an image type")
    payload = "".join(payload.split())  # line breaks some encoders insert (the request size bounds this copy)
    if len(payload) > 4 * -(-max_bytes // 3):  # 4 characters per 3 bytes: checked before decoding anything
        raise MediaError(f"the image is over the limit of {max_bytes} bytes")
    payload += "=" * (-len(payload) % 4)  # tolerate missing padding
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("invalid base64 in the image data URL") from None
    if len(data) > max_bytes:
        raise MediaError(f"the image is {len(data)} bytes, over the limit of {max_bytes}")
    return data


def image_format(data: bytes) -> str | None:
    """PNG, JPEG, GIF, WEBP or BMP by the magic bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in IMAGE_SIGNATURES if data.startswith(magic)), None)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB image from untrusted bytes: known formats only, the size checked from the header first."""
    if not data:
        raise MediaError("the image is empty (0 bytes)")
    if image_format(data) is None:
        raise MediaError(f"the image data is not a {ACCEPTED_FORMATS} image")
    try:
        return load_image(data, max_pixels)
    except ImageError as err:
        raise MediaError(str(err)) from None
