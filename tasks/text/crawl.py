"""The polite breadth-first web crawler behind ``ingest`` (kind ``crawl``).

Design decisions:

- Level-synchronous breadth-first search: every URL at depth d is fetched (by a small
  thread pool) before any URL at depth d+1, and results are consumed in frontier order
  on the calling thread. The documents, their order and the WARC are therefore the same
  on every run over an unchanged site, whatever the thread timing.
- Scope is the seeds' hosts (scheme, host and port). Links come from ``<a href>`` only,
  normalised (lower-case scheme and host, default port dropped, fragment stripped,
  percent-encoding requoted) so one page is one URL.
- robots.txt follows RFC 9309: fetched once per host before any page; a 2xx body is
  parsed, a 4xx (404 included) allows everything, a 5xx disallows everything, and an
  unreachable host drops its pages with the fetch error. A larger ``Crawl-delay`` wins, up
  to ``max_crawl_delay_seconds``: a host that asks for more is skipped (``crawl_delay_too_long``).
- Address guard (on by default): every connection (seed, link, redirect, robots.txt) is
  made to an address checked first, and only public addresses pass, unless the host is
  named in ``allow_private_hosts`` or the address is in ``allow_private_networks``. A
  crawl cannot be pointed at the metadata service, the intranet or the Prefect API on
  loopback, and DNS rebinding cannot swap the address after the check (the checked
  address is the one connected to). A refused host's pages drop as ``private_address``.
- Deadlines: each response has one wall-clock limit (headers and body, enforced while
  reading), and the crawl as a whole ``max_crawl_seconds``: URLs not started by then drop
  as ``crawl_deadline`` and the breadth-first search stops.
- Politeness: request starts to one host are spaced by the delay across all threads.
- Retries: timeouts, connection errors, 5xx and 429, with exponential backoff; a
  ``Retry-After`` is honoured when it is at most ``max_retry_after_seconds``.
- Redirects are followed by hand so every hop is checked against the scope, robots.txt
  and the hop limit. A redirect onto a URL already queued is a ``duplicate_url`` drop:
  that URL is (or was) fetched on its own, so no page is stored twice.
- The Content-Type is checked from the headers before any body is read, and a body is
  read only up to ``max_bytes``. ``Accept-Encoding: identity`` keeps the archived bytes
  exactly what the server sent.
- http.client (standard library) does the HTTP: one connection per request, no hidden
  retries or redirects, and socket timeouts that surface as ``TimeoutError``.
- Every kept page is archived as a WARC request/response pair (warcio, one gzip member
  per record), so the crawl can be re-ingested later with kind ``warc``.
- Incremental recrawls: given what an earlier crawl learned of each URL (a
  :class:`Validator`: ETag, Last-Modified, the body's SHA-256 and the page's links), a
  request for a known URL is conditional (``If-None-Match`` and ``If-Modified-Since``,
  RFC 9110 13.1; a server that knows ETags lets If-None-Match win). A 304 is not a page:
  it is yielded as an :class:`Unchanged` (reason ``not_modified``, no body read or
  archived) and the breadth-first search goes on through the links stored for that URL,
  so new pages behind unchanged ones are still found. A 200 whose body hashes as before
  (a server that ignores validators) is ``unchanged`` the same way. :attr:`Crawler.validators`
  is what the next crawl needs: every page fetched or confirmed unchanged by this one.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import hashlib
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
import urllib.robotparser
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, urldefrag, urljoin, urlsplit, urlunsplit

from pydantic import Field, IPvAnyNetwork, field_validator
from resiliparse.parse.encoding import detect_encoding
from resiliparse.parse.html import HTMLTree
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from tasks.text.pages import HTML_TYPES, Drop, Page, Unchanged, Validator
from tasks.text.settings import Settings

log = logging.getLogger("lmforge.ingest")

RETRY_STATUSES = {429, 500, 502, 503, 504}
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
_CHARSET = re.compile(r"charset\s*=\s*[\"']?([^\"';\s]+)", re.I)
_SAFE = "/%:@!$&'()*+,;=-._~"


class CrawlConfig(Settings):
    """Where to crawl and how politely."""

    seeds: list[str] = Field(
        ["http://127.0.0.1:8000/"],
        min_length=1,
        description="Start URLs (http/https); the crawl stays on their hosts. The default is what `python -m http.server` serves.",
    )
    max_pages: int = Field(
        10_000, ge=1, le=10_000_000, description="Most URLs attempted (kept + dropped) before stopping."
    )
    max_depth: int = Field(5, ge=0, le=100, description="Most links followed from a seed (seeds are depth 0).")
    delay_seconds: float = Field(
        1.0,
        ge=0.0,
        le=600.0,
        description="Least time between two request starts to one host; robots.txt Crawl-delay wins when larger.",
    )
    workers: int = Field(4, ge=1, le=64, description="Concurrent fetches (threads); the per-host delay still applies.")
    timeout_seconds: float = Field(
        10.0, gt=0.0, le=600.0, description="Time limit of one request: connect, each read, and the whole body."
    )
    retries: int = Field(2, ge=0, le=10, description="Extra attempts after a timeout, connection error, 5xx or 429.")
    backoff_seconds: float = Field(
        1.0, ge=0.0, le=600.0, description="First retry waits this long, doubling on each further retry."
    )
    max_retry_after_seconds: float = Field(
        30.0, ge=0.0, le=3600.0, description="Longest Retry-After honoured; a longer one gives the page up."
    )
    max_bytes: int = Field(5_000_000, ge=1024, description="Largest body read; a larger page is dropped as too_large.")
    max_redirects: int = Field(
        5, ge=0, le=50, description="Most redirect hops followed for one URL (RFC 9309 asks for at least 5)."
    )
    user_agent: str = Field(
        "lmforge-crawler/0.1",
        min_length=1,
        max_length=256,
        pattern=r"^[\x20-\x7e]+$",
        description="User-Agent header, also the name matched against robots.txt rules (printable ASCII: no line breaks).",
    )
    max_links_per_page: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Most links taken from one page (in document order): bounds the work on a page of links.",
    )
    max_crawl_delay_seconds: float = Field(
        30.0,
        ge=0.0,
        le=3600.0,
        description="Longest robots.txt Crawl-delay honoured; a host asking for more is skipped (crawl_delay_too_long).",
    )

    allow_private_hosts: list[str] = Field(
        [],
        max_length=1000,
        description=(
            "Host names (as written in URLs, e.g. 127.0.0.1 or intranet.example) that may resolve to loopback, private"
            " or link-local addresses. Every other request must connect to a public address (private_address drop)."
        ),
    )
    allow_private_networks: list[IPvAnyNetwork] = Field(
        [],
        max_length=1000,
        description="Address ranges (CIDR, e.g. 10.0.0.0/8) that any crawled host may connect to besides public ones.",
    )
    max_crawl_seconds: float = Field(
        43_200.0,
        gt=0.0,
        le=30 * 86_400.0,
        description="Wall-clock limit of the whole crawl; URLs not started by then are dropped (crawl_deadline).",
    )

    @field_validator("allow_private_hosts")
    @classmethod
    def _host_names(cls, hosts: list[str]) -> list[str]:
        names = []
        for h in hosts:
            name = h.strip().lower().removeprefix("[").removesuffix("]")
            bad = not name or any(c in name for c in "/ @?#") or not name.isascii()
            if not bad and ":" in name:  # an IPv6 address, or a host with a port (which would never match)
                try:
                    ipaddress.IPv6Address(name)
                except ValueError:
                    bad = True
            if bad:
                raise ValueError(f"{h!r} is not a host name (write the host alone: no scheme, port or path)")
            names.append(name)
        return names

    @field_validator("seeds")
    @classmethod
    def _http_seeds(cls, seeds: list[str]) -> list[str]:
        for s in seeds:
            if urlsplit(s).scheme not in ("http", "https") or not urlsplit(s).hostname:
                raise ValueError(f"seed {s!r} is not an http(s) URL")
        return seeds


@dataclass
class _Fetched:
    """One crawled page plus what the WARC and the frontier need."""

    page: Page
    request_line: str
    request_headers: list[tuple[str, str]]
    protocol: str
    status_line: str
    headers: list[tuple[str, str]]
    links: list[str] = field(default_factory=list)
    validator: Validator | None = None


@dataclass
class _Response:
    """One HTTP answer; ``body`` is None when it was not read (not 2xx, or not wanted)."""

    protocol: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes | None


class _Failure(Exception):
    """A fetch outcome that ends in a drop (after retries where they apply)."""

    def __init__(self, reason: str, detail: str, status: int | None = None, retry: bool = False):
        super().__init__(detail)
        self.reason, self.detail, self.status, self.retry = reason, detail, status, retry


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _normalize_escapes(text: str) -> str:
    """RFC 3986 6.2.2: percent-escapes in upper case, escaped unreserved characters decoded."""

    def fix(m: re.Match) -> str:
        char = chr(int(m.group(0)[1:], 16))
        return char if char in _UNRESERVED else m.group(0).upper()

    return _ESCAPE.sub(fix, text)


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4: ``/a/./b/../c`` is ``/a/c``; never climbs above the root."""
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    result = "/".join(out)
    return result if result.startswith("/") else "/" + result


