"""flows.console: what counts as witclip's own line on the console, and the run's log file."""

from __future__ import annotations

import logging
from pathlib import Path

import flows
from flows.console import RunLog, is_witclip_line

FLOWS_DIR = Path(flows.__file__).parent


def _record(name: str, pathname: str, msg: str = "x") -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, pathname, 1, msg, None, None)


def test_witclip_lines_are_its_logger_and_what_its_code_prints_in_a_flow():
    assert is_witclip_line(_record("witclip", "/anywhere.py"))
    assert is_witclip_line(_record("witclip.crawl", "/anywhere.py"))
    assert is_witclip_line(_record("prefect.flow_runs", str(FLOWS_DIR / "stages" / "train.py"), "[train] step 2/4"))
    assert is_witclip_line(_record("prefect.task_runs", str(FLOWS_DIR.parent / "data" / "eval" / "suite.py")))
    # img2dataset printing inside the crawl flow, Prefect's own bookkeeping, Dask, MLflow: chatter
    assert not is_witclip_line(_record("prefect.flow_runs", "/venv/site-packages/img2dataset/downloader.py"))
    assert not is_witclip_line(_record("prefect.flow_runs", "/venv/site-packages/prefect/flow_engine.py"))
    assert not is_witclip_line(_record("distributed.scheduler", "/venv/site-packages/distributed/scheduler.py"))
    assert not is_witclip_line(_record("mlflow.store.db.utils", "/venv/site-packages/mlflow/store/db/utils.py"))


def test_run_log_files_everything_quiets_the_console_and_undoes_itself(tmp_path, capsys):
    console = logging.StreamHandler()  # stands for Prefect's console handler on the root logger
    logging.getLogger().addHandler(console)
    try:
        with RunLog(tmp_path / "run", verbose=False) as log:
            logging.getLogger("distributed.scheduler").warning("Remove client Client-1")
            logging.getLogger("witclip").info("[crawl] done in 1.0s")
        logging.getLogger("distributed.scheduler").warning("after the run")
    finally:
        logging.getLogger().removeHandler(console)
    err = capsys.readouterr().err
    assert "[crawl] done in 1.0s" in err and "Remove client" not in err  # quiet while the run lasts
    assert "after the run" in err  # and as before afterwards
    text = log.path.read_text()
    assert log.path.parent == tmp_path / "run" / "logs"
    assert "Remove client Client-1" in text and "[crawl] done in 1.0s" in text and "after the run" not in text
