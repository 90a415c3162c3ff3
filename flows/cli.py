"""`witclip` command line: run the pipeline, classify images with a registered model, serve the synthetic web."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from flows.errors import UserError
from flows.fetch_cmd import (
    add_benchmarks_fetch_options,
    benchmarks_fetch_args,
    select_tasks,
)
from flows.fetch_cmd import add_parsers as add_fetch_parsers
from flows.weights_cmd import add_parser as add_import_parser

# Figures shown per stage in the end-of-run table.
KEY_FIGURES = {
    "harvest": ("pages_fetched", "candidates"),
    "crawl": ("urls", "successes", "failed_to_download", "failed_to_resize"),
    "dedup": ("input", "kept"),
    "shard": ("train", "val"),
    "train": ("steps", "final_loss", "samples_seen"),
    "eval": ("tasks_ran", "colour_score", "shape_score", "count_score", "mean_score"),
    "register": ("version", "promoted", "mean_score"),
}


def check_environment() -> None:
    """The obsolete `dataclasses` backport (pulled in by img2dataset) breaks Prefect's server subprocess."""
    spec = importlib.util.find_spec("dataclasses")
    origin = (spec.origin or "") if spec else ""
    if "site-packages" in origin or "dist-packages" in origin:
        raise UserError(
            f"the obsolete 'dataclasses' backport is installed ({origin}); it shadows the standard library "
            "and breaks Prefect: run `pip uninstall -y dataclasses`"
        )


