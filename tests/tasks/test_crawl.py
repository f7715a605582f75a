"""The crawler against a local site that misbehaves in every way ingest must survive."""

from __future__ import annotations

import collections
import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastwarc.warc import ArchiveIterator, WarcRecordType

from storage.artifact import Store, read_table
from tasks import ingest
from tasks.text.crawl import CrawlConfig, extract_links, media_type, normalize_url

PROSE = "<p>" + "The administrator checks every log file before the weekly meeting. " * 5 + "</p>"


def page(*links: str) -> bytes:
    anchors = "".join(f'<li><a href="{href}">{href}</a></li>' for href in links)
    return f"<!DOCTYPE html><html><head><title>t</title></head><body><ul>{anchors}</ul>{PROSE}</body></html>".encode()


class Site:
    """A ThreadingHTTPServer on 127.0.0.1 whose pages misbehave on purpose; counts every hit."""

    def __init__(self, robots: bytes | None = b"User-agent: *\nDisallow: /private/\n", robots_status: int = 200):
        self.hits: collections.Counter[str] = collections.Counter()
        self.robots, self.robots_status = robots, robots_status
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                site.hits[self.path] += 1
                try:
                    site.serve(self, site.hits[self.path])
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def send(
        h,
        status: int,
        body: bytes = b"",
        ctype: str = "text/html; charset=utf-8",
        headers: dict | None = None,
        length: bool = True,
    ):
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if length:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def serve(self, h, hit: int) -> None:
        path = h.path
        if path == "/robots.txt":
            if self.robots is None:
                return self.send(h, 404, b"not found")
            return self.send(h, self.robots_status, self.robots, "text/plain")
        if path == "/":
            return self.send(
                h,
                200,
                page(
                    "a.html",
                    "a.html#section",
                    "private/secret.html",
                    "missing.html",
                    "flaky.html",
                    "broken.html",
                    "busy.html",
                    "data.json",
                    "big.html",
                    "big-stream.html",
                    "loop0",
                    "go",
                    "go2",
                    "slow.html",
                    f"http://localhost:{self.port}/offhost.html",
                    "mailto:someone@example.org",
                    "javascript:void(0)",
                ),
            )
        if path == "/a.html":
            return self.send(h, 200, page("/", "b.html"))
        if path == "/b.html":
            return self.send(h, 200, page("c.html"))
        if path in ("/c.html", "/target.html", "/offhost.html", "/private/secret.html"):
            return self.send(h, 200, page())
        if path == "/flaky.html":
            return self.send(h, 500 if hit == 1 else 200, page())
        if path == "/busy.html":
            return (
                self.send(h, 429, b"slow down", headers={"Retry-After": "0"}) if hit == 1 else self.send(h, 200, page())
            )
        if path == "/broken.html":
            return self.send(h, 500, b"oops")
        if path == "/data.json":
            return self.send(h, 200, b'{"a": 1}', "application/json")
        if path == "/big.html":
            return self.send(h, 200, b"<html>" + b"x" * 200_000)
        if path == "/big-stream.html":  # no Content-Length: only reading tells it is too large
            h.close_connection = True
            return self.send(h, 200, b"<html>" + b"x" * 200_000, length=False)
        if path.startswith("/loop"):
            return self.send(h, 302, headers={"Location": f"/loop{int(path[5:]) + 1}"})
        if path == "/go":
            return self.send(h, 301, headers={"Location": "/target.html"})
        if path == "/go2":
            return self.send(h, 302, headers={"Location": "/a.html"})
        if path == "/slow.html":
            time.sleep(6)
            return self.send(h, 200, page())
        return self.send(h, 404, b"not found")


@pytest.fixture
def site():
    s = Site()
    yield s
    s.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def crawl_cfg(seeds: list[str], **kw) -> ingest.IngestConfig:
    settings = dict(
        seeds=seeds,
        max_depth=2,
        delay_seconds=0.0,
        workers=4,
        timeout_seconds=1.5,
        retries=1,
        backoff_seconds=0.01,
        max_bytes=100_000,
        max_redirects=3,
        allow_private_hosts=["127.0.0.1"],
    )
    settings.update(kw)
    return ingest.IngestConfig(kind="crawl", crawl=settings)


