"""`lmforge server`'s API calls retry what Prefect's client retries, and nothing else (against a real local HTTP server)."""

import argparse
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


def test_the_api_is_not_opened_to_the_network_without_a_password():
    assert srv.exposure_problem("127.0.0.1", {}) is None and srv.exposure_problem("::1", {}) is None
    assert srv.exposure_problem("localhost", {}) is None
    assert srv.exposure_problem("0.0.0.0", {"PREFECT_SERVER_API_AUTH_STRING": "admin:pw"}) is None
    for host in ("0.0.0.0", "10.0.0.5", "::", "example.org"):
        assert "PREFECT_SERVER_API_AUTH_STRING" in srv.exposure_problem(host, {})


def test_lmforge_server_refuses_a_public_host_without_auth_before_starting_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    args = argparse_namespace("--host", "0.0.0.0", "--state-dir", str(tmp_path / "state"))
    assert srv.cmd_server(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--host 0.0.0.0" in err and "PREFECT_SERVER_API_AUTH_STRING" in err
    assert not (tmp_path / "state" / "logs").exists()


def test_workers_and_training_children_get_no_server_secrets():
    from model.launch import child_environment

    env = {
        "PREFECT_SERVER_API_AUTH_STRING": "admin:pw",
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": "postgresql+asyncpg://u:p@h/db",
        "PREFECT_API_AUTH_STRING": "admin:pw",
        "PREFECT_API_URL": "http://127.0.0.1:4200/api",
        "PATH": "/usr/bin",
    }
    worker = srv.worker_env(env)
    assert worker == {k: env[k] for k in ("PREFECT_API_AUTH_STRING", "PREFECT_API_URL", "PATH")}
    secrets = {
        "AWS_SECRET_ACCESS_KEY": "x",
        "HF_TOKEN": "y",
        "PREFECT_API_KEY": "z",
        "PGPASSWORD": "p",
        "OPENAI_API_KEY": "k",
    }
    child = child_environment({**worker, **secrets})
    assert child == {"PREFECT_API_URL": "http://127.0.0.1:4200/api", "PATH": "/usr/bin"}
    server_env = srv.server_env(argparse_namespace("--port", "4200"))
    assert server_env["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1:4200,http://localhost:4200"


def argparse_namespace(*argv: str):
    """``lmforge server`` arguments, as the command line parses them."""
    parser = argparse.ArgumentParser()
    srv.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["server", *argv])
