"""Stage `fit_decoder`: the RAE decoder learns to turn stored features back into the images, resumes exactly,
and steps aside when a released decoder is given."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
import zarr
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.artifacts import file_sha256
from pipeline.config import config_dict
from pipeline.data.features import read_features
from pipeline.data.shards import decode_crop, iter_jpegs, manifest_rows
from pipeline.images import label_width
from pipeline.metrics.reconstruction import psnr
from pipeline.models.configured import decoder_arch
from pipeline.models.rae import build_rae_decoder, resize_random_crop, to_encoder_input, to_uint8_pixels, to_unit_pixels
from pipeline.training import TrainingStopped, step_seed
from stages import fit_decoder
from stages.fit_decoder import encode_crops, load_decoder, lr_schedule, noise_augment, unit_pixels
from stages.runner import plan, run_pipeline
from tests.conftest import REPO

# the test set is 32 px: 8x8 tokens x patch 4 decode to 32 px
EXTRA = ("runtime.device=cpu", "decoder.patch_size=4", "fit_decoder.report_images=null", "fit_decoder.loader_threads=2")
TRAIN = ("fit_decoder.steps=100", "fit_decoder.batch_size=16", "fit_decoder.lr=2e-3", "fit_decoder.ckpt_every=1000")
# a very small decoder and run for the resume tests: 12 steps, checkpoints every 4
RESUME = ("decoder.hidden_size=32", "decoder.depth=1", "decoder.num_heads=2", "decoder.intermediate_size=64",
          "fit_decoder.steps=12", "fit_decoder.batch_size=8", "fit_decoder.ckpt_every=4", "fit_decoder.log_every=4",
          "fit_decoder.image_every=4")


@pytest.fixture(scope="module")
def config(module_config):
    """make(*overrides) -> a config whose shard and encode outputs are already in the module's store."""
    def make(*overrides):
        return module_config(*EXTRA, *overrides)

    run_pipeline(make(), until="encode")
    return make


@pytest.fixture(scope="module")
def trained(config):
    """A short training run, recording each step's noise augmentation."""
    calls = []
    real = fit_decoder.noise_augment

    def recording(features, tau, generator):
        z, s = real(features, tau, generator)
        calls.append((tau, s.clone(), (z - features).clone()))
        return z, s

    fit_decoder.noise_augment = recording
    try:
        cfg = config(*TRAIN)
        manifests = run_pipeline(cfg, until="fit_decoder")
    finally:
        fit_decoder.noise_augment = real
    return cfg, manifests, calls


def held_out(cfg, manifests):
    """Val images (plain view) as the stage should see them, read independently: features and ADM crops."""
    group = zarr.open_group(str(manifests["encode"].dir / "features.zarr"), mode="r")
    lo, hi = group.attrs["splits"]["val"]
    rows = np.arange(lo, hi)[group["view"][lo:hi] == 0]
    val = manifest_rows(manifests["shard"].dir, ("val",))
    jpegs = dict(iter_jpegs(sorted(str(manifests["shard"].dir / "shards" / r["shard"]) for r in val),
                            {r["key"]: r["sha256"] for r in val}))
    keys = group["key"].get_orthogonal_selection((rows,))
    crops = np.stack([decode_crop(jpegs[k], cfg.data.resolution) for k in keys])
    return read_features(group, rows), crops


def reconstruct(decoder, features):
    with torch.no_grad():
        return decoder(features)


# --- training ------------------------------------------------------------------------------------


def test_training_lowers_l1_and_beats_the_mean_image(trained):
    cfg, manifests, _ = trained
    metrics = manifests["fit_decoder"].metrics
    features, crops = held_out(cfg, manifests)
    target = unit_pixels(torch.from_numpy(crops))
    untrained = build_rae_decoder(None, seed=cfg.fit_decoder.seed, **decoder_arch(cfg))
    l1_untrained = float((to_unit_pixels(reconstruct(untrained, features)) - target).abs().mean())

    assert metrics["steps"] == 100 and metrics["report_images"] == 16
    assert metrics["l1_train_last"] < 0.6 * metrics["l1_train_first"]
    assert metrics["l1_val"] < 0.5 * l1_untrained
    baseline = psnr(np.broadcast_to(crops.astype(np.float64).mean(0), crops.shape), crops)
    assert metrics["psnr_val_mean_image"] == pytest.approx(baseline, rel=1e-9)
    assert metrics["psnr_val"] > baseline + 4, (metrics["psnr_val"], baseline)


