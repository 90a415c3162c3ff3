"""`witclip import-weights`: OpenAI-format checkpoints (TorchScript archive, fp16 torch.save state_dict)
served from a loopback HTTP server, converted, logged and registered with alias `baseline`; loaded back
through `data.eval.suite.load_model_for_eval` and the pyfunc with the same embeddings; champion untouched;
the model-directory tokenizer convention; one-line errors.

Artifacts that cannot run code: a TorchScript archive is read without torch.jit.load; one whose loading
would run code (a class with its own __setstate__) is refused unless the user pinned its sha256 (--sha256),
it comes from an OpenAI CLIP release URL, or --trust-code is given. The hash in an OpenAI-style URL on any
other host (here: loopback) pins the bytes but lets no code run. A pin is checked before anything loads
and wins over a digest the server publishes; URLs reach MLflow and messages redacted."""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import socket
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import torch
from support.torchscript import save_code_running_archive, scripted_holder
from test_clip_openai import _few_threads  # noqa: E402,F401  (tests/ is on sys.path; the autouse fixture applies here too)

import clip
from clip.tokenizer import (
    OPENAI_VOCAB_FILE,
    TOKENIZER_FILE,
    CaptionTokenizer,
    OpenAITokenizer,
    load_openai_tokenizer,
    load_tokenizer,
    train_caption_tokenizer,
)
from flows.cli import build_parser
from flows.errors import UserError
from flows.weights import (
    bundled_config_name,
    import_weights,
    packaged_openai_vocab,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # test archives are TorchScript

VOCAB = packaged_openai_vocab()
needs_vocab = pytest.mark.skipif(VOCAB is None, reason="open_clip (which ships OpenAI's vocab) is not installed")
TEXTS = ["a red circle", "A photo of 2 dogs!", "naïve café, <end_of_text> don't"]
CONTEXT = 16


# ----------------------------------------------------------------------------- test checkpoints
def _small_openai_model() -> clip.CLIP:
    """A small ViT CLIP with OpenAI's key layout and vocabulary (heads = width // 64, quick_gelu), so that
    config inference recovers it exactly."""
    torch.manual_seed(0)
    model = clip.create_model("ViT-B-32", image_size=32, patch_size=16, vision_width=64, vision_layers=1,
                              vision_heads=1, embed_dim=32, text_width=64, text_heads=1, text_layers=1,
                              context_length=CONTEXT)
    with torch.no_grad():  # off the structured init (zero biases, unit LayerNorms): every weight matters
        g = torch.Generator().manual_seed(1)
        for pname, p in model.named_parameters():
            if pname != "logit_scale":
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def _torchscript_archive(sd: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive whose state_dict has exactly `sd`'s keys (as OpenAI's releases, which also
    carry the input_resolution / context_length / vocab_size entries)."""
    torch.jit.save(scripted_holder(sd), str(path))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The source model, and its checkpoints: fp32 TorchScript archive and fp16 torch.save state_dict."""
    d = tmp_path_factory.mktemp("served")
    model = _small_openai_model()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    extras = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(CONTEXT),
              "vocab_size": torch.tensor(49408)}
    _torchscript_archive({**sd, **extras}, d / "ViT-small.pt")
    save_code_running_archive({**sd, **extras}, d / "ViT-small-code.pt")  # loading it runs its __setstate__
    code_sha = hashlib.sha256((d / "ViT-small-code.pt").read_bytes()).hexdigest()
    readable_sha = hashlib.sha256((d / "ViT-small.pt").read_bytes()).hexdigest()
    # OpenAI-style URLs: .../<sha256>/<name>.pt, with the right hash and with a wrong one
    for digest, names in ((code_sha, ["ViT-small-code.pt"]), (readable_sha, ["ViT-small.pt"]),
                          (WRONG_SHA, ["ViT-small-code.pt", "ViT-small.pt"])):
        (d / digest).mkdir()
        for fname in names:
            (d / digest / fname).write_bytes((d / fname).read_bytes())
    half = {k: v.half() for k, v in sd.items()}
    torch.save(half, d / "ViT-small-fp16.pt")
    with torch.device("meta"):
        rounded = clip.CLIP(model.config)  # what an fp16 checkpoint can hold, in fp32
    rounded.load_state_dict({k: v.float() for k, v in half.items()}, strict=True, assign=True)
    return {"dir": d, "model": model, "rounded": rounded.eval(), "code_sha": code_sha, "readable_sha": readable_sha}


