"""The ``lmforge`` command: ``run`` the pipeline flow, ``generate`` with an exported model.

``generate`` imports only onnxruntime, numpy and tokenizers: a deployed model needs no
torch and no Prefect. ``run`` points Prefect's result storage into the artifact store
(unless set), so a store and its cache records live and die together.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from flows.environment import prepare_environment, store_of


def _profile(path: str):
    """The validated profile at ``path`` (Prefect's environment set up for its store), or None after
    printing why it cannot be used."""
    prepare_environment(store_of(path))
    from flows.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        print(f"lmforge: {e}", file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    config = _profile(args.config)
    if config is None:
        return 2
    out_dir = Path(args.output_dir or f"runs/{config.name}").resolve()

    from flows.pipeline import pipeline
    from flows.summary import (
        format_decision,
        format_eval,
        format_funnel,
        format_harness,
        format_precisions,
        format_stages,
        write_summary,
    )
    from storage.artifact import Store

    t0 = time.perf_counter()
    try:
        result = pipeline(config)
    except Exception as e:  # the flow already logged the traceback; say it plainly
        write_summary(
            out_dir, {"config": args.config, "status": "failed", "error": str(e), "seconds": time.perf_counter() - t0}
        )
        print(f"\nlmforge: the pipeline failed: {e}\nsummary: {out_dir / 'summary.json'}", file=sys.stderr)
        return 1

    store = Store(config.store)
    records = result["records"]
    report_m = store.load(*result["report"].split("/"))
    export_m = store.load(*result["export"].split("/"))
    report = json.loads(report_m.path("report.json").read_text())
    harness = None
    if result.get("harness"):
        harness = json.loads(store.load(*result["harness"].split("/")).path("report.json").read_text())
    model_dir = out_dir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(export_m.dir, model_dir, ignore=shutil.ignore_patterns("manifest.json"))

    from model.onnx_generate import OnnxGenerator

    gen = OnnxGenerator(model_dir)
    samples = [
        {"prompt": p, "completion": gen.generate(p, max_new_tokens=40, temperature=0.8, top_p=0.95, seed=0)}
        for p in config.evaluate.prompts
    ]
    summary = {
        "config": str(Path(args.config).resolve()),
        "status": "completed",
        "seconds": round(time.perf_counter() - t0, 2),
        "store": str(store.root),
        "stages": {n: r.to_dict() for n, r in records.items()},
        "evaluation": {k: v for k, v in report.items() if k != "generations"},
        "export": {"artifact": export_m.ref, "dir": str(export_m.dir), "copied_to": str(model_dir), **export_m.meta},
        "generations_int8": samples,
        "harness": harness,
        "deploy": result.get("deploy"),
    }
    path = write_summary(out_dir, summary)

    print("\n== stages ==\n" + format_stages(records))
    print("\n== funnel (documents and whitespace words in/out, drops by reason) ==\n" + format_funnel(records))
    tokens = records["shards"].meta.get("tokens", {}) if "shards" in records else {}
    if tokens:
        print("BPE tokens after shards: " + ", ".join(f"{split} {n:,}" for split, n in tokens.items()))
    print("\n== evaluation (held-out documents) ==\n" + format_eval(report))
    print(f"\n== export ==\nONNX models and the Hugging Face directory (hf/): {model_dir}  (artifact {export_m.dir})")
    print(format_precisions(export_m.meta))
    if harness:
        print(f"\n== lm-evaluation-harness (chance on the cloze: {1 / config.harness.cloze_choices:.2f}) ==")
        print(format_harness(harness))
    if result.get("deploy"):
        print("\n== deploy ==\n" + format_decision(result["deploy"]))
    print("\n== generations from the INT8 ONNX model ==")
    for s in samples:
        print(f"> {s['prompt']}\n{s['completion']}\n")
    print(f"summary: {path}\n{out_dir}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """``lmforge deploy``: run the deploy flow (promote if better, or --rollback), or show the ledger."""
    config = _profile(args.config)
    if config is None:
        return 2
    from flows.summary import format_decision, format_ledger
    from storage import promotions
    from storage.artifact import Store

    store, target = Store(config.store), config.deploy_target
    if args.history:
        decisions = [d.to_dict() for d in promotions.ledger(store, target)]
        print(format_ledger(decisions) if decisions else f"nothing was ever deployed to {target!r} in {store.root}")
        return 0
    from flows.deploy import deploy

    try:
        result = deploy(config, release=args.release, rollback=args.rollback)
    except promotions.PromotionError as e:
        print(f"lmforge deploy: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # the flow already logged the traceback; say it plainly
        print(f"\nlmforge deploy: the deploy failed: {e}", file=sys.stderr)
        return 1
    print("\n== deploy ==\n" + format_decision(result["decision"]))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from model.onnx_generate import OnnxGenerator

    try:
        gen = OnnxGenerator(Path(args.model), precision=args.precision)
    except (FileNotFoundError, ValueError) as e:
        print(f"lmforge generate: {e}", file=sys.stderr)
        return 2
    print(
        gen.generate(
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    )
    return 0


def cmd_catalog_rebuild(args: argparse.Namespace) -> int:
    from storage.artifact import Store
    from storage.catalog import CatalogError
    from storage.catalog_rebuild import rebuild_catalog

    store = Store(args.store)
    try:
        done = rebuild_catalog(store)
    except CatalogError as e:
        print(f"lmforge catalog rebuild: {e}", file=sys.stderr)
        return 2
    if done.moved_aside:
        print(f"the old catalog did not open; moved to {done.moved_aside}")
    for why in done.skipped:
        print(f"skipped {why}")
    print(
        f"lmforge catalog: rebuilt {store.catalog_path}: {done.artifacts} artifacts, {done.datasets} datasets "
        f"({done.documents:,} documents), {done.decisions} deploy decisions of {done.targets} targets"
    )
    return 1 if done.skipped else 0


def cmd_gc(args: argparse.Namespace) -> int:
    from storage.artifact import Store
    from storage.gc import collect

    store = Store(args.store)
    root = store.root
    if store.remote is None and not root.is_dir():
        print(f"lmforge gc: {root} is not a directory", file=sys.stderr)
        return 2
    done = collect(store, dry_run=args.dry_run)
    for path, size in done.removed:
        print(f"{'would remove' if args.dry_run else 'removed'} {path} ({size / 1e6:.1f} MB)")
    for path in done.kept_busy:
        print(f"kept {path}: a run is using it")
    verb = "would free" if args.dry_run else "freed"
    print(f"lmforge gc: {verb} {done.bytes / 1e6:.1f} MB in {len(done.removed)} item(s) under {store.url}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``lmforge serve``: the OpenAI-compatible server (model/serving/) on an exported model directory,
    or with ``--promoted`` on whatever the deploy target has promoted, switching when that changes."""
    import os

    from flows.server import is_loopback

    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    if not is_loopback(args.host) and not api_key:
        print(
            f"lmforge serve: refusing to listen on {args.host} without an API key: anyone who reaches the port could "
            "use the model; pass --api-key (or set LMFORGE_API_KEY), or keep the default --host 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    if bool(args.model) == bool(args.promoted):
        print("lmforge serve: give --model DIR, or --promoted with --store STORE", file=sys.stderr)
        return 2
    import uvicorn

    from model.serving.api import create_app
    from model.serving.engine import Engine
    from model.serving.metrics import Metrics
    from model.serving.switch import Follower, ServedModel

    metrics = Metrics()

    def load(model_dir: Path) -> Engine:
        return Engine(
            model_dir,
            precision=args.precision,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            threads=args.threads,
            batching=not args.no_batching,
            metrics=metrics,
            backend=args.backend,
            device=args.device,
        )

    follower = None
    try:
        if args.promoted:
            resolve, name = _promoted_resolver(args)
            found = resolve()
            if found is None:
                raise FileNotFoundError(f"nothing is promoted for target {name!r}: run `lmforge deploy` first")
            served = ServedModel(load(Path(found[1])), version=found[0], drain_grace=args.timeout + 5)
            follower = Follower(served, resolve, load, interval=args.poll_seconds)
        else:
            served = ServedModel(load(Path(args.model)))
            where = Path(args.model).resolve()
            name = where.parent.name if where.name == "model" else where.name  # runs/demo/model: demo
    except (FileNotFoundError, ValueError) as e:
        print(f"lmforge serve: {e}", file=sys.stderr)
        return 2
    name = args.served_model_name or name
    app = create_app(served, name, api_key=api_key, timeout=args.timeout)
    served.engine.start()
    if follower is not None:
        follower.start()
    following = f", following {served.version} as promoted" if follower else ""
    engine = served.engine
    runs_on = f"{engine.backend} {engine.precision} on {engine.device}, {engine.graph}"
    print(f"lmforge serve: {name} ({runs_on}{following}) on http://{args.host}:{args.port}/v1", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        if follower is not None:
            follower.stop()
        served.stop()
    return 0


def _promoted_resolver(args: argparse.Namespace):
    """``resolve() -> (export ref, directory) | None`` for ``--promoted``, and the target's name."""
    from storage import promotions
    from storage.artifact import Store

    if not args.store:
        raise ValueError("--promoted needs --store (the store the deploy flow promotes in)")
    store = Store(args.store)
    if store.remote is None and not store.root.is_dir():
        raise FileNotFoundError(f"no store at {store.root}")
    target = args.target
    if target is None:
        targets = promotions.targets(store)
        if len(targets) != 1:
            raise ValueError(
                f"the store has deploy targets {targets or 'none'}: name one with --target"
                if targets
                else f"nothing was ever deployed in {store.root}: run `lmforge deploy` first"
            )
        target = targets[0]
    promotions.check_target(target)

    def resolve():
        pointer = promotions.current(store, target)
        if pointer is None:
            return None
        # The export's directory as this host sees it: under its mount of the store, or
        # fetched from the bucket into this machine's copy.
        stage, key = pointer["export"].split("/", 1)
        manifest = store.load(stage, key) if store.remote is not None else None
        return pointer["export"], manifest.dir if manifest is not None else store.artifact_dir(stage, key)

    return resolve, target


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmforge", description="Web text to a deployable small language model.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the whole pipeline flow on a YAML profile")
    r.add_argument("--config", required=True, help="YAML profile, e.g. configs/demo.yaml")
    r.add_argument("--output-dir", help="where summary.json and the exported model go (default runs/<name>)")
    r.set_defaults(fn=cmd_run)
    g = sub.add_parser("generate", help="generate text with an exported ONNX model (no torch needed)")
    g.add_argument("--model", required=True, help="exported model directory (e.g. runs/demo/model)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--precision", default="int8", help="which exported graph: int8 (default), int4 or fp32")
    g.set_defaults(fn=cmd_generate)
    d = sub.add_parser("deploy", help="promote a release if it is not worse than the promoted model, or roll back")
    d.add_argument("--config", required=True, help="YAML profile (its store and deploy target)")
    d.add_argument("--release", help="export artifact ref to deploy (default: build the release from the profile)")
    d.add_argument("--rollback", action="store_true", help="restore the model promoted before the current one")
    d.add_argument("--history", action="store_true", help="print the target's deploy ledger and exit")
    d.set_defaults(fn=cmd_deploy)
    c = sub.add_parser("gc", help="remove what no artifact or running job needs from a store (and say how much)")
    c.add_argument(
        "--store",
        required=True,
        help="the store, e.g. .lmforge/demo (s3://...: this machine's copy of it; the bucket is kept)",
    )
    c.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    c.set_defaults(fn=cmd_gc)
    k = sub.add_parser("catalog", help="the DuckDB catalog of a store (an index over it)")
    ks = k.add_subparsers(dest="catalog_command", required=True)
    kr = ks.add_parser("rebuild", help="recreate the catalog from the store's manifests, indexes and deploy ledgers")
    kr.add_argument("--store", required=True, help="the store, e.g. .lmforge/demo or s3://bucket/prefix")
    kr.set_defaults(fn=cmd_catalog_rebuild)
    v = sub.add_parser("serve", help="serve an exported model with an OpenAI-compatible API (continuous batching)")
    v.add_argument("--model", help="exported model directory (e.g. runs/demo/model)")
    v.add_argument("--promoted", action="store_true", help="serve the deploy target's promoted model, following it")
    v.add_argument("--store", help="with --promoted: the store, e.g. .lmforge/demo")
    v.add_argument("--target", help="with --promoted: the deploy target (default: the store's only one)")
    v.add_argument("--poll-seconds", type=float, default=2.0, help="with --promoted: how often to look for a change")
    v.add_argument("--host", default="127.0.0.1", help="another address needs --api-key")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", help="require Authorization: Bearer <key> (or set LMFORGE_API_KEY)")
    v.add_argument("--backend", default="onnx", choices=["onnx", "torch"], help="onnx (CPU, default) or torch")
    v.add_argument("--device", default="cpu", help="torch backend: cpu (default) or cuda[:N] for a GPU")
    v.add_argument(
        "--precision",
        help="onnx: fp32 (default: a request gets the tokens it would get alone), int8 (faster; its tokens "
        "can depend on the batch) or int4; torch: bf16 (default on cuda), fp16 or fp32 (cpu)",
    )
    v.add_argument("--max-batch", type=int, default=16, help="sequences per decode step at most")
    v.add_argument("--max-queue", type=int, default=64, help="requests queued or running before 429")
    v.add_argument("--timeout", type=float, default=60.0, help="seconds a request may take")
    v.add_argument(
        "--threads", type=int, default=None, help="model threads (default: all cores but one, for the HTTP loop)"
    )
    v.add_argument("--no-batching", action="store_true", help="one sequence per step (the benchmark's baseline)")
    v.add_argument(
        "--served-model-name", help="the model id clients send (default: the directory's name; runs/demo/model: demo)"
    )
    v.set_defaults(fn=cmd_serve)
    from flows.server import add_parser as add_server_parser

    add_server_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
