"""A store on object storage: ``store: s3://bucket/prefix`` (AWS S3 or any S3-compatible server).

Design decisions:
- The bucket is the source of truth and every machine keeps a local copy of what it
  reads and writes (the *cache*, ``$LMFORGE_STORE_CACHE/<hash of the URL>``, default
  ``~/.cache/lmforge/stores``). Stages, torch, DuckDB and onnxruntime keep reading plain
  local files; only publishing and fetching an artifact talk to the bucket. This is how
  the Hugging Face hub cache and DVC remotes work, and it keeps ``storage/`` one code
  path: an artifact is published locally first (:mod:`storage.atomic`), then uploaded.
- The bucket mirrors the local layout, ``<prefix>/<stage>/<key>/<file>``, and
  ``manifest.json`` is uploaded last: an artifact whose manifest is in the bucket has
  every file there, so a reader that finds the manifest trusts it, exactly like the
  atomic rename locally. A killed upload leaves files without a manifest, which nobody
  reads and the next publish overwrites (same key, same content).
- A fetch checks every file's size and sha256 against the manifest in a temporary
  directory and publishes it into the cache with one rename: a corrupt or truncated
  object is an error naming it, and nothing half-fetched is ever read.
- The connection comes from the standard AWS settings (``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL``
  for MinIO, Ceph, moto or any other S3-compatible server), never from the profile: a
  profile names a place, not a secret. pyarrow's own S3 client does the transfers; boto3
  sends the one request pyarrow cannot, a conditional create (:meth:`ObjectStore.put_new`),
  which the deploy ledger (:mod:`storage.promotions`) takes its sequence numbers with.
- What stays on the machine: ``_work`` (scratch, checkpoints of a running stage), the
  lock files, the DuckDB catalog (an index; ``lmforge catalog rebuild`` recreates it from
  the bucket) and Prefect's records. Deploy decisions go to the bucket as well.

Standard library at import time: the profile code asks :func:`is_object_store` before any
heavy import; pyarrow is imported on first use.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

SCHEMES = ("s3://",)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=-]{0,254}")
CHUNK = 8 << 20


class ObjectStoreError(OSError):
    """The object store cannot be reached or refused an operation; the message names the URL and the object."""


def is_object_store(store: str | os.PathLike[str]) -> bool:
    """Whether ``store`` names an object store (``s3://...``) rather than a local directory."""
    return isinstance(store, str) and store.strip().lower().startswith(SCHEMES)


def parse_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket[/prefix]``; ValueError saying what is wrong otherwise."""
    text = url.strip()
    if not text.lower().startswith("s3://"):
        raise ValueError(f"store {url!r}: an object store URL starts with s3://")
    bucket, _, prefix = text[5:].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"store {url!r}: {bucket!r} is not a bucket name (3-63 lowercase letters, digits, '.', '-')")
    parts = [p for p in prefix.split("/") if p]
    for p in parts:
        if not _PREFIX_PART.fullmatch(p) or p in (".", ".."):
            raise ValueError(
                f"store {url!r}: prefix part {p!r} is not a plain name (letters, digits, '_', '-', '.', '=')"
            )
    return bucket, "/".join(parts)


def endpoint() -> str:
    """The S3 endpoint this process uses: ``AWS_ENDPOINT_URL``, or AWS itself ("")."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


def cache_dir(url: str) -> Path:
    """This machine's local copy of the store at ``url`` (see the module docstring).

    Keyed by the URL and the endpoint: the same bucket name on another server is another store.
    """
    bucket, prefix = parse_url(url)
    base = os.environ.get("LMFORGE_STORE_CACHE") or "~/.cache/lmforge/stores"
    digest = hashlib.sha256(f"{endpoint()}|{bucket}/{prefix}".encode()).hexdigest()[:16]
    return Path(base).expanduser().resolve() / f"{bucket}-{digest}"


class ObjectStore:
    """Objects under ``s3://bucket/prefix``, addressed by their path relative to it.

    Picklable (a Store crosses into Prefect task runs and worker processes): the client is
    made on first use in each process.
    """

    def __init__(self, url: str):
        self.bucket, self.prefix = parse_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._fs = None

    def __reduce__(self):
        return (ObjectStore, (self.url,))

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    @property
    def fs(self):
        if self._fs is None:
            from pyarrow import fs as pafs

            options = {
                "connect_timeout": 10,
                "request_timeout": 120,
                "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=4),
            }
            if endpoint():
                options["endpoint_override"] = endpoint()
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region:
                options["region"] = region
            self._fs = pafs.S3FileSystem(**options)
        return self._fs

    def _key(self, rel: str) -> str:
        return "/".join(p for p in (self.prefix, rel) if p)

    def _path(self, rel: str) -> str:
        return f"{self.bucket}/{self._key(rel)}".rstrip("/")

    def _fail(self, what: str, rel: str, e: Exception) -> ObjectStoreError:
        return ObjectStoreError(f"object store {self.url}: cannot {what} {rel or '(the store)'}: {e}")

    def exists(self, rel: str) -> bool:
        """Whether the object ``rel`` exists."""
        from pyarrow import fs as pafs

        try:
            return self.fs.get_file_info(self._path(rel)).type == pafs.FileType.File
        except OSError as e:
            raise self._fail("look up", rel, e) from None

    def read_bytes(self, rel: str) -> bytes | None:
        """The content of a small object (a manifest), or None when there is none."""
        if not self.exists(rel):
            return None
        try:
            with self.fs.open_input_stream(self._path(rel)) as f:
                return f.read()
        except OSError as e:
            raise self._fail("read", rel, e) from None

    def get(self, rel: str, dest: Path) -> None:
        """Download ``rel`` to the local file ``dest`` (its folder must exist)."""
        try:
            with self.fs.open_input_stream(self._path(rel)) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)
        except FileNotFoundError:
            raise ObjectStoreError(f"object store {self.url}: {rel} is missing") from None
        except OSError as e:
            raise self._fail("download", rel, e) from None

    def put(self, src: Path, rel: str) -> None:
        """Upload the local file ``src`` as ``rel`` (pyarrow uploads large files in parts)."""
        try:
            with open(src, "rb") as f, self.fs.open_output_stream(self._path(rel)) as out:
                shutil.copyfileobj(f, out, CHUNK)
        except OSError as e:
            raise self._fail("upload", rel, e) from None

    def put_bytes(self, data: bytes, rel: str) -> None:
        try:
            with self.fs.open_output_stream(self._path(rel)) as out:
                out.write(data)
        except OSError as e:
            raise self._fail("upload", rel, e) from None

    def put_new(self, data: bytes, rel: str) -> bool:
        """Create the object ``rel`` only if it does not exist yet; False when it does (left as it was).

        S3's conditional write (``If-None-Match: *``): of two machines creating one key at
        once, exactly one succeeds, which an exists-then-put cannot promise. It goes through
        boto3, since pyarrow's client does not send the condition.
        """
        client = self._boto3()
        try:
            client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, IfNoneMatch="*")
        except Exception as e:  # botocore's ClientError, or a connection error
            code = getattr(e, "response", {}).get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise self._fail("create", rel, e) from None
        return True

    def _boto3(self):
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:
            raise ObjectStoreError(f"object store {self.url}: boto3 is needed for a conditional write ({e})") from None
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        config = Config(connect_timeout=10, read_timeout=120, retries={"max_attempts": 4, "mode": "standard"})
        return boto3.client("s3", endpoint_url=endpoint() or None, region_name=region, config=config)

    def list_files(self, rel: str) -> list[str]:
        """The names of the objects directly under ``rel`` (empty when there are none)."""
        return self._list(rel, directories=False)

    def list_dirs(self, rel: str = "") -> list[str]:
        """The names of the "folders" directly under ``rel`` (empty when there are none)."""
        return self._list(rel, directories=True)

    def list_tree(self, rel: str) -> list[str]:
        """The paths, relative to ``rel``, of every object under the "folder" ``rel`` (sorted)."""
        return sorted(self._tree(rel))

    def tree_bytes(self, rel: str) -> int:
        """The size of every object under the "folder" ``rel``, together."""
        return sum(self._tree(rel).values())

    def _tree(self, rel: str) -> dict[str, int]:
        from pyarrow import fs as pafs

        base = self._path(rel)
        return {i.path[len(base) + 1 :]: i.size for i in self._infos(rel, True) if i.type == pafs.FileType.File}

    def delete_tree(self, rel: str) -> None:
        """Delete every object under the "folder" ``rel`` (nothing when there is none)."""
        from pyarrow import fs as pafs

        try:
            if self.fs.get_file_info(self._path(rel)).type == pafs.FileType.Directory:
                self.fs.delete_dir(self._path(rel))
        except OSError as e:
            raise self._fail("delete", rel, e) from None

    def _list(self, rel: str, directories: bool) -> list[str]:
        from pyarrow import fs as pafs

        kind = pafs.FileType.Directory if directories else pafs.FileType.File
        return sorted(i.base_name for i in self._infos(rel, False) if i.type == kind)

    def _infos(self, rel: str, recursive: bool) -> list:
        """pyarrow's FileInfo of what is under the "folder" ``rel`` (every level, or the first)."""
        from pyarrow import fs as pafs

        try:
            return self.fs.get_file_info(pafs.FileSelector(self._path(rel), recursive=recursive, allow_not_found=True))
        except OSError as e:
            raise self._fail("list", rel, e) from None


