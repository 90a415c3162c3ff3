"""The training engine (clip/train.py): exact accumulation, DDP equivalence, NaN guard, checkpoints,
and kill-and-resume through the real entry point (torchrun, the webdataset loader, gloo ranks)."""

from __future__ import annotations

import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import psutil
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

import clip
from clip import create_model
from clip.loss import ClipLoss
from clip.train import (
    TrainConfig,
    TrainingDiverged,
    accumulate_gradients,
    param_groups,
    train,
    trim_metrics,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
             text_width=64, text_layers=2, text_heads=2, context_length=16, embed_dim=64, vocab_size=300)


def small_model(seed: int = 0) -> clip.CLIP:
    torch.manual_seed(seed)
    return create_model("tiny", **SMALL)


def random_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 298, (n, 16), generator=g)
    tokens[:, 10] = 299  # EOT: the highest id
    return images, tokens


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# -----------------------------------------------------------------------------
# exact gradient accumulation


def test_four_accumulation_steps_equal_one_big_batch():
    images, tokens = random_batch(32, seed=1)
    big = small_model()
    loss_big = accumulate_gradients(big, [(images, tokens)], ClipLoss())
    g_big = grads(big)

    acc = small_model()
    micro = [(images[i:i + 8], tokens[i:i + 8]) for i in range(0, 32, 8)]
    loss_acc = accumulate_gradients(acc, micro, ClipLoss())
    g_acc = grads(acc)

    assert set(g_acc) == set(g_big) and "logit_scale" in g_acc
    worst = max((g_acc[n] - g_big[n]).abs().max().item() for n in g_big)
    print(f"4 x 8 vs 1 x 32: max |grad diff| {worst:.2e}, loss {loss_acc.item():.6f} vs {loss_big.item():.6f}")
    assert worst < 1e-5
    assert abs(loss_acc.item() - loss_big.item()) < 1e-5

    # the naive alternative (mean of per-micro-batch losses: 8 negatives each) is measurably different,
    # so the comparison above can tell the two apart
    naive = small_model()
    for im, tok in micro:
        (ClipLoss()(*naive(im, tok)) / 4).backward()
    assert max((grads(naive)[n] - g_big[n]).abs().max().item() for n in g_big) > 1e-3


def _ddp_accum_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel

    images, tokens = random_batch(32, seed=1)
    mine = slice(rank * 16, (rank + 1) * 16)  # this rank's half of the global batch, in 2 micro-batches of 8
    im, tok = images[mine], tokens[mine]
    model = small_model()
    ddp = DistributedDataParallel(model)
    loss = accumulate_gradients(ddp, [(im[:8], tok[:8]), (im[8:], tok[8:])], ClipLoss(local_loss=True),
                                feature_model=model)
    torch.save({"grads": grads(model), "loss": loss}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_accumulation_under_ddp_equals_single_process_global_batch(tmp_path):
    from flows.stages.train import free_loopback_port

    mp.spawn(_ddp_accum_worker, args=(2, free_loopback_port(), str(tmp_path)), nprocs=2, join=True)
    images, tokens = random_batch(32, seed=1)
    ref = small_model()
    ref_loss = accumulate_gradients(ref, [(images, tokens)], ClipLoss())
    g_ref = grads(ref)
    for r in range(2):
        part = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        worst = max((part["grads"][n] - g_ref[n]).abs().max().item() for n in g_ref)
        assert worst < 1e-5, (r, worst)
    losses = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["loss"].item() for r in range(2)]
    assert abs(sum(losses) / 2 - ref_loss.item()) < 1e-5  # mean of per-rank losses = global loss


def test_grad_checkpointing_gives_the_same_gradients():
    images, tokens = random_batch(8, seed=2)
    plain, ckpt = small_model(), small_model()
    ckpt.set_grad_checkpointing(True)
    accumulate_gradients(plain, [(images, tokens)], ClipLoss())
    accumulate_gradients(ckpt, [(images, tokens)], ClipLoss())
    g1, g2 = grads(plain), grads(ckpt)
    assert max((g1[n] - g2[n]).abs().max().item() for n in g1) < 1e-6