def test_crawl_keeps_good_pages_and_drops_each_failure_with_its_reason(site, tmp_path):
    dead = f"http://127.0.0.1:{closed_port()}/"
    store = Store(tmp_path / "store")
    m = ingest.run(store, crawl_cfg([site.url + "/", dead]))

    kept = read_table(m).to_pylist()
    u = site.url
    assert [r["url"] for r in kept] == [
        f"{u}/",
        f"{u}/a.html",
        f"{u}/flaky.html",
        f"{u}/busy.html",
        f"{u}/target.html",
        f"{u}/b.html",
    ]
    assert {r["source"] for r in kept} == {"crawl"}
    assert all(r["http_status"] == 200 and r["content_type"] == "text/html" and r["charset"] == "utf-8" for r in kept)
    assert kept[1]["body"] == page("/", "b.html")

    dropped = {r["url"]: r["dropped_reason"] for r in read_table(m, "dropped").to_pylist()}
    assert dropped == {
        dead: "connection_error",
        f"{u}/private/secret.html": "robots_disallowed",
        f"{u}/missing.html": "http_404",
        f"{u}/broken.html": "http_500",
        f"{u}/data.json": "not_html",
        f"{u}/big.html": "too_large",
        f"{u}/big-stream.html": "too_large",
        f"{u}/loop0": "too_many_redirects",
        f"{u}/go2": "duplicate_url",
        f"{u}/slow.html": "timeout",
    }
    c = m.counters
    assert (c["docs_in"], c["docs_out"]) == (16, 6)
    assert {r: v["docs"] for r, v in c["dropped"].items()} == collections.Counter(dropped.values())

    # Retries: the flaky and busy pages twice, the broken one retries+1 times; robots.txt obeyed,
    # depth and host limits kept, the fragment link and the seed's back-link not fetched again.
    assert site.hits["/flaky.html"] == 2 and site.hits["/busy.html"] == 2 and site.hits["/broken.html"] == 2
    assert site.hits["/a.html"] == 1 and site.hits["/robots.txt"] == 1
    assert site.hits["/loop0"] == site.hits["/loop3"] == 1 and "/loop4" not in site.hits
    for never in ("/private/secret.html", "/c.html", "/offhost.html"):
        assert never not in site.hits
    assert m.meta["retries"] == 5  # flaky, busy, broken, slow and the dead host's robots.txt, once each
    assert m.meta["body_bytes"] == sum(len(r["body"]) for r in kept)

    # The WARC archive holds a request/response pair per kept page, bodies identical.
    responses, requests = {}, []
    for rec in ArchiveIterator(
        str(m.path(ingest.WARC_NAME)), record_types=WarcRecordType.response | WarcRecordType.request
    ):
        uri = rec.headers.get("WARC-Target-URI")
        if rec.record_type == WarcRecordType.response:
            assert rec.http_headers.status_code == 200
            responses[uri] = rec.reader.read()
        else:
            requests.append(uri)
    assert responses == {r["url"]: r["body"] for r in kept}
    assert sorted(requests) == sorted(responses)


def test_rerun_is_a_cache_hit_and_a_new_snapshot_fetches_again(site, tmp_path):
    store = Store(tmp_path / "store")
    cfg = crawl_cfg([site.url + "/a.html"], max_depth=0)
    first = ingest.run(store, cfg)
    again = ingest.run(store, cfg)
    assert again.key == first.key and again.created_at == first.created_at
    assert site.hits["/a.html"] == 1
    fresh = ingest.run(store, cfg.model_copy(update={"snapshot": "2026-11-23"}))
    assert fresh.key != first.key and site.hits["/a.html"] == 2


def test_robots_5xx_disallows_and_robots_404_allows(tmp_path):
    down = Site(robots=b"", robots_status=503)
    missing = Site(robots=None)
    try:
        store = Store(tmp_path / "store")
        with pytest.raises(ingest.StageError, match="robots_disallowed: 1"):
            ingest.run(store, crawl_cfg([down.url + "/a.html"], max_depth=0, retries=0))
        assert "/a.html" not in down.hits
        assert not (store.root / "ingest").exists() or not any((store.root / "ingest").iterdir())
        m = ingest.run(store, crawl_cfg([missing.url + "/a.html"], max_depth=0))
        assert m.counters["docs_out"] == 1
    finally:
        down.close()
        missing.close()


