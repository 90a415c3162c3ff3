"""`witclip run` (the pipeline now) and `witclip serve` (the pipeline on a schedule)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
from pathlib import Path

from flows.errors import UserError


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
    """The end-of-run table (each stage's key figures, from its spec) and where the results are."""
    from flows.stages import get_stage

    rows = [("stage", "status", "seconds", "figures")]
    for o in result["outcomes"]:
        counts = o["counts"]
        figs = " ".join(f"{k}={_fmt(counts[k])}" for k in get_stage(o["stage"]).figures if k in counts)
        rows.append((o["stage"], o["status"], f"{o['seconds']:.1f}", figs))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print()
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")
    uri = result["tracking_uri"]
    print()
    print(f"MLflow run: {result['run_id']} (experiment '{cfg.mlflow.experiment}', store {uri})")
    print(f"Open the MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    print(f"Log of this run (witclip and the engines): {result['log']}")
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
    from flows.config_file import read_config_data, run_dir_early
    from flows.locks import run_lock

    # the lock of a run directory that exists first, before the config's and Prefect's slow imports: a
    # second run of the same name is told at once. run_pipeline takes the lock of the validated run_dir
    # (again, re-entrantly; or for the first time, after its checks, so bad input creates no directory).
    early = run_dir_early(read_config_data(args.config, args.set))
    with run_lock(*early) if early and early[0].is_dir() else contextlib.nullcontext():
        from flows.config import load_config

        cfg = load_config(args.config, args.set)
        check_environment()
        _prefect_defaults()
        from flows.pipeline import run_pipeline, select_stages

        selected = select_stages(args.stages, args.from_stage)
        try:
            result = run_pipeline(cfg, selected, force=args.force, verbose=args.verbose, verify=args.verify)
        finally:
            if not args.verbose:  # Prefect's temporary API says goodbye at exit (after a failure too): chatter
                logging.getLogger("prefect").setLevel(logging.WARNING)
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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="run the pipeline (stages whose outputs are complete are skipped)")
    r.add_argument("--config", help="pipeline YAML (default: the embedded demo, as configs/demo.yaml)")
    r.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    r.add_argument("--stages", help="comma-separated stages to (re-)run, e.g. eval,register")
    r.add_argument("--from", dest="from_stage", metavar="STAGE", help="re-run this stage and every stage after it")
    r.add_argument("--force", action="store_true", help="re-run stages even when complete")
    r.add_argument("--verify", action="store_true",
                   help="check complete outputs by sha256 before skipping or reusing them (always: size and mtime)")
    r.add_argument("-v", "--verbose", action="store_true",
                   help="also show the engines' messages (Prefect, Dask, MLflow, img2dataset) on the console; "
                        "they always go to <work_dir>/<run_name>/logs/")
    r.set_defaults(fn=cmd_run)

    s = sub.add_parser("serve", help="serve the pipeline on a schedule against a Prefect server (PREFECT_API_URL)")
    s.add_argument("--cron", help='cron schedule, e.g. "0 2 * * *" (UTC)')
    s.add_argument("--interval", type=float, help="or: a run every this many seconds")
    s.add_argument("--config", help="pipeline YAML, re-read at each run (default: the embedded demo)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    s.add_argument("--name", default="scheduled", help="deployment name (default: scheduled)")
    s.set_defaults(fn=cmd_serve)
