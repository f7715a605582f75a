"""Operating lmforge as its users do: `lmforge server`, its deployments, and a person at a browser.

One `lmforge server` serves the whole module (starting it is the expensive part: the
Prefect server, the work pools, `prefect deploy`, a worker), with basic auth on, on a
free loopback port, its database a real PostgreSQL that the module starts (the
database a team's server runs on; the kill -9 test keeps the default SQLite), against a
generated site and configs/smoke.yaml. The tests run in file order, each building on the
state the last one left:

1. the deployments, schedules, parameter forms and basic auth, read through the API, and
   the runs' records in PostgreSQL;
2. the automation chain, switched on: a nightly refresh that publishes a dataset starts
   pretraining on it, which starts finetuning, then a release, then a deploy that
   promotes the first model; a second nightly refresh finds nothing new and starts nothing;
3. in Debian's chromium (Playwright): log in, start a custom run of deploy/cpu from
   the form with a changed parameter, wait for Completed, read the funnel artifact and
   the deploy decision (the promoted model is kept, and the artifact says why);
4. a run with a changed filter threshold (and a 3-step pretraining) reruns filter and what
   follows, nothing before; made to fail at finetune (the file switch
   LMFORGE_FAIL_STAGE_FILE), retried with the UI's Retry button, it ends Completed with
   every stage before finetune Cached, and its deploy refuses the worse model; then
   `lmforge run` of the same profile from the command line finds every stage Cached (the
   server keeps Prefect's cache records in the store, where the command line does);
5. Ctrl-C stops everything: no process that carries the server's PREFECT_HOME is left.

Screenshots of every browser step go to test-output/browser/ (kept after the run).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from flows.server import csrf_headers, open_retrying, processes_with_env
from tests.e2e.site import build_site, serve
from tests.ports import free_port
from tests.postgres import query, running_postgres

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "test-output" / "browser"
AUTH = "lmforge:test-secret"
TIMEZONE = "Europe/Berlin"
DEPLOYMENTS = {
    "data-refresh/nightly",
    "pretrain/gpu",
    "finetune/gpu",
    "release/cpu",
    "deploy/cpu",
    "pipeline/full",
}
CHAIN = {  # automation -> (the event it follows, the deployment it starts, its parameter, from the payload's)
    "pretrain-on-new-data": ("lmforge.dataset.published", "pretrain/gpu", "dataset", "dataset"),
    "finetune-on-pretrain": ("lmforge.model.pretrained", "finetune/gpu", "base_model", "model"),
    "release-on-finetune": ("lmforge.model.finetuned", "release/cpu", "model", "model"),
    "deploy-on-release": ("lmforge.release.exported", "deploy/cpu", "release", "export"),
}
CHROMIUM = "/usr/bin/chromium"

pytestmark = pytest.mark.slow


@dataclass
class Operated:
    """The running `lmforge server` and what the tests need to reach and steer it."""

    proc: subprocess.Popen
    ui: str
    state: Path
    store: Path
    config: dict
    fail_switch: Path
    database: str
    output: list[str] = field(default_factory=list)
    chain_pretrain_run: str | None = None  # the flow run the automation chain pretrained in

    def api(
        self, path: str, body: dict | None = None, method: str | None = None, auth: str | None = AUTH, csrf: bool = True
    ):
        """(HTTP status, JSON body) of one API call; a state-changing one with a CSRF token, as the UI sends it."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.ui}/api{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        if auth and csrf and (method or ("POST" if data is not None else "GET")) != "GET":
            env = {"PREFECT_API_URL": f"{self.ui}/api", "PREFECT_API_AUTH_STRING": auth}
            for name, value in csrf_headers(env).items():
                req.add_header(name, value)
        try:
            status, raw = open_retrying(req, timeout=30)  # a 503 (SQLite busy) is retried, as Prefect's client does
            return status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            return e.code, None

    def ok(self, path: str, body: dict | None = None, method: str | None = None):
        status, out = self.api(path, body, method)
        assert 200 <= status < 300, (path, status)
        return out

    def deployment(self, name: str) -> dict:
        flow_name, dep_name = name.split("/")
        found = self.ok(
            "/deployments/filter",
            {"flows": {"name": {"any_": [flow_name]}}, "deployments": {"name": {"any_": [dep_name]}}},
        )
        assert len(found) == 1, name
        return found[0]

    def flow_runs(self, deployment: dict, **flow_run_filter) -> list[dict]:
        return self.ok(
            "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}}, "flow_runs": flow_run_filter}
        )

    def wait_for_state(self, run_id: str, states: set[str], timeout: float = 600, entered_after: str = "") -> dict:
        """The run once it is in one of ``states`` (entered after ``entered_after``, an ISO time, if given:
        a retried run is still in its old Failed state for a moment after the click)."""
        t0 = time.monotonic()
        after = dt.datetime.fromisoformat(entered_after) if entered_after else None
        while time.monotonic() - t0 < timeout:
            run = self.ok(f"/flow_runs/{run_id}")
            entered = dt.datetime.fromisoformat(run["state"]["timestamp"]) if run.get("state") else None
            if run["state_name"] in states and (after is None or (entered is not None and entered > after)):
                return run
            assert self.proc.poll() is None, "lmforge server died:\n" + "\n".join(self.output[-30:])
            time.sleep(2)
        raise AssertionError(f"flow run {run_id} not in {states} after {timeout}s: {run['state_name']}")

    def task_runs_since(self, since: str) -> dict[str, str]:
        """Stage name -> state of the task runs started after ``since`` (ISO time)."""
        runs = self.ok(
            "/task_runs/filter", {"task_runs": {"start_time": {"after_": since}}, "sort": "EXPECTED_START_TIME_ASC"}
        )
        return {r["name"].rsplit("-", 1)[0]: r["state_name"] for r in runs}