def test_max_pages_bounds_the_attempts(site, tmp_path):
    m = ingest.run(Store(tmp_path), crawl_cfg([site.url + "/"], max_pages=3))
    assert m.counters["docs_in"] == 3
    assert [r["url"] for r in read_table(m).to_pylist()] == [site.url + "/", site.url + "/a.html"]


def test_normalize_url():
    assert normalize_url("HTTP://Example.COM:80/a b/c?x=1 2#frag") == "http://example.com/a%20b/c?x=1%202"
    assert normalize_url("https://example.com:8443") == "https://example.com:8443/"
    assert normalize_url("https://example.com:443/p%20q") == "https://example.com/p%20q"
    assert normalize_url("mailto:a@b.c") is None
    assert normalize_url("javascript:void(0)") is None
    assert normalize_url("http:///nohost") is None


def test_extract_links_resolves_base_and_dedups():
    html = (
        b'<html><head><base href="/docs/"></head><body><a href="x.html">1</a><a href="x.html#top">2</a>'
        b'<a href="//other.org/y">3</a><a href="mailto:z@z.z">4</a><a>no href</a></body></html>'
    )
    assert extract_links(html, "utf-8", "http://h.org/index.html") == ["http://h.org/docs/x.html", "http://other.org/y"]


def test_media_type_and_config_validation():
    assert media_type([("Content-Type", 'text/HTML; Charset="ISO-8859-1"')]) == ("text/html", "iso-8859-1")
    assert media_type([]) == ("", None)
    with pytest.raises(ValueError, match="not an http"):
        CrawlConfig(seeds=["ftp://example.org/"])
    with pytest.raises(ValueError):
        CrawlConfig(seeds=[])


def test_a_host_asking_for_a_crawl_delay_past_the_cap_is_skipped(tmp_path):
    slow = Site(robots=b"User-agent: *\nCrawl-delay: 120\n")
    try:
        store = Store(tmp_path / "store")
        with pytest.raises(ingest.StageError, match="crawl_delay_too_long: 1"):
            ingest.run(store, crawl_cfg([slow.url + "/a.html"], max_depth=0, max_crawl_delay_seconds=10))
        assert "/a.html" not in slow.hits  # nothing but robots.txt was fetched
    finally:
        slow.close()


@pytest.mark.parametrize("agent", ["lmforge\r\nX-Injected: 1", "bot\n", "", "naïve-bot"])
def test_a_user_agent_that_could_inject_headers_is_a_config_error(agent):
    with pytest.raises(ValueError, match="user_agent"):
        CrawlConfig(user_agent=agent)


class Trickle(Site):
    """A site whose pages arrive a few bytes at a time, each well within a socket timeout."""

    def serve(self, h, hit: int) -> None:
        if h.path == "/robots.txt":
            return self.send(h, 404, b"")
        body = page()
        h.send_response(200)
        h.send_header("Content-Type", "text/html")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for i in range(0, len(body), 2):  # about 20 s for the whole page
            h.wfile.write(body[i : i + 2])
            h.wfile.flush()
            time.sleep(0.1)


def test_a_trickling_server_cannot_hold_a_fetch_past_its_time_limit(tmp_path):
    site = Trickle()
    try:
        started = time.monotonic()
        with pytest.raises(ingest.StageError, match="timeout: 1"):
            ingest.run(
                Store(tmp_path / "store"),
                crawl_cfg([site.url + "/a.html"], max_depth=0, retries=0, timeout_seconds=1.0),
            )
        assert time.monotonic() - started < 8  # the page alone would take about 20 s to arrive
    finally:
        site.close()


