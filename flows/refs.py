"""Artifact references as flow parameters.

Flows after data-refresh accept optional artifact refs (``"shards/<key>"``) so a person
can train or release a specific dataset or model version from the UI; empty means
"build it from the config", which runs the upstream flow (all cache hits when nothing
changed).
"""

from __future__ import annotations

from storage.artifact import ArtifactError, Manifest, Store
from storage.catalog import register_dataset
from tasks.stage import StageError


def load_ref(store: Store, ref: str, expect_stage: str) -> Manifest:
    """The published manifest behind ``stage/key``, or a clear error."""
    stage, _, key = ref.partition("/")
    if stage != expect_stage or not key:
        raise StageError(expect_stage, ref, f"expected an artifact ref like '{expect_stage}/<key>'")
    try:
        m = store.load(stage, key)
    except ArtifactError as e:
        raise StageError(
            expect_stage, ref, str(e), f"give a ref like '{expect_stage}/<key>' from the catalog"
        ) from None
    if m is None:
        raise StageError(
            expect_stage, ref, f"no such artifact in {store.root}", "run the upstream flow first or leave it empty"
        )
    return m


def parent_of(store: Store, manifest: Manifest, stage: str) -> Manifest:
    """The parent artifact of a given stage (e.g. the tokenizer of a shards artifact)."""
    for ref in manifest.parents:
        if ref.startswith(stage + "/"):
            return load_ref(store, ref, stage)
    raise StageError(manifest.stage, manifest.ref, f"has no {stage} parent")


def indexed_dataset(store: Store, model: Manifest) -> tuple[Manifest, Manifest]:
    """The dataset (shards) a model was trained on and its tokenizer, with the dataset indexed
    in the catalog: the model stages select documents there, and a lost catalog is rebuilt."""
    data = parent_of(store, model, "shards")
    register_dataset(store, data)
    return data, parent_of(store, data, "tokenizer")


def ancestors(store: Store, manifest: Manifest) -> list[Manifest]:
    """Every ancestor of an artifact still in the store, nearest first (breadth-first, each once)."""
    out: list[Manifest] = []
    seen = {manifest.ref}
    todo = list(manifest.parents)
    while todo:
        ref = todo.pop(0)
        if ref in seen:
            continue
        seen.add(ref)
        stage, _, key = ref.partition("/")
        m = store.load(stage, key)
        if m is not None:
            out.append(m)
            todo.extend(m.parents)
    return out
