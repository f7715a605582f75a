"""The whole pipeline flow on configs/smoke.yaml against a generated site: run, rerun, fail, recover, rebuild,
then deploy: promote, refuse, serve the promoted model as it changes, roll back.

One test, because each step builds on the last and the first run is the expensive
part (every stage for real: crawl over HTTP, torchrun training, ONNX export).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import main as lmforge
from storage import promotions
from storage.artifact import Store
from storage.catalog import Catalog
from tests.e2e.site import build_site, serve
from tests.ports import free_port
from tests.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp: Path, seed_url: str, **changes) -> Path:
    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    data["store"] = str(tmp / "store")
    data["ingest"]["crawl"]["seeds"] = [seed_url]
    for dotted, value in changes.items():
        node = data
        *path, last = dotted.split(".")
        for key in path:
            node = node[key]
        node[last] = value
    path = tmp / f"smoke-{len(changes)}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


HOLD = """import sys, time
from pathlib import Path
from storage.atomic import exclusive
with exclusive(Path(sys.argv[1]) / "pipeline-smoke.lock"):
    print("held", flush=True)
    deadline = time.monotonic() + 120
    while not Path(sys.argv[2]).exists() and time.monotonic() < deadline:  # until the test lets go
        time.sleep(0.05)
"""


WAITING = "another pipeline run of profile 'smoke'"


def _release_when_waiting(caplog, release: Path) -> threading.Thread:
    """Let the lock holder go once the run has said it is waiting for it (or after 120 s)."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(WAITING in r.getMessage() for r in list(caplog.records)):
            time.sleep(0.05)
        release.touch()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _check_hf_export(model_dir: Path, store: Store, summary: dict) -> None:
    import peft
    import torch
    import transformers

    from model.checkpoint import load_model

    tuned = load_model(store.load(*summary["stages"]["finetune"]["artifact"].split("/")).dir).eval()
    x = torch.randint(0, tuned.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir / "hf", local_files_only=True).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir / "hf-base", local_files_only=True)
    adapted = peft.PeftModel.from_pretrained(base, model_dir / "hf-adapter").eval()
    with torch.no_grad():
        ours = tuned(x)[0]
        assert (hf(x).logits - ours).abs().max().item() < 1e-4
        assert (adapted(x).logits - ours).abs().max().item() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(model_dir / "hf", local_files_only=True)
    assert tok.eos_token == "<|endoftext|>" and tok.decode(tok.encode("Le serveur")) == "Le serveur"


def _wait_for_version(url: str, version: str, server: subprocess.Popen, timeout: float = 60) -> None:
    """Until ``lmforge serve --promoted`` at ``url`` says it serves ``version``."""
    import urllib.request

    deadline, seen = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stdout.read()
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                seen = json.loads(resp.read())["version"]
            if seen == version:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server serves {seen}, not {version}")


