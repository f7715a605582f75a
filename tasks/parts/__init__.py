"""Parts: the unit of parallel work of a data stage, mapped over every core.

An artifact's Parquet parts (``part-00000.parquet`` ...) are what a stage maps over. A
step of a stage is a function ``fn(part, out_dir, *args) -> result`` (a JSON value) that reads one input
part and writes its outputs into ``out_dir``; :class:`PartMap` runs it once per part, on
worker processes, and returns the results in part order.

Design decisions:

- Every finished part is a checkpoint in the store: its outputs and its result (JSON)
  are published atomically as ``<work dir>/<step>/<index>/`` (:mod:`storage.atomic`), and
  a part found there is not run again. A run killed midway (the whole flow, or one
  worker) redoes only the parts that did not finish; the stage's artifact is still
  published in one step at the end, from the finished parts.
- Workers are long-lived processes forked from a clean fork server (no inherited
  Prefect threads or locks, no re-import of the parent's main module), each with a
  pipe, one part at a time: when a worker dies (SIGKILL, out of memory) the parent
  knows which part it held, logs it, starts a new worker and retries that part alone,
  up to ``attempts`` times; then the stage fails naming the part and its input file.
  An exception inside ``fn`` is not retried: it is bad input, raised as the stage's
  error with the part named.
- With one worker, or one part to do, the parts run in this process: the same
  checkpoints, no process start-up.
- Parts start biggest first (``Part.bytes``, their input's size as listed): the parts
  left when a worker frees up are small ones, so a map's workers finish close together
  instead of one of them running a big last part alone. Results are in part order.
- The ordinal of a document (``Part.start`` + its row in the part) is its position in
  the artifact, whatever ran it: "first in artifact order" means the same thing with 1
  worker or 64, so results do not depend on the worker count.
- Nothing here knows Prefect: the stage passes a progress callback (parts done / total),
  and the log says how many parts of each step are done, about ten times a step.
- Two engines run the parts, with the same checkpoints, retries and messages: worker
  processes on this machine (:mod:`tasks.parts.local`, the default) and a Ray cluster
  (:mod:`tasks.parts.ray_cluster`, ``execution.engine: ray``) for more than one machine.
  A step is a plain function of a part and a directory, so either can run it; on Ray
  every node has lmforge installed and sees the store at the driver's path, or, with an
  ``s3://`` store, gets the step's files through the bucket (:mod:`tasks.parts.exchange`).

Modules: :mod:`~tasks.parts.core` (the settings, a part, one part's run),
:mod:`~tasks.parts.partmap` (checkpoints, progress, retry verdicts), the two engines,
:mod:`~tasks.parts.exchange` (Ray nodes without the driver's file system).
"""
