"""The twelve stages, in pipeline order, and a one-page ingest artifact: what several tests walk over."""

STAGES = [
    "ingest",
    "extract",
    "dedup",
    "filter",
    "augment",
    "tokenizer",
    "shards",
    "pretrain",
    "finetune",
    "evaluate",
    "export",
    "compare",
]
DATA_STAGES, MODEL_STAGES = STAGES[:7], STAGES[7:]
OPTIONAL_STAGES = ["harness"]  # run by the release only when configured (harness.tasks)


def one_page_ingest(store):
    """A published ``ingest`` artifact holding one English HTML page (extract keeps it)."""
    import pyarrow as pa

    body = "<html><body><p>" + "A sentence about package management on Debian. " * 10 + "</p></body></html>"
    with store.writer("ingest", "raw") as w:
        w.write_table(
            pa.table(
                {
                    "doc_id": ["d"],
                    "url": ["http://h.org/a"],
                    "source": ["crawl"],
                    "fetched_at": ["t"],
                    "content_type": ["text/html"],
                    "charset": ["utf-8"],
                    "body": [body.encode()],
                }
            )
        )
    return w.manifest
