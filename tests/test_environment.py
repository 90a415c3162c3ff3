"""Install hygiene: the obsolete `dataclasses` backport must never be importable (it breaks Prefect)."""

import subprocess
import sys


def test_dataclasses_backport_is_absent_in_a_fresh_interpreter():
    # A fresh subprocess, like Prefect's ephemeral server, resolves `dataclasses` from scratch.
    code = "import dataclasses, sys; print(dataclasses.__file__); dataclasses.dataclass(slots=True)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    origin = out.stdout.strip()
    assert "site-packages" not in origin and "dist-packages" not in origin, (
        f"the dataclasses backport is installed at {origin}; run `pip uninstall -y dataclasses`"
    )


def test_cli_guard_names_the_backport(tmp_path, monkeypatch):
    # If the backport ever returns, `witclip run` stops with one line before starting Prefect.
    fake_site = tmp_path / "site-packages"
    fake_site.mkdir()
    (fake_site / "dataclasses.py").write_text("# stand-in for the obsolete backport\n")
    code = (
        "import sys; sys.path.insert(0, %r); sys.modules.pop('dataclasses', None);"
        "from flows.cli import check_environment\n"
        "try:\n    check_environment()\nexcept Exception as e:\n    print(e)\n" % str(fake_site)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "obsolete 'dataclasses' backport" in out.stdout, out.stdout + out.stderr
