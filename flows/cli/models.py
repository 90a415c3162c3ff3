"""Commands on models: `classify` images with a registered one, `eval` one outside the pipeline,
`promote` / `rollback` the champion alias, `import-weights` (an OpenAI-format checkpoint as a baseline)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.cli.benchmarks import data_roots, select_tasks
from flows.cli.paths import writable_out_dir
from flows.errors import UserError
from flows.tracking import (
    DEFAULT_TRACKING_URI,
    check_tracking_uri,
    tracking_client,
    tracking_uri,
)
from flows.weights import DEFAULT_IMPORTS_DIR

TRACKING_HELP = f"MLflow store (default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})"


def _store(explicit: str | None) -> str:
    """The tracking URI a command uses (flows.tracking.tracking_uri), checked reachable."""
    uri = tracking_uri(explicit)
    check_tracking_uri(uri)
    return uri


def cmd_classify(args: argparse.Namespace) -> int:
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if len(labels) < 2:
        raise UserError(f"--labels {args.labels!r}: expected at least two comma-separated labels")
    for img in args.images:
        if not Path(img).is_file():
            raise UserError(f"image {img} does not exist")
    import base64

    import mlflow
    import pandas as pd

    uri = _store(args.tracking_uri)
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model(args.model)
    except mlflow.exceptions.MlflowException as e:
        raise UserError(f"model {args.model} could not be loaded from {uri}: {str(e).splitlines()[0]}") from None
    # the model reads images only from its input, never from a path (flows.registry.WitclipZeroShotModel)
    images = [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in args.images]
    frame = pd.DataFrame({"image": images, "labels": [labels] * len(args.images)})
    out = model.predict(frame)
    for img, (_, row) in zip(args.images, out.iterrows()):
        scores = ", ".join(f"{lab}={s:.3f}" for lab, s in zip(labels, row["scores"]))
        print(f"{img}\t{row['label']}\t({scores})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from data.eval.suite import evaluate_suite, load_model_for_eval

    out = writable_out_dir(args.out)
    tasks = select_tasks(args.tasks)
    roots = data_roots(args.data_root)
    if args.model.startswith(("models:/", "runs:/")):
        import mlflow

        mlflow.set_tracking_uri(_store(args.tracking_uri))
    elif not Path(args.model).is_dir():
        raise UserError(f"--model {args.model}: expected a model directory (train stage output) or a models:/ URI")
    try:
        model, tokenizer, label = load_model_for_eval(args.model)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    report = evaluate_suite(model, tokenizer, tasks, roots, out, model_label=label,
                            batch_size=args.batch_size, num_workers=args.workers,
                            cache_dir=out / "cache", save_predictions=args.save_predictions,
                            precision=args.precision)
    print(f"{report['tasks_ran']} of {report['tasks_total']} tasks ran; mean {report['mean_score']:.4f}; "
          f"reports in {args.out}/ (summary.md, results.json, results.csv, results.png)")
    return 0


def _registry_client(explicit: str | None):
    """(tracking URI, MlflowClient on it) for the alias commands; the URI also names the alias lock."""
    uri = _store(explicit)
    return uri, tracking_client(uri)


def cmd_promote(args: argparse.Namespace) -> int:
    import mlflow

    from flows.locks import LockHeld
    from flows.registry import move_alias, registry_lock

    uri, client = _registry_client(args.tracking_uri)
    try:
        mv = client.get_model_version(args.name, str(args.version))
    except mlflow.exceptions.MlflowException:
        raise UserError(f"model {args.name} has no version {args.version}") from None
    try:
        with registry_lock(uri, args.name):  # a register moving @champion now would interleave its history
            move_alias(client, args.name, args.alias, mv.version)
    except LockHeld as e:
        raise UserError(f"{e}; @{args.alias} not moved") from None
    print(f"@{args.alias} of {args.name} -> version {mv.version} (mean_score {mv.tags.get('mean_score', 'not recorded')})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    import mlflow

    from flows.locks import LockHeld
    from flows.registry import registry_lock, rollback_alias

    uri, client = _registry_client(args.tracking_uri)
    try:
        with registry_lock(uri, args.name):  # the history read and cut must not interleave with a move
            current, previous = rollback_alias(client, args.name, args.alias)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"no registered model {args.name!r}") from None
    except ValueError as e:
        raise UserError(str(e)) from None
    except LockHeld as e:
        raise UserError(f"{e}; @{args.alias} not rolled back") from None
    print(f"@{args.alias} of {args.name}: version {current} -> version {previous}")
    return 0


def cmd_import_weights(args: argparse.Namespace) -> int:
    from flows.weights import import_weights

    uri = tracking_uri(args.tracking_uri)
    result = import_weights(args.source, name=args.name, alias=args.alias, vocab=args.vocab, tracking_uri=uri,
                            out_dir=writable_out_dir(args.out), experiment=args.experiment, progress=True,
                            sha256=args.sha256, trust_code=args.trust_code)
    config = result["config"] or "no bundled config"
    print(f"registered {result['model_uri']} as @{result['alias']} ({config}, {result['source_dtype']} source, "
          f"sha256 {result['sha256']}, read with {result['loaded_with']})")
    print(f"model directory: {result['model_dir']}; MLflow store: {uri}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("classify", help="zero-shot classify images with a registered model")
    c.add_argument("--model", default="models:/witclip@champion", help="MLflow model URI")
    c.add_argument("--labels", required=True, help='comma-separated candidate labels, e.g. "a red circle,a blue square"')
    c.add_argument("--tracking-uri", help=TRACKING_HELP)
    c.add_argument("images", nargs="+", help="image files")
    c.set_defaults(fn=cmd_classify)

    e = sub.add_parser("eval", help="zero-shot evaluation of a model outside the pipeline")
    e.add_argument("--model", required=True, help="model directory or MLflow URI (models:/witclip@champion)")
    e.add_argument("--tasks", default="all", help="all, a group (paper, shift, retrieval, synthetic) or names")
    e.add_argument("--data-root", action="append", help="where benchmark data lies (repeatable)")
    e.add_argument("--out", default="eval-results", help="report directory")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    e.add_argument("--tracking-uri", help="MLflow store for models:/ URIs")
    e.add_argument("--save-predictions", action="store_true", help="also write predictions/<task>.npz")
    e.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="towers under bf16 autocast or fp32; auto: bf16 where the device has fast bf16 "
                        "matrix units (a CPU is probed), else fp32 (default: auto)")
    e.set_defaults(fn=cmd_eval)

    for name, fn, text in (("promote", cmd_promote, "point @champion (or --alias) at a model version"),
                           ("rollback", cmd_rollback, "point @champion (or --alias) back at its previous holder")):
        a = sub.add_parser(name, help=text)
        if name == "promote":
            a.add_argument("version", help="model version number")
        a.add_argument("--name", default="witclip", help="registered model name")
        a.add_argument("--alias", default="champion")
        a.add_argument("--tracking-uri", help=TRACKING_HELP)
        a.set_defaults(fn=fn)

    p = sub.add_parser(
        "import-weights",
        help="register an OpenAI-format CLIP checkpoint (file or URL) as a model version with alias baseline",
        description="Convert an OpenAI-format CLIP checkpoint (TorchScript archive or torch.save state_dict, "
                    "fp16 or fp32) to witclip's format, log it to MLflow and register it with an alias "
                    "(baseline) for the eval stage and the promotion gate to compare against. "
                    "Never sets @champion. Never runs code the checkpoint carries: a TorchScript archive is "
                    "read by a weights-only reader; one it cannot read (torch.jit.load would run its code) "
                    "is refused unless its sha256 is pinned (--sha256, or OpenAI's own release URL "
                    "https://openaipublic.azureedge.net/clip/models/<sha256>/<name>.pt) or --trust-code is "
                    "given. The sha256 in any URL's path is checked against the bytes before anything loads.",
    )
    p.add_argument("source", metavar="SOURCE", help="checkpoint file or http(s) URL")
    p.add_argument("--name", default="witclip", help="registered model name (default: witclip)")
    p.add_argument("--alias", default="baseline", help="alias to point at the new version (default: baseline)")
    p.add_argument("--vocab", help="tokenizer: OpenAI's bpe_simple_vocab_16e6.txt.gz (file or URL) or a "
                                   "tokenizer.json (default: the copy open_clip ships, when installed)")
    p.add_argument("--sha256", metavar="HEX", help="the checkpoint's expected sha256 (from its publisher): checked "
                                                   "before anything is loaded; a pinned TorchScript archive may run")
    p.add_argument("--trust-code", action="store_true",
                   help="load a TorchScript archive the weights-only reader refuses with torch.jit.load, running "
                        "its code, without a pin (only for files you trust)")
    p.add_argument("--tracking-uri", help=TRACKING_HELP)
    p.add_argument("--experiment", default="witclip", help="MLflow experiment of the import run (default: witclip)")
    p.add_argument("--out", default=str(DEFAULT_IMPORTS_DIR),
                   help=f"where downloads and converted model directories go (default: {DEFAULT_IMPORTS_DIR})")
    p.set_defaults(fn=cmd_import_weights)