def test_report_is_the_ema_decoder_on_clean_features(trained):
    """psnr_val / l1_val recomputed here, through load_decoder and without noise, match the stage's metrics."""
    cfg, manifests, _ = trained
    metrics = manifests["fit_decoder"].metrics
    decoder = load_decoder(cfg, manifests)
    features, crops = held_out(cfg, manifests)
    recon = reconstruct(decoder, features)
    assert psnr(to_uint8_pixels(recon).numpy(), crops) == pytest.approx(metrics["psnr_val"], rel=1e-6)
    l1 = float((to_unit_pixels(recon) - torch.from_numpy(crops).permute(0, 3, 1, 2) / 255.0).abs().mean())
    assert l1 == pytest.approx(metrics["l1_val"], rel=1e-5)  # on [0, 1] pixels
    normalized = float((recon - to_encoder_input(torch.from_numpy(crops), 32)).abs().mean())
    assert 4.0 < normalized / l1 < 4.9  # ImageNet-normalized space would weigh it ~1 / std = ~4.4x


def test_outputs_weights_arch_and_reconstruction_grid(trained):
    cfg, manifests, _ = trained
    out = manifests["fit_decoder"].dir
    assert json.loads((out / fit_decoder.ARCH).read_text())["arch"] == decoder_arch(cfg)
    state = safetensors.torch.load_file(str(out / fit_decoder.WEIGHTS))
    assert "decoder_layers.0.attention.attention.query.weight" in state  # RAE key names
    grid = np.asarray(Image.open(out / fit_decoder.GRID))
    # top: 8 images, bottom: their reconstructions, each row labelled on its left
    assert grid.shape == (2 * (32 + 2) + 2, label_width(fit_decoder.GRID_ROWS) + 8 * (32 + 2) + 2, 3)


def test_the_committed_output_keeps_no_checkpoint(trained):
    """The last resume checkpoint (model, EMA and AdamW: 78% of main's output) is gone once the weights are written."""
    _, manifests, _ = trained
    out = manifests["fit_decoder"]
    assert not (out.dir / "checkpoints").exists()
    assert not [f.path for f in out.files if f.path.startswith("checkpoints/")]


def test_noise_augmentation_is_applied_every_training_step(trained):
    cfg, _, calls = trained
    assert len(calls) == cfg.fit_decoder.steps
    tau = cfg.fit_decoder.noise_tau
    assert all(t == tau for t, _, _ in calls)
    s = torch.cat([s for _, s, _ in calls])
    assert float(s.min()) >= 0 and float(s.max()) <= tau
    for _, s_batch, noise in calls[:3]:  # each sample's noise has standard deviation s
        std = noise.flatten(1).std(1)
        torch.testing.assert_close(std, s_batch, rtol=0.05, atol=1e-3)


def test_noise_scale_is_uniform_per_sample_and_seeded_by_step():
    g = torch.Generator().manual_seed(step_seed(0, 5))
    _, s = noise_augment(torch.zeros(4000, 4, 4), 0.8, g)
    assert s.shape == (4000,) and float(s.min()) >= 0 and float(s.max()) <= 0.8
    assert float(s.mean()) == pytest.approx(0.4, abs=0.02)  # tau * U(0, 1): mean tau / 2
    assert float(s.var()) == pytest.approx(0.8 ** 2 / 12, rel=0.1)  # variance tau^2 / 12
    features = torch.randn(100, 64, 64)
    z, s = noise_augment(features, 0.8, torch.Generator().manual_seed(step_seed(0, 5)))
    torch.testing.assert_close((z - features).flatten(1).std(1), s, rtol=0.06, atol=1e-3)  # N(0, s^2) per sample
    again, _ = noise_augment(features, 0.8, torch.Generator().manual_seed(step_seed(0, 5)))
    assert torch.equal(z, again) and step_seed(0, 5) != step_seed(0, 6) and step_seed(0, 5) != step_seed(1, 5)
    same, none = noise_augment(features, 0.0, g)
    assert torch.equal(same, features) and not none.any()


