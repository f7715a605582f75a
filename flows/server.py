"""``lmforge server``: a Prefect server, its work pools, lmforge's deployments and workers, in one command.

What it starts, in order, and why:

1. ``prefect server start`` on ``--host``/``--port``, with ``PREFECT_HOME`` in the state
   directory, so the embedded SQLite database (``prefect.db``) lives with the project,
   not in a home directory by accident. ``PREFECT_SERVER_DATABASE_CONNECTION_URL``
   (PostgreSQL), ``PREFECT_SERVER_API_AUTH_STRING`` (basic auth) and every other Prefect
   setting pass through from the environment.
2. It waits for ``/api/health``, then creates the ``cpu`` and ``gpu`` process work
   pools if they are missing.
3. ``prefect deploy --all --prefect-file deployments/prefect.yaml`` from the project
   root: the YAML file is the one description of the deployments, whoever deploys.
   A deployment left paused (``serve()`` pauses its deployment on shutdown, and a later
   deploy keeps it paused) is resumed, so the nightly schedule really runs.
4. A worker on the ``cpu`` pool, and one on the ``gpu`` pool when this host has a GPU
   (or ``--gpu-worker``). Workers inherit this process's environment, less the server's
   secrets (its auth string and database URL: :func:`worker_env`): the result storage
   (``PREFECT_RESULTS_LOCAL_STORAGE_PATH``, default ``<store>/_prefect_results`` of the
   ``--config`` profile, where ``lmforge run`` keeps them too, so a run from the UI
   finds the cache records of one from the command line and shows its stages Cached), the profile
   the forms default to (``LMFORGE_CONFIG``), and the API address and credentials.

Every child runs in its own process group and carries ``LMFORGE_SERVER_ID`` in its
environment. On Ctrl-C (SIGINT) or SIGTERM the workers get SIGINT (Prefect's graceful
stop), then the server; anything still alive after the grace period that carries our
id, flow-run processes and torchrun workers included, is killed. Nothing is left behind.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from flows.environment import store_of

ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
POOLS = ("cpu", "gpu")
SERVER_ID_ENV = "LMFORGE_SERVER_ID"
AUTOMATIONS = {  # command-line switch -> the variable that turns its automation on in prefect.yaml
    "train_on_refresh": "LMFORGE_TRAIN_ON_REFRESH",
    "finetune_on_pretrain": "LMFORGE_FINETUNE_ON_PRETRAIN",
    "release_on_finetune": "LMFORGE_RELEASE_ON_FINETUNE",
    "deploy_on_release": "LMFORGE_DEPLOY_ON_RELEASE",
}


class ServerError(RuntimeError):
    """The server or one of its parts could not be started; the message says which and why."""


@dataclass
class Supervisor:
    """The child processes of one ``lmforge server``, and how to stop all of them."""

    env: dict[str, str]
    logs: Path
    server_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    children: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**(self.env if env is None else env), SERVER_ID_ENV: self.server_id},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.children[name] = proc
        return proc

    def prefect(self, *args: str, timeout: float = 300) -> str:
        """Run one Prefect CLI command against the server; its output, or a ServerError."""
        cmd = [sys.executable, "-m", "prefect", "--no-prompt", *args]
        done = subprocess.run(
            cmd,
            cwd=ROOT,
            env={**self.env, SERVER_ID_ENV: self.server_id},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise ServerError(
                f"`prefect {' '.join(args)}` failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        return done.stdout

    def stop(self, grace: float = 20.0) -> None:
        """Workers first (graceful SIGINT), then the server, then any stray descendant."""
        order = sorted(self.children, key=lambda n: n == "server")
        for name in order:
            proc = self.children[name]
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGINT if name != "server" else signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()
        for pid in processes_with_env(SERVER_ID_ENV, self.server_id):
            _signal_group(pid, signal.SIGKILL)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs of live processes whose environment has ``name=value`` (Linux /proc)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of the server, the deploy step and the workers."""
    state = Path(args.state_dir).expanduser().resolve()
    config = Path(args.config).expanduser().resolve()
    api = f"http://{args.host}:{args.port}/api"
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(state),
            "PREFECT_API_URL": api,
            "PREFECT_SERVER_API_HOST": args.host,
            "PREFECT_SERVER_API_PORT": str(args.port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "LMFORGE_CONFIG": str(config),
            "LMFORGE_ROOT": str(ROOT),
            "LMFORGE_TIMEZONE": args.timezone,
            **{env: "true" if (args.chain or getattr(args, flag)) else "false" for flag, env in AUTOMATIONS.items()},
        }
    )
    # Beside the artifacts, as `lmforge run` does: one storage root to share with other hosts,
    # and the UI's runs and the command line's see each other's cache records.
    env.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(store_of(config, relative_to=ROOT) / "_prefect_results"))
    env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lmforge")
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "5")
    env.setdefault("LMFORGE_GPU_DEVICES", "0")
    if env.get("PREFECT_SERVER_API_AUTH_STRING"):
        env.setdefault("PREFECT_API_AUTH_STRING", env["PREFECT_SERVER_API_AUTH_STRING"])
    # The UI is served from the API's own origin: no other site's pages may call the API.
    # On loopback both spellings of this machine are that origin.
    origins = [api.removesuffix("/api")]
    if is_loopback(args.host):
        origins += [f"http://{name}:{args.port}" for name in ("127.0.0.1", "localhost") if name != args.host]
    env.setdefault("PREFECT_SERVER_CORS_ALLOWED_ORIGINS", ",".join(origins))
    # A page on another origin cannot forge a state-changing request: Prefect's UI and
    # client fetch a per-client token first (so does api_call).
    env.setdefault("PREFECT_SERVER_CSRF_PROTECTION_ENABLED", "true")
    return env


