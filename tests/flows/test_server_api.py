"""`lmforge server`'s API calls retry what Prefect's client retries, and nothing else (against a real local HTTP server)."""

import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flows import server as srv


class Flaky(BaseHTTPRequestHandler):
    """Answers ``/busy-N`` with 503 N times, then 200; ``/missing`` with 404."""

    counts: dict[str, int] = {}

    def do_GET(self):
        n = self.counts[self.path] = self.counts.get(self.path, 0) + 1
        if self.path == "/missing":
            status = 404
        else:
            status = 503 if n <= int(self.path.rsplit("-", 1)[1]) else 200
        body = b'{"ok": true}' if status == 200 else b'{"exception_message": "Service Unavailable"}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def url():
    Flaky.counts = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_a_busy_database_answer_is_retried_until_it_succeeds(url):
    assert srv.open_retrying(urllib.request.Request(url + "/busy-3"), timeout=5, backoff=0.0) == (200, b'{"ok": true}')
    assert Flaky.counts["/busy-3"] == 4
    assert srv.api_call({"PREFECT_API_URL": url}, "/busy-1") == {"ok": True}  # one 0.5 s wait
    assert Flaky.counts["/busy-1"] == 2


def test_retries_stop_after_six_attempts(url):
    with pytest.raises(urllib.error.HTTPError) as e:
        srv.open_retrying(urllib.request.Request(url + "/busy-10"), timeout=5, backoff=0.0)
    assert e.value.code == 503 and Flaky.counts["/busy-10"] == 6


def test_other_errors_are_not_retried(url):
    with pytest.raises(urllib.error.HTTPError) as e:
        srv.api_call({"PREFECT_API_URL": url}, "/missing")
    assert e.value.code == 404 and Flaky.counts["/missing"] == 1
