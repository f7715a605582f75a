"""Which model is promoted: an append-only ledger of deploy decisions, kept in the store.

    <store>/_deploy/<target>/
        ledger/000001.json ...   one decision each (promote, refuse, rollback), never rewritten
        current.json             the export promoted now: what ``lmforge serve --promoted`` watches

A *target* is a name for one place a model is served (by default the profile's name).
Design decisions:

- The ledger is the source of truth; ``current.json`` and the catalog's ``promotions``
  table are derived from it (:func:`promoted` replays it; ``current.json`` is rewritten
  after every decision, atomically, so a reader sees the old pointer or the new one).
- Replaying is a stack: a promotion pushes its export, a rollback pops back to the one
  before, a refusal changes nothing. So ``promote A, promote B, rollback`` serves A, and
  a second rollback has nothing left to go back to (an error that says so).
- Decisions of one target are serialised by a file lock (:func:`decision_lock`), which the
  deploy flow holds from reading the promoted model to writing its decision: two deploys
  never both compare against the same old model and both promote.
- Each ledger file is written to a temporary name, fsynced, and linked to its final name
  without replacing: a crash leaves the ledger as it was, and two writers cannot take one
  sequence number.
- In an ``s3://`` store the bucket holds the ledger, under the same names: machines that
  deploy to one target share no file system, so no file lock spans them. An entry is
  created there first, with a conditional write (:meth:`storage.object_store.ObjectStore.put_new`)
  that fails when the number is taken, then copied into the machine's local copy; a
  reader first copies the entries it lacks (they never change, so the copy is a cache).
  Two machines deciding at once: one takes the number, the other gets :class:`LedgerMoved`
  instead of overwriting it, as does a decision whose comparison began before another
  machine's decision (``record(after=...)``); the deploy flow then compares again. :func:`current` replays the bucket's ledger
  (``current.json`` is uploaded too, for people and other tools, but two machines' uploads
  may land in either order), so ``lmforge serve --promoted`` on any machine follows what
  any machine promoted.
- Nothing here imports torch or Prefect; the entries name artifacts by ref.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from storage.artifact import Store
from storage.atomic import exclusive, fsync_dir, fsync_file

DEPLOY_DIR = "_deploy"
TARGET_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ACTIONS = ("promote", "refuse", "rollback")
_ENTRY = re.compile(r"[0-9]{6,}\.json")


class PromotionError(RuntimeError):
    """A deploy request that cannot be carried out; the message says which target and why."""


class LedgerMoved(PromotionError):
    """Another deploy decided for the target meanwhile (on another machine of an ``s3://``
    store): a decision made on what was promoted before must be made again."""


@dataclass(frozen=True)
class Decision:
    """One ledger entry.

    ``export`` is the export artifact the decision is about (for a rollback, the one it
    restores); ``previous`` the one promoted before it; ``serving`` the one promoted after it.
    ``lineage`` names the model, its base model, dataset and tokenizer; ``metrics`` holds the
    numbers the decision was made on; ``run`` says who decided (a flow run id, or ``cli``).
    """

    seq: int
    action: str
    target: str
    export: str
    previous: str | None
    serving: str | None
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    decided_at: str = ""
    run: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_target(target: str) -> str:
    """``target`` when it is a safe name (it becomes a directory), else PromotionError."""
    if not isinstance(target, str) or not TARGET_PATTERN.match(target):
        raise PromotionError(
            f"deploy target {target!r} is not a valid name: 1-64 letters, digits, '.', '_' or '-', not starting with '.'"
        )
    return target


def target_dir(store: Store, target: str) -> Path:
    return store.root / DEPLOY_DIR / check_target(target)


def targets(store: Store) -> list[str]:
    """The deploy targets that have a ledger in ``store`` (here, or in its bucket)."""
    local = store.root / DEPLOY_DIR
    found = {p.name for p in local.iterdir() if p.is_dir()} if local.is_dir() else set()
    if store.remote is not None:
        found.update(store.remote.list_dirs(DEPLOY_DIR))
    return sorted(t for t in found if TARGET_PATTERN.match(t))


def _remote(target: str, name: str) -> str:
    """Where ``name`` (``ledger/000001.json``, ``current.json``) of ``target`` is in a store's bucket."""
    return f"{DEPLOY_DIR}/{target}/{name}"


