"""What a pipeline run shows on the console, and where everything else goes.

The console shows witclip's own lines -- what the stages print (`[crawl] done in 33.7s`), the trainer's
`[train]` lines, the `witclip` logger -- its progress bars and the final table. The engines' chatter
goes only to the run's log file, `<work_dir>/<run_name>/logs/<UTC time>.log`: Prefect's flow and task
bookkeeping, the Dask scheduler's connections and shutdown tracebacks, MLflow's store and registry
notices, img2dataset's prints, Python warnings, torchrun's own messages. The log file gets witclip's
lines too, so it reads as the whole story. `witclip run -v` leaves the console as the engines set it.

A printed line counts as witclip's when the code that printed it is witclip's (Prefect turns prints
inside flows into log records that carry the caller's file), so img2dataset's prints in the crawl stage
stay out of the console while the stage's own lines get in.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

WITCLIP_LOGGER = "witclip"
_PACKAGES = ("clip", "data", "flows")
_SOURCE_DIRS = tuple(str(Path(__file__).resolve().parents[1] / package) + "/" for package in _PACKAGES)
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")  # where Prefect puts what flows print
_MLFLOW_PROGRESS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def is_witclip_line(record: logging.LogRecord) -> bool:
    """witclip's own logger, or a line printed by witclip's code inside a Prefect flow."""
    if record.name == WITCLIP_LOGGER or record.name.startswith(WITCLIP_LOGGER + "."):
        return True
    return record.name.startswith(_RUN_LOGGERS) and record.pathname.startswith(_SOURCE_DIRS)


class _WitclipOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_witclip_line(record)


def _all_loggers() -> list[logging.Logger]:
    named = (lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))
    return [logging.getLogger(), *named]


def _console_handlers() -> list[logging.StreamHandler]:
    return [h for lg in _all_loggers() for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


class RunLog:
    """The log file of one pipeline run and, unless verbose, the quiet console; `close()` undoes both."""

    def __init__(self, run_dir: Path, *, verbose: bool):
        # the engines configure their loggers when imported: import them first, so ours goes on top
        import distributed  # noqa: F401
        import mlflow  # noqa: F401
        import prefect  # noqa: F401

        logs = Path(run_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.path = logs / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.log"
        self._undo: list[Callable[[], None]] = []
        self._write_everything_to_the_file()
        self._keep_what_stages_print()
        if not verbose:
            self._quiet_console()

    def _write_everything_to_the_file(self) -> None:
        from prefect.logging.formatters import PrefectFormatter

        handler = logging.FileHandler(self.path, encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(PrefectFormatter(  # names the flow or task run a Prefect record comes from
            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
            flow_run_fmt="%(asctime)s %(levelname)-7s flow run %(flow_run_name)r: %(message)s",
            task_run_fmt="%(asctime)s %(levelname)-7s task run %(task_run_name)r: %(message)s"))
        # every record that reaches the root logger, and those of loggers that keep theirs to themselves
        for lg in _all_loggers():
            if lg is logging.getLogger() or not lg.propagate:
                lg.addHandler(handler)
                self._undo.append(lambda lg=lg: lg.removeHandler(handler))
        self._undo.append(handler.close)
        logging.captureWarnings(True)  # library warnings are chatter: the file has them
        self._undo.append(lambda: logging.captureWarnings(False))

    def _keep_what_stages_print(self) -> None:
        # what stages print arrives as INFO records of Prefect's run loggers: keep them whatever
        # PREFECT_LOGGING_LEVEL says (the console filter, not the level, keeps Prefect's own chatter out)
        for name in (WITCLIP_LOGGER, *_RUN_LOGGERS):
            lg = logging.getLogger(name)
            if lg.getEffectiveLevel() > logging.INFO:
                self._undo.append(lambda lg=lg, level=lg.level: lg.setLevel(level))
                lg.setLevel(logging.INFO)

    def _quiet_console(self) -> None:
        plain = logging.Formatter("%(message)s")  # as printed; the file has the times
        only_witclip = _WitclipOnly()
        for handler in _console_handlers():
            handler.addFilter(only_witclip)
            self._undo.append(lambda h=handler, f=handler.formatter: (h.removeFilter(only_witclip), h.setFormatter(f)))
            handler.setFormatter(plain)
        # MLflow prints notices ("Successfully registered model ...") to its own stream, past logging,
        # and shows bars for artifact transfers
        from mlflow.utils import logging_utils

        stream = logging_utils.MLFLOW_LOGGING_STREAM
        notices = logging.getLogger("mlflow.notices")  # propagates to "mlflow": its (quiet) handler, the file
        stream.write = lambda text: text.strip() and notices.info(text.rstrip())  # type: ignore[method-assign]
        self._undo.append(lambda: delattr(stream, "write"))  # the class's own write again
        before = os.environ.get(_MLFLOW_PROGRESS)
        os.environ[_MLFLOW_PROGRESS] = "false"
        self._undo.append(lambda: os.environ.pop(_MLFLOW_PROGRESS) if before is None
                          else os.environ.__setitem__(_MLFLOW_PROGRESS, before))

    def close(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
