"""Stage 12, compare: a release candidate beside the promoted model, on the same held-out text.

Both exported models are scored as they would be served (the INT8 graph by default, on
onnxruntime) on the candidate's validation documents, in bits per byte overall and per
language. Bits per byte does not depend on the tokenizer, so a candidate with a new
tokenizer compares with the old model: the promoted model reads the same text through its
own tokenizer (the candidate's tokens are decoded back to text, which byte-level BPE does
losslessly, and the byte count is the catalog's). Documents are split by a hash of their
id, so a document held out of the candidate's dataset was held out of earlier versions
too: the promoted model has not trained on it either.

With no promoted model (the first release of a target), only the candidate is scored.
The decision itself (:func:`decide`) is not part of the artifact: it depends on what is
promoted at the time, which the deploy flow reads from the ledger.
"""

from __future__ import annotations

import json

from pydantic import Field

from storage.artifact import Manifest, Store
from tasks.modeling.subsets import eval_docs, select
from tasks.prefect_task import stage_task
from tasks.stage import Stage, StageConfig, StageError, stage_logger

STAGE = Stage("compare", __name__)


class CompareConfig(StageConfig):
    """How the candidate and the promoted model are scored."""

    precision: str = Field(
        "int8", pattern=r"^(int8|int4|fp32)$", description="Which exported graph is compared: int8, int4 or fp32."
    )
    docs_per_language: int = Field(50, ge=1, description="Validation documents per language scored for each model.")
    batch_size: int = Field(8, ge=1, description="Windows per onnxruntime call.")


class DeployConfig(StageConfig):
    """Where a release is promoted, and how much worse than the promoted model it may be."""

    target: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Name of the serving target whose promoted model is compared and replaced; empty: the profile's name.",
    )
    max_bpb_increase: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Promote when the candidate's bits per byte is at most the promoted model's times (1 + this); 0: not worse.",
    )
    compare: CompareConfig = Field(default_factory=CompareConfig, description="How both models are scored.")


def decide(candidate_bpb: float, promoted_bpb: float | None, max_increase: float) -> tuple[bool, str]:
    """Promote or not, and why, in words a person reads in the deploy report."""
    if promoted_bpb is None:
        return True, f"first model of this target ({candidate_bpb:.4f} bits/byte)"
    bound = promoted_bpb * (1 + max_increase)
    change = (candidate_bpb - promoted_bpb) / promoted_bpb
    verdict = f"candidate {candidate_bpb:.4f} vs promoted {promoted_bpb:.4f} bits/byte ({change:+.2%}"
    if candidate_bpb <= bound:
        return True, f"{verdict}, allowed up to {max_increase:+.2%}): not worse"
    return False, f"{verdict}, allowed up to {max_increase:+.2%}): worse than the promoted model"


def _score(model_dir, precision: str, docs, batch_size: int, retokenize) -> dict:
    from model.evaluate import EvalDoc, evaluate_logits_fn
    from model.onnx_generate import OnnxGenerator

    gen = OnnxGenerator(model_dir, precision)
    if retokenize is not None:
        gen.tokenizer.encode_special_tokens = True  # a literal <|endoftext|> in a page is text
        docs = [
            EvalDoc(gen.tokenizer.encode(text, add_special_tokens=False).ids + [gen.eot_id], d.n_bytes, d.group)
            for d, text in zip(docs, retokenize)
        ]
    return evaluate_logits_fn(gen.lm.logits, docs, gen.eot_id, gen.block_size, batch_size)


def _summary(scores: dict) -> dict:
    return {
        "bits_per_byte": scores["bits_per_byte"],
        "loss": scores["loss"],
        "tokens": scores["tokens"],
        "by_language": {g: v["bits_per_byte"] for g, v in scores["by_group"].items()},
    }


def _markdown(report: dict) -> str:
    names = [n for n in ("candidate", "promoted") if report.get(n)]
    lines = [
        "# Candidate beside the promoted model",
        "",
        f"{report['documents']} held-out documents of {report['dataset']}, {report['precision']} graphs, bits per byte "
        "(lower is better).",
        "",
        "| language | " + " | ".join(f"{n} ({report[n]['export']})" for n in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    groups = ["all", *sorted(report["candidate"]["by_language"])]
    for g in groups:
        cells = []
        for n in names:
            v = report[n]["bits_per_byte"] if g == "all" else report[n]["by_language"].get(g)
            cells.append("-" if v is None else f"{v:.4f}")
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    if not report.get("promoted"):
        lines += ["", "No model is promoted for this target yet."]
    return "\n".join(lines) + "\n"


def run(
    store: Store,
    cfg: CompareConfig,
    candidate: Manifest,
    promoted: Manifest | None,
    shards: Manifest,
    tokenizer: Manifest,
) -> Manifest:
    """Score ``candidate`` (and ``promoted``, when given) on ``shards``' validation documents."""
    b = STAGE.begin(store, cfg, candidate=candidate, promoted=promoted, shards=shards, tokenizer=tokenizer)
    if b.done:
        return b.done
    from tasks.tokenizer import load_tokenizer

    docs = eval_docs(select(store, STAGE.name, shards, None, "val"), shards.meta["dtype"], cfg.docs_per_language)
    if not docs:
        raise StageError(STAGE.name, shards.ref, "the dataset has no validation documents to compare on")
    log = stage_logger(STAGE.name)
    report = {"dataset": shards.ref, "precision": cfg.precision, "documents": len(docs)}
    report["candidate"] = {
        "export": candidate.ref,
        **_summary(_score(candidate.dir, cfg.precision, docs, cfg.batch_size, None)),
    }
    log.info("compare: candidate %s %.4f bits/byte", candidate.ref, report["candidate"]["bits_per_byte"])
    if promoted is not None:
        same_tokenizer = tokenizer.ref in promoted.parents
        texts = None
        if not same_tokenizer:
            tok = load_tokenizer(tokenizer)
            texts = [tok.decode([int(t) for t in d.tokens if t != int(shards.meta["eot_id"])]) for d in docs]
        scores = _score(promoted.dir, cfg.precision, docs, cfg.batch_size, texts)
        report["promoted"] = {"export": promoted.ref, "same_tokenizer": same_tokenizer, **_summary(scores)}
        log.info("compare: promoted %s %.4f bits/byte", promoted.ref, report["promoted"]["bits_per_byte"])
    with STAGE.writer(store, b) as w:
        (w.dir / "compare.json").write_text(json.dumps(report, indent=2))
        (w.dir / "compare.md").write_text(_markdown(report))
        w.meta.update(
            {
                "bits_per_byte": {n: report[n]["bits_per_byte"] for n in ("candidate", "promoted") if n in report},
                "documents": len(docs),
                "precision": cfg.precision,
            }
        )
    return w.manifest


task = stage_task(STAGE, run)
