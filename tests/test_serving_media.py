"""Media safety: SSRF vectors, redirects, DNS rebinding, allow-lists, size and time limits, data URLs.

No test here connects anywhere but loopback. Every socket `connect` is watched (and refused unless it
goes to 127.0.0.1), and remote fetches run on a test network that knows one "public" address,
PUBLIC_IP, and routes it to a local HTTP server; DNS answers come from a table. A refused URL must
be refused before any connection at all.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpcore
import openai
import pytest
import torch
from PIL import Image

from blip3.factory import create
from blip3.serving import BackgroundServer, MediaError, MediaLoader, MediaPolicy, ServeSettings, create_app, media
from conftest import build_test_tokenizer

PUBLIC_IP = "93.184.215.14"  # passes every address check; the test network routes it to the local server


def png_bytes(size=(40, 30), colour="red", fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------
# The test network


@pytest.fixture
def outbound(monkeypatch):
    """Every address a socket connects to, in order; anything but loopback fails the test on the spot."""
    seen: list[str] = []
    real_connect = socket.socket.connect

    def connect(sock, address):
        seen.append(address[0])
        if not ipaddress.ip_address(address[0]).is_loopback:
            raise AssertionError(f"a connection to {address} was attempted")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


class ImageHost(BaseHTTPRequestHandler):
    """The only web server the fetches can reach (as PUBLIC_IP). Records each request it gets."""

    requests: list[tuple[str, str]] = []  # (path, Host header)
    redirects = {
        "/to-private": "http://10.0.0.5/x.png",
        "/to-metadata": "http://169.254.169.254/latest/meta-data/",
        "/to-mapped": "http://[::ffff:192.168.0.1]/x.png",
        "/to-localhost": "http://localhost:8080/x.png",
        "/to-private-name": "http://private.example.com/x.png",
        "/to-file": "file:///etc/passwd",
        "/to-gopher": "gopher://127.0.0.1:6379/_INFO",
        "/to-image": "/image.png",
        "/loop": "/loop",
    }

    def do_GET(self):
        ImageHost.requests.append((self.path, self.headers.get("Host")))
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/image.png":
            self._send(png_bytes())
        elif self.path == "/big":
            self._send(b"\x89PNG" + b"\0" * 5000)
        elif self.path == "/big-chunked":  # no Content-Length: the limit must hold while reading
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"\0" * 1000)
        elif self.path == "/slow":
            time.sleep(2)
            self._send(png_bytes())
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def _send(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class ImageHostServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up (the timeout test) is expected
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def image_host():
    server = ImageHostServer(("127.0.0.1", 0), ImageHost)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


class FakeNetwork(httpcore.NetworkBackend):
    """Records every connection asked for; connects PUBLIC_IP to the local server and refuses the rest."""

    def __init__(self, port: int):
        self.port = port
        self.attempts: list[str] = []

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.attempts.append(host)
        if host != PUBLIC_IP:
            raise httpcore.ConnectError(f"the test network has no route to {host}")
        return httpcore.SyncBackend().connect_tcp("127.0.0.1", self.port, timeout, local_address, socket_options)

    def sleep(self, seconds):
        time.sleep(seconds)


class FakeDNS:
    """Answers from a table; each answer may change between calls (rebinding)."""

    def __init__(self):
        self.calls: list[str] = []
        self.table = {
            "images.example.com": [[PUBLIC_IP]],
            "a.cdn.example.org": [[PUBLIC_IP]],
            "private.example.com": [["192.168.0.7"]],
            "mixed.example.com": [[PUBLIC_IP, "10.0.0.8"]],
            "mapped.example.com": [["::ffff:127.0.0.1"]],
            "rebind.example.com": [[PUBLIC_IP], ["10.0.0.1"]],  # public when checked, private after
            "other.example.com": [[PUBLIC_IP]],
        }

    def __call__(self, host: str, port: int):
        self.calls.append(host)
        answers = self.table.get(host)
        if answers is None:
            raise socket.gaierror(f"{host}: unknown in the test DNS")
        answer = answers[min(self.calls.count(host), len(answers)) - 1]
        return [ipaddress.ip_address(a) for a in answer]


@pytest.fixture
def network(image_host):
    ImageHost.requests.clear()
    return FakeNetwork(image_host)


@pytest.fixture
def dns():
    return FakeDNS()


def loader(network, dns, **policy) -> MediaLoader:
    policy = {"allow_remote": True, "allowed_domains": ("*",), "fetch_timeout_s": 5.0, **policy}
    return MediaLoader(MediaPolicy(**policy), network=network, resolve=dns)


# ---------------------------------------------------------------------------------------------------
# Refused before any connection

SSRF_VECTORS = [
    ("http://127.0.0.1/x.png", "a loopback address"),
    ("http://localhost/x.png", "internal host name"),
    ("http://[::1]/x.png", "a loopback address"),
    ("http://0.0.0.0/x.png", "an unspecified address"),
    ("http://[::]/x.png", "an unspecified address"),
    ("http://169.254.169.254/latest/meta-data/", "a cloud metadata address"),
    ("http://metadata.google.internal/computeMetadata/v1/", "internal host name"),
    ("http://168.63.129.16/machine", "a cloud metadata address"),  # Azure's, a public address
    ("http://100.100.100.200/latest/meta-data/", "a cloud metadata address"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "a cloud metadata address"),
    ("http://10.1.2.3/x.png", "a private address"),
    ("http://172.16.0.1/x.png", "a private address"),
    ("http://172.31.255.254/x.png", "a private address"),
    ("http://192.168.1.1/x.png", "a private address"),
    ("http://[::ffff:127.0.0.1]/x.png", "a loopback address inside an IPv6 address"),
    ("http://[::ffff:a00:1]/x.png", "a private address inside an IPv6 address"),  # ::ffff:10.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/x.png", "a cloud metadata address inside an IPv6 address"),  # NAT64
    ("http://[2002:c0a8:101::]/x.png", "a private address inside an IPv6 address"),  # 6to4 of 192.168.1.1
    ("http://[fe80::1]/x.png", "a link-local address"),
    ("http://[fc00::1]/x.png", "a private address"),
    ("http://2130706433/x.png", "(= 127.0.0.1) is a loopback address"),  # decimal
    ("http://0177.0.0.1/x.png", "(= 127.0.0.1) is a loopback address"),  # octal
    ("http://0x7f.0.0.1/x.png", "(= 127.0.0.1) is a loopback address"),  # hex
    ("http://0x7f000001/x.png", "(= 127.0.0.1) is a loopback address"),
    ("http://127.1/x.png", "(= 127.0.0.1) is a loopback address"),
    ("http://0xa.0.0.1/x.png", "(= 10.0.0.1) is a private address"),
    ("http://①②⑦.0.0.1/x.png", "refused: 127.0.0.1 is a loopback address"),  # IDNA maps the digits first
    ("http://224.0.0.1/x.png", "a multicast address"),
    ("http://100.64.0.1/x.png", "a non-public address"),  # shared address space (CGNAT)
    ("http://private.example.com/x.png", "resolves to a private address"),
    ("http://mixed.example.com/x.png", "resolves to a private address"),
    ("http://mapped.example.com/x.png", "resolves to a loopback address inside an IPv6 address"),
    ("file:///etc/passwd", "scheme 'file' is not allowed"),
    ("ftp://images.example.com/x.png", "scheme 'ftp' is not allowed"),
    ("gopher://127.0.0.1:6379/_INFO", "scheme 'gopher' is not allowed"),
    ("dict://127.0.0.1:11211/stat", "scheme 'dict' is not allowed"),
    ("javascript:alert(1)", "scheme 'javascript' is not allowed"),
    ("//images.example.com/x.png", "scheme '(none)' is not allowed"),
    ("http://user:pw@images.example.com/x.png", "must not carry credentials"),
]


@pytest.mark.parametrize(("url", "reason"), SSRF_VECTORS, ids=[v[0] for v in SSRF_VECTORS])
def test_ssrf_vectors_are_refused_without_any_connection(url, reason, network, dns, outbound):
    with pytest.raises(MediaError) as raised:
        loader(network, dns).load(url)
    assert reason in str(raised.value)
    assert network.attempts == [] and outbound == [] and ImageHost.requests == []


REDIRECTS = [
    ("/to-private", "a private address"),
    ("/to-metadata", "a cloud metadata address"),
    ("/to-mapped", "a private address inside an IPv6 address"),
    ("/to-localhost", "internal host name"),
    ("/to-private-name", "resolves to a private address"),
    ("/to-file", "scheme 'file' is not allowed"),
    ("/to-gopher", "scheme 'gopher' is not allowed"),
]


@pytest.mark.parametrize(("path", "reason"), REDIRECTS, ids=[r[0] for r in REDIRECTS])
def test_redirects_to_forbidden_places_are_refused_before_connecting(path, reason, network, dns, outbound):
    with pytest.raises(MediaError) as raised:
        loader(network, dns).load(f"http://images.example.com{path}")
    assert reason in str(raised.value)
    assert network.attempts == [PUBLIC_IP]  # the first hop only
    assert set(outbound) == {"127.0.0.1"} and len(outbound) == 1
    assert [p for p, _ in ImageHost.requests] == [path]


def test_redirect_loops_end(network, dns):
    with pytest.raises(MediaError, match="more than 3 redirects"):
        loader(network, dns).load("http://images.example.com/loop")
    assert len(ImageHost.requests) == 4


# ---------------------------------------------------------------------------------------------------
# What is allowed goes where it was checked


def test_a_fetch_connects_to_the_checked_address_with_the_names_host(network, dns, outbound):
    image = loader(network, dns).load("http://images.example.com/image.png")
    assert image.size == (40, 30) and image.mode == "RGB"
    assert network.attempts == [PUBLIC_IP] and outbound == ["127.0.0.1"]
    assert ImageHost.requests == [("/image.png", "images.example.com")]
    assert dns.calls == ["images.example.com"]


def test_a_redirect_is_checked_again_and_followed(network, dns):
    loader(network, dns).load("http://images.example.com/to-image")
    assert [p for p, _ in ImageHost.requests] == ["/to-image", "/image.png"]
    assert dns.calls == ["images.example.com", "images.example.com"]  # each hop resolved and checked anew


def test_dns_rebinding_cannot_move_the_connection(network, dns):
    # the name resolves to a public address when checked and to a private one afterwards: the connection
    # must go to the checked address, so the name is resolved exactly once
    image = loader(network, dns).load("http://rebind.example.com/image.png")
    assert image.size == (40, 30)
    assert dns.calls == ["rebind.example.com"] and network.attempts == [PUBLIC_IP]


@pytest.fixture(scope="module")
def tls_image_host(tmp_path_factory):
    """The image host over https, with a self-signed certificate for images.example.com."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ]
        + ["-subj", "/CN=images.example.com", "-addext", "subjectAltName=DNS:images.example.com"],
        check=True,
        capture_output=True,
    )
    server = ImageHostServer(("127.0.0.1", 0), ImageHost)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], cert
    server.shutdown()
    server.server_close()