def test_l1_is_on_unit_pixels_as_rae_computes_it():
    """A decoder output of 0 (ImageNet-normalized) is the mean colour in [0, 1]; against white, the L1 is
    mean(1 - (0.485, 0.456, 0.406)) = 0.551, not the normalized-space mean(0.515/0.229, ...) = 2.42."""
    white = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    recon = to_unit_pixels(torch.zeros(2, 3, 4, 4))
    l1 = float((recon - unit_pixels(white)).abs().mean())
    assert l1 == pytest.approx((0.515 + 0.544 + 0.594) / 3, abs=1e-6)
    grey = torch.full((1, 2, 2, 3), 51, dtype=torch.uint8)  # 0.2
    assert float((to_unit_pixels(to_encoder_input(grey, 2)) - unit_pixels(grey)).abs().max()) < 1e-6


def test_lr_schedule_warms_up_to_the_peak_then_decays_by_cosine_to_the_floor():
    from pipeline.config import FitDecoderConfig

    fd = FitDecoderConfig(steps=320, lr=2e-4, final_lr=2e-5)  # warmup_steps null: steps // 16 = 20
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=fd.lr)
    scheduler, lrs = lr_schedule(optimizer, fd), []
    for _ in range(330):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(2e-4 / 20) and lrs[19] == pytest.approx(2e-4)  # from zero, peak at the end
    assert np.all(np.diff(lrs[:20]) > 0) and np.all(np.diff(lrs[20:320]) < 0)
    for step in (20, 95, 170, 245):  # cosine: floor + (peak - floor) (1 + cos(pi p)) / 2
        p = (step - 20) / 300
        assert lrs[step] == pytest.approx(2e-5 + 1.8e-4 * (1 + np.cos(np.pi * p)) / 2, rel=1e-9)
    assert lrs[170] == pytest.approx(1.1e-4)  # halfway: the mean of peak and floor
    assert lrs[320] == pytest.approx(2e-5) and lrs[-1] == pytest.approx(2e-5)  # the floor, and it stays there
    constant = FitDecoderConfig(lr_schedule="constant")
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    lr_schedule(optimizer, constant)
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_rae_augmentation_resizes_the_short_side_to_1_5x_and_crops_as_torchvision():
    from torchvision import transforms

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 450, 3), dtype=np.uint8))  # H 300, W 450
    resized = np.asarray(transforms.Resize(384, interpolation=transforms.InterpolationMode.BICUBIC)(image))
    assert resized.shape == (384, 576, 3)
    crop = resize_random_crop(image, 256, (0.5, 0.25))
    top, left = int(0.5 * (384 - 256 + 1)), int(0.25 * (576 - 256 + 1))
    assert crop.shape == (256, 256, 3) and np.array_equal(crop, resized[top:top + 256, left:left + 256])
    corner = resize_random_crop(image, 256, (0.0, 0.999999))  # the last position RandomCrop can draw
    assert np.array_equal(corner, resized[:256, -256:])


def test_random_crops_are_seeded_per_step_and_mirrored_for_flipped_rows(config):
    manifests = run_pipeline(config(), until="encode")
    group = zarr.open_group(str(manifests["encode"].dir / "features.zarr"), mode="r")
    pairs = fit_decoder.PairSource(group, manifests["shard"].dir, 32, threads=2)
    rows = np.arange(8)  # 4 images, plain and flipped
    crops = pairs.random_crops(rows, seed=3)
    assert crops.shape == (8, 32, 32, 3) and crops.dtype == np.uint8
    assert np.array_equal(crops, pairs.random_crops(rows, seed=3))
    assert not np.array_equal(crops, pairs.random_crops(rows, seed=4))
    center = pairs(rows)[1]
    assert not np.array_equal(crops, center)  # 48 px resize, 32 px crop: not the center crop
    mirrored = pairs.random_crops(np.array([1]), seed=7)[0]  # row 1 is image 0's flipped view
    assert np.array_equal(mirrored[:, ::-1], pairs.random_crops(np.array([0]), seed=7)[0])
    pairs.close()


