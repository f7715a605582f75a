"""Prefect's cache records of stage tasks: plain JSON naming an artifact, nothing that runs.

A stage task's result is a *reference* to what it published, ``{"stage": ..., "key": ...}``
(or ``null`` when it published nothing); the flow loads and verifies the manifest from the
store (:func:`flows.records.run_stage`). Prefect persists that result as a cache record in
the store's ``_prefect_results/`` (the ``PREFECT_RESULTS_LOCAL_STORAGE_PATH`` setting), a
directory that every worker shares and that anyone who can write the store can write.

Why a guard and not only ``result_serializer="json"``: Prefect deserializes a record with
the serializer *the record itself declares*, so a record written as ``{"serializer":
{"type": "pickle"}, ...}`` would be unpickled (code run) by every worker that looks up
that key, and a JSON serializer record names its own decoder by import path.
:class:`ArtifactRecords` therefore reads a record only after :func:`check_record` found
exactly what :data:`RECORD_SERIALIZER` writes: the JSON serializer with no object hooks,
and a result that is ``null`` or a reference of two plain strings. Anything else is not a
record of ours: Prefect treats it as missing, the stage runs (and finds its artifact in the
store when it is there), and the new record replaces the refused one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect.filesystems import LocalFileSystem
from prefect.serializers import JSONSerializer
from prefect.settings import get_current_settings

from storage.artifact import Manifest

log = logging.getLogger("lmforge.cache")

RECORDS_BLOCK = "lmforge-artifact-records/records"
"""The result storage of every stage task, by name: Prefect accepts a storage block only when
it is saved on the server, so :func:`ensure_records_block` saves it before a flow submits a stage."""

RECORD_SERIALIZER = JSONSerializer(object_encoder=None, object_decoder=None)
"""The only serializer a stage's record may declare: plain ``json``, no import-path hooks."""

_SERIALIZER_FIELDS = RECORD_SERIALIZER.model_dump(mode="json")


class RecordRefused(ValueError):
    """A cache record that is not plain JSON naming an artifact; it is never deserialized."""


def manifest_ref(manifest: Manifest | None) -> dict[str, str] | None:
    """What a stage task returns (and Prefect records): the published artifact's stage and key."""
    return None if manifest is None else {"stage": manifest.stage, "key": manifest.key}


def check_ref(ref: Any) -> dict[str, str] | None:
    """``ref`` when it is ``None`` or exactly ``{"stage": str, "key": str}``; else :class:`RecordRefused`."""
    if ref is None:
        return None
    if isinstance(ref, dict) and set(ref) == {"stage", "key"} and all(isinstance(v, str) for v in ref.values()):
        return ref
    raise RecordRefused(f"the result is not an artifact reference: {str(ref)[:200]!r}")


def check_record(content: bytes) -> bytes:
    """``content`` unchanged when it is a record :class:`ArtifactRecords` may hand to Prefect.

    Parsed with the standard library's ``json`` only (no hooks, no imports): the serializer
    must equal :data:`RECORD_SERIALIZER` field for field, and the result must be an
    artifact reference (:func:`check_ref`).
    """
    try:
        record = json.loads(content)
        serializer = record["metadata"]["serializer"]
        result = record["result"]
    except (ValueError, TypeError, KeyError) as e:
        raise RecordRefused(f"not a JSON cache record ({type(e).__name__})") from None
    if serializer != _SERIALIZER_FIELDS:
        raise RecordRefused(f"declares serializer {str(serializer)[:200]!r}, not plain JSON")
    try:
        ref = json.loads(result) if isinstance(result, str) else result
    except ValueError:
        raise RecordRefused("its result is not JSON") from None
    check_ref(ref)
    return content


class ArtifactRecords(LocalFileSystem):
    """Prefect result storage that returns only records passing :func:`check_record`.

    It reads and writes under the current ``PREFECT_RESULTS_LOCAL_STORAGE_PATH``, looked up
    at each call (the command line sets it per store, after this module is imported). A
    refused record is logged and reported to Prefect as unreadable, which Prefect takes as
    "not cached".
    """

    _block_type_name = "lmforge artifact records"
    _block_type_slug = "lmforge-artifact-records"

    def _resolve_path(self, path: str) -> Path:
        self.basepath = str(get_current_settings().results.local_storage_path)
        return super()._resolve_path(path)

    async def aread_path(self, path: str) -> bytes:
        return self._checked(path, await super().aread_path(path))

    def read_path(self, path: str, **kwargs) -> bytes:  # Prefect calls it with _sync=True
        return self._checked(path, LocalFileSystem.read_path(self, path, _sync=True))

    def _checked(self, path: str, content: bytes) -> bytes:
        try:
            return check_record(content)
        except RecordRefused as e:
            log.warning("cache record %s refused (%s); the stage runs instead of trusting it", path, e)
            raise


_saved_on: set[str] = set()


def ensure_records_block() -> None:
    """Save :data:`RECORDS_BLOCK` on the current Prefect API (once per process and API).

    Idempotent (``overwrite=True``); the block holds no setting a user could turn against
    the guard (the path comes from this process's settings, not from the saved document).
    """
    api = str(get_current_settings().api.url or "ephemeral")
    if api in _saved_on:
        return
    ArtifactRecords().save(RECORDS_BLOCK.split("/")[1], overwrite=True)
    _saved_on.add(api)
