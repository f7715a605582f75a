"""User SQL filters over one dataset's documents: checked, then evaluated in a sandbox.

``finetune.subset_sql`` and ``evaluate.where_sql`` are form fields: anyone who can start a
run types them. A filter is a WHERE condition over the documents of one dataset, and it
must not reach anything else: other tables, files, settings, the environment.

Design decisions (defence in depth, each layer enough on its own for what it covers):
- **Parsed first.** DuckDB parses ``SELECT 1 FROM documents WHERE <filter>``
  (``json_serialize_sql``, nothing executed): it must be one plain SELECT whose condition
  holds no subquery. No subquery means no other table and no table function
  (``read_text``, ``glob``, ``duckdb_settings()``) can be named at all.
- **Evaluated in a sandbox.** The dataset's rows are handed, as Arrow, to a fresh in-memory
  DuckDB connection that holds nothing else, with external access (files, HTTP), extension
  loading and configuration changes off. The filter is applied as one expression
  (``duckdb.SQLExpression``: no second statement).
- **Errors in words.** The user sees why the filter is not valid (a syntax error, an
  unknown column, a forbidden construct, a failure on the data); DuckDB's own message,
  which can quote data, goes only to this process's log.
"""

from __future__ import annotations

import json
import logging

import duckdb
import pyarrow as pa

log = logging.getLogger("lmforge.catalog")

SANDBOX = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "lock_configuration": True,
}
"""DuckDB settings of every connection that evaluates user SQL."""

_ROW = "__lmforge_row"


class FilterError(ValueError):
    """A user filter that is not valid; the message says why in words, never DuckDB's raw text."""


def _subqueries(node) -> int:
    """How many SUBQUERY expressions a serialized expression tree holds."""
    if isinstance(node, dict):
        own = 1 if node.get("class") == "SUBQUERY" else 0
        return own + sum(_subqueries(v) for v in node.values())
    if isinstance(node, list):
        return sum(_subqueries(v) for v in node)
    return 0


def check_filter(where_sql: str) -> None:
    """Refuse a filter that is not one plain condition (FilterError, in words)."""
    if not where_sql.strip():
        raise FilterError("the filter is empty")
    con = duckdb.connect(":memory:", config=SANDBOX)
    try:
        tree = json.loads(
            con.execute("SELECT json_serialize_sql(?)", [f"SELECT 1 FROM documents WHERE {where_sql}"]).fetchall()[0][0]
        )
    finally:
        con.close()
    if tree.get("error"):
        log.info("filter %r does not parse: %s", where_sql, tree.get("error_message"))
        raise FilterError("it is not a valid SQL condition (a syntax error)")
    statements = tree.get("statements") or []
    node = statements[0].get("node", {}) if len(statements) == 1 else {}
    source = node.get("from_table", {})
    if (
        node.get("type") != "SELECT_NODE"
        or source.get("type") != "BASE_TABLE"
        or source.get("table_name") != "documents"
    ):
        raise FilterError("it is not one condition: it must be a WHERE condition alone, with no statement around it")
    if _subqueries(node.get("where_clause")):
        raise FilterError("it holds a subquery (SELECT ...): a filter may name the documents' columns only")


def _reason(error: duckdb.Error) -> str:
    if isinstance(error, duckdb.ParserException):
        return "it is not a valid SQL condition (a syntax error)"
    if isinstance(error, (duckdb.BinderException, duckdb.CatalogException)):
        return "it names a column, table or function that a filter cannot use"
    if isinstance(error, duckdb.PermissionException):
        return "it tries to reach files or settings, which a filter may not"
    return "it fails on the documents (a type mismatch, or an error it raises)"


def apply_filter(rows: pa.Table, where_sql: str, columns: list[str]) -> pa.Table:
    """The rows for which ``where_sql`` holds, in their order; ``columns`` are all the filter may name."""
    check_filter(where_sql)
    visible = rows.select(columns).append_column(_ROW, pa.array(range(rows.num_rows), pa.int64()))
    con = duckdb.connect(":memory:", config=SANDBOX)
    try:
        con.register("documents", visible)
        keep = con.table("documents").filter(duckdb.SQLExpression(where_sql)).select(_ROW).order(_ROW).fetchall()
    except duckdb.Error as e:
        log.info("filter %r failed: %s: %s", where_sql, type(e).__name__, e)
        raise FilterError(_reason(e)) from None
    finally:
        con.close()
    return rows.take(pa.array([r[0] for r in keep], pa.int64()))