def normalize_url(url: str) -> str | None:
    """Canonical form of an http(s) URL, or None for anything else (mailto:, javascript:...).

    Lower-case scheme and host, default port dropped, IPv6 hosts in brackets, fragment
    stripped, dot segments removed, percent-escapes normalized (``%2f`` is ``%2F``, ``%41``
    is ``A``): one page, one URL.
    """
    try:
        parts = urlsplit(urldefrag(url.strip())[0])
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            return None
        host = parts.hostname.encode("idna").decode("ascii") if ":" not in parts.hostname else f"[{parts.hostname}]"
        port = parts.port
    except (UnicodeError, ValueError):  # "http://[oops/", a port out of range, a host IDNA refuses
        return None
    netloc = host if port is None or port == {"http": 80, "https": 443}[scheme] else f"{host}:{port}"
    path = remove_dot_segments(_normalize_escapes(quote(parts.path or "/", safe=_SAFE)))
    query = _normalize_escapes(quote(parts.query, safe=_SAFE + "?"))
    return urlunsplit((scheme, netloc, path, query, ""))


def resolve(base: str, href: str) -> str | None:
    """``href`` made absolute against ``base`` and normalized; None when it is not a usable http(s) URL."""
    try:
        return normalize_url(urljoin(base, href))
    except ValueError:
        return None


