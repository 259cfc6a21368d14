"""Exact likelihood and invertibility as tools (stages/likelihood.py, `srcflow score | invert | interpolate`) on a
short real chain (shard -> ... -> train_flow) of the tiny test set, run once for the module: the flow classifies the
tiny val split, scores out-of-distribution images worse, inverts to within fp32 round-off, and `score` agrees with
train_flow's own held-out bits/dim on the same noisy codes.
"""

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.config import config_dict
from pipeline.data.codes import open_codes, read_rows, split_rows
from pipeline.data.tiny_imagenet import make_tiny_imagenet
from srcflow.cli import app
from stages import likelihood
from stages.runner import run_pipeline
from stages.train_flow import row_noise

# The test dataset (4 classes x 12 train + 4 val, 32 px) through the smoke encoder, a PCA SRC and a small flow
# trained long enough to tell the classes apart; the RAE decoder gets a few steps: inversion needs no quality.
CHAIN = ("runtime.device=cpu", "encode.rows_per_shard=16", "encode.rows_per_chunk=4",
         "decoder.hidden_size=32", "decoder.depth=1", "decoder.num_heads=2", "decoder.intermediate_size=64",
         "decoder.patch_size=4", "fit_decoder.steps=20", "fit_decoder.batch_size=16", "fit_decoder.report_images=8",
         "src.kind=pca", "src.report_images=8",
         "flow.width=32", "flow.heads=2", "train.steps=250", "train.batch_size=16", "train.lr=3e-3",
         "train.log_every=50")


@pytest.fixture(scope="module")
def chain(module_config, tmp_path_factory):
    """(config, manifests, loaded Chain, a YAML file of the config for the CLI), built once for the module."""
    cfg = module_config(*CHAIN)
    manifests = run_pipeline(cfg, until="train_flow")
    config_file = tmp_path_factory.mktemp("config") / "chain.yaml"
    config_file.write_text(yaml.safe_dump(config_dict(cfg)))
    return cfg, manifests, likelihood.open_chain(cfg, str(config_file), decoder=True), str(config_file)


def val_images(tiny_root):
    return sorted((tiny_root / "val").rglob("*.JPEG"))


def cli(*args):
    return CliRunner().invoke(app, list(map(str, args)))


def test_the_flow_classifies_the_tiny_val_split(chain, tiny_root):
    cfg, manifests, loaded, _ = chain
    bayes = likelihood.flow_classifier(cfg, manifests, None)
    assert bayes["images"] == 16 and bayes["classes"] == 4 and bayes["view"] == "plain"
    assert bayes["accuracy"] >= 0.9, bayes
    # score on the image files: the pipeline's own preprocessing gives the stored codes, so the same figures
    rows, summary = likelihood.score_images(loaded, [tiny_root / "val"])
    assert summary["count"] == summary["labelled"] == 16 and summary["errors"] == 0
    assert summary["accuracy"] == bayes["accuracy"]
    for key in ("bits_per_dim", "bits_per_dim_marginal", "bits_per_dim_uncond", "posterior"):
        assert summary[f"{key}_mean"] == pytest.approx(bayes[f"mean_{key}"], rel=1e-5)
    assert {r["true_synset"] for r in rows} == set(loaded.synsets.values())
    # the marginal costs at most log K over the best class: log p(c) >= max_y log p(c | y) - log K
    for r in rows:
        assert 0 < r["posterior"] <= 1
        assert r["bits_per_dim"] <= r["bits_per_dim_marginal"] <= r["bits_per_dim"] + np.log2(4) / loaded.dims + 1e-9


def test_out_of_distribution_images_score_worse(chain, tiny_root, tmp_path):
    _, _, loaded, _ = chain
    _, inside = likelihood.score_images(loaded, [tiny_root / "val"])
    make_tiny_imagenet(tmp_path / "shapes", classes=4, per_class=1, val_per_class=4, size=32, kind="shapes")
    _, shapes = likelihood.score_images(loaded, [tmp_path / "shapes" / "val"])
    noise_dir = tmp_path / "noise"
    noise_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise_dir / f"{i}.png")
    noise_rows, noise = likelihood.score_images(loaded, [noise_dir])
    assert noise["labelled"] == 0 and noise["accuracy"] is None
    inside_rows, _ = likelihood.score_images(loaded, [tiny_root / "val"])
    assert shapes["bits_per_dim_marginal_mean"] > inside["bits_per_dim_marginal_mean"] + 0.2, (shapes, inside)
    assert min(r["bits_per_dim_marginal"] for r in noise_rows) > max(r["bits_per_dim_marginal"] for r in inside_rows)
    assert noise["bits_per_dim_uncond_mean"] > inside["bits_per_dim_uncond_mean"] + 1


def test_score_equals_train_flows_val_bits_per_dim_on_the_same_noisy_codes(chain):
    cfg, manifests, loaded, _ = chain
    group, attrs = open_codes(manifests["compress"].dir / "codes.zarr")
    start, stop = split_rows(attrs, "val")
    codes, labels = read_rows(group, start, stop)
    eps = row_noise(cfg.train.seed, start, stop, codes.shape[1:])[None]  # train_flow.likelihood's noise
    scored = likelihood.score_codes(loaded.flow, torch.from_numpy(codes), loaded.classes, eps=eps,
                                    sigma=loaded.noise_sigma)
    own = scored["log_probs"][np.arange(len(labels)), np.searchsorted(loaded.classes, labels)]
    metrics = manifests["train_flow"].metrics
    assert -own.mean() / loaded.dims / np.log(2) == pytest.approx(metrics["val_bits_per_dim"], rel=1e-6)
    assert scored["bits_per_dim_uncond"].mean() == pytest.approx(metrics["val_bits_per_dim_uncond"], rel=1e-6)
    # several draws average log p: one draw repeated is that draw
    twice = likelihood.score_codes(loaded.flow, torch.from_numpy(codes), loaded.classes, eps=torch.cat([eps, eps]),
                                   sigma=loaded.noise_sigma)
    np.testing.assert_allclose(twice["log_probs"], scored["log_probs"], rtol=1e-12)


