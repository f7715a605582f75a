"""Stage 10, evaluate: the base and the finetuned model on held-out documents.

Validation loss, perplexity and bits per byte, overall and per language, for both
models on the same documents (the dataset's validation split, which no augmented copy
of a validation document ever enters), next to the unigram entropy of those tokens:
a model that learned anything has bits per byte well below it. Plus a few sampled
generations from each model. Writes ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import json

from pydantic import Field, field_validator

from storage.artifact import Manifest, Store
from tasks.modeling.subsets import eval_docs, select
from tasks.prefect_task import stage_task
from tasks.stage import Stage, StageConfig, StageError, stage_logger

STAGE = Stage("evaluate", __name__)


class EvaluateConfig(StageConfig):
    """Which held-out documents to score and what to generate."""

    where_sql: str | None = Field(
        None, description="Optional SQL condition restricting the validation documents (e.g. lang IN ('en','fr'))."
    )
    max_docs_per_language: int | None = Field(
        200, ge=1, description="Cap of scored documents per language (keeps evaluation time bounded); empty: all."
    )
    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    prompts: list[str] = Field(
        ["The package manager", "Debian is"],
        description="Prompts for sample generations (also used by `lmforge run` with the INT8 model).",
    )
    max_new_tokens: int = Field(40, ge=1, le=1024, description="Tokens generated per prompt.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    seed: int = Field(0, ge=0, description="Sampling seed.")

    @field_validator("where_sql")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("where_sql is empty: leave it out to score every validation document")
        return value


def _markdown(report: dict) -> str:
    lines = [
        "# Evaluation",
        "",
        f"Held-out documents: {report['documents']} (validation split{', ' + report['where_sql'] if report['where_sql'] else ''}).",
        "",
        "| model | language | documents | tokens | loss | perplexity | bits/byte |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("base", "finetuned"):
        m = report[name]
        for group, v in [("all", m), *m["by_group"].items()]:
            lines.append(
                f"| {name} | {group} | {v['documents']} | {v['tokens']} | {v['loss']:.4f} | {v['perplexity']:.2f} | {v['bits_per_byte']:.4f} |"
            )
    if report.get("languages_without_val"):
        lines += ["", f"Not measured (train documents, none held out): {', '.join(report['languages_without_val'])}."]
    lines += [
        "",
        f"Unigram entropy of the same tokens: **{report['unigram_bits_per_byte']:.4f} bits/byte** "
        f"(the finetuned model is at {report['finetuned']['bits_per_byte']:.4f}).",
        "",
        "## Generations",
        "",
    ]
    for g in report["generations"]:
        lines += [f"**Prompt:** {g['prompt']}", "", f"- base: {g['base']}", f"- finetuned: {g['finetuned']}", ""]
    return "\n".join(lines)


def run(
    store: Store, cfg: EvaluateConfig, base: Manifest, finetuned: Manifest, shards: Manifest, tokenizer: Manifest
) -> Manifest:
    b = STAGE.begin(store, cfg, base=base, finetuned=finetuned, shards=shards, tokenizer=tokenizer)
    if b.done:
        return b.done
    from model.checkpoint import load_model
    from model.evaluate import evaluate_documents, unigram_bits_per_byte
    from model.generate import generate
    from tasks.tokenizer import load_tokenizer

    rows = select(store, STAGE.name, shards, cfg.where_sql, "val")
    docs = eval_docs(rows, shards.meta["dtype"], cfg.max_docs_per_language)
    if not docs:
        raise StageError(
            STAGE.name,
            shards.ref,
            f"no validation documents match {cfg.where_sql!r}",
            "relax evaluate.where_sql or raise split.val_fraction",
        )
    eot = int(shards.meta["eot_id"])
    tok = load_tokenizer(tokenizer)
    report = {
        "documents": len(docs),
        "where_sql": cfg.where_sql,
        "unigram_bits_per_byte": unigram_bits_per_byte(docs),
        "languages_without_val": shards.meta.get("languages_without_val", []),
    }
    models = {"base": load_model(base.dir), "finetuned": load_model(finetuned.dir)}
    for name, model in models.items():
        report[name] = evaluate_documents(model, docs, eot, batch_size=cfg.batch_size)
        stage_logger(STAGE.name).info(
            "%s: loss %.4f, %.4f bits/byte", name, report[name]["loss"], report[name]["bits_per_byte"]
        )
    report["generations"] = []
    for prompt in cfg.prompts:
        ids = tok.encode(prompt, add_special_tokens=False).ids
        out = {"prompt": prompt}
        for name, model in models.items():
            new = generate(
                model, ids, cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, eot_id=eot, seed=cfg.seed
            )
            out[name] = tok.decode(new)
        report["generations"].append(out)
    with STAGE.writer(store, b) as w:
        (w.dir / "report.json").write_text(json.dumps(report, indent=2))
        (w.dir / "report.md").write_text(_markdown(report))
        w.meta.update(
            {
                "bits_per_byte": {n: report[n]["bits_per_byte"] for n in models},
                "unigram_bits_per_byte": report["unigram_bits_per_byte"],
            }
        )
    return w.manifest


task = stage_task(STAGE, run)
