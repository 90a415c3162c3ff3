"""The zero-shot suite end to end (data/evaluate.py): generated benchmarks in CLIP_benchmark's wds layout
and in torchvision's on-disk layout, metric values checked against scikit-learn on the same predictions,
missing / corrupt / mismatched tasks, and a real image set (scikit-learn's digits) converted with our
command and evaluated."""

from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    roc_auc_score,
    top_k_accuracy_score,
)

import clip
from data.eval.registry import get_task, load_tasks
from data.eval.suite import evaluate_suite, load_model_for_eval

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small random-weight witclip model saved like a train stage output."""
    out = tmp_path_factory.mktemp("model")
    names = [n for t in ("cifar10", "fgvc_aircraft", "hateful_memes", "voc2007", "mnist")
             for n in (get_task(t).classnames or [])]
    tok = clip.train_caption_tokenizer([f"a photo of a {n}." for n in names] * 3 + ["a photo of the number"], 400)
    torch.manual_seed(0)
    model = clip.create_model("tiny", vocab_size=tok.vocab_size, context_length=24, image_size=32, patch_size=8)
    clip.save_model(model, out)
    tok.save(out / "tokenizer.json")
    return out


def _png(rng: random.Random, size: int = 24) -> bytes:
    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(20):
        img.putpixel((rng.randrange(size), rng.randrange(size)), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def write_wds(root: Path, classnames: list[str] | None, samples: list[tuple[bytes, str, bytes]],
              dataset_type: str | None = None, templates: list[str] | None = None) -> Path:
    """CLIP_benchmark layout: test/nshards.txt, test/0.tar (<key>.png + <key>.<target ext>)."""
    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, (image, ext, target) in enumerate(samples):
            for member, data in ((f"{i:06d}.png", image), (f"{i:06d}.{ext}", target)):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text("1\n")
    if classnames is not None:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates or ["a photo of a {c}."]) + "\n")
    if dataset_type:
        (root / "dataset_type.txt").write_text(dataset_type + "\n")
    return root


def classification(root: Path, task: str, n: int, seed: int, n_names: int | None = None) -> Path:
    t = get_task(task)
    rng = random.Random(seed)
    labels = [i % t.num_classes for i in range(n)]
    rng.shuffle(labels)
    names = list(t.classnames)[: n_names or t.num_classes]
    return write_wds(root / t.wds_dirs[0], names, [(_png(rng), "cls", str(y).encode()) for y in labels])


def multilabel(root: Path, task: str, n: int, seed: int) -> Path:
    t = get_task(task)
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        y = (rng.random(t.num_classes) < 0.15).astype(np.float32)
        y[i % t.num_classes] = 1.0  # every class has positives
        buf = io.BytesIO()
        np.save(buf, y)
        samples.append((_png(random.Random(i)), "npy", buf.getvalue()))
    return write_wds(root / t.wds_dirs[0], list(t.classnames), samples, dataset_type="multilabel")


def retrieval(root: Path, task: str, n: int) -> Path:
    rng = random.Random(5)
    samples = [(_png(rng), "txt", f"a photo of a red thing number {i}\nsomething {i} on a table".encode())
               for i in range(n)]
    return write_wds(root / get_task(task).wds_dirs[0], None, samples, dataset_type="retrieval")


def torchvision_mnist(root: Path, n: int = 40) -> Path:
    """MNIST's raw idx files under <root>/mnist/MNIST/raw, as torchvision.datasets.MNIST reads them."""
    raw = root / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for prefix, count in (("train", 8), ("t10k", n)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, count, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, count) + labels.tobytes())
    return root / "mnist"


def _predictions(out: Path, task: str) -> dict[str, np.ndarray]:
    with np.load(out / "predictions" / f"{task}.npz") as z:
        return {k: z[k] for k in z.files}


