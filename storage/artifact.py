"""Artifacts: the only way data moves between stages.

An artifact is a directory ``<store>/<stage>/<key>/`` holding ``manifest.json`` and its
files (Parquet parts, token shards, a tokenizer, a checkpoint...). Design decisions:

- ``key`` is a content hash of (parent manifest digests, stage config, stage code
  version), computed by :func:`artifact_key`. The same hash is the Prefect cache key, so
  a rerun with unchanged inputs is a hit and a change upstream invalidates exactly what
  depends on it.
- Writing goes to a temporary sibling directory; :class:`ArtifactWriter` checksums
  every file, writes the manifest last, and publishes with one ``rename``
  (:mod:`storage.atomic`). A crash leaves only a ``.tmp-*`` directory that no reader
  trusts and the next writer sweeps away.
- Tasks pass :class:`Manifest` objects (small) between each other, never data.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from storage.atomic import fsync_file, new_temp_dir, publish_dir
from storage.faults import pause_point
from storage.object_store import ObjectStore, cache_dir, is_object_store

MANIFEST = "manifest.json"
log = logging.getLogger("lmforge.store")
FORMAT_VERSION = "1"


class ArtifactError(RuntimeError):
    """An artifact is missing, corrupt or inconsistent; the message says which and why."""


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def safe_relative(name: str, where: str) -> str:
    """``name`` when it is a relative path that stays inside its directory; ArtifactError otherwise."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise ArtifactError(f"{where}: file path {name!r} is not a relative path inside the artifact")
    return name


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact, relative to its directory."""

    path: str
    bytes: int
    sha256: str
    rows: int | None = None


@dataclass
class Manifest:
    """What a stage published: enough to find, verify and explain its files."""

    stage: str
    key: str
    parents: list[str]
    config: dict[str, Any]
    code_version: str
    created_at: str
    files: list[FileEntry]
    counters: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    root: str = ""

    @property
    def ref(self) -> str:
        return f"{self.stage}/{self.key}"

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.stage / self.key

    def path(self, name: str) -> Path:
        """Absolute path of one of this artifact's files (a relative path inside the artifact)."""
        return self.dir / safe_relative(name, f"artifact {self.ref}")

    def files_with_prefix(self, prefix: str) -> list[FileEntry]:
        return sorted((f for f in self.files if f.path.startswith(prefix)), key=lambda f: f.path)

    def digest(self) -> str:
        """Content digest: the stage, key, parents and every file's path and checksum.

        Not where the store is (``root``), when the artifact was made, or its counters
        and meta (which can hold timings): an artifact rebuilt with the same content has
        the same digest, so what was built from it stays valid.
        """
        d = {
            "stage": self.stage,
            "key": self.key,
            "parents": self.parents,
            "files": [(f.path, f.sha256) for f in sorted(self.files, key=lambda f: f.path)],
        }
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        d = dict(d)
        d["files"] = [FileEntry(**f) for f in d.get("files", [])]
        return cls(**d)