@pytest.fixture(scope="module")
def server(sources):
    """A loopback HTTP server over the checkpoint directory, stopped after the module."""
    handler = functools.partial(_QuietHandler, directory=str(sources["dir"]))
    httpd = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


WRONG_SHA = "0" * 64
GETS: list[str] = []  # the paths the server was asked to GET, in order


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that stops reading (a refused digest, a wrong pin) breaks the pipe: expected


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the directory; ``?linked=<hex>`` makes it publish that sha256 as Hugging Face does
    (X-Linked-Etag); GETs are noted in GETS."""

    def do_GET(self) -> None:
        GETS.append(self.path)
        super().do_GET()

    def end_headers(self) -> None:
        linked = parse_qs(urlsplit(self.path).query).get("linked")
        if linked:
            self.send_header("X-Linked-Etag", f'"{linked[0]}"')
        super().end_headers()

    def log_message(self, *args) -> None:
        pass


def _store(root: Path) -> str:
    """A sqlite MLflow store whose experiment keeps artifacts under `root` (not ./mlruns)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("witclip", artifact_location=(root / "artifacts").as_uri())
    return uri


@pytest.fixture(scope="module")
def imported(sources, server, tmp_path_factory):
    """v1: the fp32 TorchScript archive by URL (then made @champion with the client, as the promotion gate
    would); v2: the fp16 state_dict by URL, which takes @baseline and must leave @champion on v1."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("store")
    uri = _store(root)
    common = dict(tracking_uri=uri, out_dir=root / "imports", progress=False)
    t0 = time.monotonic()
    with pytest.MonkeyPatch.context() as m:  # neither checkpoint needs it: no code runs
        _no_jit_load(m)
        first = import_weights(f"{server}/ViT-small.pt", **common)
    client = MlflowClient(tracking_uri=uri)
    assert str(client.get_model_version_by_alias("witclip", "baseline").version) == str(first["version"])
    client.set_registered_model_alias("witclip", "champion", str(first["version"]))
    with pytest.MonkeyPatch.context() as m:
        _no_jit_load(m)
        second = import_weights(f"{server}/ViT-small-fp16.pt", **common)
    return {"uri": uri, "client": client, "first": first, "second": second, "root": root,
            "seconds": time.monotonic() - t0}


def _no_jit_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", refuse)


def _embeddings(model: clip.CLIP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = load_openai_tokenizer(VOCAB)(TEXTS, CONTEXT)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens), tokens


def _max_diff(a: clip.CLIP, b: clip.CLIP) -> float:
    ia, ta, _ = _embeddings(a)
    ib, tb, _ = _embeddings(b)
    return max((ia - ib).abs().max().item(), (ta - tb).abs().max().item())


# ----------------------------------------------------------------------------- registration
@needs_vocab
@pytest.mark.slow
def test_versions_aliases_and_lineage(imported, sources, server):
    client, first, second = imported["client"], imported["first"], imported["second"]
    assert (first["version"], second["version"]) == (1, 2)
    assert second["model_uri"] == "models:/witclip/2"
    assert str(client.get_model_version_by_alias("witclip", "baseline").version) == "2"  # moved
    assert str(client.get_model_version_by_alias("witclip", "champion").version) == "1"  # untouched
    aliases = client.get_registered_model("witclip").aliases
    assert {k: str(v) for k, v in aliases.items()} == {"baseline": "2", "champion": "1"}

    for result, fname, dtype, how in ((first, "ViT-small.pt", "float32", "torchscript weights-only"),
                                      (second, "ViT-small-fp16.pt", "float16", "torch.load(weights_only=True)")):
        sha = hashlib.sha256((sources["dir"] / fname).read_bytes()).hexdigest()
        assert result["sha256"] == sha and result["config"] is None  # no bundled config is this small
        tags = client.get_model_version("witclip", str(result["version"])).tags
        assert tags["source"] == f"{server}/{fname}"
        assert tags["source_sha256"] == sha
        assert tags["imported_from"] == "openai-format"
        assert tags["source_dtype"] == dtype
        assert (tags["loaded_with"], tags["sha256_pin"], result["loaded_with"]) == (how, "none", how)
        assert tags["tokenizer"] == OPENAI_VOCAB_FILE
        assert "mean_score" not in tags and "config" not in tags
    assert imported["seconds"] < 40, imported["seconds"]


@needs_vocab
@pytest.mark.slow
def test_baseline_loads_back_for_eval_fp16(imported, sources):
    import mlflow

    from data.eval.suite import load_model_for_eval

    mlflow.set_tracking_uri(imported["uri"])
    model, tokenizer, label = load_model_for_eval("models:/witclip@baseline")
    assert label == "models:/witclip@baseline"
    assert model.config == sources["model"].config
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert _max_diff(model, sources["rounded"]) < 1e-5  # fp16 source: exactly its rounded weights
    assert _max_diff(model, sources["model"]) > 1e-6  # (and the rounding did change something)
    assert isinstance(tokenizer, OpenAITokenizer)
    reference = load_openai_tokenizer(VOCAB)
    assert torch.equal(tokenizer(TEXTS, CONTEXT), reference(TEXTS, CONTEXT))
    assert [tokenizer.encode(t) for t in TEXTS] == [reference.encode(t) for t in TEXTS]


@needs_vocab
@pytest.mark.slow
def test_fp32_version_pyfunc_and_eval_equal_source(imported, sources, tmp_path):
    import mlflow
    import pandas as pd
    from PIL import Image

    from clip.transform import eval_transform
    from clip.zeroshot import build_classifier, zeroshot_logits
    from data.eval.suite import load_model_for_eval
    from flows.registry import DEFAULT_TEMPLATES

    mlflow.set_tracking_uri(imported["uri"])
    model, tokenizer, _ = load_model_for_eval("models:/witclip/1")
    assert _max_diff(model, sources["model"]) < 1e-5
    assert isinstance(tokenizer, OpenAITokenizer)

    pyfunc = mlflow.pyfunc.load_model("models:/witclip/1")
    inner = pyfunc.unwrap_python_model()
    assert _max_diff(inner.model, sources["model"]) < 1e-5
    assert isinstance(inner.tokenizer, OpenAITokenizer)

    rng = np.random.default_rng(0)
    path = tmp_path / "picture.png"
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    labels = ["a red circle", "a blue square", "a green star"]
    out = pyfunc.predict(pd.DataFrame({"image": [base64.b64encode(path.read_bytes()).decode()], "labels": [labels]}))
    src = sources["model"]
    with torch.no_grad():
        classifier = build_classifier(src, load_openai_tokenizer(VOCAB), labels, list(DEFAULT_TEMPLATES),
                                      context_length=CONTEXT, device="cpu")
        image = eval_transform(32)(Image.open(path).convert("RGB")).unsqueeze(0)
        expected = zeroshot_logits(src, image, classifier, scale=None).softmax(dim=-1)[0]
    assert np.abs(np.array(out.loc[0, "scores"]) - expected.numpy()).max() < 1e-5
    assert out.loc[0, "label"] == labels[int(expected.argmax())]


@needs_vocab
@pytest.mark.slow
def test_cli_local_file_import(sources, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = _store(tmp_path)
    parser = build_parser()
    src = sources["dir"] / "ViT-small.pt"
    args = parser.parse_args(["import-weights", str(src), "--name", "other", "--vocab", str(VOCAB),
                              "--tracking-uri", uri, "--out", str(tmp_path / "imports")])
    assert (args.alias, args.experiment) == ("baseline", "witclip")
    assert args.fn(args) == 0
    assert "registered models:/other/1 as @baseline" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri)
    mv = client.get_model_version_by_alias("other", "baseline")
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert mv.tags["source"] == sha and mv.tags["source_sha256"] == sha
    assert mv.tags["source_file"] == "ViT-small.pt"
    assert (mv.tags["loaded_with"], mv.tags["sha256_pin"]) == ("torchscript weights-only", "none")
    assert set(client.get_registered_model("other").aliases) == {"baseline"}
    model_dir = tmp_path / "imports" / sha[:16]
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(["model.safetensors", "config.json",
                                                                   OPENAI_VOCAB_FILE])


# ----------------------------------------------------------------------------- errors
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_url_fails_fast_with_one_line(tmp_path):
    port = _closed_port()
    vocab = tmp_path / OPENAI_VOCAB_FILE
    vocab.write_bytes(b"")  # a local vocab: only the checkpoint URL is fetched
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        import_weights(f"http://127.0.0.1:{port}/ViT-B-32.pt", vocab=str(vocab),
                       tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", out_dir=tmp_path / "imports",
                       progress=False)
    assert time.monotonic() - t0 < 15
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "\n" not in msg


@needs_vocab
def test_missing_local_file_fails_with_one_line(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(UserError) as err:
        import_weights(str(missing), vocab=str(VOCAB),
                       tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", out_dir=tmp_path / "imports")
    msg = str(err.value)
    assert str(missing) in msg and "does not exist" in msg and "\n" not in msg
    assert not (tmp_path / "mlflow.db").exists()  # nothing was logged


def test_missing_vocab_and_bad_inputs(tmp_path, monkeypatch):
    import flows.weights as wc

    common = dict(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", out_dir=tmp_path / "imports")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    vocab = tmp_path / OPENAI_VOCAB_FILE
    vocab.write_bytes(b"")
    monkeypatch.setattr(wc, "packaged_openai_vocab", lambda: None)
    with pytest.raises(UserError, match="--vocab") as err:
        import_weights(str(junk), **common)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="champion"):
        import_weights(str(junk), alias="champion", vocab=str(vocab), **common)
    with pytest.raises(UserError, match="unsupported URL scheme"):
        import_weights("ftp://127.0.0.1/x.pt", vocab=str(vocab), **common)
    with pytest.raises(UserError, match="not an OpenAI-format CLIP checkpoint") as err:
        import_weights(str(junk), vocab=str(vocab), **common)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="directory .* does not exist"):
        import_weights(str(junk), tracking_uri=f"sqlite:///{tmp_path / 'no' / 'mlflow.db'}",
                       out_dir=tmp_path, vocab=str(vocab))


def test_bundled_config_name():
    with torch.device("meta"):
        model = clip.create_model("ViT-B-32")
    inferred = clip.config_from_state_dict(model.state_dict())
    assert bundled_config_name(inferred) == "ViT-B-32"
    assert bundled_config_name(_small_openai_model().config) is None


# ----------------------------------------------------------------------------- tokenizer convention
@needs_vocab
def test_load_tokenizer_picks_by_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(tmp_path)
    assert TOKENIZER_FILE in str(err.value) and OPENAI_VOCAB_FILE in str(err.value)

    (tmp_path / OPENAI_VOCAB_FILE).write_bytes(VOCAB.read_bytes())
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, OpenAITokenizer)
    assert torch.equal(tok(TEXTS, CONTEXT), load_openai_tokenizer(VOCAB)(TEXTS, CONTEXT))

    train_caption_tokenizer(["a red circle", "a blue square"] * 20, vocab_size=300).save(tmp_path / TOKENIZER_FILE)
    assert isinstance(load_tokenizer(tmp_path), CaptionTokenizer)  # tokenizer.json wins


def test_registry_model_files_accept_either_tokenizer(tmp_path):
    from flows.registry import model_dir_files

    _, missing = model_dir_files(tmp_path)
    assert missing == ["model.safetensors", "config.json", f"{TOKENIZER_FILE} or {OPENAI_VOCAB_FILE}"]
    for name in ("model.safetensors", "config.json", OPENAI_VOCAB_FILE):
        (tmp_path / name).write_bytes(b"x")
    files, missing = model_dir_files(tmp_path)
    assert missing == [] and [f.name for f in files] == ["model.safetensors", "config.json", OPENAI_VOCAB_FILE]


@pytest.mark.slow
def test_pipeline_register_model_unchanged(tmp_path):
    """The pipeline's register_model (now on the shared log_clip_model) still bundles tokenizer.json and
    gates its alias on mean_score."""
    import mlflow
    import pandas as pd
    from PIL import Image

    from flows.registry import register_model
    from flows.tracking import get_or_create_run

    uri = _store(tmp_path)
    train_dir = tmp_path / "train"
    torch.manual_seed(0)
    clip.save_model(clip.create_model("tiny"), train_dir)
    train_caption_tokenizer(["a red circle", "a blue square"] * 20, vocab_size=300).save(train_dir / TOKENIZER_FILE)
    run_id = get_or_create_run(uri, "witclip", "demo", "abc", {"x": 1})

    def results(score: float) -> dict:
        return {"mean_score": score, "tasks": {"colour": {"status": "ran", "metric": "acc1", "value": score}}}

    first = register_model(train_dir=train_dir, eval_results=results(0.5), out_dir=tmp_path / "reg", run_id=run_id,
                           tracking_uri=uri, model_name="witclip", alias="champion")
    second = register_model(train_dir=train_dir, eval_results=results(0.4), out_dir=tmp_path / "reg", run_id=run_id,
                            tracking_uri=uri, model_name="witclip", alias="champion")
    assert (first, second) == ({"version": 1, "mean_score": 0.5, "promoted": 1},
                               {"version": 2, "mean_score": 0.4, "promoted": 0})
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model("models:/witclip@champion")
    assert isinstance(pyfunc.unwrap_python_model().tokenizer, CaptionTokenizer)
    # every registered version pickles the pyfunc class by reference: this path must keep importing
    pickled = next(Path(mlflow.artifacts.download_artifacts("models:/witclip@champion")).rglob("python_model.pkl"))
    assert b"flows.registry" in pickled.read_bytes() and b"WitclipZeroShotModel" in pickled.read_bytes()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    red = base64.b64encode((tmp_path / "red.png").read_bytes()).decode()
    frame = pd.DataFrame({"image": [red, f"data:image/png;base64,{red}"],
                          "labels": [["a red circle", "a blue square"]] * 2})
    out = pyfunc.predict(frame)
    assert out.loc[0, "label"] in ("a red circle", "a blue square") and out.loc[0, "scores"] == out.loc[1, "scores"]
    for named in (str(tmp_path / "red.png"), (tmp_path / "red.png").as_uri()):  # a file that exists: never read
        with pytest.raises(mlflow.exceptions.MlflowException, match="image in row 0: a path or URL") as err:
            pyfunc.predict(pd.DataFrame({"image": [named], "labels": [["a red circle", "a blue square"]]}))
        assert err.value.get_http_status_code() == 400
    with pytest.raises(FileNotFoundError, match="run the train stage first"):
        (train_dir / TOKENIZER_FILE).unlink()
        register_model(train_dir=train_dir, eval_results=results(0.9), out_dir=tmp_path / "reg", run_id=run_id,
                       tracking_uri=uri, model_name="witclip", alias="champion")


# ----------------------------------------------------------------------------- artifacts that cannot run code
def _dummy_vocab(tmp_path: Path) -> str:
    """A local vocab file: the checks under test stop before the vocab is read."""
    vocab = tmp_path / OPENAI_VOCAB_FILE
    vocab.write_bytes(b"")
    return str(vocab)


def _refused(tmp_path: Path, source: str, **kwargs) -> str:
    """import_weights(source) must stop with one UserError line, load nothing and register nothing."""
    db = tmp_path / "mlflow.db"
    with pytest.MonkeyPatch.context() as m:
        _no_jit_load(m)
        with pytest.raises(UserError) as err:
            import_weights(source, vocab=kwargs.pop("vocab", None) or _dummy_vocab(tmp_path),
                           tracking_uri=f"sqlite:///{db}", out_dir=tmp_path / "imports", progress=False, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and not db.exists(), msg  # nothing was logged or registered
    return msg


def test_code_running_archive_is_refused_without_pin(server, sources, tmp_path):
    msg = _refused(tmp_path, f"{server}/ViT-small-code.pt?token=s3cret")
    assert "__setstate__" in msg and "--sha256" in msg and "--trust-code" in msg
    assert "s3cret" not in msg and "token=***" in msg  # the URL is shown redacted
    local = _refused(tmp_path, str(sources["dir"] / "ViT-small-code.pt"))  # a local file alike
    assert "--sha256" in local and "--trust-code" in local


def test_wrong_pin_stops_before_anything_is_kept(server, sources, tmp_path):
    path = "/ViT-small-code.pt?wrong-pin"
    t0 = time.monotonic()
    msg = _refused(tmp_path, f"{server}{path}", sha256=WRONG_SHA)
    assert f"sha256 {sources['code_sha']} of the downloaded bytes does not match the pinned {WRONG_SHA}" in msg
    assert time.monotonic() - t0 < 15 and GETS.count(path) == 1  # not retried: the same bytes would come
    downloads = tmp_path / "imports" / "downloads"
    assert not [p for p in downloads.rglob("ViT-small-code.pt*") if p.is_file()]  # neither renamed nor a part
    local = _refused(tmp_path, str(sources["dir"] / "ViT-small-code.pt"), sha256=WRONG_SHA.upper().replace("0", "A"))
    assert f"sha256 {sources['code_sha']} does not match the pinned {'a' * 64}; nothing was loaded" in local
    assert "expected 64 hex digits" in _refused(tmp_path, f"{server}/ViT-small.pt", sha256="abc")


def test_server_digest_disagreeing_with_the_pin_stops(server, sources, tmp_path):
    other = hashlib.sha256(b"something else").hexdigest()
    path = f"/ViT-small-code.pt?linked={other}"
    msg = _refused(tmp_path, f"{server}{path}", sha256=sources["code_sha"])
    assert f"the server publishes sha256 {other}, not the pinned {sources['code_sha']}" in msg
    assert GETS.count(path) == 1


def test_openai_style_url_with_a_hash_that_does_not_match_stops(server, sources, tmp_path):
    msg = _refused(tmp_path, f"{server}/{WRONG_SHA}/ViT-small-code.pt")
    assert f"does not match the pinned {WRONG_SHA}" in msg
    readable = _refused(tmp_path, f"{server}/{WRONG_SHA}/ViT-small.pt")  # a readable archive alike: the bytes
    assert f"does not match the pinned {WRONG_SHA}" in readable
    differ = _refused(tmp_path, f"{server}/{sources['code_sha']}/ViT-small-code.pt", sha256=WRONG_SHA)
    assert WRONG_SHA in differ and sources["code_sha"] in differ and "the URL" in differ


def test_openai_release_urls_alone_vouch_for_code():
    """The hash in an OpenAI-style URL pins the bytes on any host; it lets code run only on OpenAI's own
    release URLs (https, its hosts, /clip/models/<sha256>/<name>, nothing else), as a --sha256 or
    --trust-code always does."""
    from data.acquire.weights import openai_release_sha256, pinned_sha256_from_url
    from flows.weights import may_run_code, resolve_pin

    sha = "ab" * 32
    for host in ("openaipublic.azureedge.net", "openaipublic.blob.core.windows.net", "OpenAIPublic.azureedge.net"):
        url = f"https://{host}/clip/models/{sha.upper()}/ViT-L-14@336px.pt"
        assert openai_release_sha256(url) == pinned_sha256_from_url(url) == sha, url
        assert resolve_pin(url, None) == (sha, "url") and may_run_code(url, sha, "url", False)
    lookalikes = [
        f"http://openaipublic.azureedge.net/clip/models/{sha}/RN50.pt",  # not https
        f"https://evil.example/clip/models/{sha}/RN50.pt",
        f"https://openaipublic.azureedge.net.evil.example/clip/models/{sha}/RN50.pt",
        f"https://openaipublic.azureedge.net@evil.example/clip/models/{sha}/RN50.pt",
        f"https://user@openaipublic.azureedge.net/clip/models/{sha}/RN50.pt",
        f"https://openaipublic.azureedge.net:8443/clip/models/{sha}/RN50.pt",
        f"https://openaipublic.azureedge.net./clip/models/{sha}/RN50.pt",
        f"https://openaipublic.azureedge.net/clip/models/{sha}/RN50.pt?sv=1",
        f"https://openaipublic.azureedge.net/clip/models/{sha}/RN50.pt#x",
        f"https://openaipublic.azureedge.net/clip/models/{sha}/RN50.pt\n",
        f"https://openaipublic.azureedge.net/other/models/{sha}/RN50.pt",
        f"https://openaipublic.azureedge.net/x/clip/models/{sha}/RN50.pt",
        f"https://openaipublic.azureedge.net/clip/models/{sha}/a%2F..%2FRN50.pt",
        f"https://openaipublic.azureedge.net/clip/models/{sha}/..",
        f"http://127.0.0.1:8000/clip/models/{sha}/RN50.pt",
    ]
    for url in lookalikes:
        assert openai_release_sha256(url) is None, url
        pin, pinned_by = resolve_pin(url, None)
        assert not may_run_code(url, pin, pinned_by, False), url
        assert may_run_code(url, pin, pinned_by, True)  # --trust-code
    loopback = f"http://127.0.0.1:8000/{sha}/RN50.pt"
    assert resolve_pin(loopback, None) == (sha, "url") and not may_run_code(loopback, sha, "url", False)
    assert resolve_pin(loopback, sha.upper()) == (sha, "argument") and may_run_code(loopback, sha, "argument", False)
    assert pinned_sha256_from_url(f"https://h/{sha}%0A/m.pt") is None  # fullmatch: no trailing newline
    with pytest.raises(UserError, match="--alias"):
        import_weights("x.pt", alias="baseline\n", tracking_uri="sqlite:///x.db", out_dir=Path("unused"))


def test_url_hash_pins_but_lets_no_code_run(server, sources, tmp_path):
    """A loopback URL naming the code-running archive's right sha256 downloads and checks it, then refuses
    it like an unpinned one (anyone can name the hash of their own file), saying why; torch.jit.load is
    never called."""
    msg = _refused(tmp_path, f"{server}/{sources['code_sha']}/ViT-small-code.pt")
    assert "__setstate__" in msg and "the sha256 in its URL checks its bytes but lets code run only from " \
        "OpenAI's release URLs (https://openaipublic.azureedge.net/clip/models/<sha256>/<name>)" in msg
    assert "--sha256" in msg and "--trust-code" in msg
    downloads = tmp_path / "imports" / "downloads"
    got = [p for p in downloads.rglob("ViT-small-code.pt") if p.is_file()]
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in got] == [sources["code_sha"]]  # it was verified


@needs_vocab
@pytest.mark.slow
def test_pinned_openai_url_and_trusted_archives_load(server, sources, tmp_path, capsys):
    """The code-running archive loads (with torch.jit.load) when the user pins it with --sha256 (on the
    command line; also for a URL naming the same hash, which alone would not do) or passes --trust-code.
    A readable archive loads by a loopback OpenAI-style URL (its hash checked) without torch.jit.load.
    A URL's secrets never reach MLflow."""
    from mlflow.tracking import MlflowClient

    uri = _store(tmp_path)
    sha, readable_sha = sources["code_sha"], sources["readable_sha"]
    parser = build_parser()
    args = parser.parse_args(["import-weights", f"{server}/ViT-small-code.pt?X-Amz-Signature=s3cret&v=1",
                              "--sha256", sha.upper(), "--vocab", str(VOCAB), "--tracking-uri", uri,
                              "--out", str(tmp_path / "imports")])
    assert (args.sha256, args.trust_code) == (sha.upper(), False)
    assert args.fn(args) == 0
    assert "registered models:/witclip/1 as @baseline" in capsys.readouterr().out
    common = dict(vocab=str(VOCAB), tracking_uri=uri, out_dir=tmp_path / "imports", progress=False)
    with pytest.MonkeyPatch.context() as m:
        _no_jit_load(m)
        by_url = import_weights(f"{server}/{readable_sha}/ViT-small.pt", **common)
    by_url_and_pin = import_weights(f"{server}/{sha}/ViT-small-code.pt", sha256=sha, **common)
    trusted = import_weights(str(sources["dir"] / "ViT-small-code.pt"), trust_code=True, **common)

    client = MlflowClient(tracking_uri=uri)
    for version, pin, how, digest in ((1, "argument", "torch.jit.load", sha),
                                      (2, "url", "torchscript weights-only", readable_sha),
                                      (3, "argument", "torch.jit.load", sha), (4, "none", "torch.jit.load", sha)):
        mv = client.get_model_version("witclip", str(version))
        assert (mv.tags["sha256_pin"], mv.tags["loaded_with"], mv.tags["source_sha256"]) == (pin, how, digest)
    assert (by_url["loaded_with"], by_url_and_pin["loaded_with"], trusted["version"]) == (
        "torchscript weights-only", "torch.jit.load", 4)
    first = client.get_model_version("witclip", "1")
    assert first.tags["source"] == f"{server}/ViT-small-code.pt?X-Amz-Signature=***&v=1"
    run = client.get_run(first.run_id)
    assert run.data.params["source"] == first.tags["source"] == run.data.tags["witclip.source"]
    stored = [*run.data.params.values(), *run.data.tags.values(), *first.tags.values()]
    assert not [v for v in stored if "s3cret" in v]
    assert not [p for p in (tmp_path / "imports").glob("*.import.json") if "s3cret" in p.read_text()]
    import mlflow

    from data.eval.suite import load_model_for_eval

    mlflow.set_tracking_uri(uri)
    model, _, _ = load_model_for_eval("models:/witclip/2")
    assert _max_diff(model, sources["model"]) < 1e-5
