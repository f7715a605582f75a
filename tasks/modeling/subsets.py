"""Document subsets of a dataset, chosen by SQL over the catalog.

The catalog's ``documents`` table knows where every document's tokens are (shard,
start, n_tokens) and what it is (lang, source, signals, split...). A finetune set or an
evaluation slice is a WHERE clause over it; this module turns the matching rows into
token files (for the trainer) or evaluation documents (for scoring).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from storage.artifact import Manifest, Store
from storage.catalog import Catalog, CatalogBusy, CatalogError, token_spans
from storage.tokens import read_spans
from tasks.stage import StageError


def select(store: Store, stage: str, shards: Manifest, where_sql: str | None, split: str | None) -> pa.Table:
    """Catalog rows of ``shards`` matching ``where_sql`` in ``split``.

    A bad filter is a StageError (not retried); a catalog busy in another process is a
    RuntimeError, which the task's retries take care of.
    """
    try:
        with Catalog(store.catalog_path, read_only=True) as cat:
            return cat.select_documents(shards.ref, where_sql, split)
    except CatalogBusy as e:
        raise RuntimeError(f"[{stage}] catalog busy: {e}") from None
    except CatalogError as e:
        raise StageError(stage, f"filter {where_sql!r}", str(e)) from None


def write_token_file(table: pa.Table, dtype: str, path: Path) -> int:
    """Concatenate the rows' token spans into one flat file; returns the token count."""
    n = 0
    with open(path, "wb") as f:
        for toks in read_spans(token_spans(table), dtype):
            arr = np.ascontiguousarray(toks, dtype=np.dtype(dtype).newbyteorder("<"))
            f.write(arr.tobytes())
            n += len(arr)
    return n


def eval_docs(table: pa.Table, dtype: str, max_docs_per_group: int | None = None, group_column: str = "lang"):
    """:class:`model.evaluate.EvalDoc` per row, grouped by language (capped per group)."""
    from model.evaluate import EvalDoc

    groups = table.column(group_column).to_pylist() if group_column in table.column_names else ["all"] * table.num_rows
    n_bytes = table.column("n_bytes").to_pylist()
    seen: dict[str, int] = {}
    docs = []
    for toks, nb, g in zip(read_spans(token_spans(table), dtype), n_bytes, groups):
        g = g or "unknown"
        if max_docs_per_group is not None and seen.get(g, 0) >= max_docs_per_group:
            continue
        seen[g] = seen.get(g, 0) + 1
        docs.append(EvalDoc(np.asarray(toks, dtype=np.int64), int(nb), g))
    return docs
