"""Serving a model that changes: the engine requests go to now, and a follower that replaces it.

``lmforge serve --promoted`` follows a deploy target: whenever a different export is
promoted (or rolled back to), the follower loads it into a new engine and switches.

Design decisions:
- No request is dropped by a switch. A request handler takes :attr:`ServedModel.engine`
  once and does all its work with it (its prompt is encoded by that model's tokenizer);
  the old engine keeps generating for what it admitted and stops when the last of those
  ends (:meth:`model.serving.engine.Engine.retire`). A handler that took the old engine
  just before the switch and submits after it drained gets :class:`Retired` and retries
  on the new one.
- The new model is loaded before the switch, off the request path; a model that fails
  to load is logged and the old one keeps serving (the follower tries again when the
  promoted version changes again).
- The follower knows nothing of stores or ledgers: ``resolve()`` says which version is
  current and where its directory is (the CLI reads the deploy pointer).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

from model.serving.engine import Engine

log = logging.getLogger("lmforge.serve")

Resolve = Callable[[], "tuple[str, Path] | None"]
"""Returns (version, model directory) of the model that should be serving, or None."""


class ServedModel:
    """The engine requests go to now, and its version (e.g. the export artifact's ref)."""

    def __init__(self, engine: Engine, version: str | None = None, drain_grace: float = 70.0):
        self._engine, self._version = engine, version
        self._lock = threading.Lock()
        self.drain_grace = drain_grace
        self.switches = 0

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def version(self) -> str | None:
        return self._version

    def switch(self, engine: Engine, version: str) -> threading.Thread:
        """Send new requests to ``engine`` (started here); the old one drains in the returned thread."""
        engine.start()
        with self._lock:
            old, self._engine, self._version = self._engine, engine, version
            self.switches += 1
        drain = threading.Thread(target=old.retire, args=(self.drain_grace,), name="lmforge-drain", daemon=True)
        drain.start()
        return drain

    def stop(self) -> None:
        self._engine.stop()


class Follower:
    """Polls ``resolve()`` every ``interval`` seconds and switches ``served`` to a new version."""

    def __init__(self, served: ServedModel, resolve: Resolve, load: Callable[[Path], Engine], interval: float = 2.0):
        self.served, self.resolve, self.load, self.interval = served, resolve, load, interval
        self._stop = threading.Event()
        self._failed: str | None = None
        self._thread = threading.Thread(target=self._run, name="lmforge-follow", daemon=True)

    def start(self) -> "Follower":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check(self) -> bool:
        """One poll: switch if another version is current; True when it switched."""
        try:
            found = self.resolve()
        except Exception as e:  # an unreadable pointer must not take the server down
            log.warning("serve: cannot read which model is promoted: %s", e)
            return False
        if found is None or found[0] in (self.served.version, self._failed):
            return False
        version, model_dir = found
        try:
            engine = self.load(Path(model_dir))
        except Exception as e:
            log.error("serve: cannot load %s (%s); still serving %s", version, e, self.served.version)
            self._failed = version
            return False
        previous = self.served.version
        self.served.switch(engine, version)
        log.info("serve: switched from %s to %s", previous, version)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()