SERVER_SECRETS = ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_SERVER_DATABASE_CONNECTION_URL")
"""What only the server needs: workers and the flow runs they start never see them (they
authenticate with ``PREFECT_API_AUTH_STRING``, and never touch the database)."""


def worker_env(env: dict[str, str]) -> dict[str, str]:
    """A worker's environment: the server's, less the server's secrets."""
    return {k: v for k, v in env.items() if k not in SERVER_SECRETS and not k.startswith("PREFECT_SERVER_DATABASE_")}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback name or address (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(host: str, env: dict[str, str]) -> str | None:
    """Why listening on ``host`` would be unsafe with this environment, or None.

    Prefect's process worker runs whatever a deployment run asks for, so whoever reaches
    the API runs code on the workers: beyond loopback, the API needs a password.
    """
    if is_loopback(host) or env.get("PREFECT_SERVER_API_AUTH_STRING"):
        return None
    return (
        f"--host {host} would open the Prefect API (which runs code on the workers) to the network without a password: "
        "set PREFECT_SERVER_API_AUTH_STRING=user:password, or keep the default --host 127.0.0.1"
    )


RETRYABLE_STATUS = (429, 502, 503)


def open_retrying(
    req: urllib.request.Request, timeout: float, attempts: int = 6, backoff: float = 0.5
) -> tuple[int, bytes]:
    """(status, body) of ``req``, retrying the answers Prefect's own client retries.

    On SQLite the server answers 503 when a write transaction loses a race
    (``SQLITE_BUSY_SNAPSHOT`` fails at once, whatever the busy timeout); the request
    was rolled back, so sending it again is safe. Waits ``backoff`` seconds, doubling up
    to 8 s: 15.5 s in all by default.
    """

    def send() -> tuple[int, bytes]:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()

    for attempt in range(attempts - 1):
        try:
            return send()
        except urllib.error.HTTPError as e:
            if e.code not in RETRYABLE_STATUS:
                raise
        time.sleep(min(backoff * 2**attempt, 8.0))
    return send()


def api_call(env: dict[str, str], path: str, body: dict | None = None, timeout: float = 10.0):
    """GET (or POST ``body``) ``<PREFECT_API_URL><path>`` with the client's basic-auth credentials; JSON back.

    A POST carries a CSRF token (:func:`csrf_headers`) when the server asks for one.
    """
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(env["PREFECT_API_URL"] + path, data=data, headers={"Content-Type": "application/json"})
    for name, value in {**auth_headers(env), **(csrf_headers(env) if data is not None else {})}.items():
        req.add_header(name, value)
    return json.loads(open_retrying(req, timeout)[1] or b"null")


def auth_headers(env: dict[str, str]) -> dict[str, str]:
    """The basic-auth header for ``PREFECT_API_AUTH_STRING``, or none."""
    auth = env.get("PREFECT_API_AUTH_STRING")
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}