def host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def header(headers: list[tuple[str, str]], name: str) -> str | None:
    """The first value of a header (case-insensitive name), or None."""
    name = name.lower()
    return next((v for k, v in headers if k.lower() == name), None)


def media_type(headers: list[tuple[str, str]]) -> tuple[str, str | None]:
    """(lower-case media type, charset or None) from the Content-Type header."""
    value = header(headers, "content-type") or ""
    m = _CHARSET.search(value)
    return value.split(";")[0].strip().lower(), (m.group(1).lower() if m else None)


def extract_links(body: bytes, charset: str | None, base_url: str, max_links: int = 10_000) -> list[str]:
    """Normalised absolute http(s) links of ``<a href>``, in document order, unique; at most
    ``max_links`` of them, so a page of 200,000 links costs bounded time."""
    tree = HTMLTree.parse_from_bytes(body, charset or detect_encoding(body) or "utf-8")
    if tree.document is None:
        return []
    base = tree.document.query_selector("base[href]")
    base_url = (resolve(base_url, base.getattr("href")) or base_url) if base is not None else base_url
    links: dict[str, None] = {}
    # .values() materialises the node list at once; iterating it node by node is quadratic.
    for a in tree.document.query_selector_all("a[href]").values():
        url = resolve(base_url, a.getattr("href"))
        if url:
            links[url] = None
            if len(links) >= max_links:
                break
    return list(links)


def _retry_after(headers: list[tuple[str, str]]) -> float | None:
    value = header(headers, "retry-after")
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - _dt.datetime.now(_dt.timezone.utc)).total_seconds()) if when.tzinfo else None