def test_weight_decay_spares_gains_biases_and_temperature():
    model = small_model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "logit_scale" in exempt and "ln_final.weight" in exempt and "ln_final.bias" in exempt
    assert "visual.transformer.resblocks.0.attn.in_proj_bias" in exempt
    assert "visual.class_embedding" in exempt  # a 1-d gain-like vector
    assert {"token_embedding.weight", "visual.proj", "transformer.resblocks.0.mlp.c_fc.weight"} <= decayed
    assert exempt | decayed == set(names.values()) and not exempt & decayed


# -----------------------------------------------------------------------------
# the engine in one process


def toy_batches(n: int = 64, batch: int = 16, poison: set[int] = frozenset()):
    """Deterministic batches; global micro-batch indices in `poison` carry NaN pixels."""
    images, tokens = random_batch(n, seed=3)

    def make_batches(epoch: int, start=None):
        for j in range(start or 0, n // batch):
            im = images[j * batch:(j + 1) * batch].clone()
            if epoch * (n // batch) + j in poison:
                im[0, 0, 0, 0] = float("nan")
            yield im, tokens[j * batch:(j + 1) * batch]

    return make_batches


def test_nan_steps_are_skipped_and_counted(tmp_path):
    logged = []
    cfg = TrainConfig(epochs=2, warmup_steps=1, log_every=1, checkpoint_every=0, progress=False)
    result = train(small_model(), toy_batches(poison={2, 3}), 4, cfg, tmp_path, device="cpu",
                   on_metrics=lambda s, m: logged.append((s, m)))
    assert result["steps"] == 8 and result["skipped_steps"] == 2
    assert [m["skipped_steps"] for _, m in logged] == [0, 0, 1, 2, 2, 2, 2, 2]
    assert math.isnan(logged[2][1]["loss"]) and all(math.isfinite(m["loss"]) for s, m in logged if s not in (3, 4))
    weights = load_file(tmp_path / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_too_many_bad_steps_stop_with_the_last_good_checkpoint(tmp_path):
    good_weights = {}

    def snapshot(step, metrics):
        if step == 2:
            good_weights.update({k: v.clone() for k, v in model.state_dict().items()})

    model = small_model()
    cfg = TrainConfig(epochs=3, warmup_steps=1, log_every=1, max_bad_steps=3, progress=False)
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row .*max_bad_steps=3.*step-000000005\.pt") as err:
        train(model, toy_batches(poison=set(range(2, 12))), 4, cfg, tmp_path, device="cpu", on_metrics=snapshot)
    assert err.value.checkpoint == tmp_path / "checkpoints" / "step-000000005.pt"
    state = torch.load(err.value.checkpoint, weights_only=True)
    assert state["skipped_steps"] == 3
    for k, v in good_weights.items():  # the three bad steps changed nothing
        assert torch.equal(state["model"][k], v), k
    assert not (tmp_path / "model.safetensors").exists()


def test_checkpoints_keep_the_newest_k_and_resume_skips_a_broken_one(tmp_path):
    cfg = TrainConfig(epochs=2, warmup_steps=1, log_every=4, checkpoint_every=1, keep_checkpoints=3,
                      progress=False)
    train(small_model(), toy_batches(), 4, cfg, tmp_path, device="cpu")
    names = [p.name for p in clip.list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step-000000006.pt", "step-000000007.pt", "step-000000008.pt"]
    # a torn newest file (e.g. a copy cut short) and a stray temp file: resume takes step 7
    newest = tmp_path / "checkpoints" / "step-000000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    (tmp_path / "checkpoints" / ".step-000000009.pt.123.tmp").write_bytes(b"partial")
    path, state = clip.load_newest_checkpoint(tmp_path / "checkpoints")
    assert path.name == "step-000000007.pt" and state["step"] == 7 and state["epoch_step"] == 3
    seen = []

    def counting(epoch, start=None):
        seen.append((epoch, start))
        yield from toy_batches()(epoch, start)

    result = train(small_model(), counting, 4, cfg, tmp_path, device="cpu")
    assert result["steps"] == 8 and seen == [(1, 3)]  # one step left, 3 micro-batches already consumed


def test_fp16_uses_a_grad_scaler_and_checkpoints_it(tmp_path):
    cfg = TrainConfig(epochs=1, precision="fp16", warmup_steps=1, log_every=1, progress=False)
    result = train(small_model(), toy_batches(), 4, cfg, tmp_path, device="cpu")
    assert result["precision"] == "fp16" and result["steps"] == 4
    state = torch.load(clip.list_checkpoints(tmp_path / "checkpoints")[-1], weights_only=True)
    assert state["scaler"]["scale"] > 0
    assert load_file(tmp_path / "model.safetensors")["logit_scale"].dtype == torch.float32


def test_periodic_zeroshot_check_is_logged(tmp_path):
    calls = []

    def check(model):
        calls.append(model.training)
        return {"heldout_acc1": 0.5}

    cfg = TrainConfig(epochs=1, warmup_steps=1, log_every=2, eval_every=2, progress=False)
    train(small_model(), toy_batches(), 4, cfg, tmp_path, device="cpu", eval_fn=check)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "zeroshot/heldout_acc1" in r] == [2, 4]
    assert {"loss", "lr", "temperature", "samples_per_s", "data_wait_s", "grad_norm", "skipped_steps"} <= set(rows[0])


def test_trim_metrics_keeps_rows_up_to_the_step_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)] + [{"step": 2, "zeroshot/acc1": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "loss": 0.2')  # killed mid-write
    assert trim_metrics(path, 2) == 3  # steps 3 and 4, and the torn line
    assert [json.loads(line) for line in path.read_text().splitlines()] == [rows[0], rows[1], rows[4]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left behind
    before = path.stat().st_mtime_ns
    assert trim_metrics(path, 9) == 0 and path.stat().st_mtime_ns == before  # nothing to drop: untouched
    path.write_text('{"step": 1, "loss": 1.0}')  # complete, but the next append would join it
    assert trim_metrics(path, 1) == 0 and path.read_text() == '{"step": 1, "loss": 1.0}\n'
    assert trim_metrics(tmp_path / "none.jsonl", 0) == 0 and not (tmp_path / "none.jsonl").exists()


def test_a_rerun_without_checkpoints_starts_metrics_jsonl_afresh(tmp_path):
    cfg = TrainConfig(epochs=1, warmup_steps=1, log_every=1, checkpoint_every=0, progress=False)
    train(small_model(), toy_batches(), 4, cfg, tmp_path, device="cpu")
    for ckpt in clip.list_checkpoints(tmp_path / "checkpoints"):
        ckpt.unlink()
    train(small_model(), toy_batches(), 4, cfg, tmp_path, device="cpu")  # from step 0 again
    assert [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]


# -----------------------------------------------------------------------------
# the MLflow sink on a real (sqlite) store


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> dict:
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("train", artifact_location=(root / "artifacts").as_uri())
    return {"uri": uri, "client": client, "experiment": experiment}


def metric_steps(client, run_id: str) -> dict[str, list[int]]:
    """Every metric of the run -> the steps of its history, in the store's order."""
    keys = client.get_run(run_id).data.metrics
    return {k: [m.step for m in client.get_metric_history(run_id, k)] for k in keys}


@pytest.mark.integration
def test_mlflow_sink_skips_steps_the_run_already_has(mlflow_store):
    from flows.train_entry import MlflowMetricSink

    client = mlflow_store["client"]
    run_id = client.create_run(mlflow_store["experiment"]).info.run_id
    first = MlflowMetricSink(mlflow_store["uri"], run_id, flush_every=1)
    for step in (1, 2, 3):
        first(step, {"loss": float(step)})
    first(2, {"zeroshot/acc1": 0.5})
    # a resumed process: steps 2 and 3 come again (with other values), then new ones
    again = MlflowMetricSink(mlflow_store["uri"], run_id, flush_every=1)
    for step in (2, 3, 4):
        again(step, {"loss": 10.0 * step})
    again(2, {"zeroshot/acc1": 0.9})
    again(4, {"zeroshot/acc1": 0.7})
    again.flush()
    history = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert metric_steps(client, run_id) == {"train/loss": [1, 2, 3, 4], "train/zeroshot/acc1": [2, 4]}
    assert history == {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0}  # the first value of a step stays


# -----------------------------------------------------------------------------
# through torchrun and the real loader

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40),
           "purple": (140, 40, 170), "orange": (240, 140, 20), "white": (240, 240, 240), "black": (20, 20, 20)}


def write_shards(root: Path, n: int = 192, per_shard: int = 48) -> None:
    """webdataset tars of 64 px colour squares with captions, plus a tokenizer for them."""
    rng = random.Random(0)
    root.mkdir(parents=True)
    names = list(COLOURS)
    captions = []
    for s in range(n // per_shard):
        with tarfile.open(root / f"train-{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s * per_shard + i:06d}"
                colour = names[rng.randrange(len(names))]
                img = Image.new("RGB", (64, 64), COLOURS[colour])
                img.putpixel((rng.randrange(64), rng.randrange(64)), (rng.randrange(256),) * 3)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                caption = f"a photo of a {colour} square number {rng.randrange(100)}"
                captions.append(caption)
                for suffix, data in (("jpg", buf.getvalue()), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    clip.train_caption_tokenizer(captions, vocab_size=300).save(root.parent / "tokenizer.json")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-data") / "shards"
    write_shards(root)
    return root


def write_spec(shards: Path, out: Path, mlflow: dict[str, str] | None = None, **train_overrides) -> Path:
    from flows.config import TrainConfig as TrainSection

    t = TrainSection(device="cpu", vocab_size=300, context_length=16, lr=1e-3, warmup_steps=2, log_every=1,
                     system_metrics_interval=0, progress=False, eval_every=0, **train_overrides)
    spec = t.train_spec(shard_dir=shards, out_dir=out, tokenizer=shards.parent / "tokenizer.json", mlflow=mlflow)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "spec.json"
    path.write_text(spec.to_json())
    return path


def torchrun(spec: Path, nproc: int, extra: list[str] | None = None) -> list[str]:
    from flows.stages.train import free_loopback_port

    rdzv = extra or ["--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={free_loopback_port()}"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *rdzv,
            "-m", "flows.train_entry", str(spec)]


ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def run_ok(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def kill_tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """SIGKILL torchrun and its ranks, as a lost node would; returns the ranks. torchrun starts each
    rank in its own session, so killing torchrun's group alone would leave them running."""
    ranks = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    for victim in ranks:
        victim.send_signal(signal.SIGKILL)
    psutil.wait_procs(ranks, timeout=30)  # not torchrun itself: Popen.wait must reap it
    proc.wait(timeout=60)
    return ranks


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_two_ranks_two_nodes_and_accumulation_match_one_rank_step_by_step(shards, tmp_path):
    """The same global batch of 16 four ways: 1 rank x 16; 2 ranks x 8 (one torchrun); 2 nodes x 1 rank
    x 8 (two torchruns meeting at a c10d rendezvous on loopback); 1 rank x 4 micro-batches of 4."""
    from flows.stages.train import free_loopback_port

    # whole-image crops, no sample shuffle, samples striped over ranks: rank r's batch j holds the
    # samples i % 2 == r of the 1-rank batch j, so every step sees the same global batch
    same_batches = dict(crop_scale=(1.0, 1.0), shuffle_buffer=0, partition="samples", epochs=2,
                        checkpoint_every=0, precision="fp32")  # exact arithmetic: bf16 rounds per layout
    one = tmp_path / "one"
    run_ok(torchrun(write_spec(shards, one, batch_size=16, **same_batches), 1))
    two = tmp_path / "two"
    run_ok(torchrun(write_spec(shards, two, batch_size=8, nproc=2, **same_batches), 2))
    nodes = tmp_path / "nodes"
    spec = write_spec(shards, nodes, batch_size=8, nnodes=2, rdzv_endpoint="x:1", **same_batches)
    endpoint = f"127.0.0.1:{free_loopback_port()}"
    procs = [subprocess.Popen(torchrun(spec, 1, ["--nnodes=2", f"--node-rank={r}", "--rdzv-backend=c10d",
                                                  f"--rdzv-endpoint={endpoint}", "--rdzv-id=t"]),
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    accum = tmp_path / "accum"
    run_ok(torchrun(write_spec(shards, accum, batch_size=4, grad_accum=4, **same_batches), 1))

    ref = step_losses(one)
    assert sorted(ref) == list(range(1, 25))  # 192 samples / 16 = 12 steps x 2 epochs
    for name, out in (("2 ranks", two), ("2 nodes", nodes), ("4 x accumulation", accum)):
        got = step_losses(out)
        assert sorted(got) == sorted(ref), name
        worst = max(abs(got[s] - ref[s]) for s in ref)
        print(f"{name}: max |loss diff| over {len(ref)} steps {worst:.2e}")
        assert worst < 1e-4, (name, worst)
    assert ref[24] < ref[1] - 0.5  # and it learns


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(shards, tmp_path):
    """In bf16 autocast (what `auto` picks on CPUs with fast bf16): resuming is still bit-exact."""
    settings = dict(batch_size=8, nproc=2, epochs=3, checkpoint_every=4, keep_checkpoints=2, deterministic=True,
                    shuffle_buffer=64, precision="bf16")
    whole = tmp_path / "whole"
    run_ok(torchrun(write_spec(shards, whole, **settings), 2))

    killed = tmp_path / "killed"
    spec = write_spec(shards, killed, **settings)
    kill_at = random.Random().randrange(17, 24)  # epoch 1 is steps 13..24; checkpoints at 16 and 20
    print(f"killing at step {kill_at}")
    proc = subprocess.Popen(torchrun(spec, 2), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"[train] step {kill_at}/"):
            ranks = kill_tree(proc)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])
    assert len(ranks) >= 2
    assert not (killed / "model.safetensors").exists()
    newest = clip.list_checkpoints(killed / "checkpoints")[-1]
    assert int(newest.stem.split("-")[1]) < kill_at + 1

    resumed = run_ok(torchrun(spec, 2))
    line = next(l for l in resumed.stdout.splitlines() if l.startswith("[train] resumed from"))
    print(line)
    step_in_epoch = int(line.split("step ")[-1].split(" of it")[0])
    assert "(epoch 1," in line and step_in_epoch > 0  # a mid-epoch resume, not an epoch boundary

    a, b = load_file(whole / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, differing[:5]
    assert json.loads((killed / "summary.json").read_text())["steps"] == 36


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_then_resume_leaves_one_value_per_step_in_metrics_jsonl_and_mlflow(shards, mlflow_store, tmp_path):
    client = mlflow_store["client"]
    run_id = client.create_run(mlflow_store["experiment"]).info.run_id
    out = tmp_path / "out"
    # 192 samples / 16 = 12 steps; checkpoints at 4 and 8; the sink flushes every 2 steps (10 metrics each)
    spec = write_spec(shards, out, mlflow={"tracking_uri": mlflow_store["uri"], "run_id": run_id}, batch_size=16,
                      epochs=1, checkpoint_every=4)
    proc = subprocess.Popen(torchrun(spec, 1), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        # step 7 is printed after step 6's metrics reached both metrics.jsonl and MLflow, one step
        # before the next checkpoint: 5 and 6 will be done again
        if line.startswith("[train] step 7/"):
            kill_tree(proc)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])
    assert [p.name for p in clip.list_checkpoints(out / "checkpoints")] == ["step-000000004.pt"]
    assert {5, 6} <= {r["step"] for r in metric_rows(out)}
    assert {5, 6} <= set(metric_steps(client, run_id)["train/loss"])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 3.')  # as if killed in the middle of writing a row

    resumed = run_ok(torchrun(spec, 1))
    assert "[train] resumed from" in resumed.stdout and "dropped" in resumed.stdout
    assert (out / "model.safetensors").exists()
    rows = metric_rows(out)
    pairs = [(r["step"], k) for r in rows for k in r if k != "step"]
    assert len(pairs) == len(set(pairs)) and sorted(r["step"] for r in rows) == list(range(1, 13))
    history = metric_steps(client, run_id)
    assert history and all(len(steps) == len(set(steps)) for steps in history.values()), history
    assert sorted(history["train/loss"]) == list(range(1, 13))
    # MLflow kept the first value of steps 5 and 6, the file the re-done one: on CPU they are equal
    mlflow_loss = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    assert mlflow_loss == {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_torch_compile_trains_like_eager():
    """train.compile=true goes through torch.compile (inductor, a C++ compiler on CPU) and takes the
    same steps as eager execution."""
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    from clip.train import TrainStep

    batch = random_batch(16, seed=4)
    losses = {}
    for compiled in (False, True):
        # fp32: the same arithmetic to ~1e-7; in bf16 inductor's fusions round differently (~1e-2 in the loss)
        stepper = TrainStep(small_model(), TrainConfig(compile=compiled, warmup_steps=1, precision="fp32"), 10,
                            torch.device("cpu"))
        stepper.wrap()
        losses[compiled] = [stepper.step([batch]).loss for _ in range(3)]
    assert max(abs(a - b) for a, b in zip(losses[False], losses[True])) < 1e-4, losses