CSRF_CLIENT = f"lmforge-{os.getpid()}-{secrets.token_hex(4)}"


def csrf_headers(env: dict[str, str], client: str = CSRF_CLIENT) -> dict[str, str]:
    """``Prefect-Csrf-Token`` / ``Prefect-Csrf-Client`` for one state-changing request, as
    Prefect's own client sends them: a fresh token from ``GET /csrf-token?client=...``
    (tokens expire; these calls are few). None needed when the server has CSRF off (422)."""
    req = urllib.request.Request(f"{env['PREFECT_API_URL']}/csrf-token?client={client}")
    for name, value in auth_headers(env).items():
        req.add_header(name, value)
    try:
        token = json.loads(open_retrying(req, 10.0)[1])["token"]
    except urllib.error.HTTPError as e:
        if e.code == 422:  # "CSRF protection is disabled"
            return {}
        raise
    return {"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": client}


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something else holds: its health check would answer for our server."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServerError(
                f"{host}:{port} is in use ({e.strerror}): another lmforge server? Stop it or pass --port"
            ) from None


def wait_healthy(sup: Supervisor, timeout: float) -> float:
    """Seconds until ``/api/health`` answers; a ServerError naming the log if it never does."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        proc = sup.children["server"]
        if proc.poll() is not None:
            raise ServerError(f"the Prefect server exited with code {proc.returncode}; see {sup.logs / 'server.log'}")
        try:
            if api_call(sup.env, "/health") is True:
                return time.monotonic() - t0
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    raise ServerError(f"the Prefect server was not healthy after {timeout:.0f}s; see {sup.logs / 'server.log'}")


def wait_worker_online(sup: Supervisor, pool: str, name: str, timeout: float) -> None:
    """Block until the worker has sent its first heartbeat: "ready" means runs get picked up."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        proc = sup.children[f"worker-{pool}"]
        if proc.poll() is not None:
            raise ServerError(
                f"the {pool} worker exited with code {proc.returncode}; see {sup.logs / f'worker-{pool}.log'}"
            )
        workers = api_call(sup.env, f"/work_pools/{pool}/workers/filter", {})
        if any(w["name"] == name and w["status"] == "ONLINE" for w in workers):
            return
        time.sleep(1)
    raise ServerError(
        f"the {pool} worker did not come online within {timeout:.0f}s; see {sup.logs / f'worker-{pool}.log'}"
    )


def ensure_pools(sup: Supervisor) -> None:
    """Create the missing work pools (the CLI fills in the process type's job template)."""
    existing = {p["name"] for p in api_call(sup.env, "/work_pools/filter", {})}
    for pool in POOLS:
        if pool not in existing:
            sup.prefect("work-pool", "create", pool, "--type", "process")


def deploy(sup: Supervisor) -> list[str]:
    """Register deployments/prefect.yaml; resume any paused deployment; return their names."""
    sup.prefect("deploy", "--all", "--prefect-file", str(PREFECT_FILE))
    return resume_paused(sup.env)