def address_problem(address: str, networks: list = ()) -> str | None:
    """Why a crawl must not connect to ``address`` (loopback, private, link-local...), or
    None for a public address or one inside ``networks``. IPv4-mapped IPv6 is judged as IPv4."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in net for net in networks):
        return None
    for kind in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    return None if ip.is_global else "not a public address"


class _HostGate:
    """Spaces request starts to one host by ``delay`` seconds, across threads."""

    def __init__(self, delay: float):
        self.delay = delay
        self._lock = threading.Lock()
        self._next = 0.0

    def wait(self) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.delay
        if start > now:
            time.sleep(start - now)


class Crawler:
    """One crawl: call :meth:`crawl` once and consume its pages, drops and unchanged URLs.

    ``previous`` maps URLs to what an earlier crawl knew of them: their requests become
    conditional (see the module docstring). After the crawl, :attr:`validators` holds the
    same for this crawl, in the order pages were reached.
    """

    def __init__(self, cfg: CrawlConfig, previous: dict[str, Validator] | None = None):
        self.cfg = cfg
        self.previous = previous or {}
        self.validators: dict[str, Validator] = {}
        self.stats = {
            "requests": 0,
            "retries": 0,
            "bytes_fetched": 0,
            "redirects": 0,
            "conditional_requests": 0,
            "not_modified": 0,
            "unchanged": 0,
            "new": 0,
            "changed": 0,
        }
        self._stats_lock = threading.Lock()
        self._gates: dict[str, _HostGate] = {}
        self._robots: dict[str, urllib.robotparser.RobotFileParser | _Failure] = {}
        self._known: frozenset[str] = frozenset()  # URLs queued before the current level
        self._ssl = ssl.create_default_context()
        self._private_ok = frozenset(cfg.allow_private_hosts)
        self._deadline = float("inf")  # set when the crawl starts

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    # --- HTTP ----------------------------------------------------------------------------

    def _request_headers(self) -> list[tuple[str, str]]:
        return [
            ("User-Agent", self.cfg.user_agent),
            ("Accept", "text/html,application/xhtml+xml;q=0.9,*/*;q=0.1"),
            ("Accept-Encoding", "identity"),
        ]

    def _conditional_headers(self, url: str) -> list[tuple[str, str]]:
        """If-None-Match / If-Modified-Since for a URL an earlier crawl knew (else none)."""
        known = self.previous.get(url)
        if known is None:
            return []
        return ([("If-None-Match", known.etag)] if known.etag else []) + (
            [("If-Modified-Since", known.last_modified)] if known.last_modified else []
        )

    def _once(
        self, url: str, want_body, extra_headers: list[tuple[str, str]] = (), truncate: bool = False
    ) -> _Response:
        """One GET, no retries. ``want_body(status, headers)`` says whether to read the body.

        A body over ``max_bytes`` is a ``too_large`` failure, or with ``truncate`` cut there
        (robots.txt: RFC 9309 asks crawlers to parse at least 500 KiB of it, not to give up).
        """
        parts = urlsplit(url)
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        kwargs = {"context": self._ssl} if parts.scheme == "https" else {}
        conn = conn_cls(parts.hostname, parts.port, timeout=self.cfg.timeout_seconds, **kwargs)
        conn._create_connection = self._connect  # every connection (HTTPS too) goes through the address guard
        gate = self._gates.get(host_of(url))
        if gate is not None:
            gate.wait()
        self._count("requests")
        # One wall-clock limit for the whole response, headers and body: a watchdog shuts the
        # socket at the deadline, so a server that trickles a byte at a time cannot hold a
        # fetch (and its depth level) past it. Per-read socket timeouts alone never fire then.
        expired = threading.Event()
        held: list[socket.socket] = []  # the connection's socket: http.client drops conn.sock once it has the headers

        def expire() -> None:
            expired.set()
            for sock in [*held, conn.sock]:
                if sock is None:
                    continue
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        watchdog = threading.Timer(self.cfg.timeout_seconds, expire)
        watchdog.daemon = True
        watchdog.start()
        try:
            sent = dict([*self._request_headers(), *extra_headers])
            conn.request("GET", urlunsplit(("", "", parts.path or "/", parts.query, "")), headers=sent)
            held.append(conn.sock)
            if expired.is_set():
                expire()
            resp = conn.getresponse()
            headers = resp.getheaders()
            body = None
            if want_body(resp.status, headers):
                chunks, size = [], 0
                while chunk := resp.read1(1 << 16):
                    size += len(chunk)
                    if size > self.cfg.max_bytes and truncate:
                        chunks.append(chunk[: len(chunk) - (size - self.cfg.max_bytes)])
                        size = self.cfg.max_bytes
                        break
                    if size > self.cfg.max_bytes:
                        raise _Failure("too_large", f"body exceeds max_bytes={self.cfg.max_bytes}", resp.status)
                    chunks.append(chunk)
                if expired.is_set():
                    raise _Failure(
                        "timeout", f"response not complete within {self.cfg.timeout_seconds}s", resp.status, retry=True
                    )
                body = b"".join(chunks)
                self._count("bytes_fetched", size)
            if expired.is_set():
                raise _Failure("timeout", f"response not complete within {self.cfg.timeout_seconds}s", retry=True)
            return _Response("HTTP/1.0" if resp.version == 10 else "HTTP/1.1", resp.status, resp.reason, headers, body)
        except TimeoutError as e:
            raise _Failure("timeout", f"no answer within {self.cfg.timeout_seconds}s ({e})", retry=True) from e
        except (OSError, http.client.HTTPException) as e:
            if expired.is_set():
                raise _Failure(
                    "timeout", f"response not complete within {self.cfg.timeout_seconds}s", retry=True
                ) from e
            raise _Failure("connection_error", f"{type(e).__name__}: {e}", retry=True) from e
        finally:
            watchdog.cancel()
            conn.close()

    def _connect(self, address: tuple[str, int], timeout: float | None, source_address=None) -> socket.socket:
        """``socket.create_connection`` with the address guard: every address the host resolves to
        is checked before it is connected to, and only a checked address is connected, so a DNS
        answer that changes between a check and the connect (rebinding) cannot slip through."""
        host, port = address
        named = host.lower() in self._private_ok
        refused, error = [], None
        for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            why = None if named else address_problem(sockaddr[0], self.cfg.allow_private_networks)
            if why:
                refused.append(f"{sockaddr[0]} ({why})")
                continue
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                error = e
        if error is not None:
            raise error
        raise _Failure(
            "private_address",
            f"{host} resolves to {', '.join(refused) or 'no address'}; name it in allow_private_hosts"
            " (or its range in allow_private_networks) to crawl it",
        )

    def _get(self, url: str, want_body, extra_headers: list[tuple[str, str]] = (), truncate: bool = False) -> _Response:
        """GET with retries on transient failures; a 5xx/429 that persists becomes a response."""
        for attempt in range(self.cfg.retries + 1):
            last = attempt == self.cfg.retries
            try:
                resp = self._once(url, want_body, extra_headers, truncate)
            except _Failure as f:
                if not f.retry or last:
                    raise
                wait = self.cfg.backoff_seconds * 2**attempt
            else:
                if resp.status not in RETRY_STATUSES or last:
                    return resp
                after = _retry_after(resp.headers)
                if after is not None and after > self.cfg.max_retry_after_seconds:
                    return resp
                wait = after if after is not None else self.cfg.backoff_seconds * 2**attempt
            if time.monotonic() + wait > self._deadline:
                raise _Failure(
                    "crawl_deadline", f"no time left for a retry within max_crawl_seconds={self.cfg.max_crawl_seconds}"
                )
            self._count("retries")
            time.sleep(wait)
        raise AssertionError("unreachable")

    # --- robots.txt -----------------------------------------------------------------------

    def _load_robots(self, host: str) -> None:
        url = host + "/robots.txt"
        rp = urllib.robotparser.RobotFileParser(url)
        try:
            for _ in range(self.cfg.max_redirects + 1):
                resp = self._get(url, lambda status, _: 200 <= status < 300, truncate=True)
                location = header(resp.headers, "location")
                target = resolve(url, location) if location and resp.status in REDIRECT_STATUSES else None
                if target is None:
                    break
                url = target
        except _Failure as f:
            self._robots[host] = _Failure(f.reason, f"robots.txt unreachable: {f.detail}")
            return
        if 200 <= resp.status < 300 and resp.body is not None:
            rp.parse(resp.body.decode("utf-8", "replace").splitlines())
        elif resp.status >= 500:
            rp.disallow_all = True
        else:
            rp.allow_all = True
        self._robots[host] = rp
        delay = rp.crawl_delay(self.cfg.user_agent) if 200 <= resp.status < 300 else None
        if delay and float(delay) > self.cfg.max_crawl_delay_seconds:
            detail = f"robots.txt asks for Crawl-delay {delay}s, above max_crawl_delay_seconds={self.cfg.max_crawl_delay_seconds}"
            self._robots[host] = _Failure("crawl_delay_too_long", detail)
            return
        if delay and float(delay) > self._gates[host].delay:
            log.info("%s: robots.txt asks for Crawl-delay %ss", host, delay)
            self._gates[host].delay = float(delay)

    def _check_robots(self, url: str) -> None:
        rules = self._robots[host_of(url)]
        if isinstance(rules, _Failure):
            raise rules
        if not rules.can_fetch(self.cfg.user_agent, url):
            reason = (
                "robots.txt answered 5xx: everything disallowed" if rules.disallow_all else "disallowed by robots.txt"
            )
            raise _Failure("robots_disallowed", reason)

    # --- pages ----------------------------------------------------------------------------

    def _want_page_body(self, status: int, headers: list[tuple[str, str]]) -> bool:
        if not 200 <= status < 300:
            return False
        ctype, _ = media_type(headers)
        if ctype and ctype not in HTML_TYPES:
            raise _Failure("not_html", f"Content-Type {ctype}", status)
        length = header(headers, "content-length") or ""
        if length.strip().isdigit() and int(length) > self.cfg.max_bytes:
            raise _Failure("too_large", f"Content-Length {length} exceeds max_bytes={self.cfg.max_bytes}", status)
        if any(k.lower() == "content-encoding" and v.strip().lower() not in ("", "identity") for k, v in headers):
            raise _Failure("encoded_body", "server sent a Content-Encoding despite Accept-Encoding: identity", status)
        return True

    def _unchanged(self, url: str, reason: str, detail: str, fetched_at: str, resp: _Response) -> Unchanged:
        """A known URL confirmed unchanged; fresher validators from the answer replace the old."""
        known = self.previous[url]
        validator = Validator(
            url,
            header(resp.headers, "etag") or known.etag,
            header(resp.headers, "last-modified") or known.last_modified,
            known.sha256,
            known.links,
        )
        return Unchanged(url, reason, detail, fetched_at, resp.status, validator)

    def _visit(self, url: str) -> _Fetched | Unchanged | Drop:
        """Fetch one frontier URL, following redirects; runs on a pool thread."""
        fetched_at = now_iso()
        if time.monotonic() > self._deadline:
            return Drop(
                url, "crawl_deadline", f"not started within max_crawl_seconds={self.cfg.max_crawl_seconds}", fetched_at
            )
        try:
            self._check_robots(url)
            current, hops = url, 0
            while True:
                conditional = self._conditional_headers(current)
                if conditional:
                    self._count("conditional_requests")
                resp = self._get(current, self._want_page_body, conditional)
                if resp.status == 304 and conditional:
                    return self._unchanged(current, "not_modified", "HTTP 304 Not Modified", fetched_at, resp)
                location = header(resp.headers, "location")
                if resp.status not in REDIRECT_STATUSES or not location:
                    break
                hops += 1
                self._count("redirects")
                if hops > self.cfg.max_redirects:
                    raise _Failure("too_many_redirects", f"more than {self.cfg.max_redirects} redirects", resp.status)
                target = resolve(current, location)
                if target is None or host_of(target) not in self._gates:
                    raise _Failure("off_host_redirect", f"redirects to {location}", resp.status)
                if target in self._known:
                    raise _Failure("duplicate_url", f"redirects to {target}, crawled on its own", resp.status)
                self._check_robots(target)
                current = target
            if not 200 <= resp.status < 300:
                raise _Failure(f"http_{resp.status}", f"HTTP {resp.status} {resp.reason}".strip(), resp.status)
            ctype, charset = media_type(resp.headers)
            body = resp.body or b""
            if not ctype:
                if not re.match(rb"\s*(<!doctype html|<html)", body[:1024], re.I):
                    raise _Failure("not_html", "no Content-Type and the body is not HTML", resp.status)
                ctype = "text/html"
        except _Failure as f:
            return Drop(url, f.reason, f.detail, fetched_at, f.status)
        except Exception as e:  # one odd page (a header or URL no parser expected) must not end the crawl
            return Drop(url, "crawl_error", f"{type(e).__name__}: {e}"[:500], fetched_at)
        sha = hashlib.sha256(body).hexdigest()
        known = self.previous.get(current)
        if known is not None and known.sha256 == sha:
            return self._unchanged(
                current, "unchanged", f"HTTP {resp.status}, body identical to the previous crawl's", fetched_at, resp
            )
        parts = urlsplit(current)
        fetched = _Fetched(
            page=Page(current, fetched_at, resp.status, ctype, charset, body),
            request_line=f"GET {urlunsplit(('', '', parts.path or '/', parts.query, ''))} HTTP/1.1",
            request_headers=[("Host", parts.netloc), *self._request_headers(), *conditional],
            protocol=resp.protocol,
            status_line=f"{resp.status} {resp.reason}".strip(),
            headers=[(k, v) for k, v in resp.headers if k.lower() != "transfer-encoding"],
        )
        fetched.links = extract_links(body, charset, current, self.cfg.max_links_per_page)
        fetched.validator = Validator(
            current, header(resp.headers, "etag"), header(resp.headers, "last-modified"), sha, tuple(fetched.links)
        )
        return fetched

    def crawl(self, warc_path: Path) -> Iterator[Page | Unchanged | Drop]:
        """Yield every attempted URL's outcome in breadth-first order; archive kept pages."""
        cfg = self.cfg
        self._deadline = time.monotonic() + cfg.max_crawl_seconds
        seeds = list(dict.fromkeys(u for u in map(normalize_url, cfg.seeds) if u))
        for host in dict.fromkeys(map(host_of, seeds)):
            self._gates[host] = _HostGate(cfg.delay_seconds)
            self._load_robots(host)
        seen = set(seeds)
        frontier, depth, attempted = seeds, 0, 0
        pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="crawl")
        try:
            with open(warc_path, "wb") as f:
                warc = WARCWriter(f, gzip=True)
                warc.write_record(
                    warc.create_warcinfo_record(
                        warc_path.name, {"software": "lmforge ingest (crawl)", "format": "WARC File Format 1.0"}
                    )
                )
                while frontier and attempted < cfg.max_pages and time.monotonic() < self._deadline:
                    level = frontier[: cfg.max_pages - attempted]
                    attempted += len(level)
                    self._known = frozenset(seen)
                    log.info("crawl depth %d: %d URLs (%d attempted so far)", depth, len(level), attempted)
                    next_level: list[str] = []
                    for url, result in zip(level, pool.map(self._visit, level)):
                        if isinstance(result, Drop):
                            yield result
                            continue
                        final = result.url if isinstance(result, Unchanged) else result.page.url
                        if final != url:
                            if final in seen:
                                when, status = (
                                    (result.fetched_at, result.http_status)
                                    if isinstance(result, Unchanged)
                                    else (result.page.fetched_at, result.page.http_status)
                                )
                                yield Drop(
                                    url, "duplicate_url", f"redirects to {final}, crawled on its own", when, status
                                )
                                continue
                            seen.add(final)
                        if isinstance(result, Unchanged):
                            self._count(result.reason)
                            self.validators[final] = result.validator
                            links = result.validator.links
                            yield result
                        else:
                            self._count("changed" if final in self.previous else "new")
                            self.validators[final] = result.validator
                            self._archive(warc, result)
                            links = result.links
                            yield result.page
                        if depth < cfg.max_depth:
                            for link in links:
                                if link not in seen and host_of(link) in self._gates:
                                    seen.add(link)
                                    next_level.append(link)
                    frontier, depth = next_level, depth + 1
                if frontier and time.monotonic() >= self._deadline:
                    log.warning(
                        "crawl stopped at max_crawl_seconds=%s; %d URLs not attempted",
                        cfg.max_crawl_seconds,
                        len(frontier),
                    )
        finally:
            # An abandoned crawl (an error downstream) must not wait for the whole level.
            pool.shutdown(wait=True, cancel_futures=True)

    def _archive(self, warc: WARCWriter, f: _Fetched) -> None:
        date = {"WARC-Date": f.page.fetched_at.replace("+00:00", "Z")}
        req = warc.create_warc_record(
            f.page.url,
            "request",
            warc_headers_dict=dict(date),
            http_headers=StatusAndHeaders(f.request_line, f.request_headers, is_http_request=True),
        )
        resp = warc.create_warc_record(
            f.page.url,
            "response",
            payload=BytesIO(f.page.body),
            length=len(f.page.body),
            warc_headers_dict=dict(date),
            http_headers=StatusAndHeaders(f.status_line, f.headers, protocol=f.protocol),
        )
        warc.write_request_response_pair(req, resp)
