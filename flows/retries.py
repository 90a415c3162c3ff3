"""Prefect retries for MLflow logging and registry calls: a dropped connection or a restarting server
is retried (3 times, after 2, 5 and 15 s); a user mistake or a bug fails at once."""

from __future__ import annotations

from typing import Any, Callable

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext


def _transient(task, task_run, state) -> bool:
    import requests
    from mlflow.exceptions import MlflowException

    try:
        state.result()
    except (ConnectionError, TimeoutError, requests.RequestException):
        return True
    except MlflowException as e:  # the MLflow client wraps exhausted HTTP retries and 5xx answers
        return "API request" in str(e) or e.get_http_status_code() >= 500
    except Exception:  # noqa: BLE001 - anything else is not transient
        return False
    return False


@task(name="mlflow-call", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 5, 15], retry_condition_fn=_transient)
def _mlflow_task(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def mlflow_call(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) as the Prefect task `mlflow-<fn>` inside a flow run; a plain call outside one (the
    `import-weights` and `promote` commands need no Prefect API). Only idempotent calls belong here."""
    if FlowRunContext.get() is None:
        return fn(*args)
    return _mlflow_task.with_options(name=f"mlflow-{getattr(fn, '__name__', 'call')}")(fn, *args)
