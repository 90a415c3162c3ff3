"""Which code made an output: a stage's code fingerprint (part of its key) and the checkout's git commit
(a registered model's `code_version`).

A stage's fingerprint covers
- the source of every witclip module it uses: its own module under `flows/stages/`, and every module of
  `clip`, `data` or `flows` reached from there through `import` statements (those inside functions
  included: most stages import their engines lazily; those under `if TYPE_CHECKING:` excluded), plus
  what its spec lists in `code` -- modules it runs in another process (train's `flows.train_entry`
  under torchrun) and data files it reads (model configs, task tables);
- the versions of the engines it calls (its spec's `engines`: img2dataset, torch, ...) and Python's.

A package's `__init__` counts only where it is imported by name (`from data.dedup import dedup`), not
as the parent of a submodule: `flows/stages/__init__.py` imports every stage, and an edit to dedup must
not re-run harvest. The config's schema (flows/config.py) is not part of any stage's code: the key holds
the config values a stage reads, whatever code produced them.

Fingerprints are computed once per process: `witclip serve` runs each scheduled run in a fresh process,
which reads the code as it is then.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path

from data.common.files import sha256_file

REPO_ROOT = Path(__file__).resolve().parent.parent  # where clip/, data/ and flows/ live
WITCLIP_PACKAGES = ("clip", "data", "flows")


def module_path(name: str) -> Path | None:
    """The source file of witclip module `name` (a package's __init__.py), or None if it is not one."""
    if name.split(".")[0] not in WITCLIP_PACKAGES:
        return None
    base = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imported_modules(name: str, source: str) -> set[str]:
    """The witclip modules `source` (module `name`) imports anywhere but under `if TYPE_CHECKING:`."""
    package = name if module_path(name) and module_path(name).name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            for child in getattr(node, "orelse", []):
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level-1 packages
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source, filename=name))
    return {m for m in found if module_path(m) is not None}


def module_closure(roots: Iterable[str]) -> dict[str, Path]:
    """{module: source file} of `roots` and every witclip module they import, transitively."""
    seen: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_path(name)
        if path is None:
            raise ValueError(f"{name!r} is not a witclip module (under {', '.join(WITCLIP_PACKAGES)})")
        seen[name] = path
        todo.extend(imported_modules(name, path.read_text(encoding="utf-8")) - seen.keys())
    return dict(sorted(seen.items()))


def code_files(roots: Iterable[str], extra: Iterable[str] = ()) -> dict[str, str]:
    """{repo-relative path: sha256} of the module closure of `roots` plus `extra`: more module names, or
    repo-relative paths of data files or directories (every file under it)."""
    files = {path for path in module_closure(roots).values()}
    for item in extra:
        if "/" in item:
            target = REPO_ROOT / item
            if not target.exists():
                raise ValueError(f"code path {item!r} does not exist under {REPO_ROOT}")
            files.update([target] if target.is_file() else
                         (f for f in target.rglob("*") if f.is_file() and "__pycache__" not in f.parts))
        else:
            files.update(module_closure([item]).values())
    return {f.relative_to(REPO_ROOT).as_posix(): sha256_file(f) for f in sorted(files)}


def engine_versions(distributions: Iterable[str]) -> dict[str, str]:
    """{distribution: installed version} ('absent' if not installed), plus Python's version."""
    out = {"python": ".".join(platform.python_version_tuple()[:2])}  # a patch release changes no output
    for dist in distributions:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


@functools.lru_cache(maxsize=None)
def stage_code(module: str, extra: tuple[str, ...], engines: tuple[str, ...]) -> dict[str, object]:
    """The code part of a stage's key: {"sources": sha256 over its files, "files": count, "engines": ...}."""
    files = code_files([module], extra)
    digest = hashlib.sha256("".join(f"{p}\0{h}\n" for p, h in files.items()).encode()).hexdigest()
    return {"sources": digest, "files": len(files), "engines": engine_versions(engines)}


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """sha256 over every source and data file of witclip's packages: which code, whether or not it is a
    git checkout (what `pip install` put in site-packages has a fingerprint too)."""
    files: list[Path] = []
    for package in WITCLIP_PACKAGES:
        files += [f for f in (REPO_ROOT / package).rglob("*") if f.is_file() and "__pycache__" not in f.parts
                  and f.suffix != ".pyc"]
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f"{f.relative_to(REPO_ROOT).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def git_version() -> str | None:
    """The checkout's commit, with '-dirty' when tracked files differ from it; None outside a checkout
    (or without git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != REPO_ROOT:
            return None  # witclip installed inside somebody else's repository
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *WITCLIP_PACKAGES)
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def code_version() -> str:
    """What a registered model's `code_version` tag says: the git commit ('-dirty' when edited) in a
    checkout, otherwise 'source-' + the first 16 hex digits of the source fingerprint."""
    return git_version() or f"source-{source_fingerprint()[:16]}"
