"""The embedded web: deterministic scenes, captions and a site with faults, served on loopback.

`scenes` (what an image shows, how it is drawn and captioned), `site` (pages, image entries, faults,
built from a `SiteSpec`), `server` (`SyntheticWeb`, the loopback HTTP server). The demo harvests and
crawls it; the synthetic zero-shot benchmarks are rendered from the same scenes.
"""

from data.synthetic.scenes import (
    BACKGROUNDS,
    COLOURS,
    COUNTS,
    NUMBER_WORDS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    describe_scene,
    encode_jpeg,
    random_scene,
    render_scene,
)
from data.synthetic.server import RequestRecord, SyntheticWeb, ThreadedServer
from data.synthetic.site import (
    ALL_FAULT_KINDS,
    BOMB_SIDE,
    DEFAULT_PRIVATE_TARGET,
    DEMO_FAULT_KINDS,
    EXTRA_FAULT_KINDS,
    MOVED_PAGE,
    NOINDEX_PREFIX,
    TOO_LARGE_CLAIMED_BYTES,
    TOO_LARGE_MAX_BYTES,
    ImageEntry,
    Site,
    SiteSpec,
    bomb_png,
    build_site,
)

__all__ = [
    "BACKGROUNDS", "COLOURS", "COUNTS", "NUMBER_WORDS", "POSITIONS", "SHAPES", "SIZES", "Scene",
    "describe_scene", "encode_jpeg", "random_scene", "render_scene",
    "RequestRecord", "SyntheticWeb", "ThreadedServer",
    "ALL_FAULT_KINDS", "BOMB_SIDE", "DEFAULT_PRIVATE_TARGET", "DEMO_FAULT_KINDS", "EXTRA_FAULT_KINDS", "MOVED_PAGE",
    "NOINDEX_PREFIX", "TOO_LARGE_CLAIMED_BYTES", "TOO_LARGE_MAX_BYTES", "ImageEntry", "Site", "SiteSpec",
    "bomb_png", "build_site",
]
