"""`witclip web`: serve the synthetic web on 127.0.0.1 until Ctrl-C."""

from __future__ import annotations

import argparse


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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from data.synthetic import SiteSpec

    w = sub.add_parser("web", help="serve the synthetic web on 127.0.0.1 and print its seed URL")
    w.add_argument("--seed", type=int, default=SiteSpec.seed)
    w.add_argument("--pages", type=int, default=SiteSpec.n_pages, help="gallery pages (default: the demo's)")
    w.add_argument("--port", type=int, default=0, help="0: let the OS choose")
    w.set_defaults(fn=cmd_web)
