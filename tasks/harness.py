"""Stage 13 (when configured), harness: EleutherAI's lm-evaluation-harness on the exported model.

Runs ``lm_eval --model hf`` on the export's Hugging Face directory, offline, in a child
process, on the task definitions shipped in ``tasks/lm_eval_tasks/`` over data this stage
writes from the dataset's held-out documents (the validation split, capped per language):

- ``lmforge_bpb_<lang>`` (``bpb``): rolling log-likelihood of each document, as lm-eval's
  wikitext task scores text: word and byte perplexity, bits per byte;
- ``lmforge_cloze_<lang>`` (``cloze``): multiple choice. The context is a window of a
  held-out document's words; the choices are its real next words and spans of as many
  words from elsewhere in the language's held-out documents (seeded; see
  :func:`cloze_items`). ``acc`` and ``acc_norm``; chance is 1 / choices.

Beside lm-eval's bits per byte the report puts lmforge's own, from the export's ONNX fp32
graph on the same documents: on the text alone (what lm-eval counts) and with the
end-of-text token (what the evaluate stage counts: a model is also charged for where a
document ends). The first two agree closely (tests/e2e checks how closely); lm-eval's
last window of a long document keeps more context than lmforge's disjoint windows, which
is most of what separates them.

Writes ``results.json`` (lm-eval's own), ``report.json``, ``report.md`` and, to rerun
lm-eval by hand, ``data/`` and ``lm_eval_tasks/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from storage.artifact import Manifest, Store
from tasks.modeling.subsets import eval_docs, select
from tasks.prefect_task import stage_task
from tasks.stage import Stage, StageConfig, StageError, stage_logger

TEMPLATES = Path(__file__).resolve().parent / "lm_eval_tasks"


def _templates_and_version(cfg, **_inputs) -> str:
    """The task templates and the installed lm-eval: both decide what the scores mean."""
    h = hashlib.sha256()
    for path in sorted(TEMPLATES.glob("*.yaml")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    try:
        version = metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        version = "not installed"
    return f"templates {h.hexdigest()[:16]}, lm_eval {version}"


STAGE = Stage("harness", __name__, external=_templates_and_version)


class HarnessConfig(StageConfig):
    """Which lm-evaluation-harness tasks the release runs on the Hugging Face export (none: skipped)."""

    tasks: list[Literal["bpb", "cloze"]] = Field(
        [], description="lm-eval tasks to run, one per language: bpb (bits per byte), cloze; empty: skip the stage."
    )
    docs_per_language: int = Field(20, ge=2, description="Held-out documents per language for each task.")
    cloze_context_words: int = Field(24, ge=1, description="Words of a document the cloze shows as its context.")
    cloze_answer_words: int = Field(6, ge=1, description="Words in each cloze choice.")
    cloze_choices: int = Field(4, ge=2, le=10, description="Choices per cloze item (one real continuation).")
    cloze_items_per_language: int = Field(
        50, ge=1, le=10_000, description="Cloze items per language at most (several windows of a long document)."
    )
    batch_size: int = Field(8, ge=1, description="lm-eval's batch size.")
    seed: int = Field(0, ge=0, description="Seed of the cloze distractors.")
    timeout_seconds: int = Field(3600, ge=10, description="Longest the lm-eval run may take.")


def cloze_items(texts: list[str], cfg: HarnessConfig, rng: np.random.Generator) -> list[dict]:
    """Cloze items from one language's documents: context, choices (real one among distractors), label.

    Every document gives an item per window of ``context + answer`` words, taken round-robin
    over the documents (first windows first) up to ``cloze_items_per_language``: a held-out
    split has few documents but long ones (the demo's has 2 to 7 per language of 150 to
    5,600 words; one item per document left some languages without a task). Distractors are
    spans of the same length drawn from all of the language's documents, never overlapping
    the item's own window, and distinct from the answer and each other.
    """
    ctx, ans = cfg.cloze_context_words, cfg.cloze_answer_words
    words = [t.split() for t in texts]
    need = ctx + ans
    windows = sorted(
        ((i, start) for i, w in enumerate(words) for start in range(0, len(w) - need + 1, need)),
        key=lambda window: (window[1], window[0]),
    )[: cfg.cloze_items_per_language]
    spans = [(j, start) for j, w in enumerate(words) for start in range(len(w) - ans + 1)]
    items = []
    for i, start in windows:
        answer = " ".join(words[i][start + ctx : start + need])
        choices = {answer}
        for k in rng.integers(0, len(spans), size=20 * cfg.cloze_choices):
            j, at = spans[k]
            if j == i and at < start + need and at + ans > start:
                continue  # inside the item's own window: it could be the answer or copy the context
            choices.add(" ".join(words[j][at : at + ans]))
            if len(choices) == cfg.cloze_choices:
                break
        if len(choices) < cfg.cloze_choices:
            continue  # too little text for distinct distractors
        order = sorted(choices)
        rng.shuffle(order)
        items.append(
            {"context": " ".join(words[i][start : start + ctx]), "choices": order, "label": order.index(answer)}
        )
    return items


def _task_yaml(name: str, template: str, data_file: Path) -> str:
    data = json.dumps(str(data_file))
    return (
        f"include: {json.dumps(str(TEMPLATES / template))}\n"
        f"task: {name}\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
    )


def _write_tasks(
    out: Path, located: Path, texts: dict[str, list[str]], cfg: HarnessConfig
) -> tuple[list[str], dict[str, int]]:
    """Data files (``out/data``) and task definitions (``out/lm_eval_tasks``, naming the data as it
    will be found under ``located``) per language; returns the task names and the cloze item counts."""
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "lm_eval_tasks").mkdir(exist_ok=True)
    names, cloze_counts = [], {}
    for lang, docs in sorted(texts.items()):
        if "bpb" in cfg.tasks:
            data = out / "data" / f"bpb_{lang}.jsonl"
            data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs))
            names.append(f"lmforge_bpb_{lang}")
            (out / "lm_eval_tasks" / f"{names[-1]}.yaml").write_text(
                _task_yaml(names[-1], "lmforge_bpb.yaml", located / "data" / data.name)
            )
        if "cloze" in cfg.tasks:
            rng = np.random.default_rng([cfg.seed, int(hashlib.sha256(lang.encode()).hexdigest()[:8], 16)])
            items = cloze_items(docs, cfg, rng)
            if not items:
                continue
            cloze_counts[lang] = len(items)
            data = out / "data" / f"cloze_{lang}.jsonl"
            data.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
            names.append(f"lmforge_cloze_{lang}")
            (out / "lm_eval_tasks" / f"{names[-1]}.yaml").write_text(
                _task_yaml(names[-1], "lmforge_cloze.yaml", located / "data" / data.name)
            )
    return names, cloze_counts


def run_lm_eval(hf_dir: Path, task_dir: Path, names: list[str], out: Path, cache: Path, cfg: HarnessConfig) -> dict:
    """``python -m lm_eval`` offline on ``hf_dir``; returns lm-eval's results file as a dict."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={hf_dir},dtype=float32",
        "--tasks",
        ",".join(names),
        "--include_path",
        str(task_dir),
        "--output_path",
        str(out),
        "--device",
        device,
        "--batch_size",
        str(cfg.batch_size),
        "--seed",
        str(cfg.seed),
    ]
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(cache),  # datasets' cache of the JSON files: scratch space, not the user's home
        TOKENIZERS_PARALLELISM="false",
    )
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=cfg.timeout_seconds)
    except subprocess.TimeoutExpired:
        raise StageError(STAGE.name, str(hf_dir), f"lm_eval ran past {cfg.timeout_seconds} s") from None
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        if "No module named lm_eval" in done.stderr:
            raise StageError(
                STAGE.name, "lm_eval", "lm-evaluation-harness is not installed", "pip install 'lm_eval[hf]'"
            )
        raise StageError(STAGE.name, str(hf_dir), f"lm_eval exited with {done.returncode}:\n{tail}")
    found = sorted(out.rglob("results_*.json"))
    if not found:
        raise StageError(STAGE.name, str(hf_dir), f"lm_eval wrote no results under {out}")
    return json.loads(found[-1].read_text())