def _check_deploys(tmp: Path, url: str, store: Path, first: dict, recovered: dict, rebuilt: dict) -> None:
    """Run 1 promoted the first model; run 4's candidate was promoted only if not worse; then by hand."""
    import urllib.request

    assert first["deploy"]["action"] == "promote" and "first model" in first["deploy"]["reason"]
    decided = recovered["deploy"]
    bpb = decided["metrics"]
    assert decided["action"] == (
        "promote" if bpb["candidate_bits_per_byte"] <= bpb["promoted_bits_per_byte"] else "refuse"
    ), decided
    f, x = first["export"]["artifact"], recovered["export"]["artifact"]
    better, worse = (x, f) if decided["action"] == "promote" else (f, x)
    assert promotions.promoted(Store(store), "smoke") == better
    assert rebuilt["deploy"]["action"] == ("unchanged" if better == x else "refuse")

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--promoted", "--store", str(store), "--port", str(port)]
        + ["--poll-seconds", "0.2", "--threads", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_version(base, better, server)
        # The worse model is refused at the default tolerance (not worse)...
        strict = _config(tmp, url, **{"finetune.train.max_steps": 24})
        assert lmforge(["deploy", "--config", str(strict), "--release", worse]) == 0
        last = promotions.ledger(Store(store), "smoke")[-1]
        assert (last.action, last.export, last.serving) == ("refuse", worse, better)
        assert "worse than the promoted model" in last.reason
        # ...promoted when a 100% increase is allowed; the server switches to it...
        tolerant = _config(tmp, url, **{"finetune.train.max_steps": 24, "deploy.max_bpb_increase": 1.0})
        assert lmforge(["deploy", "--config", str(tolerant), "--release", worse]) == 0
        _wait_for_version(base, worse, server)
        body = json.dumps({"prompt": "Le serveur", "max_tokens": 4, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert json.loads(resp.read())["model"] == "smoke"
        # ...and a rollback brings the better one back, in the ledger, the catalog and the server.
        assert lmforge(["deploy", "--config", str(tolerant), "--rollback"]) == 0
        _wait_for_version(base, better, server)
    finally:
        server.terminate()
        server.wait(30)
    ledger = promotions.ledger(Store(store), "smoke")
    assert [d.action for d in ledger][-3:] == ["refuse", "promote", "rollback"]
    assert ledger[-1].lineage["dataset"].startswith("shards/") and ledger[-1].run.startswith("flow run ")
    with Catalog(store / "catalog.duckdb", read_only=True) as cat:
        rows = cat.query("SELECT action, export FROM promotions WHERE target = 'smoke' ORDER BY seq").to_pylist()
    rows = [(r["action"], r["export"]) for r in rows]
    assert rows == [(d.action, d.export) for d in ledger]
    _check_a_decision_made_meanwhile(tmp, store, tolerant, worse, better)


def _check_a_decision_made_meanwhile(tmp: Path, store: Path, tolerant: Path, worse: str, better: str) -> None:
    """Another machine decides while a deploy has compared and not yet decided (stopped at the
    flow's pause point): the deploy compares again and decides after it, never over it."""
    paused, go_on = tmp / "deploy-paused", tmp / "deploy-go-on"
    env = {
        **os.environ,
        "LMFORGE_PAUSE_IN": "deploy",
        "LMFORGE_PAUSE_MARKER": str(paused),
        "LMFORGE_PAUSE_UNTIL": str(go_on),
        "LMFORGE_PAUSE_SECONDS": "300",
    }
    cmd = [sys.executable, "-m", "flows.cli", "deploy", "--config", str(tolerant), "--release", worse]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not paused.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert paused.exists(), proc.communicate(timeout=60)[0] if proc.poll() is not None else "not paused"
        seen = promotions.state(Store(store), "smoke")[0]
        elsewhere = promotions.record(Store(store), "smoke", "refuse", worse, "stricter elsewhere", run="machine b")
        go_on.touch()
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"decisions {seen + 1}..{seen + 1} were made elsewhere while this one was compared" in out, out
    assert "comparing again with the model promoted now (attempt 2 of 3)" in out
    last = promotions.ledger(Store(store), "smoke")[-2:]
    assert [(d.seq, d.action, d.run) for d in last][0] == (elsewhere.seq, "refuse", "machine b")
    assert (last[1].seq, last[1].action, last[1].previous, last[1].export) == (seen + 2, "promote", better, worse)
    assert lmforge(["deploy", "--config", str(tolerant), "--rollback"]) == 0  # what the later steps expect
    assert promotions.promoted(Store(store), "smoke") == better


def _check_harness(tmp: Path, url: str, store: Path, rebuilt: dict) -> None:
    """The release with lm-eval tasks configured (through `lmforge deploy`, which builds the release):
    lm-eval's bits per byte on the Hugging Face export agree with lmforge's on the same documents."""
    with_harness = _config(
        tmp,
        url,
        **{
            "finetune.train.max_steps": 24,
            "harness": {"tasks": ["bpb", "cloze"], "docs_per_language": 10, "cloze_items_per_language": 10},
        },
    )
    assert lmforge(["deploy", "--config", str(with_harness)]) == 0
    [found] = (store / "harness").iterdir()
    harness = Store(store).load("harness", found.name)
    assert rebuilt["export"]["artifact"] in harness.parents
    report = json.loads(harness.path("report.json").read_text())
    assert set(report["languages"]) == {"en", "fr"}
    for lang, row in report["languages"].items():
        # Same text, same weights (transformers fp32 vs onnxruntime fp32): within 1% (measured: ~0.2%;
        # lm-eval's last window of a long document keeps more context than lmforge's disjoint ones).
        assert abs(row["difference"]) < 0.01, (lang, row)
        assert row["bits_per_byte"] > row["bits_per_byte_text"]  # the end-of-text token costs bits, no bytes
        assert 5 <= row["cloze"]["items"] <= 10 and 0.0 <= row["cloze"]["acc"] <= 1.0 and row["cloze"]["chance"] == 0.25
    # The tasks and data in the artifact are lm-eval's input as it ran: a person can rerun them by hand.
    task = (harness.dir / "lm_eval_tasks" / "lmforge_cloze_fr.yaml").read_text()
    assert str(harness.dir / "data" / "cloze_fr.jsonl") in task and (harness.dir / "data" / "cloze_fr.jsonl").exists()


def _check_continued_pretraining(tmp: Path, url: str, store: Path, rebuilt: dict) -> None:
    """pretrain.continue_from_promoted: the promoted model's weights when the shape matches, scratch otherwise."""
    import math

    from flows.config import load_config
    from flows.pretrain import pretrain, promoted_weights

    st = Store(store)
    promoted_export = st.load(*promotions.promoted(st, "smoke").split("/"))
    promoted_model = next(p for p in promoted_export.parents if p.startswith("finetune/"))
    data = st.load(*rebuilt["stages"]["shards"]["artifact"].split("/"))
    tok = st.load(*rebuilt["stages"]["tokenizer"]["artifact"].split("/"))
    short = {
        "pretrain.train.max_steps": 6,
        "pretrain.train.warmup_steps": 1,
        "pretrain.train.log_every": 1,
        "pretrain.continue_from_promoted": True,
    }
    # Another shape: from scratch (the log says why).
    assert (
        promoted_weights(st, load_config(_config(tmp, url, **short, **{"pretrain.model.n_layer": 1})), data, tok)
        is None
    )
    trained = pretrain(load_config(_config(tmp, url, **short)), dataset=data.ref)
    model = st.load(*trained["model"].split("/"))
    assert promoted_model in model.parents, model.parents
    rows = [json.loads(line) for line in model.path("metrics.jsonl").read_text().splitlines()]
    first_loss = next(r["loss"] for r in rows if r.get("loss") is not None)
    # From scratch the first steps cost about ln(vocabulary) nats; from the promoted weights far less.
    assert first_loss < 0.8 * math.log(tok.meta["vocab_size"]), first_loss


def _run(config: Path, out: Path) -> dict:
    rc = lmforge(["run", "--config", str(config), "--output-dir", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert rc == (0 if summary["status"] == "completed" else 1)
    return summary


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path, monkeypatch, caplog):
    planted = build_site(tmp_path / "site")
    server, url = serve(tmp_path / "site")
    try:
        config = _config(tmp_path, url)

        # 1. The first run executes every stage.
        first = _run(config, tmp_path / "run1")
        assert first["status"] == "completed", first.get("error")
        stages = first["stages"]
        assert list(stages) == STAGES
        assert not any(s["cached"] for s in stages.values()), {n: s["status"] for n, s in stages.items()}
        # Every page of the site was fetched; the near-copies were found and dropped.
        assert stages["ingest"]["docs_out"] >= planted["pages"] + planted["near_copies"]
        assert stages["dedup"]["dropped"]["near_duplicate"]["docs"] == planted["near_copies"]
        assert set(stages["shards"]["meta"]["docs"]) == {"train", "val"}
        # The model learned: held-out bits per byte well below the unigram entropy of the same tokens.
        ev = first["evaluation"]
        assert ev["finetuned"]["bits_per_byte"] < 0.9 * ev["unigram_bits_per_byte"], ev
        assert set(ev["finetuned"]["by_group"]) == {"en", "fr"}
        # The release gate passed and the INT8 model generates, without torch, from the CLI.
        model_dir = Path(first["export"]["copied_to"])
        assert (model_dir / "model.int8.onnx").exists()
        code = (
            "import sys; from flows.cli import main; rc = main(['generate', '--model', sys.argv[1], '--prompt', 'The administrator',"
            " '--max-new-tokens', '8', '--temperature', '0']); assert 'torch' not in sys.modules; sys.exit(rc)"
        )
        gen = subprocess.run(
            [sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout.strip()
        # The same model in Hugging Face's format: transformers computes lmforge's logits, and
        # peft's base + adapter computes the finetuned model's.
        assert first["export"]["hf"] == ["hf", "hf-base", "hf-adapter"]
        sizes = {k: v["bytes"] for k, v in first["export"]["precisions"].items()}
        assert sizes["int4"] < sizes["int8"] < sizes["fp32"], sizes
        _check_hf_export(model_dir, Store(yaml.safe_load(config.read_text())["store"]), first)

        # 2. An unchanged rerun is served from cache, stage by stage; it first waits for another
        #    run of the same profile (here a process holding the profile's pipeline lock) to end.
        release = tmp_path / "release-lock"
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                HOLD,
                str(Path(yaml.safe_load(config.read_text())["store"]) / "_locks"),
                str(release),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout.readline().strip() == "held"
        # Prefect's logging setup (run 1) stops lmforge's loggers from propagating: listen on the logger itself.
        pipeline_log = logging.getLogger("lmforge.pipeline")
        pipeline_log.addHandler(caplog.handler)
        try:
            with caplog.at_level("INFO", logger="lmforge.pipeline"):
                watcher = _release_when_waiting(caplog, release)
                second = _run(config, tmp_path / "run2")
            watcher.join()
        finally:
            pipeline_log.removeHandler(caplog.handler)
        assert holder.wait() == 0
        assert any(WAITING in r.getMessage() for r in caplog.records)
        assert all(s["cached"] for s in second["stages"].values()), {
            n: s["status"] for n, s in second["stages"].items()
        }
        assert second["export"]["artifact"] == first["export"]["artifact"]

        # 3. A failure at finetune (after a config change there): the run fails and publishes nothing new...
        changed = _config(tmp_path, url, **{"finetune.train.max_steps": 24})
        monkeypatch.setenv("LMFORGE_FAIL_STAGE", "finetune")
        failed = _run(changed, tmp_path / "run3")
        assert failed["status"] == "failed" and "finetune" in failed["error"]
        monkeypatch.delenv("LMFORGE_FAIL_STAGE")

        # ...and the next run re-executes only finetune and what follows it.
        recovered = _run(changed, tmp_path / "run4")
        assert recovered["status"] == "completed", recovered.get("error")
        cached = {n: s["cached"] for n, s in recovered["stages"].items()}
        assert cached == {n: n not in ("finetune", "evaluate", "export", "compare") for n in STAGES}, cached

        # 5. A deleted artifact and a deleted catalog are no cache hits: the next run rebuilds
        # them, and since the rebuilt dedup artifact has the same content, nothing after it reruns.
        store = Path(recovered["store"])
        shutil.rmtree(store / recovered["stages"]["dedup"]["artifact"])
        (store / "catalog.duckdb").unlink()
        rebuilt = _run(changed, tmp_path / "run5")
        assert rebuilt["status"] == "completed", rebuilt.get("error")
        cached = {n: s["cached"] for n, s in rebuilt["stages"].items()}
        assert cached == {n: n != "dedup" for n in STAGES}, cached
        assert rebuilt["stages"]["dedup"]["artifact"] == recovered["stages"]["dedup"]["artifact"]
        assert (store / recovered["stages"]["dedup"]["artifact"] / "manifest.json").exists()
        with Catalog(store / "catalog.duckdb", read_only=True) as cat:
            assert cat.has_dataset(rebuilt["stages"]["shards"]["artifact"])

        # 6. Deploys: what the runs promoted, a refusal, a server that follows promotions, a rollback.
        _check_deploys(tmp_path, url, store, first, recovered, rebuilt)

        # 7. lm-evaluation-harness on the Hugging Face export, run by the release when configured.
        _check_harness(tmp_path, url, store, rebuilt)

        # 8. Pretraining that continues from the promoted model's weights.
        _check_continued_pretraining(tmp_path, url, store, rebuilt)
    finally:
        server.shutdown()