_MAGIC = re.compile(r"[*?\[]")


def _glob_regex(pattern: str) -> re.Pattern:
    """A key glob as a regex: ``*`` and ``?`` stay within one path part, ``**`` crosses parts."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


@dataclass(frozen=True)
class RemoteFile:
    """One object an input pattern matched: its URL, size and modification time (a key's fingerprint)."""

    url: str
    size: int
    mtime_ns: int

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


def matching_objects(pattern: str) -> list[RemoteFile]:
    """The objects whose URL matches ``pattern`` (``s3://bucket/key``, the key a glob), sorted by URL.

    ValueError for a pattern that is not an s3:// URL of a bucket; ObjectStoreError when the
    store cannot be listed. An empty list when nothing matches (the caller says why that is wrong).
    """
    bucket, _, key = pattern.strip()[5:].partition("/") if is_object_store(pattern) else ("", "", "")
    if not _BUCKET.fullmatch(bucket) or not key or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"{pattern!r} is not s3://bucket/key (a key or a glob of keys, no empty, '.' or '..' parts)")
    from pyarrow import fs as pafs

    store = ObjectStore(f"s3://{bucket}")
    magic = _MAGIC.search(key)
    base = key if magic is None else key[: magic.start()].rpartition("/")[0]
    try:
        if magic is None:
            infos = [store.fs.get_file_info(f"{bucket}/{key}")]
        else:
            where = f"{bucket}/{base}".rstrip("/")
            infos = store.fs.get_file_info(pafs.FileSelector(where, recursive=True, allow_not_found=True))
        if not infos and store.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise ObjectStoreError(f"object store s3://{bucket}: no such bucket (or these credentials cannot see it)")
    except ObjectStoreError:
        raise
    except OSError as e:
        raise store._fail("list", base, e) from None
    wanted = _glob_regex(key)
    found = [
        RemoteFile(f"s3://{i.path}", i.size, i.mtime_ns or 0)
        for i in infos
        if i.type == pafs.FileType.File and wanted.fullmatch(i.path[len(bucket) + 1 :])
    ]
    return sorted(found, key=lambda f: f.url)


def download(url: str, dest: Path) -> None:
    """Copy the object at ``url`` (``s3://bucket/key``) to the local file ``dest``."""
    bucket, _, key = url[5:].partition("/")
    ObjectStore(f"s3://{bucket}").get(key, dest)