@contextmanager
def decision_lock(store: Store, target: str) -> Iterator[None]:
    """Hold the target's lock: one deploy decision at a time, across processes and the hosts
    that share the store's file system (an ``s3://`` store's hosts: see the module docstring)."""
    with exclusive(store.lock_path("deploy", check_target(target))):
        yield


def ledger(store: Store, target: str) -> list[Decision]:
    """Every decision of ``target``, oldest first (empty when nothing was ever deployed)."""
    folder = target_dir(store, target) / "ledger"
    if store.remote is not None:
        _copy_new_entries(store, target, folder)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("[0-9]*.json")):
        try:
            out.append(Decision(**json.loads(path.read_text())))
        except (ValueError, TypeError) as e:
            raise PromotionError(f"deploy ledger entry {path} is unreadable: {e}") from None
    return out


def _copy_new_entries(store: Store, target: str, folder: Path) -> None:
    """Copy the bucket's ledger entries that this machine's copy lacks (entries never change)."""
    names = [n for n in store.remote.list_files(_remote(target, "ledger")) if _ENTRY.fullmatch(n)]
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
    for name in missing:
        data = store.remote.read_bytes(_remote(target, f"ledger/{name}"))
        if data is not None:
            _write_new(folder, name, data)


def _write_new(folder: Path, name: str, data: bytes) -> bool:
    """Write ``folder/name`` durably unless it exists (False then); never a half-written file."""
    tmp = folder / f".tmp-{uuid.uuid4().hex}"
    tmp.write_bytes(data)
    fsync_file(tmp)
    try:
        os.link(tmp, folder / name)  # never replaces: a taken number is an error, not an overwrite
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(folder)
    return True


def history(decisions: list[Decision]) -> list[str]:
    """The stack of promoted exports after replaying ``decisions`` (last = serving now)."""
    stack: list[str] = []
    for d in decisions:
        if d.action == "promote":
            stack.append(d.export)
        elif d.action == "rollback" and stack:
            stack.pop()
    return stack


def promoted(store: Store, target: str) -> str | None:
    """The export ref promoted for ``target`` now, or None."""
    return state(store, target)[1]


def state(store: Store, target: str) -> tuple[int, str | None]:
    """The number of ``target``'s last decision (0: none yet) and the export ref it left
    promoted: what a deploy compares against, and passes to :func:`record` as ``after``."""
    decisions = ledger(store, target)
    stack = history(decisions)
    return _last_seq(decisions), (stack[-1] if stack else None)


def _last_seq(decisions: list[Decision]) -> int:
    """The number of the last decision (0: none yet)."""
    return decisions[-1].seq if decisions else 0


def record(
    store: Store,
    target: str,
    action: str,
    export: str,
    reason: str,
    *,
    metrics: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
    run: str = "cli",
    after: int | None = None,
) -> Decision:
    """Append a promote or refuse decision (call it holding :func:`decision_lock`); returns the entry.

    ``after``: the number of the last decision when the comparison began (:func:`state`);
    if the ledger has moved on since (another machine decided), :class:`LedgerMoved`, for
    this decision was made against a model that may no longer be the promoted one.
    """
    if action not in ("promote", "refuse"):
        raise PromotionError(f"unknown deploy action {action!r}")
    decisions = ledger(store, target)
    last = _last_seq(decisions)
    if after is not None and last != after:
        raise LedgerMoved(
            f"deploy target {target!r}: decisions {after + 1}..{last} were made elsewhere while this one was compared"
        )
    before = history(decisions)
    previous = before[-1] if before else None
    serving = export if action == "promote" else previous
    return _append(store, target, decisions, action, export, previous, serving, reason, metrics, lineage, run)