def artifact_key(stage: str, parents: Iterable[Manifest], config: dict[str, Any], code_version: str) -> str:
    """Content hash that names a stage's output: parents' digests + config + code."""
    payload = {
        "format": FORMAT_VERSION,
        "stage": stage,
        "parents": [p.digest() for p in parents],
        "config": config,
        "code": code_version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


_VERIFIED: dict[tuple, str] = {}  # (path, inode, size, mtime_ns) -> sha256, for files verified in this process


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Store:
    """A root directory of artifacts plus the DuckDB catalog beside them.

    ``Store("s3://bucket/prefix")`` is a store on object storage: ``root`` is then this
    machine's local copy of it (:func:`storage.object_store.cache_dir`, or ``cache``), every
    artifact published here is uploaded, and one missing here is fetched from the bucket
    when it is there (:mod:`storage.object_store` says why this shape). ``url`` names the
    store either way: the bucket URL, or the local root.
    """

    def __init__(self, root: str | os.PathLike[str], *, cache: str | os.PathLike[str] | None = None):
        self.remote: ObjectStore | None = None
        if is_object_store(root):
            self.remote = ObjectStore(str(root))
            root = cache or cache_dir(self.remote.url)
        self.root = Path(root).expanduser().resolve()
        self.url = self.remote.url if self.remote else str(self.root)
        self._in_remote: set[str] = set()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_in_remote": set()}

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.duckdb"

    def work_dir(self, stage: str, key: str) -> Path:
        """Scratch space that survives a crash (e.g. training checkpoints to resume from)."""
        d = self.root / "_work" / stage / key
        d.mkdir(parents=True, exist_ok=True)
        return d

    def lock_path(self, stage: str, key: str) -> Path:
        """The lock file that two runs building the same artifact take turns on."""
        self.artifact_dir(stage, key)  # the same names check
        return self.root / "_locks" / f"{stage}-{key}.lock"

    def artifact_dir(self, stage: str, key: str) -> Path:
        """``<root>/<stage>/<key>``; both must be plain names, so no ref reaches outside the store."""
        for part, what in ((stage, "stage"), (key, "key")):
            if not _NAME.fullmatch(part or ""):
                raise ArtifactError(
                    f"artifact {stage}/{key}: {what} {part!r} is not a plain name (letters, digits, '_', '-', '.')"
                )
        return self.root / stage / key

    def load(self, stage: str, key: str) -> Manifest | None:
        """The published manifest, or None when the artifact does not exist (yet).

        Every file the manifest lists must be a relative path inside the artifact.
        """
        mpath = self.artifact_dir(stage, key) / MANIFEST
        if not mpath.exists() and not (self.remote is not None and self._fetch(stage, key)):
            return None
        m = self._parse_manifest(stage, key, mpath.read_bytes())
        m.root = str(self.root)
        if self.remote is not None and m.ref not in self._in_remote:
            self.upload(m)  # published here but not (all) uploaded: an earlier upload failed
        return m

    def is_published(self, stage: str, key: str) -> bool:
        """Whether the artifact exists, here or in the bucket, without fetching it."""
        if (self.artifact_dir(stage, key) / MANIFEST).exists():
            return True
        return self.remote is not None and self.remote.exists(f"{stage}/{key}/{MANIFEST}")

    def refs(self) -> list[tuple[str, str]]:
        """``(stage, key)`` of every artifact directory here and in the bucket, sorted."""
        found = set()
        for stage_dir in (p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []:
            if _NAME.fullmatch(stage_dir.name) and not stage_dir.name.startswith("_"):
                found.update(
                    (stage_dir.name, k.name) for k in stage_dir.iterdir() if k.is_dir() and _NAME.fullmatch(k.name)
                )
        if self.remote is not None:
            for stage in self.remote.list_dirs():
                if _NAME.fullmatch(stage) and not stage.startswith("_"):
                    found.update((stage, k) for k in self.remote.list_dirs(stage) if _NAME.fullmatch(k))
        return sorted(found)

    @staticmethod
    def _parse_manifest(stage: str, key: str, raw: bytes) -> Manifest:
        m = Manifest.from_dict(json.loads(raw))
        if (m.stage, m.key) != (stage, key):
            raise ArtifactError(f"artifact {stage}/{key}: its manifest names {m.stage}/{m.key}")
        for f in m.files:
            safe_relative(f.path, f"artifact {m.ref}")
        return m

    def _fetch(self, stage: str, key: str) -> bool:
        """Copy ``stage/key`` from the bucket into this machine's copy; False when the bucket has none.

        Every file is checked against the manifest before the one rename that publishes it
        here, so a corrupt object never becomes a local artifact.
        """
        raw = self.remote.read_bytes(f"{stage}/{key}/{MANIFEST}")
        if raw is None:
            return False
        m = self._parse_manifest(stage, key, raw)
        final = self.artifact_dir(stage, key)
        tmp = new_temp_dir(final)
        try:
            for f in m.files:
                dst = tmp / f.path
                dst.parent.mkdir(parents=True, exist_ok=True)
                self.remote.get(f"{stage}/{key}/{f.path}", dst)
                if dst.stat().st_size != f.bytes or _sha256_file(dst) != f.sha256:
                    raise ArtifactError(
                        f"artifact {m.ref} in {self.remote.url}: file {f.path} does not match its checksum"
                        f" (a damaged object); delete {self.remote.url}/{stage}/{key}/{MANIFEST} to build it again"
                    )
            (tmp / MANIFEST).write_bytes(raw)
            publish_dir(tmp, final, replace=False)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._in_remote.add(m.ref)
        log.info("store: fetched %s from %s (%d files)", m.ref, self.remote.url, len(m.files))
        return True

    def upload(self, manifest: Manifest) -> None:
        """Put a published artifact into the bucket: its files, then its manifest (so a
        manifest there means every file is there). Nothing to do for a local store, or for
        an artifact the bucket already has."""
        if self.remote is None or manifest.ref in self._in_remote:
            return
        base = f"{manifest.stage}/{manifest.key}"
        if not self.remote.exists(f"{base}/{MANIFEST}"):
            for f in manifest.files:
                self.remote.put(manifest.path(f.path), f"{base}/{f.path}")
            self.remote.put(manifest.dir / MANIFEST, f"{base}/{MANIFEST}")
            log.info("store: uploaded %s to %s (%d files)", manifest.ref, self.remote.url, len(manifest.files))
        self._in_remote.add(manifest.ref)

    def problem(self, manifest: Manifest) -> str | None:
        """Why ``manifest`` is not a usable artifact of this store (missing, a file gone or
        changed), or None when it is published here and every file verifies."""
        published = self.load(manifest.stage, manifest.key)
        if published is None:
            return f"artifact {manifest.ref} is not in the store {self.root}"
        try:
            self.verify(published)
        except ArtifactError as e:
            return str(e)
        return None

    def verify(self, manifest: Manifest) -> None:
        """Check every file's size and sha256; raise ArtifactError naming the first bad one.

        A file checked before in this process and not touched since (same inode, size and
        modification time) is not hashed again: a run verifies each input once, however
        many stages read it.
        """
        for f in manifest.files:
            p = manifest.path(f.path)
            try:
                st = p.stat()
            except FileNotFoundError:
                raise ArtifactError(f"artifact {manifest.ref}: file {f.path} is missing") from None
            seen = (str(p), st.st_ino, st.st_size, st.st_mtime_ns)
            if _VERIFIED.get(seen) == f.sha256:
                continue
            if st.st_size != f.bytes or _sha256_file(p) != f.sha256:
                raise ArtifactError(f"artifact {manifest.ref}: file {f.path} does not match its checksum")
            _VERIFIED[seen] = f.sha256

    def quarantine(self, manifest: Manifest) -> Path:
        """Move a damaged artifact aside (``<stage>/.damaged-<key>-<id>``) so its key can be rebuilt;
        its files stay there to look at."""
        aside = self.root / manifest.stage / f".damaged-{manifest.key}-{uuid.uuid4().hex[:8]}"
        os.rename(self.artifact_dir(manifest.stage, manifest.key), aside)
        return aside

    def writer(
        self,
        stage: str,
        key: str,
        *,
        parents: Iterable[Manifest] = (),
        config: dict[str, Any] | None = None,
        code_version: str = "",
    ) -> "ArtifactWriter":
        return ArtifactWriter(self, stage, key, [p.ref for p in parents], config or {}, code_version)


class ArtifactWriter:
    """Context manager that builds an artifact in a temp dir and publishes it atomically.

    Usage::

        with store.writer("dedup", key, parents=[docs], config=cfg, code_version=v) as w:
            w.write_table(table)             # part-00000.parquet, part-00001.parquet ...
            w.write_table(dropped, "dropped")
            (w.dir / "tokenizer.json").write_text(...)   # any other file
            w.counters["docs_out"] = n
        manifest = w.manifest
    """

    def __init__(self, store: Store, stage: str, key: str, parents: list[str], config: dict, code_version: str):
        self.store = store
        self.stage = stage
        self.key = key
        self.parents = parents
        self.config = config
        self.code_version = code_version
        self.counters: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self._rows: dict[str, int] = {}
        self._parts: dict[str, int] = {}
        self.manifest: Manifest | None = None
        self.dir: Path | None = None

    def __enter__(self) -> "ArtifactWriter":
        self.dir = new_temp_dir(self.store.artifact_dir(self.stage, self.key))
        return self

    def write_table(self, table: pa.Table, prefix: str = "part") -> str:
        """Write one zstd Parquet part named ``<prefix>-NNNNN.parquet``; returns its name."""
        n = self._parts.get(prefix, 0)
        self._parts[prefix] = n + 1
        name = f"{prefix}-{n:05d}.parquet"
        pq.write_table(table, self.dir / name, compression="zstd")
        self._rows[name] = table.num_rows
        return name

    def add_file(self, src: Path, name: str, rows: int | None = None) -> str:
        """Put a finished file (a part made by a worker) into the artifact as ``name``.

        A hard link when ``src`` is on the same file system (no copy of the data), a copy
        otherwise; ``src`` stays where it is until the artifact is published.
        """
        dst = self.dir / safe_relative(name, f"artifact {self.stage}/{self.key}")
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        if rows is not None:
            self._rows[name] = rows
        return name

    def set_rows(self, name: str, rows: int) -> None:
        """Record a row count for a non-Parquet file (e.g. documents in a token shard)."""
        self._rows[name] = rows

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            return
        try:
            self._publish()
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _publish(self) -> None:
        pause_point(self.stage)  # every file written, nothing published: where a kill -9 is tested
        entries = []
        for p in sorted(q for q in self.dir.rglob("*") if q.is_file()):
            rel = str(p.relative_to(self.dir))
            fsync_file(p)
            entries.append(FileEntry(rel, p.stat().st_size, _sha256_file(p), self._rows.get(rel)))
        manifest = Manifest(
            stage=self.stage,
            key=self.key,
            parents=self.parents,
            config=self.config,
            code_version=self.code_version,
            created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(),
            files=entries,
            counters=self.counters,
            meta=self.meta,
            root=str(self.store.root),
        )
        d = manifest.to_dict()
        d.pop("root")
        (self.dir / MANIFEST).write_text(json.dumps(d, indent=2, default=str))
        if publish_dir(self.dir, self.store.artifact_dir(self.stage, self.key), replace=False):
            self.manifest = manifest
            self.store.upload(manifest)
            return
        # Same key means same content: another run published it first. Keep theirs.
        existing = self.store.load(self.stage, self.key)
        if existing is None:
            raise ArtifactError(f"artifact {self.stage}/{self.key}: directory exists without a manifest")
        self.manifest = existing


class PartBuffer:
    """Buffers rows (dicts) or tables and writes ``<prefix>-NNNNN.parquet`` parts of bounded size.

    A part closes at ``max_rows`` rows or when the rows' ``size_of`` reaches ``max_bytes``
    (e.g. raw HTML bodies), so a stage streams any input with bounded memory.
    """

    def __init__(
        self,
        writer: "ArtifactWriter",
        prefix: str = "part",
        schema: pa.Schema | None = None,
        max_rows: int = 20_000,
        max_bytes: int = 128 << 20,
        size_of=None,
    ):
        self.writer, self.prefix, self.schema = writer, prefix, schema
        self.max_rows, self.max_bytes, self.size_of = max_rows, max_bytes, size_of
        self._rows: list[dict] = []
        self._tables: list[pa.Table] = []
        self._n = 0
        self._bytes = 0

    def add(self, row: dict) -> None:
        self._rows.append(row)
        self._n += 1
        if self.size_of is not None:
            self._bytes += self.size_of(row)
        if self._n >= self.max_rows or self._bytes >= self.max_bytes:
            self.flush()

    def add_table(self, table: pa.Table) -> None:
        self._gather()
        self._tables.append(table)
        self._n += table.num_rows
        while self._n >= self.max_rows:
            self._write(self.max_rows)

    def flush(self) -> None:
        """Write what is buffered (nothing when empty)."""
        self._gather()
        while self._n:
            self._write(min(self._n, self.max_rows))
        self._bytes = 0

    def _gather(self) -> None:
        if self._rows:
            self._tables.append(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def _write(self, n: int) -> None:
        table = pa.concat_tables(self._tables) if len(self._tables) > 1 else self._tables[0]
        self.writer.write_table(table.slice(0, n), self.prefix)
        rest = table.slice(n)
        self._tables, self._n = ([rest] if rest.num_rows else []), rest.num_rows


def columns_of(manifest: Manifest, prefix: str = "part") -> set[str]:
    """Column names of an artifact's ``<prefix>-*.parquet`` parts, from the first one's schema (empty without parts)."""
    parts = [f for f in manifest.files_with_prefix(prefix + "-") if f.path.endswith(".parquet")]
    return set(pq.read_schema(manifest.path(parts[0].path)).names) if parts else set()


def read_table(manifest: Manifest, prefix: str = "part", columns: list[str] | None = None) -> pa.Table:
    """All ``<prefix>-*.parquet`` parts of an artifact as one table (empty if none)."""
    parts = [manifest.path(f.path) for f in manifest.files_with_prefix(prefix + "-") if f.path.endswith(".parquet")]
    if not parts:
        return pa.table({})
    tables = [pq.read_table(p, columns=columns) for p in parts]
    return pa.concat_tables(tables, promote_options="default")


def iter_batches(manifest: Manifest, prefix: str = "part", batch_size: int = 4096, columns: list[str] | None = None):
    """Stream record batches over an artifact's parts without loading them all."""
    for f in manifest.files_with_prefix(prefix + "-"):
        if f.path.endswith(".parquet"):
            yield from pq.ParquetFile(manifest.path(f.path)).iter_batches(batch_size=batch_size, columns=columns)
