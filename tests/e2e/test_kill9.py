"""`kill -9` of the whole `lmforge run` process group inside each of the 12 stages loses nothing.

The harness (tests/e2e/killer.py) kills a chain of runs on one store, one stage further
each time, then lets the last run finish; an uninterrupted run on another store is the
reference. For every stage it checks: the rerun builds it (the stages before it are cache
hits), no process of a killed run lives on (torchrun's workers included), nothing
half-written is visible or trusted, and the stage's output and the final evaluation equal
the reference's. The per-stage table goes to test-output/kill9.md (bench/kill9.py writes
the same table with the machine's description into bench/results/).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from storage.artifact import Store
from tests.e2e import killer
from tests.e2e.site import build_site, serve
from tests.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output"


def kill_every_stage(tmp: Path) -> dict:
    """Run the reference and the killed chain; assert the invariants; return the per-stage table."""
    build_site(tmp / "site")
    server, url = serve(tmp / "site")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "PREFECT_RESULTS_"))}
    env["PREFECT_HOME"] = str(tmp / "prefect")
    try:
        with killer.prefect_server(tmp / "prefect") as api:  # one Prefect server for every run of the chain
            env["PREFECT_API_URL"] = api
            return _kill_every_stage(tmp, url, env)
    finally:
        server.shutdown()


def _kill_every_stage(tmp: Path, url: str, env: dict[str, str]) -> dict:
    ref_store, chain_store = Store(tmp / "reference"), Store(tmp / "chain")
    _, reference = killer.run_to_end(killer.smoke_config(tmp, url, ref_store.root), tmp / "ref-out", env)
    assert reference["status"] == "completed", reference.get("error")

    config = killer.smoke_config(tmp, url, chain_store.root)
    chain_env, mark = killer.new_chain_env(env)
    runs, before = [], {}
    for i, stage in enumerate(STAGES):
        run = killer.run_until_killed(config, tmp / f"killed-in-{stage}", chain_env, stage, tmp / "paused")
        assert not killer.leftovers(mark), f"processes of the run killed inside {stage} outlived it"
        now = killer.published(chain_store)  # raises on anything half-written or not verifying
        assert now.get(stage, set()) == before.get(stage, set()), f"{stage} published although killed"
        states = run.states()
        assert stage not in states, states
        for earlier in STAGES[:i]:
            expected = "Completed" if earlier == STAGES[i - 1] else "Cached"
            assert states.get(earlier) == expected, (stage, earlier, states)
        runs.append(run)
        before = now

    last, final = killer.run_to_end(config, tmp / "final-out", chain_env)
    assert final["status"] == "completed", final.get("error")
    assert {s: r["status"] for s, r in final["stages"].items()} == {
        **{s: "Cached" for s in STAGES[:-1]},
        STAGES[-1]: "Completed",
    }
    assert final["evaluation"] == reference["evaluation"]

    rows = []
    for i, stage in enumerate(STAGES):
        rerun = runs[i + 1] if i + 1 < len(runs) else last
        diffs = killer.differences(
            ref_store, reference["stages"][stage]["artifact"], chain_store, final["stages"][stage]["artifact"]
        )
        rows.append(
            {
                "stage": stage,
                "killed_after_s": round(runs[i].killed_after, 1),
                "rerun_to_stage_done_s": round(rerun.finished_at(stage), 1),
                "stage_rerun_s": round(rerun.stage_seconds(stage, STAGES[i - 1] if i else None), 1),
                "resumed_from_step": rerun.resumed_from() if stage in ("pretrain", "finetune") else None,
                "identical": not diffs,
                "differences": diffs,
            }
        )
    assert not [r for r in rows if r["differences"]], rows
    # Killed right after a checkpoint, training resumed from it (not from step 0).
    assert all(r["resumed_from_step"] for r in rows if r["stage"] in ("pretrain", "finetune")), rows
    return {"rows": rows, "evaluation": final["evaluation"]}


def markdown(table: dict) -> str:
    lines = [
        "| stage | killed after (s) | rerun: start to stage done (s) | of which the stage (s) | resumed from step"
        " | identical to an uninterrupted run |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in table["rows"]:
        lines.append(
            f"| {r['stage']} | {r['killed_after_s']} | {r['rerun_to_stage_done_s']} | {r['stage_rerun_s']}"
            f" | {r['resumed_from_step'] or ''} | {'yes' if r['identical'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_kill_9_inside_every_stage_loses_nothing(tmp_path):
    table = kill_every_stage(tmp_path)
    OUTPUT.mkdir(exist_ok=True)
    (OUTPUT / "kill9.json").write_text(json.dumps(table, indent=2))
    (OUTPUT / "kill9.md").write_text(markdown(table))