def test_normalize_url_gives_one_url_per_page():
    assert normalize_url("http://h.org/a%2fb") == normalize_url("http://h.org/a%2Fb") == "http://h.org/a%2Fb"
    assert normalize_url("http://h.org/%41%7e") == "http://h.org/A~"  # escaped unreserved characters decoded
    assert normalize_url("http://h.org/a/./b/../c") == "http://h.org/a/c"
    assert normalize_url("http://h.org/../../etc") == "http://h.org/etc"
    assert normalize_url("http://h.org/a/b/..") == "http://h.org/a/"
    assert normalize_url("http://[::1]:8080/x") == "http://[::1]:8080/x"
    assert normalize_url("http://[2001:DB8::1]/") == "http://[2001:db8::1]/"


def test_malformed_links_are_skipped_not_fatal():
    html = (
        b'<html><head><base href="http://[bad"></head><body><a href="http://[oops/">1</a><a href="http://[zz]/">2</a>'
        b'<a href="http://h.org:99999/">3</a><a href="/fine.html">4</a></body></html>'
    )
    assert extract_links(html, "utf-8", "http://h.org/") == ["http://h.org/fine.html"]
    assert normalize_url("http://[oops/") is None


def test_a_page_of_200k_links_yields_at_most_the_cap():
    html = b"<html><body>" + b"".join(b'<a href="/p%d">p</a>' % i for i in range(200_000)) + b"</body></html>"
    links = extract_links(html, "utf-8", "http://h.org/", max_links=500)
    assert len(links) == 500 and links[0] == "http://h.org/p0"


def test_a_robots_txt_over_max_bytes_is_read_up_to_the_cap(tmp_path):
    big = Site(robots=b"User-agent: *\nDisallow: /private/\n" + b"# padding\n" * 200_000)  # 2 MB
    try:
        m = ingest.run(Store(tmp_path / "store"), crawl_cfg([big.url + "/"], max_depth=1, max_bytes=1_000_000))
        reasons = {r["url"].removeprefix(big.url): r["dropped_reason"] for r in read_table(m, "dropped").to_pylist()}
        assert reasons.get("/private/secret.html") == "robots_disallowed"
        assert m.counters["docs_out"] >= 1
    finally:
        big.close()


def test_an_ipv6_seed_is_crawled(tmp_path):
    class V6(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = b"" if self.path == "/robots.txt" else page()
            Site.send(self, 404 if self.path == "/robots.txt" else 200, body)

    try:
        server = V6(("::1", 0), Handler)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://[::1]:{server.server_address[1]}/"
        m = ingest.run(Store(tmp_path / "store"), crawl_cfg([url], max_depth=0, allow_private_hosts=["[::1]"]))
        assert [r["url"] for r in read_table(m).to_pylist()] == [url]
    finally:
        server.shutdown()


# --- the address guard and the crawl deadline -------------------------------------------


def dropped_reasons(store: Store, cfg: ingest.IngestConfig) -> dict[str, str]:
    """The crawl's drops by URL, for a crawl that keeps nothing (ingest then refuses to publish)."""
    with pytest.raises(ingest.StageError) as failed:
        ingest.run(store, cfg)
    return failed.value


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "0x7f000001", "[::ffff:127.0.0.1]"])
def test_a_loopback_seed_is_refused_unless_named(site, tmp_path, host):
    url = f"http://{host}:{site.port}/a.html"
    with pytest.raises(ingest.StageError, match="private_address: 1") as failed:
        ingest.run(Store(tmp_path / "store"), crawl_cfg([url], max_depth=0, allow_private_hosts=[]))
    assert "allow_private_hosts" in str(failed.value)
    assert not site.hits  # not even robots.txt was requested


def test_naming_one_host_does_not_allow_its_other_spellings(site, tmp_path):
    """127.0.0.1 is allowed by name; localhost and 2130706433 reach the same address and are refused."""
    urls = [f"http://localhost:{site.port}/a.html", f"http://2130706433:{site.port}/a.html", site.url + "/a.html"]
    m = ingest.run(Store(tmp_path / "store"), crawl_cfg(urls, max_depth=0))
    assert [r["url"] for r in read_table(m).to_pylist()] == [site.url + "/a.html"]
    dropped = {r["url"]: r["dropped_reason"] for r in read_table(m, "dropped").to_pylist()}
    assert dropped == {urls[0]: "private_address", urls[1]: "private_address"}
    assert site.hits["/a.html"] == 1


