"""Kill -9 inside each stage of the pipeline, rerun, compare with an uninterrupted run.

The same harness and checks as ``tests/e2e/test_kill9.py`` (the smoke profile against a
generated site; see ``tests/e2e/killer.py``), run on its own to write the reliability table
with the machine it ran on:

    .venv/bin/python bench/kill9.py        # about 5 minutes on 2 cores

Writes ``bench/results/kill9.json`` and ``bench/results/kill9.md``. There is no peer column:
none of the tools lmforge is compared with promises a rerun after ``kill -9`` equal to an
uninterrupted run, so the table states lmforge's own figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe, machine  # noqa: E402
from tests.e2e.test_kill9 import kill_every_stage, markdown  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="lmforge-kill9-") as tmp:
        table = kill_every_stage(Path(tmp))
    table["machine"] = machine()
    table["date"] = dt.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kill9.json").write_text(json.dumps(table, indent=2))
    m = table["machine"]
    head = (
        f"# kill -9 inside every stage ({table['date']}; {describe(m)}, Python {m['python']})\n\n"
        "Smoke profile against a generated site. Each run is killed (SIGKILL to its process group) at the\n"
        "stage's pause point (every file written, nothing published; training: right after a checkpoint);\n"
        "the next run rebuilds that stage from cache and is killed in the next one. *Identical*: the\n"
        "stage's artifact equals an uninterrupted run's (file checksums; Parquet compared without\n"
        "`fetched_at`; timing files left out). The chain's final evaluation equals the reference's.\n\n"
    )
    (out / "kill9.md").write_text(head + markdown(table))
    print((out / "kill9.md").read_text())


if __name__ == "__main__":
    main()
