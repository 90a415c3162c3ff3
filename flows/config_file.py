"""Reading a config file and --set overrides into a plain mapping, before any validation.

Kept apart from `flows.config` (which imports the engines' option classes, and through them pandas and
pyarrow: about a second) so that `witclip run` can find its run directory and take the run's lock in the
first moments of the process (`run_dir_early`); `flows.config.load_config` validates the same mapping.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from flows.errors import UserError

DEFAULT_RUN_NAME = "demo"
DEFAULT_WORK_DIR = "runs"
RUN_NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise UserError(f"--set {item!r}: expected section.key=value")
    # YAML parsing gives ints, floats, bools, lists ([a, b]) and null the obvious way.
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def read_config_data(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML file's mapping (empty when path is None) with the --set overrides applied, unvalidated."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} does not exist (expected a YAML file)")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"config file {p} must hold a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise UserError(f"--set {item!r}: '{k}' is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


def run_dir_early(data: dict[str, Any]) -> tuple[Path, str] | None:
    """(run directory, run name) from an unvalidated mapping, or None when they are not plain valid
    values (validation will say why)."""
    run_name = data.get("run_name", DEFAULT_RUN_NAME)
    work_dir = data.get("work_dir", DEFAULT_WORK_DIR)
    if not isinstance(run_name, str) or not re.match(RUN_NAME_PATTERN, run_name) or not isinstance(work_dir, str):
        return None
    return Path(work_dir) / run_name, run_name