def _lmforge_bpb(export: Manifest, docs_by_lang: dict, cfg: HarnessConfig) -> dict[str, dict]:
    """lmforge's bits per byte from the export's ONNX fp32 graph: text alone, and with end-of-text."""
    from model.evaluate import EvalDoc, evaluate_logits_fn
    from model.onnx_generate import OnnxGenerator

    gen = OnnxGenerator(export.dir, "fp32")
    docs = [d for lang in sorted(docs_by_lang) for d in docs_by_lang[lang]]
    text_only = [EvalDoc(d.tokens[:-1], d.n_bytes, d.group) for d in docs]
    with_eot = evaluate_logits_fn(gen.lm.logits, docs, gen.eot_id, gen.block_size, cfg.batch_size)["by_group"]
    alone = evaluate_logits_fn(gen.lm.logits, text_only, gen.eot_id, gen.block_size, cfg.batch_size)["by_group"]
    return {
        lang: {"bits_per_byte_text": alone[lang]["bits_per_byte"], "bits_per_byte": with_eot[lang]["bits_per_byte"]}
        for lang in docs_by_lang
    }


def _markdown(report: dict) -> str:
    lines = [
        "# lm-evaluation-harness",
        "",
        f"lm_eval {report['lm_eval_version']} (`--model hf`) on `{report['hf_dir']}`, "
        f"{report['documents']} held-out documents of {report['dataset']}.",
        "",
        "| language | lm-eval bits/byte | lmforge bits/byte (text) | difference | lmforge bits/byte (with end-of-text) "
        "| cloze acc | cloze acc_norm | cloze items (chance) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def num(v, fmt=".4f"):
        return "-" if v is None else format(v, fmt)

    for lang, r in report["languages"].items():
        c = r.get("cloze") or {}
        chance = f"{c['items']} ({c['chance']:.2f})" if c else "-"
        lines.append(
            f"| {lang} | {num(r.get('lm_eval_bits_per_byte'))} | {num(r['bits_per_byte_text'])} "
            f"| {num(r.get('difference'), '+.2%')} | {num(r['bits_per_byte'])} | {num(c.get('acc'), '.3f')} "
            f"| {num(c.get('acc_norm'), '.3f')} | {chance} |"
        )
    return "\n".join(lines) + "\n"


def run(store: Store, cfg: HarnessConfig, export: Manifest, shards: Manifest, tokenizer: Manifest) -> Manifest:
    """Run the configured lm-eval tasks on ``export``'s ``hf/`` directory (the release flow skips the
    stage when ``tasks`` is empty)."""
    if not cfg.tasks:
        raise StageError(STAGE.name, "harness.tasks", "no lm-eval task is configured", "name bpb and/or cloze")
    b = STAGE.begin(store, cfg, export=export, shards=shards, tokenizer=tokenizer)
    if b.done:
        return b.done
    from tasks.tokenizer import load_tokenizer

    hf_dir = export.dir / "hf"
    if not (hf_dir / "config.json").is_file():
        raise StageError(STAGE.name, export.ref, "the export has no Hugging Face directory hf/", "rerun the release")
    docs = eval_docs(select(store, STAGE.name, shards, None, "val"), shards.meta["dtype"], cfg.docs_per_language)
    tok = load_tokenizer(tokenizer)
    docs_by_lang: dict[str, list] = {}
    texts: dict[str, list[str]] = {}
    for d in docs:
        text = tok.decode([int(t) for t in d.tokens[:-1]])
        if text.strip():
            docs_by_lang.setdefault(d.group, []).append(d)
            texts.setdefault(d.group, []).append(text)
    if not texts:
        raise StageError(STAGE.name, shards.ref, "the dataset has no held-out documents with text")
    log = stage_logger(STAGE.name)
    scratch = store.work_dir(STAGE.name, b.key)
    shutil.rmtree(scratch / "run", ignore_errors=True)  # what a killed run left
    names, cloze_counts = _write_tasks(scratch / "run", scratch / "run", texts, cfg)
    log.info("harness: lm_eval on %d tasks (%s)", len(names), ", ".join(names))
    results = run_lm_eval(
        hf_dir, scratch / "run" / "lm_eval_tasks", names, scratch / "run" / "out", scratch / "hf", cfg
    )
    with STAGE.writer(store, b) as w:
        # The same data and tasks in the artifact, naming the data where it is once published.
        _write_tasks(w.dir, store.artifact_dir(STAGE.name, b.key), texts, cfg)
        (w.dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
        ours = _lmforge_bpb(export, docs_by_lang, cfg)
        scores = results["results"]
        languages = {}
        for lang in sorted(texts):
            row = dict(ours[lang], documents=len(texts[lang]))
            bpb = scores.get(f"lmforge_bpb_{lang}", {})
            if bpb:
                row["lm_eval_bits_per_byte"] = bpb["bits_per_byte,none"]
                row["byte_perplexity"] = bpb["byte_perplexity,none"]
                row["word_perplexity"] = bpb["word_perplexity,none"]
                row["difference"] = (row["lm_eval_bits_per_byte"] - row["bits_per_byte_text"]) / row[
                    "bits_per_byte_text"
                ]
            cloze = scores.get(f"lmforge_cloze_{lang}", {})
            if cloze:
                row["cloze"] = {
                    "acc": cloze["acc,none"],
                    "acc_norm": cloze["acc_norm,none"],
                    "items": cloze_counts[lang],
                    "chance": 1 / cfg.cloze_choices,
                }
            languages[lang] = row
        report = {
            "lm_eval_version": results.get("lm_eval_version"),
            "hf_dir": str(hf_dir),
            "dataset": shards.ref,
            "documents": sum(len(t) for t in texts.values()),
            "tasks": names,
            "languages": languages,
        }
        (w.dir / "report.json").write_text(json.dumps(report, indent=2))
        (w.dir / "report.md").write_text(_markdown(report))
        w.meta.update({"tasks": names, "languages": languages})
    return w.manifest


task = stage_task(STAGE, run)