def resume_paused(env: dict[str, str]) -> list[str]:
    """Resume every paused deployment (over the REST API: no Prefect client state in this process)."""
    names = []
    for d in api_call(env, "/deployments/filter", {}):
        if d["paused"]:
            api_call(env, f"/deployments/{d['id']}/resume_deployment", {})
        flow = api_call(env, f"/flows/{d['flow_id']}")
        names.append(f"{flow['name']}/{d['name']}")
    return sorted(names)


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def cmd_server(args: argparse.Namespace) -> int:
    env = server_env(args)
    problem = exposure_problem(args.host, env)
    if problem:
        print(f"lmforge server: {problem}", file=sys.stderr)
        return 2
    state = Path(env["PREFECT_HOME"])
    (state / "logs").mkdir(parents=True, exist_ok=True)
    if not Path(env["LMFORGE_CONFIG"]).is_file():
        print(f"lmforge server: config {env['LMFORGE_CONFIG']} not found", file=sys.stderr)
        return 2
    sup = Supervisor(env, state / "logs")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then
    # leaves it ignored; `kill -INT` must still stop everything, like Ctrl-C does.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        check_port_free(args.host, args.port)
        sup.start(
            "server",
            [sys.executable, "-m", "prefect", "server", "start", "--host", args.host, "--port", str(args.port)],
        )
        print(f"lmforge server: starting Prefect at {env['PREFECT_API_URL']} (state in {state})", flush=True)
        print(f"lmforge server: healthy after {wait_healthy(sup, args.startup_timeout):.1f}s", flush=True)
        ensure_pools(sup)
        names = deploy(sup)
        print(f"lmforge server: deployments {', '.join(names)} (defaults from {env['LMFORGE_CONFIG']})", flush=True)
        pools = ["cpu"] + (["gpu"] if args.gpu_worker or (args.gpu_worker is None and has_gpu()) else [])
        for pool in pools:
            name = f"lmforge-{pool}-{os.uname().nodename}"
            sup.start(
                f"worker-{pool}",
                [
                    sys.executable,
                    "-m",
                    "prefect",
                    "worker",
                    "start",
                    "--pool",
                    pool,
                    "--type",
                    "process",
                    "--name",
                    name,
                ],
                env=worker_env(env),
            )
            wait_worker_online(sup, pool, name, args.startup_timeout)
        print(f"lmforge server: workers on pool(s) {', '.join(pools)}; logs in {sup.logs}", flush=True)
        ui = env["PREFECT_API_URL"].removesuffix("/api")
        print(f"lmforge server: ready. Open the UI at {ui}  (Ctrl-C stops everything)", flush=True)
        while True:
            for name, proc in sup.children.items():
                if proc.poll() is not None:
                    raise ServerError(f"{name} exited with code {proc.returncode}; see {sup.logs / (name + '.log')}")
            time.sleep(1)
    except KeyboardInterrupt:
        print("lmforge server: stopping workers and server...", flush=True)
        return 0
    except (ServerError, subprocess.TimeoutExpired) as e:
        print(f"lmforge server: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        sup.stop()
        print("lmforge server: stopped", flush=True)


def add_parser(sub) -> None:
    s = sub.add_parser("server", help="start a Prefect server with lmforge's work pools, deployments and workers")
    s.add_argument("--host", default="127.0.0.1", help="address the server listens on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=4200, help="port of the UI and API (default 4200)")
    s.add_argument(
        "--config", default=str(ROOT / "configs" / "demo.yaml"), help="profile every deployment's form defaults to"
    )
    s.add_argument(
        "--state-dir",
        default=str(ROOT / ".lmforge" / "prefect"),
        help="PREFECT_HOME: the SQLite database, results and logs",
    )
    s.add_argument(
        "--timezone",
        default=os.environ.get("LMFORGE_TIMEZONE", "UTC"),
        help="time zone of the nightly schedule (e.g. Europe/Berlin)",
    )
    s.add_argument(
        "--gpu-worker",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start a worker on the gpu pool (default: only when this host has a GPU)",
    )
    s.add_argument(
        "--train-on-refresh",
        action="store_true",
        help="turn on the automation that pretrains when a nightly refresh publishes new data",
    )
    s.add_argument("--finetune-on-pretrain", action="store_true", help="turn on the automation pretrain -> finetune")
    s.add_argument("--release-on-finetune", action="store_true", help="turn on the automation finetune -> release")
    s.add_argument(
        "--deploy-on-release", action="store_true", help="turn on the automation release -> deploy-if-better"
    )
    s.add_argument(
        "--chain",
        action="store_true",
        help="turn on all four: nightly refresh -> pretrain -> finetune -> release -> deploy-if-better",
    )
    s.add_argument("--startup-timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    s.set_defaults(fn=cmd_server)
