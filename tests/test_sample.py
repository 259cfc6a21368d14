"""Stage `sample` on a short real chain (shard -> encode -> fit_decoder -> fit_src -> compress -> train_flow),
sized for CI: class colours survive the whole chain, sharding / resume / CFG w = 0 give the same samples,
the ADM file format (balanced labels in a seeded order, arr_1), and NaN samples are counted, never resampled.
"""

import numpy as np
import pytest
import torch

from pipeline.artifacts import StageOutput
from pipeline.data.shards import decode_crop, iter_jpegs, manifest_rows
from stages import sample
from stages.runner import run_pipeline
from stages.sample import class_labels, labels_of, load_models, sample_noise

# The test dataset (4 classes x 12 train + 4 val, 32 px) through the smoke encoder; a tiny RAE decoder
# (32 px out) and flow, trained just long enough for the class colours to come through.
CHAIN = ("runtime.device=cpu", "encode.rows_per_shard=16", "encode.rows_per_chunk=4",
         "decoder.hidden_size=32", "decoder.depth=1", "decoder.num_heads=2", "decoder.intermediate_size=64",
         "decoder.patch_size=4", "fit_decoder.steps=300", "fit_decoder.batch_size=16", "fit_decoder.lr=2e-3",
         "fit_decoder.report_images=8", "src.kind=pca", "src.report_images=8",
         "flow.width=32", "flow.heads=2", "train.steps=250", "train.batch_size=16", "train.lr=3e-3",
         "train.log_every=50", "sample.per_class=6", "sample.cfg_scale=[0.0,1.0]", "sample.batch_size=4",
         "sample.chunk_size=8", "sample.grid_per_class=3")
CLASSES, PER_CLASS = 4, 6



@pytest.fixture(scope="module")
def chain(module_config):
    """(config, manifests) of the whole chain through `sample`, run once for the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = module_config(*CHAIN)
        return cfg, run_pipeline(cfg, until="sample")
    finally:
        torch.set_num_threads(threads)


def run_sample(chain, out_dir, *overrides):
    """The sample stage into `out_dir` with operational / semantic overrides, against the chain's upstream."""
    cfg, manifests = chain
    cfg = load_config_with(cfg, *overrides)
    upstream = {name: manifests[name] for name in ("encode", "fit_src", "compress", "train_flow", "fit_decoder")}
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = sample.run(cfg, upstream, StageOutput("sample", "test", out_dir))
    return metrics, out_dir


def load(path):
    with np.load(path) as npz:
        return {name: npz[name] for name in npz.files}


def mean_colours(images, labels):
    return np.stack([images[labels == k].reshape(-1, 3).astype(np.float64).mean(0) for k in range(CLASSES)])


def test_samples_of_every_class_have_the_colour_of_that_class(chain):
    cfg, manifests = chain
    shard_dir = manifests["shard"].dir
    rows = manifest_rows(shard_dir, ("train",))
    jpegs = dict(iter_jpegs(sorted({str(shard_dir / "shards" / r["shard"]) for r in rows}),
                            {r["key"]: r["sha256"] for r in rows}))
    crops = np.stack([decode_crop(jpegs[r["key"]], cfg.data.resolution) for r in rows])
    train = mean_colours(crops, np.array([r["label"] for r in rows]))
    for w in (0.0, 1.0):
        s = load(manifests["sample"].dir / f"samples-cfg{w}.npz")
        distances = ((mean_colours(s["arr_0"], s["labels"])[:, None] - train[None]) ** 2).sum(-1)
        assert distances.argmin(1).tolist() == list(range(CLASSES)), (w, distances.round())



