"""The run summary: ``summary.json`` and the text tables ``lmforge run`` prints.

The funnel is read from the stages' records (their manifests' counters), so it is the
same numbers the Prefect table artifact and the catalog show.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flows.records import StageRecord


def funnel_rows(records: dict[str, StageRecord]) -> list[dict[str, Any]]:
    """One row per stage with in/out, then one row per drop reason under it."""
    rows = []
    for name, r in records.items():
        if r.docs_in is None and r.docs_out is None:
            continue
        rows.append(
            {
                "stage": name,
                "reason": "",
                "docs_in": r.docs_in,
                "docs_out": r.docs_out,
                "words_in": r.words_in,
                "words_out": r.words_out,
            }
        )
        for reason, n in sorted(r.dropped.items(), key=lambda kv: -kv[1].get("docs", 0)):
            rows.append(
                {
                    "stage": name,
                    "reason": reason,
                    "docs_in": None,
                    "docs_out": -n.get("docs", 0),
                    "words_in": None,
                    "words_out": -n.get("words", 0),
                }
            )
    return rows


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [
        [
            ("" if c is None else f"{c:,}" if isinstance(c, int) else f"{c:.4g}" if isinstance(c, float) else str(c))
            for c in row
        ]
        for row in rows
    ]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]

    def line(vals):
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def format_funnel(records: dict[str, StageRecord]) -> str:
    rows = []
    for r in funnel_rows(records):
        label = r["stage"] if not r["reason"] else f"  - {r['reason']}"
        rows.append([label, r["docs_in"], r["docs_out"], r["words_in"], r["words_out"]])
    return _table(["stage / drop reason", "docs in", "docs out", "words in", "words out"], rows)


def format_stages(records: dict[str, StageRecord]) -> str:
    rows = [[n, r.status, "yes" if r.cached else "no", r.seconds, r.artifact] for n, r in records.items()]
    return _table(["stage", "status", "cached", "seconds", "artifact"], rows)


def format_eval(report: dict[str, Any]) -> str:
    """Loss / perplexity / bits per byte of base and finetuned, overall and per language."""
    rows = []
    for model_name in ("base", "finetuned"):
        m = report.get(model_name) or {}
        for group, v in [("all", m), *sorted((m.get("by_group") or {}).items())]:
            if v:
                rows.append(
                    [model_name, group, v.get("tokens"), v.get("loss"), v.get("perplexity"), v.get("bits_per_byte")]
                )
    if report.get("unigram_bits_per_byte") is not None:
        rows.append(["unigram baseline", "all", None, None, None, report["unigram_bits_per_byte"]])
    return _table(["model", "language", "tokens", "loss", "ppl", "bits/byte"], rows)


def format_precisions(export_meta: dict[str, Any]) -> str:
    """Size and held-out loss of each exported graph (fp32, INT8, INT4), side by side."""
    precisions = export_meta.get("precisions") or {}
    base = (precisions.get("fp32") or {}).get("val_loss")
    rows = []
    for name, p in precisions.items():
        loss = p.get("val_loss")
        change = f"{(loss - base) / base:+.2%}" if base and loss is not None else ""
        rows.append([name, f"{p['bytes'] / 2**20:.2f} MiB", loss, p.get("bits_per_byte"), change])
    return _table(["precision", "size", "val loss", "bits/byte", "vs fp32"], rows)


def format_harness(report: dict[str, Any]) -> str:
    """lm-evaluation-harness per language: its bits per byte beside lmforge's, and the cloze."""
    rows = []
    for lang, r in report["languages"].items():
        cloze = r.get("cloze") or {}
        diff = r.get("difference")
        rows.append(
            [
                lang,
                r.get("lm_eval_bits_per_byte"),
                r["bits_per_byte_text"],
                f"{diff:+.2%}" if diff is not None else "",
                cloze.get("acc"),
                cloze.get("acc_norm"),
                cloze.get("items"),
            ]
        )
    header = ["language", "lm-eval bits/byte", "lmforge (text)", "diff", "cloze acc", "acc_norm", "items"]
    return _table(header, rows)


def format_decision(decision: dict[str, Any]) -> str:
    """One deploy decision in a line or two: what, to which target, and why."""
    verb = {"promote": "promoted", "refuse": "NOT promoted", "rollback": "rolled back to", "unchanged": "unchanged:"}
    return (
        f"{decision['target']}: {verb[decision['action']]} {decision['export']} ({decision['reason']})\n"
        f"serving now: {decision.get('serving') or 'nothing'}"
    )


def format_ledger(decisions: list[dict[str, Any]]) -> str:
    """A target's deploy ledger as a table, oldest first."""
    rows = [
        [
            d["seq"],
            d["decided_at"],
            d["action"],
            d["export"],
            (d.get("metrics") or {}).get("candidate_bits_per_byte"),
            d["reason"],
        ]
        for d in decisions
    ]
    return _table(["#", "decided at", "action", "export", "bits/byte", "why"], rows)


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "summary.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(path)
    return path
