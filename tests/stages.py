"""The eleven stages, in pipeline order: what several tests walk over."""

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
]
DATA_STAGES, MODEL_STAGES = STAGES[:7], STAGES[7:]