def test_https_checks_the_certificate_against_the_name_not_the_address(tls_image_host, dns):
    port, cert = tls_image_host
    ImageHost.requests.clear()
    trusting = ssl.create_default_context(cafile=str(cert))
    fetch = lambda url, context: MediaLoader(  # noqa: E731
        MediaPolicy(allow_remote=True, allowed_domains=("*",)),
        network=FakeNetwork(port),
        resolve=dns,
        ssl_context=context,
    ).load(url)
    assert fetch("https://images.example.com/image.png", trusting).size == (40, 30)
    assert ImageHost.requests == [("/image.png", "images.example.com")]
    with pytest.raises(MediaError, match="fetching the image failed"):  # same address, certificate for another name
        fetch("https://other.example.com/image.png", trusting)
    with pytest.raises(MediaError, match="fetching the image failed"):  # a self-signed certificate is not trusted
        fetch("https://images.example.com/image.png", None)
    assert len(ImageHost.requests) == 1


def test_remote_urls_are_off_by_default(network, dns, outbound):
    with pytest.raises(MediaError, match="does not fetch remote image URLs"):
        MediaLoader(MediaPolicy(), network=network, resolve=dns).load("http://images.example.com/image.png")
    assert dns.calls == [] and network.attempts == [] and outbound == []