def _prefect_defaults() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def print_summary(result: dict, cfg) -> None:
    rows = [("stage", "status", "seconds", "figures")]
    for o in result["outcomes"]:
        counts = o["counts"]
        figs = " ".join(f"{k}={_fmt(counts[k])}" for k in KEY_FIGURES.get(o["stage"], ()) if k in counts)
        rows.append((o["stage"], o["status"], f"{o['seconds']:.1f}", figs))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print()
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
    uri = result["tracking_uri"]
    print()
    print(f"MLflow run: {result['run_id']} (experiment '{cfg.mlflow.experiment}', store {uri})")
    print(f"Open the MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    for o in result["outcomes"]:
        if o["stage"] == "register":
            c = o["counts"]
            if o["status"] in ("skipped", "reused"):
                state = "registered by an earlier run"
            elif c.get("promoted"):
                state = f"alias @{cfg.mlflow.alias} moved to it"
            else:
                state = f"@{cfg.mlflow.alias} unchanged: not better than the holder"
            print(f"Model: models:/{cfg.mlflow.model_name}/{c.get('version')} ({state})")


def cmd_run(args: argparse.Namespace) -> int:
    from flows.config import load_config

    cfg = load_config(args.config, args.set)
    check_environment()
    _prefect_defaults()
    from flows.config import STAGES
    from flows.pipeline import run_pipeline

    if args.stages and args.from_stage:
        raise UserError("give --stages or --from, not both")
    selected = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    if args.from_stage:
        if args.from_stage not in STAGES:
            raise UserError(f"--from {args.from_stage!r}: expected one of {', '.join(STAGES)}")
        selected = list(STAGES[STAGES.index(args.from_stage):])
    result = run_pipeline(cfg, selected, force=args.force)
    print_summary(result, cfg)
    return 0


def prefect_api_url() -> str:
    """The Prefect server `serve` registers with; schedules need one (the ephemeral API has no scheduler)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise UserError("serve needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api from "
                        "`infra/local/server.sh start prefect`); the ephemeral API runs no scheduler")
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5).read()
    except urllib.error.HTTPError as e:
        if e.code not in (401, 403):  # refused without credentials still means a server is there
            raise UserError(f"PREFECT_API_URL {url} answered HTTP {e.code}; expected a Prefect server's API") from None
    except OSError as e:
        raise UserError(f"PREFECT_API_URL {url} is unreachable ({getattr(e, 'reason', e)}); "
                        "expected a running `prefect server start`") from None
    return url


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.config import load_config

    if bool(args.cron) == bool(args.interval):
        raise UserError("serve: give exactly one of --cron \"MIN HOUR DOM MON DOW\" or --interval SECONDS")
    if args.cron:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=args.cron)
        except ValueError:
            raise UserError(f"--cron {args.cron!r} is not a valid cron expression; expected five fields, "
                            "e.g. \"0 2 * * *\" for 02:00 UTC daily") from None
    cfg = load_config(args.config, args.set)  # a bad config fails now, not at 2 a.m.
    check_environment()
    _prefect_defaults()
    url = prefect_api_url()
    from flows.pipeline import preflight, scheduled_pipeline

    preflight(cfg, None)
    config_path = str(Path(args.config).resolve()) if args.config else None
    schedule = f"cron {args.cron!r}" if args.cron else f"every {args.interval} s"
    print(f"serving deployment witclip-scheduled/{args.name} ({schedule}) against {url}; Ctrl-C stops it")
    print(f"each run: run_name {cfg.run_name}-<scheduled UTC time> under {cfg.work_dir}, config re-read from "
          f"{config_path or 'the embedded default'}")
    scheduled_pipeline.serve(
        name=args.name,
        cron=args.cron or None,
        interval=args.interval or None,
        parameters={"config": config_path, "overrides": list(args.set)},
        limit=1,  # runs share work_dir and the MLflow store: one at a time
        pause_on_shutdown=True,
    )
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if len(labels) < 2:
        raise UserError(f"--labels {args.labels!r}: expected at least two comma-separated labels")
    for img in args.images:
        if not Path(img).is_file():
            raise UserError(f"image {img} does not exist")
    import mlflow
    import pandas as pd

    from flows.registry import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    check_tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(args.model)
    except mlflow.exceptions.MlflowException as e:
        raise UserError(f"model {args.model} could not be loaded from {uri}: {str(e).splitlines()[0]}") from None
    frame = pd.DataFrame({"image": [str(p) for p in args.images], "labels": [labels] * len(args.images)})
    out = model.predict(frame)
    for img, (_, row) in zip(args.images, out.iterrows()):
        scores = ", ".join(f"{lab}={s:.3f}" for lab, s in zip(labels, row["scores"]))
        print(f"{img}\t{row['label']}\t({scores})")
    return 0


def _data_roots(roots: list[str] | None) -> list[Path]:
    paths = [Path(r).expanduser() for r in (roots or [])]
    for p in paths:
        if not p.is_dir():
            raise UserError(f"--data-root {p} is not a directory")
    return paths


def cmd_benchmarks(args: argparse.Namespace) -> int:
    from data.eval.registry import load_tasks, locate

    if args.action == "convert":
        return cmd_convert(args)
    if args.action == "fetch":
        return benchmarks_fetch_args(args)  # needs --tasks and exactly one --data-root
    roots = _data_roots(args.data_root)
    tasks = load_tasks()
    rows = [("task", "group", "type", "metric", "classes", "data")]
    found = 0
    for name, t in tasks.items():
        loc = locate(t, roots) if roots else None
        found += loc is not None
        where = f"{loc.kind}: {loc.path}" if loc else "-"
        rows.append((name, t.group, t.type, t.metric, str(t.num_classes or ""), where))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(f"{c:<{w}}" for c, w in zip(r[:5], widths)) + "  " + r[5])
    print(f"{len(tasks)} tasks; {found} with data under {', '.join(map(str, roots)) or '(no --data-root given)'}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from data.eval.convert import convert_to_wds, imagefolder, load_dataset_object
    from data.eval.registry import get_task

    if bool(args.folder) == bool(args.dataset):
        raise UserError("benchmarks convert: give exactly one of --folder DIR or --dataset module:callable")
    if not args.out:
        raise UserError("benchmarks convert: --out DIR is required")
    try:
        dataset = imagefolder(args.folder) if args.folder else load_dataset_object(args.dataset)
        task = get_task(args.task) if args.task else None
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    classnames = list(task.classnames) if task and task.classnames else None
    templates = list(task.templates) if task else ["a photo of a {c}."]
    info = convert_to_wds(dataset, args.out, classnames=classnames, templates=templates,
                          image_format=args.image_format)
    print(f"wrote {info['samples']} samples, {info['classes']} classes, {info['shards']} shard(s) to {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from data.eval.suite import evaluate_suite, load_model_for_eval

    tasks = select_tasks(args.tasks)
    roots = _data_roots(args.data_root)
    if args.model.startswith(("models:/", "runs:/")):
        import mlflow

        from flows.registry import check_tracking_uri, resolve_tracking_uri

        uri = resolve_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
        check_tracking_uri(uri)
        mlflow.set_tracking_uri(uri)
    elif not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: expected a model directory (train stage output) or a models:/ URI")
    try:
        model, tokenizer, label = load_model_for_eval(args.model)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    report = evaluate_suite(model, tokenizer, tasks, roots, Path(args.out), model_label=label,
                            batch_size=args.batch_size, num_workers=args.workers,
                            cache_dir=Path(args.out) / "cache", save_predictions=args.save_predictions)
    print(f"{report['tasks_ran']} of {report['tasks_total']} tasks ran; mean {report['mean_score']:.4f}; "
          f"reports in {args.out}/ (summary.md, results.json, results.csv, results.png)")
    return 0


def _registry_client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient

    from flows.registry import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    check_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def cmd_promote(args: argparse.Namespace) -> int:
    import mlflow

    from flows.registry import move_alias

    client = _registry_client(args.tracking_uri)
    try:
        mv = client.get_model_version(args.name, str(args.version))
    except mlflow.exceptions.MlflowException:
        raise UserError(f"model {args.name} has no version {args.version}") from None
    move_alias(client, args.name, args.alias, mv.version)
    print(f"@{args.alias} of {args.name} -> version {mv.version} (mean_score {mv.tags.get('mean_score', 'not recorded')})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    import mlflow

    from flows.registry import rollback_alias

    client = _registry_client(args.tracking_uri)
    try:
        current, previous = rollback_alias(client, args.name, args.alias)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"no registered model {args.name!r}") from None
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"@{args.alias} of {args.name}: version {current} -> version {previous}")
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    """Serve a synthetic web until Ctrl-C."""
    import json
    import time

    from data.synthetic import SiteSpec, SyntheticWeb

    web = SyntheticWeb(SiteSpec(seed=args.seed, n_pages=args.pages), port=args.port)
    try:
        # Print inside the try: a Ctrl-C right after the line appears must still exit cleanly.
        seed_url = web.start()
        print(f"serving synthetic web at {seed_url} {json.dumps(web.site.stats())}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        web.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="witclip", description="Turn the web into a CLIP model.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the pipeline (stages whose outputs are complete are skipped)")
    r.add_argument("--config", help="pipeline YAML (default: the embedded demo, as configs/demo.yaml)")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    r.add_argument("--stages", help="comma-separated stages to (re-)run, e.g. eval,register")
    r.add_argument("--from", dest="from_stage", metavar="STAGE", help="re-run this stage and every stage after it")
    r.add_argument("--force", action="store_true", help="re-run stages even when complete")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("serve", help="serve the pipeline on a schedule against a Prefect server (PREFECT_API_URL)")
    s.add_argument("--cron", help='cron schedule, e.g. "0 2 * * *" (UTC)')
    s.add_argument("--interval", type=float, help="or: a run every this many seconds")
    s.add_argument("--config", help="pipeline YAML, re-read at each run (default: the embedded demo)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    s.add_argument("--name", default="scheduled", help="deployment name (default: scheduled)")
    s.set_defaults(fn=cmd_serve)

    c = sub.add_parser("classify", help="zero-shot classify images with a registered model")
    c.add_argument("--model", default="models:/witclip@champion", help="MLflow model URI")
    c.add_argument("--labels", required=True, help='comma-separated candidate labels, e.g. "a red circle,a blue square"')
    c.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    c.add_argument("images", nargs="+", help="image files")
    c.set_defaults(fn=cmd_classify)

    b = sub.add_parser("benchmarks", help="list the zero-shot tasks and where their data is; fetch or convert data")
    b.add_argument("action", nargs="?", choices=["list", "convert", "fetch"], default="list")
    b.add_argument("--data-root", action="append", help="where benchmark data lies (repeatable)")
    b.add_argument("--folder", help="convert: an image folder (<class>/<image>)")
    b.add_argument("--dataset", help="convert: module:callable returning a dataset (len, [i] -> (image, label), .classes)")
    b.add_argument("--task", help="convert: take class names and templates from this registry task")
    b.add_argument("--out", help="convert: output directory (CLIP_benchmark wds layout)")
    b.add_argument("--image-format", default="png", choices=["png", "jpg", "webp"])
    add_benchmarks_fetch_options(b)  # fetch: --tasks, --mirror, --url-template, --workers
    b.set_defaults(fn=cmd_benchmarks)

    e = sub.add_parser("eval", help="zero-shot evaluation of a model outside the pipeline")
    e.add_argument("--model", required=True, help="model directory or MLflow URI (models:/witclip@champion)")
    e.add_argument("--tasks", default="all", help="all, a group (paper, shift, retrieval, synthetic) or names")
    e.add_argument("--data-root", action="append", help="where benchmark data lies (repeatable)")
    e.add_argument("--out", default="eval-results", help="report directory")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    e.add_argument("--tracking-uri", help="MLflow store for models:/ URIs")
    e.add_argument("--save-predictions", action="store_true", help="also write predictions/<task>.npz")
    e.set_defaults(fn=cmd_eval)

    for name, fn, text in (("promote", cmd_promote, "point @champion (or --alias) at a model version"),
                           ("rollback", cmd_rollback, "point @champion (or --alias) back at its previous holder")):
        a = sub.add_parser(name, help=text)
        if name == "promote":
            a.add_argument("version", help="model version number")
        a.add_argument("--name", default="witclip", help="registered model name")
        a.add_argument("--alias", default="champion")
        a.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
        a.set_defaults(fn=fn)

    w = sub.add_parser("web", help="serve the synthetic web on 127.0.0.1 and print its seed URL")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--pages", type=int, default=200)
    w.add_argument("--port", type=int, default=0, help="0: let the OS choose")
    w.set_defaults(fn=cmd_web)

    add_fetch_parsers(sub)  # urls fetch
    add_import_parser(sub)  # import-weights
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ConnectionError, PermissionError) as e:
        # raised by a stage once it started (e.g. the seed site went away): no manifest was written
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