def test_invert_round_trips_to_fp32_round_off_and_writes_z_and_the_grid(chain, tiny_root, tmp_path):
    _, _, loaded, config = chain
    images = val_images(tiny_root)[::4]  # one per class
    r = cli("invert", "--config", config, *images, "--out", tmp_path, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["max_abs_code_error"] <= 1e-4
    for row, image in zip(report["images"], images, strict=True):
        assert row["class"] == loaded.class_of(image.parent.name) and row["class_from"] == "bayes"
        assert row["identical_pixels"] or row["psnr_round_trip_db"] > 60
        with np.load(row["z_file"]) as z:
            assert int(z["label"]) == row["class"] and str(z["synset"]) == image.parent.name
            codes = torch.from_numpy(likelihood.image_codes(loaded, likelihood.load_crop(image, 32)[None]))
            expected, _ = likelihood.round_trip(loaded, codes, np.array([row["class"]]))
            np.testing.assert_allclose(z["z"], expected[0].numpy(), atol=1e-5)
    grid = np.asarray(Image.open(report["grid"]))  # 4 rows x (original | RAE | SRC | flow), 32 px, 2 px padding
    assert grid.shape == (2 + 4 * 34, 2 + 4 * 34, 3)
    # --class forces the class; an unknown one is one line
    r = cli("invert", "--config", config, images[0], "--out", tmp_path / "forced", "--class", "n01443537", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["images"][0]["class"] == 1
    r = cli("invert", "--config", config, images[0], "--out", tmp_path / "bad", "--class", "7")
    assert r.exit_code == 2 and "--class 7: not a class the flow was trained on (labels 0, 1, 2, 3," in r.output


def test_interpolate_writes_steps_frames_whose_ends_are_the_round_trips(chain, tiny_root, tmp_path):
    _, _, loaded, config = chain
    a, b = val_images(tiny_root)[0], val_images(tiny_root)[-1]
    r = cli("interpolate", "--config", config, a, b, "--steps", 5, "--out", tmp_path, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    frames = [np.asarray(Image.open(p))[2:-2, 2:-2] for p in report["frames"]]
    assert len(frames) == 5 == len(list(tmp_path.glob("frame-*.png"))) and report["t"][0] == 0 == 1 - report["t"][-1]
    assert report["max_abs_code_error_ends"] <= 1e-4
    codes = torch.from_numpy(likelihood.image_codes(loaded, np.stack([likelihood.load_crop(p, 32) for p in (a, b)])))
    _, back = likelihood.round_trip(loaded, codes, np.full(2, report["class"]))
    ends = likelihood._decode(loaded, back)
    for frame, end in zip((frames[0], frames[-1]), ends, strict=True):
        assert np.abs(frame.astype(int) - end.astype(int)).max() <= 1
    assert np.abs(frames[2].astype(int) - frames[0].astype(int)).max() > 0  # the middle is another image


def test_a_corrupt_image_is_an_error_row_and_scoring_goes_on(chain, tiny_root, tmp_path):
    _, _, _, config = chain
    folder = tmp_path / "mixed" / "n01484850"
    folder.mkdir(parents=True)
    for image in val_images(tiny_root)[8:12]:  # class 2's val images
        (folder / image.name).write_bytes(image.read_bytes())
    (folder / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")  # not an image name: not listed
    r = cli("score", "--config", config, tmp_path / "mixed", "--json", "--csv", tmp_path / "rows.csv")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    errors = {row["path"].rsplit("/", 1)[1]: row["error"] for row in out["rows"] if row["error"]}
    assert set(errors) == {"broken.JPEG", "empty.png"} and "empty file" in errors["empty.png"]
    assert out["summary"] | {"count": 4, "errors": 2, "labelled": 4, "accuracy": 1.0} == out["summary"]
    scored = [row for row in out["rows"] if not row["error"]]
    assert {row["predicted_synset"] for row in scored} == {"n01484850"}
    assert all(row["true_class"] == 2 for row in scored)
    assert set(scored[0]) >= {"path", "predicted_class", "predicted_synset", "posterior", "bits_per_dim",
                              "bits_per_dim_marginal", "bits_per_dim_uncond"}
    with open(tmp_path / "rows.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    r = cli("score", "--config", config, tmp_path / "mixed", "--max-images", 2)  # the table
    assert r.exit_code == 0 and "2 scored, 0 errors" in r.stdout and "accuracy 1.000 on 2 labelled" in r.stdout


def test_a_missing_artifact_is_one_line_naming_the_stage_to_run(chain, tiny_root, tmp_path):
    _, _, _, config = chain
    image = val_images(tiny_root)[0]
    r = cli("score", "--config", config, "--set", "train.steps=251", image)  # another flow: never trained
    assert r.exit_code == 2
    line = r.output.strip()
    assert "\n" not in line and line == (f"error: train_flow is not done for this config (stale): run `srcflow run "
                                         f"--config {config} --until train_flow` first")
    r = cli("invert", "--config", config, "--set", f"storage.root={tmp_path / 'empty'}", image, "--out", tmp_path)
    assert r.exit_code == 2 and "error: shard is not done for this config (missing)" in r.output
    r = cli("score", "--config", config, tmp_path / "absent.png")
    assert r.exit_code == 2 and "absent.png: no such image file or folder" in r.output