def _own_prefect_env() -> dict[str, str]:
    """This environment less the tests' Prefect API and result settings: the child picks its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "PREFECT_RESULTS_"))}


@pytest.fixture(scope="module")
def database():
    with running_postgres() as url:
        yield url


@pytest.fixture(scope="module")
def operated(tmp_path_factory, database):
    tmp = tmp_path_factory.mktemp("operate")
    build_site(tmp / "site")
    site, url = serve(tmp / "site")
    config = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    config["store"] = str(tmp / "store")
    config["ingest"]["crawl"]["seeds"] = [url]
    (tmp / "smoke.yaml").write_text(yaml.safe_dump(config))
    port = free_port()
    env = _own_prefect_env()
    env.update(
        {
            "PREFECT_SERVER_API_AUTH_STRING": AUTH,
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": database,
            "LMFORGE_FAIL_STAGE_FILE": str(tmp / "fail-stage"),
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
            "PREFECT_WORKER_QUERY_SECONDS": "2",  # a run started from the UI waits less for the worker
        }
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "server",
            "--port",
            str(port),
            "--state-dir",
            str(tmp / "state"),
            "--config",
            str(tmp / "smoke.yaml"),
            "--timezone",
            TIMEZONE,
            "--gpu-worker",  # the chain's pretrain and finetune runs go to the gpu pool
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As a shell starts a background job: SIGINT ignored. `kill -INT` must still stop it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    op = Operated(proc, f"http://127.0.0.1:{port}", tmp / "state", tmp / "store", config, tmp / "fail-stage", database)
    ready = threading.Event()

    def read_output() -> None:
        for line in proc.stdout:
            op.output.append(line.rstrip())
            if "lmforge server: ready." in line:
                ready.set()

    threading.Thread(target=read_output, daemon=True).start()
    t0 = time.monotonic()
    while not ready.wait(1):
        assert proc.poll() is None and time.monotonic() - t0 < 300, "lmforge server did not get ready:\n" + "\n".join(
            op.output[-40:]
        )
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield op
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(120)
        site.shutdown()


# --- 1. through the API -------------------------------------------------------------------


def test_deployments_land_on_their_pools_and_are_not_paused(operated):
    names = set()
    for d in operated.ok("/deployments/filter", {}):
        flow = operated.ok(f"/flows/{d['flow_id']}")
        names.add(f"{flow['name']}/{d['name']}")
        assert not d["paused"], d["name"]
        assert d["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        assert d["job_variables"]["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "lmforge"  # stage logs reach the UI
        if d["name"] == "gpu":
            assert d["work_pool_name"] == "gpu"
            assert d["global_concurrency_limit"]["limit"] == 1  # at most one GPU run at a time
            assert d["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == "0"
        else:
            assert d["work_pool_name"] == "cpu"
    assert names == DEPLOYMENTS
    pools = {p["name"]: p["type"] for p in operated.ok("/work_pools/filter", {})}
    assert pools.items() >= {"cpu": "process", "gpu": "process"}.items()
    # Without a GPU on this host only the cpu pool has a worker.
    workers = operated.ok("/work_pools/cpu/workers/filter", {})
    assert [w["status"] for w in workers] == ["ONLINE"]


def test_the_server_keeps_its_state_in_postgresql(operated):
    """Deployments, work pools and scheduled runs are rows of the PostgreSQL database; no SQLite file appears."""
    [(deployments,)] = query(operated.database, "SELECT count(*) FROM deployment")
    assert int(deployments) == len(DEPLOYMENTS)
    pools = {name for (name,) in query(operated.database, "SELECT name FROM work_pool")}
    assert {"cpu", "gpu"} <= pools
    assert not list(operated.state.glob("*.db")), "the server wrote a SQLite database beside PostgreSQL"


def test_nightly_schedule_is_active_and_creates_runs_at_two_in_its_time_zone(operated):
    nightly = operated.deployment("data-refresh/nightly")
    [schedule] = nightly["schedules"]
    assert (
        schedule["active"]
        and schedule["schedule"]["cron"] == "0 2 * * *"
        and schedule["schedule"]["timezone"] == TIMEZONE
    )
    assert nightly["parameters"] == {"incremental": True}
    t0 = time.monotonic()
    while not (runs := operated.flow_runs(nightly, state={"type": {"any_": ["SCHEDULED"]}})):
        assert time.monotonic() - t0 < 120, "the scheduler created no run for the nightly deployment"
        time.sleep(3)
    starts = sorted(dt.datetime.fromisoformat(r["expected_start_time"]).astimezone(ZoneInfo(TIMEZONE)) for r in runs)
    assert all((s.hour, s.minute) == (2, 0) for s in starts), starts
    assert starts[0] > dt.datetime.now(dt.timezone.utc)
    assert all(b - a == dt.timedelta(days=1) for a, b in zip(starts, starts[1:]))


def _properties(schema: dict, node: dict, path: str):
    """Every (dotted path, property) of a JSON schema, following $ref into definitions."""
    if "$ref" in node:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]]
    for options in node.get("anyOf", []) + node.get("allOf", []):
        yield from _properties(schema, options, path)
    for name, prop in node.get("properties", {}).items():
        yield f"{path}.{name}", prop
        yield from _properties(schema, prop, f"{path}.{name}")


def test_every_parameter_has_a_description_and_the_profile_default(operated):
    for name in DEPLOYMENTS:
        schema = operated.deployment(name)["parameter_openapi_schema"]
        props = list(_properties(schema, schema, name))
        assert len(props) > 100, name  # every stage's settings, nested
        undocumented = [p for p, prop in props if not prop.get("description")]
        assert not undocumented, undocumented
        default = schema["properties"]["config"]["default"]
        assert default["store"] == operated.config["store"] and default["name"] == "smoke"


def test_basic_auth_and_csrf_guard_the_api_but_not_the_health_check(operated):
    dep = operated.deployment("pipeline/full")
    assert operated.api(f"/deployments/{dep['id']}", auth=None)[0] == 401
    assert operated.api(f"/deployments/{dep['id']}", auth="lmforge:wrong")[0] == 401
    assert operated.api("/csrf-token?client=x", auth=None)[0] == 401  # no token without the credentials
    # CSRF protection is on: a state-changing request without the per-client token is refused
    # (Prefect checks it before the credentials: without either, the answer is 403).
    assert operated.api("/deployments/filter", {}, csrf=False)[0] == 403
    assert operated.api("/deployments/filter", {}, auth=None)[0] in (401, 403)
    assert operated.api("/deployments/filter", {})[0] == 200
    assert operated.api("/health", auth=None) == (200, True)


# --- 2. the automation chain: nightly refresh -> pretrain -> finetune -> release -> deploy ------


def _chain_runs(operated: Operated, since: str, links: list[str], timeout: float = 600) -> dict[str, dict]:
    """The run each automation in ``links`` started after ``since``, each waited for until Completed."""
    runs: dict[str, dict] = {}
    t0 = time.monotonic()
    for name in links:
        deployment = CHAIN[name][1]
        dep = operated.deployment(deployment)
        while not (started := operated.flow_runs(dep, expected_start_time={"after_": since})):
            assert time.monotonic() - t0 < timeout, f"{name} started nothing:\n" + "\n".join(operated.output[-20:])
            time.sleep(2)
        [runs[name]] = started
        runs[name] = operated.wait_for_state(runs[name]["id"], {"Completed", "Failed", "Crashed"}, timeout)
        assert runs[name]["state_name"] == "Completed", (name, runs[name]["state"])
    return runs


def test_the_automation_chain_ends_in_a_promotion(operated):
    from storage import promotions
    from storage.artifact import Store

    automations = {a["name"]: a for a in operated.ok("/automations/filter", {})}
    assert set(automations) == set(CHAIN)
    for name, (event, deployment, parameter, payload) in CHAIN.items():
        a = automations[name]
        assert a["enabled"] is False and a["trigger"]["expect"] == [event], a  # opt-in, one switch each
        assert a["actions"][0]["deployment_id"] == operated.deployment(deployment)["id"]
        assert a["actions"][0]["parameters"] == {parameter: "{{ event.payload.%s }}" % payload}
        operated.ok(f"/automations/{a['id']}", {"enabled": True}, method="PATCH")
    nightly = operated.deployment("data-refresh/nightly")
    try:
        began = _now()
        first = operated.ok(f"/deployments/{nightly['id']}/create_flow_run", {})
        assert operated.wait_for_state(first["id"], {"Completed", "Failed", "Crashed"})["state_name"] == "Completed"
        # The crawl showed a progress bar, which ended at 100%.
        progress = operated.ok(
            "/artifacts/filter",
            {"artifacts": {"key": {"any_": ["ingest-progress"]}, "flow_run_id": {"any_": [first["id"]]}}},
        )
        assert [a["data"] for a in progress] == [100.0], progress
        runs = _chain_runs(operated, began, list(CHAIN))
        dataset = runs["pretrain-on-new-data"]["parameters"]["dataset"]
        assert re.fullmatch(r"shards/[0-9a-f]+", dataset) and (operated.store / dataset / "manifest.json").exists()
        for name, (_, _, parameter, _) in CHAIN.items():
            assert re.fullmatch(r"[a-z]+/[0-9a-f]+", runs[name]["parameters"][parameter]), runs[name]["parameters"]
        operated.chain_pretrain_run = runs["pretrain-on-new-data"]["id"]
        store = Store(operated.store)
        [promoted] = promotions.ledger(store, "smoke")
        assert promoted.action == "promote" and promoted.export == runs["deploy-on-release"]["parameters"]["release"]
        assert promoted.lineage["dataset"] == dataset and runs["deploy-on-release"]["id"] in promoted.run
        # The chain's runs are rows of the server's PostgreSQL database, Completed there too.
        ids = ", ".join(f"'{r['id']}'" for r in runs.values())
        states = query(operated.database, f"SELECT state_type FROM flow_run WHERE id IN ({ids})")
        assert sorted(states) == [("COMPLETED",)] * len(CHAIN)

        # Unchanged site: the next nightly run publishes nothing and starts nothing.
        pretrain = operated.deployment("pretrain/gpu")
        second = operated.ok(f"/deployments/{nightly['id']}/create_flow_run", {})
        assert operated.wait_for_state(second["id"], {"Completed", "Failed", "Crashed"})["state_name"] == "Completed"
        time.sleep(10)
        assert [r["id"] for r in operated.flow_runs(pretrain)] == [operated.chain_pretrain_run]

    finally:
        for a in automations.values():
            operated.ok(f"/automations/{a['id']}", {"enabled": False}, method="PATCH")


# --- 3-4. in a real browser ------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield b
        b.close()


@pytest.fixture
def page(browser, operated):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(operated.ui + "/deployments")
    page.get_by_placeholder("admin:pass").fill(AUTH)  # basic auth: the UI asks for the credentials once
    page.get_by_role("button", name="Login").click()
    page.get_by_text(f"{len(DEPLOYMENTS)} Deployments").wait_for()
    yield page
    context.close()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _form_field(page, label: str):
    """The input of one field of a deployment's parameter form, by its label."""
    page.get_by_text(label, exact=True).first.wait_for()
    labels = page.locator(".schema-form-property__label", has_text=re.compile(f"^{re.escape(label)}$"))
    assert labels.count() == 1, f"{labels.count()} form fields are labelled {label!r}"
    prop = labels.locator(
        "xpath=ancestor::div[contains(concat(' ', normalize-space(@class), ' '), ' schema-form-property ')][1]"
    )
    return prop.locator("input, textarea").first


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def test_custom_run_of_deploy_from_the_form_completes_and_says_what_it_decided(operated, page):
    """deploy/cpu from its form with one changed parameter: the release is rebuilt from cache (only the
    evaluation, whose generations got shorter, runs again), it is the model the chain promoted, and the
    run's page shows the data funnel and the deploy decision with its reason."""
    dep = operated.deployment("deploy/cpu")
    page.goto(f"{operated.ui}/deployments/deployment/{dep['id']}")
    page.get_by_text("Entrypoint").wait_for()
    _shot(page, "01-deployment-deploy-cpu")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    page.get_by_text("Run Name").wait_for()
    field_ = _form_field(page, "Max New Tokens (Optional)")
    assert field_.input_value() == str(operated.config["evaluate"]["max_new_tokens"])
    field_.fill("12")
    _shot(page, "02-custom-run-form")
    started = _now()
    page.get_by_role("button", name="Submit").click()

    t0 = time.monotonic()
    while not (runs := operated.flow_runs(dep, expected_start_time={"after_": started})):
        assert time.monotonic() - t0 < 30, "the form created no flow run"
        time.sleep(1)
    [run] = runs
    assert run["parameters"]["config"]["evaluate"]["max_new_tokens"] == 12
    done = operated.wait_for_state(run["id"], {"Completed", "Failed", "Crashed"})
    assert done["state_name"] == "Completed", done["state"]["message"]
    states = operated.task_runs_since(started)
    # The automation chain of the last test built the data and the model: reused; the evaluation
    # (whose generations got shorter) ran again, and the release is the model promoted already.
    assert {s: states[s] for s in ("ingest", "shards", "pretrain", "export", "evaluate")} == {
        "ingest": "Cached",
        "shards": "Cached",
        "pretrain": "Cached",
        "export": "Cached",
        "evaluate": "Completed",
    }, states

    # The torchrun child's step lines are in the chain's pretrain run's log, in the API and on its page.
    assert operated.chain_pretrain_run, "the automation chain test did not run"
    steps = operated.config["pretrain"]["train"]["max_steps"]
    [pretrain_run] = operated.ok(
        "/task_runs/filter",
        {"flow_runs": {"id": {"any_": [operated.chain_pretrain_run]}}, "task_runs": {"name": {"like_": "pretrain-"}}},
    )
    logs = operated.ok("/logs/filter", {"logs": {"task_run_id": {"any_": [pretrain_run["id"]]}}, "limit": 200})
    messages = [entry["message"] for entry in logs if entry["name"] == "lmforge.pretrain"]
    last_step = next((m for m in messages if m.startswith(f"step {steps}/{steps} | loss")), None)
    assert last_step, messages[-10:]
    page.goto(f"{operated.ui}/runs/task-run/{pretrain_run['id']}")
    page.get_by_text(last_step).first.wait_for()
    _shot(page, "03-pretrain-task-log")

    page.goto(f"{operated.ui}/runs/flow-run/{run['id']}")
    page.get_by_text("Completed", exact=True).first.wait_for()
    _shot(page, "04-flow-run-completed")
    page.get_by_text("Artifacts", exact=True).click()
    page.get_by_text("data-funnel").first.click()
    table = page.locator("table").first
    table.wait_for()
    _shot(page, "05-funnel-artifact")
    text = table.inner_text()
    for stage in ("ingest", "extract", "dedup", "filter", "augment", "shards", "near_duplicate"):
        assert stage in text, (stage, text)
    target = operated.config["deploy"].get("target") or operated.config["name"]
    page.goto(f"{operated.ui}/runs/flow-run/{run['id']}")
    page.get_by_text("Artifacts", exact=True).click()
    page.get_by_text(f"deploy-{target}").first.click()
    page.get_by_text("Unchanged", exact=True).first.wait_for()  # the artifact's markdown, on its own page
    _shot(page, "05b-deploy-decision")
    assert "It is already the promoted model." in page.locator("body").inner_text()


