"""Where commands may write: never into a stage directory of a pipeline run (one holding a manifest or
an attempt). Complete stage outputs can be hard links shared by several runs; a report written there
would change every run's copy at once."""

from __future__ import annotations

from pathlib import Path

from data.common.manifest import enclosing_stage_dir
from flows.errors import UserError


def writable_out_dir(path: str, flag: str = "--out") -> Path:
    """`path` as a Path, or a UserError when it is inside a stage directory."""
    stage_dir = enclosing_stage_dir(path)
    if stage_dir is not None:
        raise UserError(f"{flag} {path} is inside the stage directory {stage_dir}; stage outputs may be shared "
                        "with other runs: choose a directory outside them")
    return Path(path)