def test_only_listed_domains_are_fetched(network, dns):
    listed = loader(network, dns, allowed_domains=("images.example.com", "*.cdn.example.org"))
    assert listed.load("http://images.example.com/image.png").size == (40, 30)
    assert listed.load("http://a.cdn.example.org/image.png").size == (40, 30)
    dns.calls.clear()
    for url in (
        "http://evil.example.com/image.png",
        "http://cdn.example.org.evil.net/image.png",
        "http://images.example.com.evil.net/image.png",
        "http://93.184.215.14/image.png",  # the listed host's address is not the listed host
    ):
        with pytest.raises(MediaError, match="not on this server's list of allowed domains"):
            listed.load(url)
    assert dns.calls == []  # refused before asking DNS


def test_fetches_are_held_to_the_byte_limit_and_the_deadline(network, dns):
    small = loader(network, dns, max_image_bytes=1000)
    with pytest.raises(MediaError, match="5004 bytes, over the limit of 1000"):
        small.load("http://images.example.com/big")
    with pytest.raises(MediaError, match="over the limit of 1000 bytes"):
        small.load("http://images.example.com/big-chunked")
    started = time.monotonic()
    with pytest.raises(MediaError, match="took longer than 0.5 s"):
        loader(network, dns, fetch_timeout_s=0.5).load("http://images.example.com/slow")
    assert time.monotonic() - started < 1.9
    with pytest.raises(MediaError, match="HTTP 404"):
        loader(network, dns).load("http://images.example.com/missing.png")


