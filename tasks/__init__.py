"""One module per pipeline stage: a plain ``run(store, cfg, **inputs) -> Manifest`` and a thin Prefect task."""