def test_online_features_of_the_center_crops_equal_the_stored_ones(config):
    """With augment: resize_random_crop the encoder runs in the loop; it computes rows as `encode` does."""
    from stages.encode import encoder_spec, load_encoder

    cfg = config()
    manifests = run_pipeline(cfg, until="encode")
    group = zarr.open_group(str(manifests["encode"].dir / "features.zarr"), mode="r")
    pairs = fit_decoder.PairSource(group, manifests["shard"].dir, 32, threads=2)
    rows = np.arange(0, 12, 2)  # plain views
    stored, crops = pairs(rows)
    online = encode_crops(load_encoder(encoder_spec(cfg), "cpu"), torch.from_numpy(crops), cfg)
    torch.testing.assert_close(online, stored, rtol=2e-3, atol=2e-3)  # float16 rounding of the same forward
    pairs.close()


def test_training_with_rae_augmentation_runs_and_has_its_own_fingerprint(config):
    cfg = config(*RESUME, "fit_decoder.steps=6", "fit_decoder.augment=resize_random_crop")
    plain = {p.name: p.fingerprint for p in plan(config(*RESUME, "fit_decoder.steps=6"))}
    manifests = run_pipeline(cfg, until="fit_decoder")
    assert manifests["fit_decoder"].fingerprint != plain["fit_decoder"]
    assert manifests["fit_decoder"].semantic_config["fit_decoder"]["augment"] == "resize_random_crop"
    metrics = manifests["fit_decoder"].metrics
    assert metrics["steps"] == 6 and np.isfinite(metrics["psnr_val"]) and 0 < metrics["l1_val"] < 1


def test_streamed_pairs_equal_held_pairs_and_flips_pair_with_mirrored_images(config):
    manifests = run_pipeline(config(), until="encode")
    group = zarr.open_group(str(manifests["encode"].dir / "features.zarr"), mode="r")
    streamed = fit_decoder.PairSource(group, manifests["shard"].dir, 32, threads=2)
    held = fit_decoder.PairSource(group, manifests["shard"].dir, 32, threads=2)
    assert held.hold(range(96), budget_bytes=1 << 30) and not streamed.hold(range(96), budget_bytes=1000)
    rows = np.random.default_rng(0).permutation(96)[:20]
    (f1, c1), (f2, c2) = streamed(rows), held(rows)
    assert torch.equal(f1, f2) and np.array_equal(c1, c2)
    assert torch.equal(f1, read_features(group, rows)) and c1.shape == (20, 32, 32, 3)
    _, crops = streamed(np.array([6, 7]))  # one image, plain and flipped views
    assert np.array_equal(crops[1], crops[0][:, ::-1])
    streamed.close()
    held.close()


# --- resume --------------------------------------------------------------------------------------

KILL_SCRIPT = """
import os, signal, sys
import torch
import pipeline.training as training
torch.set_num_threads(int(sys.argv[1]))
die_at, calls = int(sys.argv[2]), [0]
real = training.EMA.update
def update(self, model):
    calls[0] += 1
    if calls[0] == die_at:
        os.kill(os.getpid(), signal.SIGKILL)   # mid-step: after the optimizer step, before the EMA update
    real(self, model)
training.EMA.update = update
from pipeline.config import load_config
from stages.runner import run_pipeline
run_pipeline(load_config(sys.argv[3]), until="fit_decoder")
"""