def test_the_pinned_connection_refuses_any_other_address(network):
    pinned = media._PinnedBackend(network, ipaddress.ip_address(PUBLIC_IP))
    for host in ("10.0.0.1", "127.0.0.1", "example.com"):
        with pytest.raises(httpcore.ConnectError):
            pinned.connect_tcp(host, 80)
    with pytest.raises(httpcore.ConnectError):
        media._PinnedBackend(network, ipaddress.ip_address("10.0.0.1")).connect_tcp("10.0.0.1", 80)
    assert network.attempts == []


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", PUBLIC_IP, "2001:4860:4860::8888", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(address):
    problem = media.address_problem(ipaddress.ip_address(address))
    # IPv4-mapped forms are refused whatever they map to: Python marks ::ffff:0:0/96 reserved
    assert problem is None if not address.startswith("::ffff") else problem == "a reserved address"


# ---------------------------------------------------------------------------------------------------
# Data URLs and decoding


def test_data_urls_decode_with_line_breaks_and_missing_padding():
    encoded = base64.b64encode(png_bytes()).decode().rstrip("=")
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert media.decode_data_url(f"data:image/png;base64,{wrapped}", 10_000) == png_bytes()
    for url, message in [
        ("data:image/png,rawbytes", "must be base64-encoded"),
        ("data:image/png;base64", "no ',' before the data"),
        ("data:text/html;base64,PGgxPg==", "not an image type"),
        ("data:image/png;base64,@@@@", "invalid base64"),
    ]:
        with pytest.raises(MediaError, match=message):
            media.decode_data_url(url, 10_000)


def test_data_url_size_is_checked_before_decoding(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("base64 was decoded before the size check")

    monkeypatch.setattr(media.base64, "b64decode", never)
    with pytest.raises(MediaError, match="over the limit of 3000 bytes"):
        media.decode_data_url("data:image/png;base64," + "A" * 4004, 3000)


def test_only_known_image_formats_are_decoded():
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP"):
        assert media.decode_image(png_bytes(fmt=fmt), 10_000).size == (40, 30)
    for data in (
        png_bytes(fmt="TIFF"),
        png_bytes(fmt="ICO"),
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"%PDF-1.4",
    ):
        with pytest.raises(MediaError, match="not a PNG, JPEG, GIF, WebP or BMP image"):
            media.decode_image(data, 10_000)
    with pytest.raises(MediaError, match="40×30 pixels exceeds the limit of 1000"):
        media.decode_image(png_bytes(), 1000)


# ---------------------------------------------------------------------------------------------------
# Through the server


def test_the_server_fetches_allowed_urls_and_refuses_the_rest(network, dns, outbound):
    torch.manual_seed(0)
    model, processor = create("tiny", build_test_tokenizer())
    media_loader = loader(network, dns)
    with BackgroundServer(create_app(model, processor, ServeSettings(), media_loader=media_loader)) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)

        def ask(url):
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
            return client.chat.completions.create(
                model="blip3", messages=[{"role": "user", "content": content}], max_tokens=2
            )

        assert ask("http://images.example.com/image.png").usage.completion_tokens == 2
        for url, reason in [
            ("http://169.254.169.254/latest/meta-data/", "a cloud metadata address"),
            ("http://2130706433/", "a loopback address"),
            ("http://images.example.com/to-private", "a private address"),
        ]:
            with pytest.raises(openai.BadRequestError) as raised:
                ask(url)
            assert reason in raised.value.body["message"] and raised.value.body["code"] == "invalid_image"
    assert network.attempts == [PUBLIC_IP, PUBLIC_IP]  # the allowed image and the redirect's first hop
    assert set(outbound) == {"127.0.0.1"}  # the client's connections to the server, and the test network's