def test_train_flows_tensorboard_grid_shows_samples_of_each_class_decoded_like_samples(chain):
    """The sample grid train_flow logs (labels 0, 1, 2, 3, 0, ...) is decoded through the chain's SRC and RAE
    decoder: each panel has the colour of its class, as the sample stage's images do."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from stages.train_flow import GRID_IMAGES

    cfg, manifests = chain
    events = EventAccumulator(str(manifests["train_flow"].dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    last = events.Images("train/samples")[-1]
    assert last.step == cfg.train.steps
    grid = np.asarray(Image.open(io.BytesIO(last.encoded_image_string)).convert("RGB"))
    r, pad = cfg.data.resolution, 2  # pipeline.images.grid_image's white padding
    assert grid.shape == (r + 2 * pad, GRID_IMAGES * (r + pad) + pad, 3)
    panels = np.stack([grid[pad:pad + r, pad + i * (r + pad):pad + i * (r + pad) + r] for i in range(GRID_IMAGES)])
    labels = np.arange(GRID_IMAGES) % CLASSES
    first = load(manifests["sample"].dir / "samples-cfg1.0.npz")
    reference = mean_colours(first["arr_0"], first["labels"])
    distances = ((panels.reshape(GRID_IMAGES, -1, 3).mean(1)[:, None] - reference[None]) ** 2).sum(-1)
    assert distances.argmin(1).tolist() == labels.tolist(), distances.round()

def test_held_out_bits_per_dim_beat_the_gaussian_baseline_after_smoke_training(chain):
    m = chain[1]["train_flow"].metrics
    assert m["val_bits_per_dim"] < m["val_gaussian_bits_per_dim"]
    assert m["train_bits_per_dim"] < m["val_gaussian_bits_per_dim"]


def test_sample_file_is_adm_format_with_balanced_labels_and_a_grid(chain):
    out = chain[1]["sample"].dir
    metrics = chain[1]["sample"].metrics
    from PIL import Image

    from storage_schemas.samples import open_samples

    for w in (0.0, 1.0):
        s = load(out / f"samples-cfg{w}.npz")
        assert s["arr_0"].dtype == np.uint8 and s["arr_0"].shape == (CLASSES * PER_CLASS, 32, 32, 3)
        assert s["arr_1"].dtype == np.int64 and np.array_equal(s["arr_1"], s["labels"])  # ADM's key, and the alias
        assert np.bincount(s["arr_1"]).tolist() == [PER_CLASS] * CLASSES  # balanced
        assert (np.diff(s["arr_1"]) < 0).any()  # not class-sorted: ADM's contiguous IS splits see every class
        assert np.array_equal(s["arr_1"], class_labels(CLASSES, PER_CLASS, chain[0].sample.seed))
        assert int(s["schema_version"]) == 2
        assert not s["nonfinite"].any() and metrics[f"nonfinite_cfg{w}"] == 0
        images, labels, _ = open_samples(out / f"samples-cfg{w}.npz")  # the consumer memory-maps arr_0
        assert isinstance(images, np.memmap) and np.array_equal(images, s["arr_0"])
        assert np.array_equal(labels, s["arr_1"])
        # the grid: one row per class, that class's first grid_per_class samples in file order
        grid = np.asarray(Image.open(out / f"grid-cfg{w}.png").convert("RGB"))
        for c in range(CLASSES):
            for j, i in enumerate(np.flatnonzero(s["arr_1"] == c)[:3]):
                tile = grid[2 + c * 34: 2 + c * 34 + 32, 2 + j * 34: 2 + j * 34 + 32]
                assert np.array_equal(tile, s["arr_0"][i]), (w, c, j)
    assert not (out / "chunks").exists() and metrics["num_samples"] == CLASSES * PER_CLASS
    assert not np.array_equal(load(out / "samples-cfg0.0.npz")["arr_0"], load(out / "samples-cfg1.0.npz")["arr_0"])


def test_sharded_sampling_equals_unsharded(chain, tmp_path, monkeypatch):
    """Other shards (chunks of 4, not 8), run in another order (last first): the same samples."""
    real = sample.map_jobs
    monkeypatch.setattr(sample, "map_jobs", lambda fn, jobs, **kw: real(fn, list(jobs)[::-1], **kw))
    _, out = run_sample(chain, tmp_path, "sample.chunk_size=4", "sample.cfg_scale=[1.0]")
    single = load(chain[1]["sample"].dir / "samples-cfg1.0.npz")
    sharded = load(out / "samples-cfg1.0.npz")
    assert sharded.keys() == single.keys() and all(np.array_equal(sharded[k], single[k]) for k in single)


def test_resume_after_a_crash_equals_the_uninterrupted_run(chain, tmp_path, monkeypatch):
    real, calls = sample.write_atomic, []

    def crash_on_third(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        real(path, data)

    monkeypatch.setattr(sample, "write_atomic", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_sample(chain, tmp_path)
    assert len(list((tmp_path / "chunks").rglob("*.npz"))) == 2  # two chunks committed before the crash
    monkeypatch.setattr(sample, "write_atomic", real)
    metrics, _ = run_sample(chain, tmp_path)
    assert metrics["samples_per_s"] > 0
    for w in (0.0, 1.0):
        resumed, straight = load(tmp_path / f"samples-cfg{w}.npz"), load(chain[1]["sample"].dir / f"samples-cfg{w}.npz")
        assert all(np.array_equal(resumed[k], straight[k]) for k in straight)


def test_cfg_zero_equals_conditional_sampling_at_the_stage_level(chain, tmp_path):
    from pipeline.models.rae import to_uint8_pixels

    _, out = run_sample(chain, tmp_path, "sample.cfg_scale=[0.0]", "sample.cfg_mode=tarflow")
    tarflow = load(out / "samples-cfg0.0.npz")["arr_0"]
    starflow = load(chain[1]["sample"].dir / "samples-cfg0.0.npz")["arr_0"]
    assert np.array_equal(tarflow, starflow)
    # the conditional flow by hand: same per-sample noise, no guidance, SRC -> de-normalization -> RAE decoder
    cfg, manifests = chain
    flow, src, normalizer, decoder = load_models(sample.ModelSources(cfg, {k: manifests[k] for k in (
        "encode", "fit_src", "compress", "train_flow", "fit_decoder")}, "cpu"))
    n = CLASSES * PER_CLASS
    with torch.no_grad():
        y = torch.from_numpy(labels_of(0, n, CLASSES, PER_CLASS, cfg.sample.seed))
        codes = flow.reverse(sample_noise(cfg.sample.seed, 0, n, (64, cfg.src.dim)), y)
        pixels = to_uint8_pixels(decoder(normalizer.inverse(src.decode(codes)))).numpy()
    assert np.abs(pixels.astype(int) - tarflow.astype(int)).max() <= 1  # batch composition may round differently


def test_nonfinite_samples_are_flagged_and_never_committed(chain, tmp_path, monkeypatch):
    """NaN codes of one class: flagged and blanked in the samples file, and the stage refuses to commit it in one
    line (main committed them with a warning, exit 0)."""
    from pipeline.models.flow import TARFlow

    real = TARFlow.reverse

    def reverse(self, z, y, **kwargs):
        x = real(self, z, y, **kwargs)
        x[y == 2] = float("nan")  # every sample of class 2
        return x

    monkeypatch.setattr(TARFlow, "reverse", reverse)
    with pytest.raises(ValueError, match=f"{PER_CLASS} of {CLASSES * PER_CLASS} samples at cfg 1.0") as e:
        run_sample(chain, tmp_path, "sample.cfg_scale=[1.0]")
    assert type(e.value).__name__ == "NonFiniteError"
    assert "nothing is committed" in str(e.value) and "\n" not in str(e.value)
    s = load(tmp_path / "samples-cfg1.0.npz")
    assert s["nonfinite"].tolist() == (s["labels"] == 2).tolist()
    assert (s["arr_0"][s["labels"] == 2] == 0).all() and (s["arr_0"][s["labels"] != 2] > 0).any()


def test_the_batch_size_enters_the_fingerprint_and_the_chunks_change_no_bytes(chain, tmp_path):
    """The matmuls round differently at another batch size (a few pixels by one level): sample.batch_size is
    semantic (its default, 125, stays out of stored fingerprints), and chunks are whole batches, so chunks of 6
    with batches of 4 give the samples of chunks of 8 (main: an operational batch size that changed bytes)."""
    from pipeline.config import semantic_of

    cfg, manifests = chain
    plain = load_config_with(cfg, "sample.batch_size=125")
    assert "batch_size" not in semantic_of(plain, ("sample",))["sample"]
    assert semantic_of(load_config_with(cfg, "sample.batch_size=3"), ("sample",))["sample"]["batch_size"] == 3
    _, out = run_sample(chain, tmp_path, "sample.chunk_size=6", "sample.cfg_scale=[0.0]")
    ragged, whole = load(out / "samples-cfg0.0.npz"), load(manifests["sample"].dir / "samples-cfg0.0.npz")
    assert all(np.array_equal(ragged[k], whole[k]) for k in whole)


def load_config_with(cfg, *overrides):
    from pipeline.config import apply_override, config_dict, validate_config

    raw = config_dict(cfg)
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw)


def test_tweedie_denoising_moves_the_codes_along_the_score(chain, tmp_path, monkeypatch):
    seen = []
    real = sample.tweedie
    monkeypatch.setattr(sample, "tweedie", lambda flow, x, y, sigma: seen.append(sigma) or real(flow, x, y, sigma))
    metrics, out = run_sample(chain, tmp_path, "sample.cfg_scale=[1.0]", "sample.denoise=tweedie")
    assert seen and set(seen) == {chain[0].flow.noise_sigma} and metrics["nonfinite_cfg1.0"] == 0
    assert "removed twice" in metrics["denoise_warning"]  # the SRC decoder was trained under that noise
    assert "denoise_warning" not in chain[1]["sample"].metrics
    denoised = load(out / "samples-cfg1.0.npz")["arr_0"]
    plain = load(chain[1]["sample"].dir / "samples-cfg1.0.npz")["arr_0"]
    assert not np.array_equal(denoised, plain)


def test_label_order_is_a_balanced_permutation_fixed_by_the_seed_alone():
    labels = class_labels(10, 50, seed=0)
    assert np.bincount(labels).tolist() == [50] * 10
    assert np.array_equal(labels, class_labels(10, 50, seed=0))  # no hidden state
    assert not np.array_equal(labels, class_labels(10, 50, seed=1))
    # any chunking reads the same label for sample i
    chunks = [labels_of(a, min(a + 64, 500), 10, 50, seed=0) for a in range(0, 500, 64)]
    assert np.array_equal(np.concatenate(chunks), labels)
    # every contiguous tenth (ADM's IS splits at 50k: 5,000 of 50,000) holds most classes, not one
    assert min(len(np.unique(part)) for part in labels.reshape(10, 50)) >= 8


def test_the_jacobi_solver_gives_the_sequential_samples_at_the_stage_level(chain, tmp_path):
    metrics, out = run_sample(chain, tmp_path, "sample.cfg_scale=[1.0]", "sample.solver=jacobi",
                              "sample.jacobi_chunk=16", "sample.jacobi_tol=1e-5")
    jacobi = load(out / "samples-cfg1.0.npz")
    sequential = load(chain[1]["sample"].dir / "samples-cfg1.0.npz")
    assert metrics["solver"] == "jacobi" and np.array_equal(jacobi["labels"], sequential["labels"])
    assert np.abs(jacobi["arr_0"].astype(int) - sequential["arr_0"].astype(int)).max() <= 1  # rounding only
    with pytest.raises(ValueError, match=r"sample.cuda_graph"):
        run_sample(chain, tmp_path / "graph", "sample.cuda_graph=true")
