"""`witclip` command line. One module per group of subcommands:

    run.py          run, serve                      the pipeline, now or on a schedule
    models.py       classify, eval, promote, rollback, import-weights
    benchmarks.py   benchmarks list | fetch | convert
    urls.py         urls fetch
    web.py          web                             the synthetic web on loopback

Every flag belongs to the subcommand that uses it. A user mistake is one line on stderr (`error: ...`)
and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from flows.cli import benchmarks, models, run, urls, web
from flows.cli.run import check_environment
from flows.errors import RejectedOutput, UserError

__all__ = ["build_parser", "check_environment", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="witclip", description="Turn the web into a CLIP model.")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (run, models, benchmarks, urls, web):
        module.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RejectedOutput as e:  # the world's fault (an outage): counted, not cached, retried next run
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ConnectionError, PermissionError) as e:
        # raised by a stage once it started (e.g. the seed site went away): no manifest was written
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