def test_full_eval_on_generated_layouts_matches_sklearn(model_dir, tmp_path):
    root = tmp_path / "data"
    classification(root, "cifar10", 60, seed=1)
    classification(root, "fgvc_aircraft", 150, seed=2)
    classification(root, "hateful_memes", 40, seed=3)
    multilabel(root, "voc2007", 30, seed=4)
    retrieval(root, "flickr30k", 12)
    torchvision_mnist(root)
    model, tokenizer, label = load_model_for_eval(model_dir)
    tasks = ["cifar10", "fgvc_aircraft", "hateful_memes", "voc2007", "flickr30k", "mnist", "food101"]
    out = tmp_path / "out"
    report = evaluate_suite(model, tokenizer, tasks, [root], out, model_label=label, batch_size=16,
                            save_predictions=True, cache_dir=tmp_path / "cache", progress=False)
    t = report["tasks"]
    assert {n: t[n]["status"] for n in tasks} == {**{n: "ran" for n in tasks[:-1]}, "food101": "not_available"}
    assert report["tasks_ran"] == 6 and report["tasks_total"] == 7
    assert t["mnist"]["layout"] == "torchvision" and t["cifar10"]["layout"] == "wds" and t["cifar10"]["n"] == 60

    p = _predictions(out, "cifar10")
    assert t["cifar10"]["metric"] == "acc1"
    assert t["cifar10"]["value"] == pytest.approx(accuracy_score(p["targets"], p["logits"].argmax(1)), abs=1e-9)
    assert t["cifar10"]["metrics"]["acc5"] == pytest.approx(
        top_k_accuracy_score(p["targets"], p["logits"], k=5, labels=range(10)), abs=1e-9)
    p = _predictions(out, "fgvc_aircraft")
    assert t["fgvc_aircraft"]["metric"] == "mean_per_class_recall"
    assert t["fgvc_aircraft"]["value"] == pytest.approx(balanced_accuracy_score(p["targets"], p["logits"].argmax(1)), abs=1e-9)
    p = _predictions(out, "hateful_memes")
    assert t["hateful_memes"]["metric"] == "roc_auc"
    assert t["hateful_memes"]["value"] == pytest.approx(roc_auc_score(p["targets"], p["logits"][:, 1] - p["logits"][:, 0]), abs=1e-9)
    p = _predictions(out, "mnist")
    assert t["mnist"]["value"] == pytest.approx(accuracy_score(p["targets"], p["logits"].argmax(1)), abs=1e-9)
    assert t["mnist"]["n"] == 40

    # VOC2007: 11-point interpolated AP per class (the devkit's definition), averaged over classes
    p = _predictions(out, "voc2007")
    assert t["voc2007"]["metric"] == "map_11point" and p["targets"].shape == (30, 20)
    aps = []
    for c in range(20):
        order = np.argsort(-p["logits"][:, c], kind="stable")
        hits = p["targets"][order, c] > 0
        tp, fp = np.cumsum(hits), np.cumsum(~hits)
        rec, prec = tp / hits.sum(), tp / np.maximum(tp + fp, 1e-12)
        # recall levels exactly i/10 (np.arange(0, 1.1, 0.1) would make 0.3 into 0.30000000000000004)
        aps.append(np.mean([prec[rec >= i / 10].max() if (rec >= i / 10).any() else 0.0 for i in range(11)]))
    assert t["voc2007"]["value"] == pytest.approx(float(np.mean(aps)), abs=1e-6)

    # retrieval: recall@k against a brute-force loop over the similarity matrix
    p = _predictions(out, "flickr30k")
    sim, owner = p["similarity"], p["text_to_image"]
    assert sim.shape == (12, 24)
    for k in (1, 5, 10):
        text_hits = np.mean([owner[j] in np.argsort(-sim[:, j], kind="stable")[:k] for j in range(sim.shape[1])])
        image_hits = np.mean([any(owner[j] == i for j in np.argsort(-sim[i], kind="stable")[:k]) for i in range(sim.shape[0])])
        assert t["flickr30k"]["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(text_hits)
        assert t["flickr30k"]["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(image_hits)

    assert "not available: expected at" in t["food101"]["message"] and "obtain" in t["food101"]["message"]
    summary = (out / "summary.md").read_text()
    assert "6 of 7 tasks ran" in summary
    assert (out / "results.png").stat().st_size > 1000 and (out / "results.csv").read_text().count("\n") == 8
    assert json.loads((out / "results.json").read_text())["tasks"]["cifar10"]["data_hash"] == t["cifar10"]["data_hash"]
    # the classifier cache: a second run reuses every head (same model, same prompts)
    heads = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(heads) == 5
    again = evaluate_suite(model, tokenizer, ["cifar10"], [root], tmp_path / "again", cache_dir=tmp_path / "cache",
                           progress=False)
    assert again["tasks"]["cifar10"]["value"] == t["cifar10"]["value"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == heads


def test_missing_corrupt_and_mismatched_tasks_fail_alone(model_dir, tmp_path):
    root = tmp_path / "data"
    good = classification(root, "hateful_memes", 20, seed=1)
    broken = classification(root, "cifar10", 20, seed=2)
    (broken / "test" / "0.tar").write_bytes(b"this is not a tar file" * 100)
    classification(root, "cifar100", 20, seed=3, n_names=99)  # one class name short of the paper's 100
    model, tokenizer, _ = load_model_for_eval(model_dir)
    report = evaluate_suite(model, tokenizer, ["cifar10", "cifar100", "hateful_memes", "dtd"], [root], tmp_path / "out",
                            progress=False)
    t = report["tasks"]
    assert t["hateful_memes"]["status"] == "ran" and good.exists()
    assert t["cifar10"]["status"] == "failed" and "0.tar" in t["cifar10"]["message"]
    assert t["cifar100"]["status"] == "failed" and "99 classes in the data, but task cifar100 has 100" in t["cifar100"]["message"]
    assert t["dtd"]["status"] == "not_available" and str(root) in t["dtd"]["message"]
    assert (report["tasks_ran"], report["tasks_failed"], report["tasks_missing"]) == (1, 2, 1)
    assert report["mean_score"] == t["hateful_memes"]["value"]
    assert "1 of 4 tasks ran" in (tmp_path / "out" / "summary.md").read_text()


@pytest.mark.slow
def test_sklearn_digits_converted_with_our_command_then_evaluated(model_dir, tmp_path):
    """A real labelled image set from a PyPI package, through `witclip benchmarks convert` and `witclip eval`."""
    witclip = [sys.executable, "-m", "flows.cli"]
    wds = tmp_path / "data" / get_task("mnist").wds_dirs[0]
    conv = subprocess.run(witclip + ["benchmarks", "convert", "--dataset", "data.eval.convert:sklearn_digits",
                                     "--task", "mnist", "--out", str(wds)], cwd=REPO, capture_output=True, text=True)
    assert conv.returncode == 0, conv.stderr[-2000:]
    assert "wrote 1797 samples, 10 classes" in conv.stdout
    listed = subprocess.run(witclip + ["benchmarks", "list", "--data-root", str(tmp_path / "data")], cwd=REPO,
                            capture_output=True, text=True)
    assert listed.returncode == 0 and f"wds: {wds}" in listed.stdout
    out = tmp_path / "out"
    ev = subprocess.run(witclip + ["eval", "--model", str(model_dir), "--tasks", "mnist", "--data-root",
                                   str(tmp_path / "data"), "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr[-2000:]
    r = json.loads((out / "results.json").read_text())["tasks"]["mnist"]
    print(f"sklearn digits (1,797 images, random-weight tiny model): top-1 {r['value']:.4f}, chance 0.1")
    assert r["status"] == "ran" and r["n"] == 1797 and 0.0 <= r["value"] <= 1.0


def test_benchmarks_command_lists_the_registry():
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "benchmarks"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(load_tasks())} tasks" in proc.stdout and len(load_tasks()) >= 35
    for name in ("imagenet1k", "voc2007", "flickr30k", "colour"):
        assert any(line.startswith(name + " ") for line in proc.stdout.splitlines()), name


def test_eval_command_rejects_bad_input_in_one_line(tmp_path):
    cli = [sys.executable, "-m", "flows.cli", "eval"]
    bad_model = subprocess.run(cli + ["--model", str(tmp_path / "nope"), "--tasks", "cifar10"], cwd=REPO,
                               capture_output=True, text=True)
    assert bad_model.returncode == 2 and bad_model.stderr.strip().count("\n") == 0 and "nope" in bad_model.stderr
    bad_task = subprocess.run(cli + ["--model", str(tmp_path), "--tasks", "cifar11"], cwd=REPO, capture_output=True,
                              text=True)
    assert bad_task.returncode == 2 and "cifar11" in bad_task.stderr and "cifar10" in bad_task.stderr


def test_imagefolder_with_numbered_class_folders_keeps_the_numbers_as_labels(tmp_path):
    """ImageNetV2-style folders 0..99: sorted as strings "10" comes before "2"; the label must be the number."""
    from data.eval.registry import locate
    from data.eval.sources import open_task_data

    task = get_task("cifar100")
    test = tmp_path / task.wds_dirs[-1] / "test"
    rng = random.Random(0)
    for label in range(100):
        (test / str(label)).mkdir(parents=True)
        (test / str(label) / f"img{label}.png").write_bytes(_png(rng, 8))
    location = locate(task, [tmp_path])
    assert location.kind == "imagefolder"
    data = open_task_data(task, location)
    labels = {key: data.dataset[i][1] for i, key in enumerate(data.keys)}
    assert all(labels[f"img{n}"] == n for n in range(100))
    assert data.classnames == list(task.classnames)  # the metadata's names, not "0".."99"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_index_equals_tarfile(tmp_path, fmt):
    """The fast header walk gives tarfile's (name, offset, size) list, long names and pax included."""
    from data.eval.sources import _tar_members

    path = tmp_path / "x.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        long_name = "d" * 60 + "/" + "x" * 90 + ".png"  # ustar: prefix + name fields
        for i, name in enumerate(["a.png", "a.cls", "dir/b.png", "dir/b.cls", long_name, "é.txt"]):
            data = bytes(range(256)) * (i + 1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("emptydir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    assert _tar_members(path) == expected


# ----------------------------------------------------------------------------- precision, batching, speed paths
def test_batched_eval_preprocess_is_bit_identical_to_eval_transform():
    """The suite's two-stage preprocessing (PIL per image, float maths per batch) gives eval_transform's
    tensors exactly: grayscale, RGBA, palette, non-square, smaller and larger than the crop."""
    from clip.transform import EvalPreprocess

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((32, 32), (20, 45), (90, 61))]
    images += [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)),  # MNIST-like "L"
               Image.fromarray(rng.integers(0, 256, (40, 30, 4), dtype=np.uint8), "RGBA"),
               images[1].convert("P")]
    pre, reference = EvalPreprocess(32), clip.eval_transform(32)
    batch = pre.batch(torch.from_numpy(np.stack([pre.image(im) for im in images])))
    expected = torch.stack([reference(im) for im in images])
    assert batch.dtype == torch.float32 and batch.is_contiguous()
    assert torch.equal(batch, expected)
    with pytest.raises(ValueError, match="uint8"):
        pre.batch(batch)


def test_prompt_encoding_cuts_batches_to_their_longest_prompt_and_keeps_order(model_dir):
    """encode_prompts sorts by length and trims each batch after its last EOT token; the embeddings are
    those of the full-context, one-prompt-at-a-time encoding, in the caller's order."""
    from clip.zeroshot import encode_prompts, trim_tokens

    model, tokenizer, _ = load_model_for_eval(model_dir)
    ctx = model.config.text.context_length
    prompts = ["a photo of a number", "a photo of a red airplane.", "a", "a photo of a cat on a photo of a dog.",
               "photo", "a photo of the number", "a photo of a truck."]
    lengths = []
    hook = model.token_embedding.register_forward_hook(lambda m, i, o: lengths.append(tuple(o.shape[:2])))
    try:
        got = encode_prompts(model, tokenizer, prompts, ctx, "cpu", batch_size=3)
    finally:
        hook.remove()
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_text(tokenizer(prompts, ctx)), dim=-1)
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=0)
    eot = tokenizer(prompts, ctx).argmax(-1)
    assert [b for b, _ in lengths] == [3, 3, 1] and all(L < ctx for _, L in lengths)
    assert sorted(L for _, L in lengths) == [L for _, L in lengths]  # shortest first
    assert lengths[-1][1] == int(eot.max()) + 1
    tokens = tokenizer(["a", "a photo of a cat"], ctx)
    assert trim_tokens(tokens).shape[1] == int(tokens.argmax(-1).max()) + 1
    assert encode_prompts(model, tokenizer, [], ctx, "cpu").shape == (0, model.config.embed_dim)


def test_precision_is_resolved_once_reported_and_keys_the_classifier_cache(model_dir, tmp_path, capsys, monkeypatch):
    from clip import precision as P

    root = tmp_path / "data"
    classification(root, "cifar10", 48, seed=1)
    model, tokenizer, _ = load_model_for_eval(model_dir)
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        runs[precision] = evaluate_suite(model, tokenizer, ["cifar10"], [root], out, cache_dir=tmp_path / "cache",
                                         batch_size=16, progress=False, save_predictions=True, precision=precision)
        report = json.loads((out / "results.json").read_text())
        assert report["precision"] == precision and report["precision_reason"] == "as configured"
        assert f"Precision: {precision}" in (out / "summary.md").read_text()
    printed = capsys.readouterr().out
    assert printed.count("[eval] precision: fp32 (as configured)") == 1
    assert printed.count("[eval] precision: bf16 (as configured)") == 1
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one head per precision, never shared
    l32, l16 = (_predictions(tmp_path / p, "cifar10")["logits"] for p in ("fp32", "bf16"))
    assert l32.dtype == l16.dtype == np.float32  # bf16 towers, fp32 logits
    assert 0 < np.abs(l32 - l16).max() < 1.0  # 100 x cosine: bf16's ~3 digits, not a different model

    # auto on a CPU whose probe says bf16 is slower: fp32, and the report says why
    monkeypatch.setenv(P.PROBE_ENV, "slower")
    P.cpu_bf16_probe.cache_clear()
    try:
        auto = evaluate_suite(model, tokenizer, ["cifar10"], [root], tmp_path / "auto", batch_size=16, progress=False,
                              device="cpu")
    finally:
        P.cpu_bf16_probe.cache_clear()
    assert auto["precision"] == "fp32"
    assert "not faster" in auto["precision_reason"] and "slower" in auto["precision_reason"]
    assert auto["tasks"]["cifar10"]["value"] == runs["fp32"]["tasks"]["cifar10"]["value"]


def test_score_model_takes_a_precision_and_agrees_with_the_suite_in_fp32(model_dir, tmp_path):
    from data.eval.suite import score_model

    root = tmp_path / "data"
    wds = classification(root, "cifar10", 40, seed=2)
    model, tokenizer, _ = load_model_for_eval(model_dir)
    ctx = model.config.text.context_length
    fp32 = score_model(model, tokenizer, wds, context_length=ctx, batch_size=16)
    bf16 = score_model(model, tokenizer, wds, context_length=ctx, batch_size=16, precision="bf16")
    suite = evaluate_suite(model, tokenizer, ["cifar10"], [root], tmp_path / "out", batch_size=16, progress=False,
                           precision="fp32")["tasks"]["cifar10"]["metrics"]
    assert fp32["n"] == bf16["n"] == 40
    assert fp32["acc1"] == suite["acc1"] and fp32["acc5"] == suite["acc5"]
    assert abs(bf16["acc1"] - fp32["acc1"]) <= 0.1


@pytest.mark.slow
def test_compiled_vision_blocks_match_eager_and_leave_the_model_alone(model_dir, tmp_path, capsys):
    """compile=True: the ViT blocks run through torch.compile on shallow copies (the caller's model keeps
    its plain blocks), a short last batch runs eagerly, and the logits are eager's up to bf16 rounding."""
    root = tmp_path / "data"
    classification(root, "cifar10", 40, seed=3)  # batches of 16, 16, 8: the last one runs eagerly
    model, tokenizer, _ = load_model_for_eval(model_dir)
    blocks = list(model.visual.transformer.resblocks)
    logits = {}
    for compiled in (False, True):
        evaluate_suite(model, tokenizer, ["cifar10"], [root], tmp_path / str(compiled), batch_size=16, progress=False,
                       save_predictions=True, precision="bf16", compile=compiled)
        logits[compiled] = _predictions(tmp_path / str(compiled), "cifar10")["logits"]
    assert "torch.compile failed" not in capsys.readouterr().out  # it did compile, no eager fallback
    assert list(model.visual.transformer.resblocks) == blocks
    assert all(type(b).__name__ == "ResidualBlock" for b in model.visual.transformer.resblocks)
    assert np.abs(logits[True] - logits[False]).max() < 1.0
    np.testing.assert_array_equal(logits[True][32:], logits[False][32:])  # the eager last batch


def test_compile_auto_rule_and_the_flop_estimate():
    """compile=None compiles only big reduced-precision CPU tasks; the FLOP estimate behind it is
    FlopCounterMode's count for ViT-B-32 (8.818 GFLOP per image)."""
    from types import SimpleNamespace

    from data.eval.suite import _slice_size, _want_compile, vit_flops_per_image

    vit = SimpleNamespace(config=clip.get_config("ViT-B-32"))
    assert vit_flops_per_image(vit) == pytest.approx(8.818e9, rel=1e-3)
    assert vit_flops_per_image(SimpleNamespace(config=clip.get_config("RN50"))) == 0.0
    assert _want_compile(None, vit, 10_000, "bf16", "cpu") and not _want_compile(None, vit, 1_000, "bf16", "cpu")
    assert not _want_compile(None, vit, 10_000, "fp32", "cpu") and not _want_compile(None, vit, 10_000, "bf16", "cuda")
    assert _want_compile(True, vit, 10, "fp32", "cpu") and not _want_compile(False, vit, 10**6, "bf16", "cpu")
    assert _slice_size(vit, "bf16", "cpu", 256) == 32 and _slice_size(vit, "fp32", "cpu", 256) == 256
    assert _slice_size(vit, "bf16", "cuda", 256) == 256 and _slice_size(vit, "bf16", "cpu", 20) == 20


def test_bf16_on_cpu_encodes_in_cache_sized_slices_in_order(model_dir, tmp_path, monkeypatch):
    """Reduced precision on a CPU: each DataLoader batch goes through the image tower in slices; the
    features come back in dataset order (same targets, logits equal up to bf16 rounding). fp32 keeps
    whole batches, CLIP_benchmark's computation."""
    from data.eval import suite

    root = tmp_path / "data"
    classification(root, "cifar10", 40, seed=4)
    model, tokenizer, _ = load_model_for_eval(model_dir)
    v = model.config.vision
    one_image = (v.grid_size**2 + 1) * int(v.width * v.mlp_ratio) * 2
    sizes = []
    hook = model.visual.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    try:
        runs = {}
        for name, budget in (("whole", suite.CPU_SLICE_BYTES), ("sliced", 8 * one_image)):
            monkeypatch.setattr(suite, "CPU_SLICE_BYTES", budget)
            sizes.clear()
            evaluate_suite(model, tokenizer, ["cifar10"], [root], tmp_path / name, batch_size=16, progress=False,
                           save_predictions=True, precision="bf16")
            runs[name] = (_predictions(tmp_path / name, "cifar10"), list(sizes))
        sizes.clear()
        evaluate_suite(model, tokenizer, ["cifar10"], [root], tmp_path / "fp32", batch_size=16, progress=False,
                       precision="fp32")
        fp32_sizes = list(sizes)
    finally:
        hook.remove()
    assert runs["whole"][1] == [16, 16, 8] and runs["sliced"][1] == [8, 8, 8, 8, 8] and fp32_sizes == [16, 16, 8]
    whole, sliced = runs["whole"][0], runs["sliced"][0]
    np.testing.assert_array_equal(whole["targets"], sliced["targets"])
    assert np.abs(whole["logits"] - sliced["logits"]).max() < 1.0
