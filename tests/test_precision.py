"""Precision from the hardware (clip/precision.py): the auto rule, the probe and its forced answers, fp32
losses under autocast, and bf16 training that ends where fp32 training ends."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clip
from clip import precision as P
from clip.loss import ClipLoss, SigLipLoss
from clip.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def probe_env(monkeypatch):
    """Set WITCLIP_BF16_PROBE for one test; the process-wide probe cache is cleared around it."""

    def force(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(P.PROBE_ENV, raising=False)
        else:
            monkeypatch.setenv(P.PROBE_ENV, value)
        P.cpu_bf16_probe.cache_clear()

    yield force
    P.cpu_bf16_probe.cache_clear()


def test_a_cpu_whose_probe_says_slower_falls_back_to_fp32_and_says_so(probe_env):
    probe_env("slower")
    choice = P.resolve_precision("auto", "cpu")
    assert choice.precision == "fp32" and choice.requested == "auto"
    assert "bf16 is not faster" in choice.reason and f"{P.PROBE_ENV}=slower" in choice.reason


def test_a_cpu_whose_probe_says_faster_autocasts_in_bf16(probe_env):
    probe_env("faster")
    choice = P.resolve_precision("auto", torch.device("cpu"))
    assert choice.precision == "bf16" and "probe forced" in choice.reason


def test_a_bad_forced_probe_value_is_an_error_naming_the_variable(probe_env):
    probe_env("maybe")
    with pytest.raises(ValueError, match=f"{P.PROBE_ENV}='maybe': expected 'faster' or 'slower'"):
        P.resolve_precision("auto", "cpu")


def test_explicit_precisions_pass_through_and_unknown_ones_are_refused(probe_env):
    probe_env("slower")  # an explicit choice never consults the probe
    for name in ("fp32", "bf16", "fp16"):
        assert P.resolve_precision(name, "cpu").precision == name
    with pytest.raises(ValueError, match="precision must be one of"):
        P.resolve_precision("int8", "cpu")


def test_the_measured_probe_matches_the_instruction_flags(probe_env):
    """Unforced: the probe really times both dtypes; auto picks bf16 only with a bf16 instruction set
    and a measured speed-up of at least MIN_PROBE_SPEEDUP."""
    probe_env(None)
    measured = P.measure_matmul(size=256, repeats=2)
    assert measured.fp32_gflops > 0 and measured.bf16_gflops > 0 and not measured.forced
    choice = P.resolve_precision("auto", "cpu")
    probe = P.cpu_bf16_probe()
    expect_bf16 = bool(P.cpu_bf16_instructions()) and probe.speedup >= P.MIN_PROBE_SPEEDUP
    assert choice.precision == ("bf16" if expect_bf16 else "fp32"), choice.reason
    print(f"this machine: {choice}")


def test_the_cli_prints_the_fallback_when_the_probe_is_forced_slower(tmp_path):
    """`witclip eval --precision auto` on a CPU simulated without fast bf16 evaluates in fp32 and says why."""
    from clip.checkpoint import save_model
    from data.eval.synthetic import build_synthetic_benchmark

    model_dir = tmp_path / "model"
    tok = clip.train_caption_tokenizer([f"a {c} thing" for c in ("red", "green", "blue")] * 10, 300)
    torch.manual_seed(0)
    model = clip.create_model("tiny", vocab_size=tok.vocab_size)
    save_model(model, model_dir)
    tok.save(model_dir / "tokenizer.json")
    build_synthetic_benchmark("colour", tmp_path / "data", 0, 5, model.config.vision.image_size)
    env = {**os.environ, P.PROBE_ENV: "slower"}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "eval", "--model", str(model_dir), "--tasks", "colour",
                           "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("[eval] precision:"))
    assert line.startswith("[eval] precision: fp32") and "bf16 is not faster" in line, line
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["precision"] == "fp32" and "not faster" in report["precision_reason"]


@pytest.mark.parametrize("loss_cls", [ClipLoss, SigLipLoss])
def test_losses_and_logits_stay_fp32_under_bf16_autocast(loss_cls):
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(16, 32), dim=-1)
    args = (img, txt, torch.tensor(50.0)) + ((torch.tensor(-10.0),) if loss_cls is SigLipLoss else ())
    plain = loss_cls()(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = loss_cls()(*args)
        cast_from_bf16 = loss_cls()(*(a.to(torch.bfloat16) if a.ndim else a for a in args))
    assert cast.dtype == torch.float32 and torch.equal(cast, plain)  # no bf16 product anywhere
    assert cast_from_bf16.dtype == torch.float32


def test_the_model_returns_fp32_normalised_features_under_autocast():
    torch.manual_seed(0)
    model = clip.create_model("tiny").eval()
    images = torch.randn(4, 3, 64, 64)
    tokens = torch.randint(1, 1000, (4, 24))
    tokens[:, 5] = 1023
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        img, txt, scale = model(images, tokens)
    assert img.dtype == txt.dtype == scale.dtype == torch.float32
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)


# ----------------------------------------------------------------------------- bf16 vs fp32 training
def scene_batches(n: int, batch: int, image_size: int, context_length: int):
    """Synthetic-web scenes (colour, shape, count, background) and their captions, in fixed batches."""
    from data.synthetic.scenes import describe_scene, random_scene, render_scene

    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(n)]
    captions = [describe_scene(s, rng) for s in scenes]
    tok = clip.train_caption_tokenizer(captions, 512)
    to_tensor = clip.eval_transform(image_size)
    images = torch.stack([to_tensor(render_scene(s, image_size, rng)) for s in scenes])
    tokens = tok(captions, context_length)

    def make_batches(epoch: int, start=None):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range((start or 0) * batch, n - batch + 1, batch):
            idx = order[i:i + batch]
            yield images[idx], tokens[idx]

    return make_batches, tok.vocab_size


@pytest.mark.slow
def test_tiny_config_in_bf16_ends_within_2_percent_of_fp32_loss(tmp_path):
    """The `tiny` config, the same batches and seeds, 160 steps: the bf16 run's final loss (mean of the last
    20 steps) is within 2 % of the fp32 run's."""
    cfg = clip.get_config("tiny")
    batches, vocab = scene_batches(512, 32, cfg.vision.image_size, cfg.text.context_length)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = clip.create_model("tiny", vocab_size=vocab)
        tc = TrainConfig(epochs=10, precision=precision, lr=1e-3, warmup_steps=10, log_every=20, progress=False,
                         checkpoint_every=0, seed=0)
        result = train(model, batches, 16, tc, tmp_path / precision, device="cpu", resume=False)
        assert result["precision"] == precision and result["steps"] == 160
        losses[precision] = result["final_loss"]
    gap = abs(losses["bf16"] - losses["fp32"]) / losses["fp32"]
    print(f"final loss after 160 steps: fp32 {losses['fp32']:.4f}, bf16 {losses['bf16']:.4f} ({100 * gap:.2f} %)")
    assert losses["fp32"] < 0.6 * 3.4657  # it learned (log 32 at the start)
    assert gap <= 0.02