def rollback(
    store: Store, target: str, *, run: str = "cli", lineage: Callable[[str], dict[str, Any]] | None = None
) -> Decision:
    """Go back to the export promoted before the current one (call it holding :func:`decision_lock`);
    ``lineage(ref)`` describes the export restored, for the ledger entry."""
    decisions = ledger(store, target)
    stack = history(decisions)
    if len(stack) < 2:
        have = f"only {stack[0]} was ever promoted" if stack else "nothing was ever promoted"
        raise PromotionError(f"deploy target {target!r}: nothing to roll back to ({have})")
    current, restored = stack[-1], stack[-2]
    if store.load(*restored.split("/", 1)) is None:
        raise PromotionError(
            f"deploy target {target!r}: cannot roll back to {restored}: it is no longer in the store {store.root}"
        )
    reason = f"rolled back from {current}"
    described = lineage(restored) if lineage else {}
    return _append(store, target, decisions, "rollback", restored, current, restored, reason, {}, described, run)


def _append(store, target, decisions, action, export, previous, serving, reason, metrics, lineage, run) -> Decision:
    folder = target_dir(store, target) / "ledger"
    folder.mkdir(parents=True, exist_ok=True)
    seq = _last_seq(decisions) + 1
    entry = Decision(
        seq=seq,
        action=action,
        target=target,
        export=export,
        previous=previous,
        serving=serving,
        reason=reason,
        metrics=dict(metrics or {}),
        lineage=dict(lineage or {}),
        decided_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        run=run,
    )
    name, data = f"{seq:06d}.json", json.dumps(entry.to_dict(), indent=2, sort_keys=True).encode()
    taken = LedgerMoved(f"deploy target {target!r}: decision {seq} was written by someone else meanwhile; deploy again")
    if store.remote is not None and not store.remote.put_new(data, _remote(target, f"ledger/{name}")):
        raise taken  # another machine decided in between: the bucket keeps its decision
    if not _write_new(folder, name, data) and store.remote is None:
        raise taken
    write_current(store, target, entry)
    return entry


def write_current(store: Store, target: str, entry: Decision) -> None:
    """Rewrite ``current.json`` (atomically) to say what ``entry`` left promoted."""
    folder = target_dir(store, target)
    # No absolute directory: a reader finds the export under its own mount of the store.
    pointer = {"target": target, "seq": entry.seq, "export": entry.serving, "decided_at": entry.decided_at}
    tmp = folder / f".tmp-current-{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(pointer, indent=2))
    fsync_file(tmp)
    os.replace(tmp, folder / "current.json")
    fsync_dir(folder)
    if store.remote is not None:
        store.remote.put_bytes(json.dumps(pointer, indent=2).encode(), _remote(target, "current.json"))


def current(store: Store, target: str) -> dict[str, Any] | None:
    """What is promoted (``export``, ``seq``, ``decided_at``), or None when nothing is.

    A local store's ``current.json``, written under the decision lock. In an ``s3://`` store
    the bucket's ledger replayed instead: two machines' pointer uploads may land in either
    order, their ledger entries cannot (new entries are fetched, the rest is cached here).
    """
    if store.remote is not None:
        decisions = ledger(store, target)
        stack = history(decisions)
        if not stack:
            return None
        last = decisions[-1]
        return {"target": target, "seq": last.seq, "export": stack[-1], "decided_at": last.decided_at}
    path = target_dir(store, target) / "current.json"
    try:
        pointer = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise PromotionError(f"{path} is unreadable: {e}") from None
    return pointer if pointer.get("export") else None


def index_in_catalog(store: Store, target: str, export_manifest=None) -> int:
    """Mirror ``target``'s ledger into the catalog's ``promotions`` table (and the export's
    lineage into ``artifacts``); the catalog is derived, so this is safe to repeat."""
    from storage.catalog import Catalog

    with Catalog(store.catalog_path) as cat:
        if export_manifest is not None:
            cat.register_lineage(store, export_manifest)
        return cat.index_promotions(target, [d.to_dict() for d in ledger(store, target)])
