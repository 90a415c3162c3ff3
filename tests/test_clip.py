"""Fast CPU tests for the clip package (whole file well under a minute on 2 cores)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clip
from clip import (
    CaptionTokenizer,
    CLIPConfig,
    ClipLoss,
    TrainConfig,
    create_model,
    evaluate_zeroshot,
    load_model,
    save_model,
    train,
    train_caption_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # These models are tiny: one intra-op thread is as fast, and it stays fast when the
    # 2 cores are shared (OpenMP spin-waiting under oversubscription is very slow).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# -----------------------------------------------------------------------------
# model


def test_vit_b32_param_count_and_openai_keys():
    with torch.device("meta"):  # no allocation, no init cost
        model = create_model("ViT-B-32")
    assert model.num_params() == 151_277_313
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "visual.conv1.weight": (768, 3, 32, 32),
        "visual.class_embedding": (768,),
        "visual.positional_embedding": (50, 768),
        "visual.ln_pre.weight": (768,),
        "visual.transformer.resblocks.11.attn.in_proj_weight": (2304, 768),
        "visual.transformer.resblocks.11.attn.in_proj_bias": (2304,),
        "visual.transformer.resblocks.11.attn.out_proj.weight": (768, 768),
        "visual.transformer.resblocks.11.attn.out_proj.bias": (768,),
        "visual.transformer.resblocks.0.ln_1.bias": (768,),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": (3072, 768),
        "visual.transformer.resblocks.0.mlp.c_proj.weight": (768, 3072),
        "visual.transformer.resblocks.0.ln_2.weight": (768,),
        "visual.ln_post.bias": (768,),
        "visual.proj": (768, 512),
        "token_embedding.weight": (49408, 512),
        "positional_embedding": (77, 512),
        "transformer.resblocks.11.attn.in_proj_weight": (1536, 512),
        "transformer.resblocks.11.mlp.c_proj.bias": (512,),
        "ln_final.weight": (512,),
        "text_projection": (512, 512),
        "logit_scale": (),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert "visual.conv1.bias" not in shapes
    assert not any(k.startswith(("visual.transformer.resblocks.12", "transformer.resblocks.12"))
                   for k in shapes)
    assert math.isclose(model.config.init_logit_scale, math.log(1 / 0.07))


def test_other_named_configs():
    assert {"tiny", "ViT-B-32", "ViT-B-16", "ViT-L-14"} <= set(clip.list_models())
    with torch.device("meta"):
        assert create_model("ViT-B-16").num_params() == 149_620_737
        assert create_model("ViT-L-14").num_params() == 427_616_513
    cfg = clip.get_config("ViT-L-14")
    assert cfg.act == "quick_gelu" and cfg.embed_dim == 768
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg


def test_create_model_overrides():
    with torch.device("meta"):
        m = create_model("tiny", vocab_size=777, text_layers=2, **{"vision.width": 64}, embed_dim=32)
    c = m.config
    assert (c.text.vocab_size, c.text.layers, c.vision.width, c.embed_dim) == (777, 2, 64, 32)
    assert m.token_embedding.weight.shape == (777, 128)
    with pytest.raises(ValueError):
        create_model("tiny", width=64)  # ambiguous: vision or text?
    with pytest.raises(ValueError):
        create_model("no-such-model")


@pytest.fixture(scope="module")
def tiny_model() -> clip.CLIP:
    torch.manual_seed(0)
    return create_model("tiny").eval()


def test_tiny_forward_shapes_and_norms(tiny_model):
    cfg = tiny_model.config
    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = torch.randint(1, cfg.text.vocab_size, (3, cfg.text.context_length))
    with torch.no_grad():
        img, txt, scale = tiny_model(images, tokens)
        raw = tiny_model.encode_image(images)
    assert img.shape == txt.shape == raw.shape == (3, cfg.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert math.isclose(scale.item(), 1 / 0.07, rel_tol=1e-5)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(3))  # encode_* is unnormalised


def test_text_is_causal_and_pools_at_eot(tiny_model):
    ctx, V = tiny_model.config.text.context_length, tiny_model.config.text.vocab_size
    a = torch.randint(1, V - 1, (1, ctx))
    b = a.clone()
    b[0, 10] = (a[0, 10] + 1) % (V - 1) + 1
    with torch.no_grad():
        ha, hb = tiny_model.text_hidden_states(a), tiny_model.text_hidden_states(b)
    torch.testing.assert_close(ha[:, :10], hb[:, :10])
    assert not torch.allclose(ha[:, 10:], hb[:, 10:])
    # features are read at argmax(tokens): changing a token after it has no effect
    a[0, 5] = V - 1
    c = a.clone()
    c[0, 20] = 1 if a[0, 20] != 1 else 2
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.encode_text(a), tiny_model.encode_text(c))


# -----------------------------------------------------------------------------
# tokenizer

COLOURS = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black"]
RGB = {
    "red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0),
    "cyan": (0, 1, 1), "magenta": (1, 0, 1), "white": (1, 1, 1), "black": (0, 0, 0),
}
CAPTIONS = [f"a photo of a {c} square" for c in COLOURS] + [
    f"a {c} square on the left of a {d} circle" for c in COLOURS for d in COLOURS
]


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    return train_caption_tokenizer(CAPTIONS, vocab_size=300)


def test_tokenizer_special_ids_and_layout(tokenizer):
    V = tokenizer.vocab_size
    assert V <= 300
    assert (tokenizer.pad_id, tokenizer.sot_id, tokenizer.eot_id) == (0, V - 2, V - 1)
    toks = tokenizer(["a photo of a red square", "blue"], context_length=16)
    assert toks.dtype == torch.long and toks.shape == (2, 16)
    assert (toks[:, 0] == tokenizer.sot_id).all()
    for row in toks:
        n = int((row != 0).sum())
        assert row[n - 1] == tokenizer.eot_id and (row[n:] == 0).all()
        assert row.argmax() == n - 1  # argmax pooling finds EOT
    assert tokenizer.decode(toks[0].tolist()) == "a photo of a red square"
    # normalisation: lower-case and collapsed whitespace
    assert torch.equal(tokenizer("A  PHOTO\tof a Red square ", 16), toks[:1])
    # a literal special-token string in a caption is text, not EOT
    weird = tokenizer("red <end_of_text> square", 32)[0]
    assert int((weird == tokenizer.eot_id).sum()) == 1


def test_tokenizer_truncation_keeps_eot(tokenizer):
    long = " ".join(["a red square on the left of a blue circle"] * 10)
    toks = tokenizer([long], context_length=8)[0]
    assert toks[0] == tokenizer.sot_id and toks[-1] == tokenizer.eot_id
    assert (toks != 0).all()


def test_tokenizer_save_load_round_trip(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path / "tok" / "tokenizer.json")
    assert path.is_file()
    loaded = CaptionTokenizer.load(path)
    assert (loaded.vocab_size, loaded.sot_id, loaded.eot_id) == (
        tokenizer.vocab_size, tokenizer.sot_id, tokenizer.eot_id)
    assert torch.equal(loaded(CAPTIONS, 24), tokenizer(CAPTIONS, 24))
    assert torch.equal(clip.tokenize(loaded, "red", 24), tokenizer("red", 24))


# -----------------------------------------------------------------------------
# loss


def test_loss_matches_hand_computed_symmetric_ce():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(3, 4), dim=-1)
    txt = F.normalize(torch.randn(3, 4), dim=-1)
    scale = torch.tensor(2.5)
    sim = [[scale.item() * float(img[i] @ txt[j]) for j in range(3)] for i in range(3)]
    row_ce = [-sim[i][i] + math.log(sum(math.exp(s) for s in sim[i])) for i in range(3)]
    col_ce = [-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(3))) for j in range(3)]
    expected = 0.5 * (sum(row_ce) / 3 + sum(col_ce) / 3)
    assert math.isclose(ClipLoss()(img, txt, scale).item(), expected, rel_tol=1e-5)


def test_loss_is_log_n_for_random_features():
    torch.manual_seed(0)
    n = 16
    img = F.normalize(torch.randn(n, 512), dim=-1)
    txt = F.normalize(torch.randn(n, 512), dim=-1)
    assert abs(ClipLoss()(img, txt, torch.tensor(1.0)).item() - math.log(n)) < 0.05


# -----------------------------------------------------------------------------
# checkpoints


def test_save_load_round_trip_identical_outputs(tiny_model, tmp_path):
    out = save_model(tiny_model, tmp_path / "model")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = load_model(out)
    assert loaded.config == tiny_model.config
    cfg = tiny_model.config
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = torch.randint(1, cfg.text.vocab_size, (2, cfg.text.context_length))
    with torch.no_grad():
        for a, b in zip(tiny_model(images, tokens), loaded(images, tokens)):
            assert torch.equal(a, b)


# -----------------------------------------------------------------------------
# training on a toy task: solid-colour images <-> colour-name captions

SMALL = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
             text_width=64, text_layers=2, text_heads=2, context_length=16, embed_dim=64)


def colour_images(names: list[str], size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([RGB[n] for n in names], dtype=torch.float32)[:, :, None, None]
    images = base.expand(-1, -1, size, size) + 0.1 * torch.randn(len(names), 3, size, size, generator=g)
    return (images - 0.5) / 0.25


def toy_batches(tokenizer, ctx: int, batch: int = 32, n: int = 64):
    names = [COLOURS[i % len(COLOURS)] for i in range(n)]
    images = colour_images(names, SMALL["image_size"], seed=1)
    tokens = tokenizer([f"a photo of a {c} square" for c in names], ctx)

    def make_batches(epoch: int, start: int | None = None):
        # `start`: micro-batches of this epoch already consumed (the engine's resume contract)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range((start or 0) * batch, n - batch + 1, batch):
            idx = perm[i : i + batch]
            yield images[idx], tokens[idx]

    return make_batches


def small_model(tokenizer) -> clip.CLIP:
    torch.manual_seed(0)
    return create_model("tiny", vocab_size=tokenizer.vocab_size, **SMALL)


TOY_CFG = dict(lr=2e-3, warmup_steps=5, weight_decay=0.1, log_every=5, checkpoint_every=7)


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    model = small_model(tokenizer)
    logged: list[tuple[int, dict]] = []
    result = train(model, toy_batches(tokenizer, SMALL["context_length"]), steps_per_epoch=2,
                   cfg=TrainConfig(epochs=15, **TOY_CFG), out_dir=out,
                   on_metrics=lambda s, m: logged.append((s, m)), device="cpu")
    return model, out, result, logged


def test_train_reduces_loss_and_writes_artifacts(trained):
    model, out, result, logged = trained
    assert result["steps"] == 30 and result["samples_seen"] == 30 * 32
    assert [s for s, _ in logged] == [5, 10, 15, 20, 25, 30]
    first, last = logged[0][1]["loss"], logged[-1][1]["loss"]
    assert last < first - 0.5, (first, last)
    assert math.isclose(result["final_loss"], last)
    m = logged[-1][1]
    assert set(m) >= {"loss", "lr", "temperature", "logit_scale", "samples_per_s"}
    assert math.isclose(m["temperature"], 1 / m["logit_scale"])
    assert m["logit_scale"] <= 100.0 + 1e-4
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    state = torch.load(clip.list_checkpoints(out / "checkpoints")[-1], weights_only=True)  # no pickle
    assert state["step"] == 30 and state["epoch"] == 15
    assert load_model(out).config == model.config


def test_train_resume_continues_from_saved_step(trained, tokenizer, tmp_path):
    _, out, _, _ = trained
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    newest = clip.list_checkpoints(out / "checkpoints")[-1]
    (run / "checkpoints" / newest.name).write_bytes(newest.read_bytes())
    fresh = small_model(tokenizer)
    logged = []
    result = train(fresh, toy_batches(tokenizer, SMALL["context_length"]), steps_per_epoch=2,
                   cfg=TrainConfig(epochs=17, **TOY_CFG), out_dir=run,
                   on_metrics=lambda s, m: logged.append(s), device="cpu")
    assert result["steps"] == 34 and result["samples_seen"] == 34 * 32
    assert logged == [34]  # only the 4 new steps ran; last step is always logged
    assert torch.load(clip.list_checkpoints(run / "checkpoints")[-1], weights_only=True)["step"] == 34
    # training already complete: resume runs nothing
    again = train(small_model(tokenizer), toy_batches(tokenizer, 16), steps_per_epoch=2,
                  cfg=TrainConfig(epochs=17, **TOY_CFG), out_dir=run, device="cpu")
    assert again["steps"] == 34


def test_resume_mid_epoch_runs_only_the_missing_steps(tokenizer, tmp_path):
    batches = toy_batches(tokenizer, SMALL["context_length"], batch=16)  # 4 batches per epoch

    def crash_in_epoch_1(epoch, start=None):
        for i, b in enumerate(batches(epoch, start)):
            if epoch == 1 and i == 2:
                raise RuntimeError("simulated preemption")
            yield b

    cfg = TrainConfig(epochs=2, lr=1e-3, warmup_steps=1, log_every=100, checkpoint_every=5)
    with pytest.raises(RuntimeError, match="preemption"):
        train(small_model(tokenizer), crash_in_epoch_1, 4, cfg, tmp_path, device="cpu")
    state = torch.load(clip.list_checkpoints(tmp_path / "checkpoints")[-1], weights_only=True)
    assert state["step"] == 5 and (state["epoch"], state["epoch_step"]) == (1, 1)
    seen = []

    def counting(epoch, start=None):
        for b in batches(epoch, start):
            seen.append(epoch)
            yield b

    result = train(small_model(tokenizer), counting, 4, cfg, tmp_path, device="cpu")
    assert result["steps"] == 8 and seen == [1, 1, 1]  # the 3 steps epoch 1 still owed


def test_train_bf16_amp_with_grad_accum(tokenizer, tmp_path):
    cfg = TrainConfig(epochs=1, precision="bf16", grad_accum=2, log_every=1, warmup_steps=1)
    logged = []
    result = train(small_model(tokenizer), toy_batches(tokenizer, 16, batch=16), 2, cfg, tmp_path,
                   on_metrics=lambda s, m: logged.append(m["loss"]), device="cpu", resume=False)
    assert result["steps"] == 2 and result["samples_seen"] == 64
    assert len(logged) == 2 and all(math.isfinite(x) for x in logged)
    assert load_model(tmp_path).logit_scale.dtype == torch.float32  # weights stay fp32


def test_zeroshot_metrics_on_toy_task(trained, tokenizer):
    model, _, _, _ = trained
    labels = torch.arange(len(COLOURS)).repeat(4)
    images = colour_images([COLOURS[i] for i in labels], SMALL["image_size"], seed=7)
    batches = [(images[:16], labels[:16]), (images[16:], labels[16:])]
    metrics = evaluate_zeroshot(model, tokenizer, COLOURS, ["a photo of a {c} square", "a {c} square"],
                                batches, context_length=16, device="cpu")
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall", "n"}
    assert metrics["n"] == 32
    assert 0.0 <= metrics["acc1"] <= metrics["acc5"] <= 1.0
    assert metrics["acc1"] > 0.5  # 8 classes: chance is 0.125
    assert model.training  # evaluate_zeroshot restores the caller's mode
    clf = clip.build_classifier(model, tokenizer, COLOURS, ["a {c} square"], 16, "cpu")
    assert clf.shape == (model.config.embed_dim, len(COLOURS))
    torch.testing.assert_close(clf.norm(dim=0), torch.ones(len(COLOURS)))


def test_classifier_is_batched_over_classes_and_matches_per_class(trained, tokenizer):
    model, _, _, _ = trained
    templates = ["a photo of a {c} square", "a {c} square", "{c}"]
    batched = clip.build_classifier(model, tokenizer, COLOURS, templates, 16, "cpu", batch_size=5)
    calls = []
    hook = model.token_embedding.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        clip.build_classifier(model, tokenizer, COLOURS, templates, 16, "cpu", batch_size=256)
    finally:
        hook.remove()
    assert calls == [len(COLOURS) * len(templates)]  # one text-tower pass for all 24 prompts
    model.eval()
    with torch.no_grad():
        for c, name in enumerate(COLOURS):
            emb = F.normalize(model.encode_text(tokenizer([t.replace("{c}", name) for t in templates], 16)), dim=-1)
            torch.testing.assert_close(batched[:, c], F.normalize(emb.mean(0), dim=0), atol=1e-6, rtol=0)
    model.train()


def test_predict_topk(trained, tokenizer):
    model, _, _, _ = trained
    model.eval()
    clf = clip.build_classifier(model, tokenizer, COLOURS, ["a {c} square"], 16, "cpu")
    images = colour_images(COLOURS[:4], SMALL["image_size"], seed=3)
    top = clip.predict_topk(model, images, clf, COLOURS, k=3)
    model.train()
    assert len(top) == 4 and all(len(row) == 3 for row in top)
    for row in top:
        probs = [p for _, p in row]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert all(name in COLOURS for name, _ in row)
    assert sum(row[0][0] == COLOURS[i] for i, row in enumerate(top)) >= 3  # the toy model knows colours
    with pytest.raises(ValueError, match="class names"):
        clip.predict_topk(model, images, clf, COLOURS[:3])


def test_transforms():
    from PIL import Image

    img = Image.new("L", (80, 50), color=128)  # grayscale, non-square
    for tf in (clip.train_transform(32), clip.eval_transform(32)):
        x = tf(img)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_eval_transform_resizes_short_side_then_centre_crops():
    from PIL import Image
    from torchvision import transforms as T

    # 60x30: left third red, middle third green, right third blue. The short side goes 30 -> 20
    # (wide 40), then the centre 20x20 crop keeps the green band plus half of each neighbour.
    img = Image.new("RGB", (60, 30))
    for x0, colour in ((0, (255, 0, 0)), (20, (0, 255, 0)), (40, (0, 0, 255))):
        img.paste(colour, (x0, 0, x0 + 20, 30))
    x = clip.eval_transform(20)(img)
    mean = torch.tensor(clip.transform.CLIP_MEAN)[:, None]
    std = torch.tensor(clip.transform.CLIP_STD)[:, None]
    row = (x[:, 10, :] * std + mean)  # [3, 20] back in [0, 1]
    assert x.shape == (3, 20, 20)
    assert row[1, 8:12].min() > 0.95  # centre is green
    assert row[0, 0] > 0.9 and row[2, -1] > 0.9  # edges: red left, blue right (3.3 px each)
    reference = img.resize((40, 20), Image.BICUBIC).crop((10, 0, 30, 20))
    ref = T.functional.pil_to_tensor(reference).float() / 255
    assert (x * std[..., None] + mean[..., None] - ref).abs().max() < 0.03  # PIL bicubic, same crop


def test_clip_does_not_import_orchestration_libs():
    code = ("import clip, clip.train, clip.zeroshot, sys; "
            "print(','.join(m for m in ('prefect', 'mlflow', 'dask', 'webdataset', 'pandas') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""


# -----------------------------------------------------------------------------
# distributed (2 gloo processes on CPU)


def _gathered_loss_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    img = F.normalize(torch.randn(8, 16), dim=-1)
    txt = F.normalize(torch.randn(8, 16), dim=-1)
    n = 8 // world
    local_img = img[rank * n : (rank + 1) * n].clone().requires_grad_()
    local_txt = txt[rank * n : (rank + 1) * n].clone().requires_grad_()
    loss = ClipLoss()(local_img, local_txt, torch.tensor(3.0))
    loss.backward()
    torch.save({"loss": loss.detach(), "g_img": local_img.grad, "g_txt": local_txt.grad},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_loss_gathers_with_gradients(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_gathered_loss_worker, args=(world, str(tmp_path / "init"), str(tmp_path)),
             nprocs=world, join=True)
    torch.manual_seed(0)
    img = F.normalize(torch.randn(8, 16), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(8, 16), dim=-1).requires_grad_()
    full = ClipLoss()(img, txt, torch.tensor(3.0))
    full.backward()
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    # the mean of the per-rank losses is the global-batch loss ...
    torch.testing.assert_close(sum(p["loss"] for p in parts) / world, full.detach())
    # ... and gradients reach each rank's features from every rank's loss (DDP then averages)
    torch.testing.assert_close(torch.cat([p["g_img"] for p in parts]) / world, img.grad)
    torch.testing.assert_close(torch.cat([p["g_txt"] for p in parts]) / world, txt.grad)


@pytest.mark.slow
def test_train_under_torchrun_ddp(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys, torch
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)
        import clip, test_clip as T
        tok = clip.train_caption_tokenizer(T.CAPTIONS, 300)
        model = T.small_model(tok)
        res = clip.train(model, T.toy_batches(tok, 16, batch=16), steps_per_epoch=2,
                         cfg=clip.TrainConfig(epochs=2, grad_accum=2, log_every=2, lr=1e-3,
                                              warmup_steps=1),
                         out_dir={str(tmp_path / "out")!r}, device="cpu")
        rank = os.environ["RANK"]
        with open(os.path.join({str(tmp_path)!r}, "result" + rank + ".json"), "w") as f:
            json.dump(res, f)
    """))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 64 samples / (16 per micro-batch * 2 micro-batches) = 2 steps per epoch per rank
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2)]
    for res in results:
        assert (res["steps"], res["samples_seen"]) == (4, 256)
    assert results[0]["final_loss"] == results[1]["final_loss"]  # loss is averaged over ranks
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert clip.list_checkpoints(tmp_path / "out" / "checkpoints")
