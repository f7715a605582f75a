"""Dataset artifacts, token shards and the DuckDB catalog. Knows nothing of torch or Prefect."""