def test_an_allowed_network_admits_any_host_in_it(site, tmp_path):
    url = f"http://localhost:{site.port}/a.html"
    m = ingest.run(
        Store(tmp_path / "store"),
        crawl_cfg([url], max_depth=0, allow_private_hosts=[], allow_private_networks=["127.0.0.0/8", "::1/128"]),
    )
    assert m.counters["docs_out"] == 1


class RobotsElsewhere(Site):
    """A public-looking site whose robots.txt redirects to an internal service."""

    def __init__(self, target: str):
        self.target = target
        super().__init__()

    def serve(self, h, hit: int) -> None:
        if h.path == "/robots.txt":
            return self.send(h, 302, headers={"Location": self.target})
        return super().serve(h, hit)


def test_a_robots_redirect_cannot_reach_an_internal_host(site, tmp_path):
    """The seed's host is allowed; its robots.txt points at 'localhost' (another name, not allowed)."""
    inside = f"http://localhost:{site.port}/robots.txt"
    outer = RobotsElsewhere(inside)
    try:
        with pytest.raises(ingest.StageError, match="private_address: 1"):
            ingest.run(Store(tmp_path / "store"), crawl_cfg([outer.url + "/a.html"], max_depth=0, retries=0))
        assert not site.hits  # the internal service saw no request
        assert outer.hits["/robots.txt"] == 1 and "/a.html" not in outer.hits
    finally:
        outer.close()


def test_the_checked_address_is_the_one_connected_to(site, tmp_path, monkeypatch):
    """DNS rebinding: the name answers a public address once, loopback afterwards. A guard that
    looked the name up, checked, then let http.client look it up again would reach the loopback
    site; this one resolves once per connection and connects to the address it checked."""
    real = socket.getaddrinfo
    answers = iter(["93.184.216.34"])  # public: passes the check; unreachable from here, or not serving this port

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.example":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers, "127.0.0.1"), port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    url = f"http://rebind.example:{site.port}/a.html"
    with pytest.raises(ingest.StageError):
        ingest.run(
            Store(tmp_path / "store"),
            crawl_cfg([url], max_depth=0, retries=0, timeout_seconds=1.0, allow_private_hosts=[]),
        )
    assert not site.hits


def test_private_address_checks():
    from tasks.text.crawl import address_problem

    for address in ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "::1", "fe80::1",
                    "fd00::1", "::ffff:10.0.0.1", "0.0.0.0", "100.64.0.1", "224.0.0.1"]:  # fmt: skip
        assert address_problem(address), address
    assert address_problem("93.184.216.34") is None and address_problem("2606:4700::1111") is None
    assert address_problem("10.1.2.3", [ipaddress.ip_network("10.0.0.0/8")]) is None


@pytest.mark.parametrize("bad", ["http://intranet", "intranet/x", "a b", "user@host", "127.0.0.1:8731", ""])
def test_allowed_hosts_are_bare_host_names(bad):
    with pytest.raises(ValueError, match="allow_private_hosts"):
        CrawlConfig(allow_private_hosts=[bad])
    assert CrawlConfig(allow_private_hosts=["[::1]", "Intranet.Example"]).allow_private_hosts == [
        "::1",
        "intranet.example",
    ]


class Sleepy(Site):
    """Every page takes a second; robots.txt is quick."""

    def serve(self, h, hit: int) -> None:
        if h.path != "/robots.txt":
            time.sleep(1.0)
        return super().serve(h, hit)


def test_a_crawl_stops_at_its_deadline_and_says_why(tmp_path):
    site = Sleepy()
    try:
        started = time.monotonic()
        m = ingest.run(
            Store(tmp_path / "store"),
            crawl_cfg([site.url + "/"], max_depth=3, workers=1, max_crawl_seconds=2.5, timeout_seconds=5),
        )
        took = time.monotonic() - started
        dropped = collections.Counter(r["dropped_reason"] for r in read_table(m, "dropped").to_pylist())
        assert dropped["crawl_deadline"] >= 5  # the rest of depth 1 was never started
        assert 1 <= m.counters["docs_out"] <= 4
        assert took < 9  # the whole site, one page a second, one worker, would take over 20 s
        assert "b.html" not in str(site.hits)  # depth 2 was never reached
    finally:
        site.close()