def _changed_filter(config: dict) -> dict:
    """The profile with a changed filter threshold (filter and all after it rerun) and a pretraining of
    3 steps instead of 60: a model clearly worse than the one the automation chain promoted."""
    config = json.loads(json.dumps(config))
    config["filter"]["min_lang_score"] = 0.7
    config["pretrain"]["train"].update({"max_steps": 3, "warmup_steps": 1})
    return config


def test_failed_run_retried_from_the_ui_reruns_only_the_failed_stage_and_after(operated, page):
    config = _changed_filter(operated.config)
    operated.fail_switch.write_text("finetune\n")
    full = operated.deployment("pipeline/full")
    started = _now()
    run = operated.ok(f"/deployments/{full['id']}/create_flow_run", {"parameters": {"config": config}})
    failed = operated.wait_for_state(run["id"], {"Completed", "Failed", "Crashed"})
    assert failed["state_name"] == "Failed" and "[finetune]" in failed["state"]["message"], failed["state"]
    states = operated.task_runs_since(started)
    expected = {s: "Cached" for s in ("ingest", "extract", "dedup")}
    expected.update({s: "Completed" for s in ("filter", "augment", "tokenizer", "shards", "pretrain")})
    expected["finetune"] = "Failed"
    assert {s: states.get(s) for s in expected} == expected, states

    page.goto(f"{operated.ui}/runs/flow-run/{run['id']}")
    page.get_by_text("Failed", exact=True).first.wait_for()
    _shot(page, "06-flow-run-failed")
    operated.fail_switch.unlink()
    retried_at = _now()
    page.get_by_role("button", name="Retry").click()
    page.get_by_role("dialog").get_by_role("button", name="Retry").click()
    done = operated.wait_for_state(run["id"], {"Completed", "Failed", "Crashed"}, timeout=600, entered_after=retried_at)
    assert done["state_name"] == "Completed" and done["run_count"] == 2, done["state"]
    states = operated.task_runs_since(retried_at)
    expected = {
        s: "Cached" for s in ("ingest", "extract", "dedup", "filter", "augment", "tokenizer", "shards", "pretrain")
    }
    expected.update({s: "Completed" for s in ("finetune", "evaluate", "export")})
    assert {s: states.get(s) for s in expected} == expected, states
    # The pipeline's deploy refused the worse model; the chain's stays promoted.
    from storage import promotions
    from storage.artifact import Store

    promoted, refused = promotions.ledger(Store(operated.store), "smoke")
    assert (promoted.action, refused.action, refused.serving) == ("promote", "refuse", promoted.export), refused
    assert refused.metrics["candidate_bits_per_byte"] > refused.metrics["promoted_bits_per_byte"], refused.metrics
    report = operated.ok(
        "/artifacts/filter", {"artifacts": {"key": {"any_": ["deploy-smoke"]}}, "sort": "CREATED_DESC"}
    )
    assert "Not promoted" in report[0]["data"] and "worse than the promoted model" in report[0]["data"], report[0]
    page.reload()
    page.get_by_text("Completed", exact=True).first.wait_for()
    _shot(page, "07-flow-run-retried-completed")