def test_resume_after_sigterm_and_sigkill_is_bit_identical(config, monkeypatch, tmp_path):
    cfg = config(*RESUME)
    reference = run_pipeline(cfg, until="fit_decoder")["fit_decoder"]
    want = safetensors.torch.load_file(str(reference.dir / fit_decoder.WEIGHTS))
    shutil.rmtree(reference.dir)
    (p,) = [p for p in plan(cfg) if p.name == "fit_decoder"]
    checkpoints = p.path / "checkpoints"

    # SIGTERM at step 6: the stage checkpoints that step (not a ckpt_every multiple) and stops
    from pipeline.training import EMA

    real, calls = EMA.update, [0]

    def update(self, model):
        calls[0] += 1
        if calls[0] == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        real(self, model)

    monkeypatch.setattr(EMA, "update", update)
    with pytest.raises(TrainingStopped, match="fit_decoder: stopped by signal 15 at step 6/12"):
        run_pipeline(cfg, until="fit_decoder")
    monkeypatch.undo()
    assert sorted(c.name for c in checkpoints.iterdir()) == ["ckpt-00000006.pt", "ckpt-00000006.pt.json"]

    # SIGKILL in another process, in its 4th step after resuming (step 10): the step-8 checkpoint survives
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_dict(cfg)))
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(torch.get_num_threads()), "4",
                           str(tmp_path / "config.yaml")], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (p,) = [p for p in plan(cfg) if p.name == "fit_decoder"]
    assert p.state == "partial"
    assert sorted(c.name for c in checkpoints.iterdir()) == ["ckpt-00000008.pt", "ckpt-00000008.pt.json"]

    resumed = run_pipeline(cfg, until="fit_decoder")["fit_decoder"]
    assert resumed.fingerprint == reference.fingerprint
    got = safetensors.torch.load_file(str(resumed.dir / fit_decoder.WEIGHTS))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # bit-identical EMA weights
    assert resumed.metrics == reference.metrics
    # training curves: TensorBoard scalars and grids from the three runs, loss.png, all listed in _SUCCESS.json
    events = EventAccumulator(str(resumed.dir / "tensorboard")).Reload()
    scalars = {"train/loss", "train/l1", "train/lr", "train/grad_norm", "train/images_per_s"}
    assert scalars <= set(events.Tags()["scalars"])
    assert "train/reconstructions" in events.Tags()["images"]
    steps = [p.step for p in events.Scalars("train/loss")]  # step 8's point died with the killed run, or not
    assert steps[0] == 4 and steps[-1] == 12 and set(steps) <= {4, 8, 12} and len(set(steps)) == len(steps)
    listed = {f.path for f in resumed.files}
    assert "loss.png" in listed and any(f.startswith("tensorboard/events.out.tfevents.") for f in listed)
    (p,) = [p for p in plan(cfg) if p.name == "fit_decoder"]
    assert p.state == "done"


# --- a released decoder instead ----------------------------------------------------------------------


def test_released_decoder_disables_the_stage_and_loads_through_decoder_weights(config, tmp_path):
    arch = decoder_arch(config())
    released = build_rae_decoder(None, seed=7, **arch)
    ema = {f"module.{k}": v for k, v in released.state_dict().items()}  # DDP-wrapped EMA, as training checkpoints
    path = tmp_path / "model.pt"
    torch.save({"ema": ema, "model": {k: torch.zeros_like(v) for k, v in ema.items()}, "step": 10}, path)
    cfg = config(f"decoder.weights={path}")

    planned = {p.name: p for p in plan(cfg)}
    assert "fit_decoder" not in planned
    for name in ("fit_src", "sample"):
        assert planned[name].external["decoder_weights"] == file_sha256(path)
        assert "fit_decoder" not in planned[name].upstream

    decoder = load_decoder(cfg, {})
    features = torch.randn(2, arch["num_tokens"], arch["in_channels"])
    assert not any(p.requires_grad for p in decoder.parameters())
    torch.testing.assert_close(reconstruct(decoder, features), reconstruct(released, features), rtol=0, atol=0)


# --- one-line errors -------------------------------------------------------------------------------


def test_decoder_patch_that_misses_the_resolution_is_a_one_line_error(config):
    with pytest.raises(ValueError, match=r"decoder.patch_size: 8x8 tokens x patch 8 decode to 64 px but "
                                         r"data.resolution is 32 \(patch_size 4 would match\)"):
        run_pipeline(config(*RESUME, "decoder.patch_size=8"), until="fit_decoder")


def test_lpips_weights_missing_or_lpips_unavailable(config, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"fit_decoder.lpips_weights: .*nope.pth does not exist"):
        plan(config(f"fit_decoder.lpips_weights={tmp_path / 'nope.pth'}"))
    if importlib.util.find_spec("lpips") is not None:
        pytest.skip("the lpips package is installed here")
    (tmp_path / "vgg.pth").write_bytes(b"weights")
    cfg = config(*RESUME, f"fit_decoder.lpips_weights={tmp_path / 'vgg.pth'}")
    assert "lpips_weights" in {p.name: p for p in plan(cfg)}["fit_decoder"].external
    with pytest.raises(RuntimeError, match=r"fit_decoder.lpips_weights: LPIPS is not available"):
        run_pipeline(cfg, until="fit_decoder")