def test_the_command_line_finds_the_ui_runs_cache_records(operated, tmp_path):
    """`lmforge run` on the profile the retried UI run used: every stage Cached, nothing recomputed."""
    config = tmp_path / "changed-filter.yaml"
    config.write_text(yaml.safe_dump(_changed_filter(operated.config)))
    # Against the running server, as a person at the UI would watch it (the cache records are found in
    # the store's _prefect_results either way: Prefect looks a cache key up in result storage).
    env = {**_own_prefect_env(), "PREFECT_API_URL": f"{operated.ui}/api", "PREFECT_API_AUTH_STRING": AUTH}
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--output-dir", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {n: s["cached"] for n, s in summary["stages"].items()} == dict.fromkeys(summary["stages"], True), summary[
        "stages"
    ]
    assert len(summary["stages"]) == 12
    assert any((operated.store / "_prefect_results").iterdir())  # the records live beside the artifacts


# --- 5. Ctrl-C ------------------------------------------------------------------------------


def test_ctrl_c_stops_server_workers_and_flow_processes(operated):
    state = str(operated.state)
    assert processes_with_env("PREFECT_HOME", state), "the server's processes should carry its PREFECT_HOME"
    operated.proc.send_signal(signal.SIGINT)
    assert operated.proc.wait(120) == 0, "\n".join(operated.output[-30:])
    assert operated.output[-1] == "lmforge server: stopped"
    assert processes_with_env("PREFECT_HOME", state) == []
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(operated.ui.rsplit(":", 1)[1]))) != 0, "the port still answers"
