"""Stage `sample` on a short real chain (shard -> encode -> fit_decoder -> fit_src -> compress -> train_flow),
sized for CI: class colours survive the whole chain, sharding / resume / CFG w = 0 give the same samples,
the ADM file format (balanced labels in a seeded order, arr_1), and NaN samples are counted, never resampled.
"""

import warnings

import numpy as np
import pytest
import torch

from pipeline.artifacts import StageOutput
from pipeline.data.shards import decode_crop, iter_jpegs, manifest_rows
from stages import sample
from stages.runner import run_pipeline
from stages.sample import class_labels, labels_of, load_models, sample_noise
from storage_schemas.samples import read_sampling

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
        assert np.array_equal(s["arr_1"], class_labels(range(CLASSES), PER_CLASS, chain[0].sample.seed))
        assert int(s["schema_version"]) == 3
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


def test_each_samples_file_records_how_its_samples_were_made(chain):
    """The CFG rule and scale, annealing, the solver and its steps per flow block, the network's arithmetic, the
    denoising (resolved, and as configured), the pixel rounding and the warnings: in the file and the metrics."""
    from storage_schemas.samples import read_sampling

    cfg, manifests = chain
    metrics = manifests["sample"].metrics
    for w in (0.0, 1.0):
        made = read_sampling(manifests["sample"].dir / f"samples-cfg{w}.npz")
        assert made == {"classes": CLASSES, "per_class": PER_CLASS, "seed": 0, "cfg_rule": "starflow",
                        "cfg_scale": w, "cfg_anneal": False, "solver": "sequential", "network_precision": "fp32",
                        "cuda_graph": False, "denoise": "tweedie", "denoise_setting": "auto", "flow_noise_sigma": 0.2,
                        "decoder_noise_sigma": 0.0, "pixel_rounding": "truncate", "warnings": [],
                        "solver_stats": [{"block": b, "token_steps": 64} for b in range(cfg.flow.num_blocks)]}
        assert metrics[f"solver_stats_cfg{w}"] == made["solver_stats"]
        assert metrics["sampling"] == {k: v for k, v in made.items() if k not in ("cfg_scale", "solver_stats",
                                                                                   "warnings")}
    assert metrics["warnings"] == []


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
    from pipeline.models.flow import tweedie_denoise
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
        y = torch.from_numpy(labels_of(0, n, range(CLASSES), PER_CLASS, cfg.sample.seed))
        codes = flow.reverse(sample_noise(cfg.sample.seed, 0, n, (64, cfg.src.dim)), y)
        codes = tweedie_denoise(flow, codes, y, cfg.flow.noise_sigma)  # denoise auto: the PCA decoder saw no noise
        pixels = to_uint8_pixels(decoder(normalizer.inverse(src.decode(codes))), "truncate").numpy()
    assert np.abs(pixels.astype(int) - tarflow.astype(int)).max() <= 1  # batch composition may round differently


def test_nonfinite_samples_are_flagged_and_never_committed(chain, tmp_path, monkeypatch):
    """NaN codes of one class: flagged and blanked in the samples file, and the stage refuses to commit it in one
    line (main committed them with a warning, exit 0)."""
    from pipeline.models.flow import TARFlow

    real = TARFlow.reverse

    def reverse(self, z, y, **kwargs):
        x = real(self, z, y, **kwargs)
        x[y == 2] = float("nan")  # every sample of class 2
        warnings.warn("an injected warning while sampling", UserWarning, stacklevel=1)
        return x

    monkeypatch.setattr(TARFlow, "reverse", reverse)
    with pytest.raises(ValueError, match=f"{PER_CLASS} of {CLASSES * PER_CLASS} samples at cfg 1.0") as e:
        run_sample(chain, tmp_path, "sample.cfg_scale=[1.0]")
    assert type(e.value).__name__ == "NonFiniteError"
    assert "nothing is committed" in str(e.value) and "\n" not in str(e.value)
    s = load(tmp_path / "samples-cfg1.0.npz")
    assert s["nonfinite"].tolist() == (s["labels"] == 2).tolist()
    assert (s["arr_0"][s["labels"] == 2] == 0).all() and (s["arr_0"][s["labels"] != 2] > 0).any()
    # every warning raised while sampling is in the (uncommitted) file's record, once
    assert read_sampling(tmp_path / "samples-cfg1.0.npz")["warnings"] == [
        "UserWarning: an injected warning while sampling",
        f"{PER_CLASS} of {CLASSES * PER_CLASS} samples are NaN / inf (black images, flagged in `nonfinite`)"]


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


def test_pca_samples_are_denoised_by_default_and_never_said_to_be_denoised_twice(chain, tmp_path, monkeypatch):
    """The chain's SRC is PCA: its decoder never trained under noise (src.json decoder_noise_sigma 0, beside the
    configured src.noise_sigma 0.2), so sample.denoise=auto takes the Tweedie step, an explicit tweedie warns of
    nothing, and an explicit none says the noisy codes meet a decoder trained on clean ones."""
    cfg, manifests = chain
    assert manifests["fit_src"].metrics["decoder_noise_sigma"] == 0.0 and cfg.src.noise_sigma == 0.2
    auto = manifests["sample"].metrics
    assert auto["denoise"] == "tweedie" and auto["sampling"]["denoise_setting"] == "auto" and auto["warnings"] == []
    seen = []
    real = sample.tweedie
    monkeypatch.setattr(sample, "tweedie", lambda flow, x, y, sigma: seen.append(sigma) or real(flow, x, y, sigma))
    metrics, out = run_sample(chain, tmp_path / "tweedie", "sample.cfg_scale=[1.0]", "sample.denoise=tweedie")
    assert seen and set(seen) == {cfg.flow.noise_sigma} and metrics["nonfinite_cfg1.0"] == 0
    assert metrics["warnings"] == []  # main warned "the noise is removed twice" for a PCA decoder
    denoised = load(out / "samples-cfg1.0.npz")["arr_0"]
    assert np.array_equal(denoised, load(manifests["sample"].dir / "samples-cfg1.0.npz")["arr_0"])  # = auto's
    metrics, out = run_sample(chain, tmp_path / "none", "sample.cfg_scale=[1.0]", "sample.denoise=none")
    assert metrics["denoise"] == "none" and len(metrics["warnings"]) == 1
    assert "trained on clean codes (src.kind pca)" in metrics["warnings"][0]
    assert not np.array_equal(load(out / "samples-cfg1.0.npz")["arr_0"], denoised)


def test_a_learned_src_decoder_is_not_denoised_by_default_and_denoising_it_warns():
    """A learned SRC decoder trained at the flow's sigma decodes the samples' noise itself."""
    assert sample.resolve_denoise("auto", 0.2, 0.2) == ("none", [])
    assert sample.resolve_denoise("none", 0.2, 0.2) == ("none", [])
    denoise, notes = sample.resolve_denoise("tweedie", 0.2, 0.2)
    assert denoise == "tweedie" and len(notes) == 1 and "removed twice" in notes[0]
    assert sample.resolve_denoise("auto", 0.0, 0.2) == ("tweedie", [])  # PCA
    assert sample.resolve_denoise("auto", 0.0, 0.0) == ("none", [])  # no noise anywhere


def test_label_order_is_a_balanced_permutation_fixed_by_the_seed_alone():
    labels = class_labels(range(10), 50, seed=0)
    assert np.bincount(labels).tolist() == [50] * 10
    assert np.array_equal(labels, class_labels(range(10), 50, seed=0))  # no hidden state
    assert not np.array_equal(labels, class_labels(range(10), 50, seed=1))
    # any chunking reads the same label for sample i
    chunks = [labels_of(a, min(a + 64, 500), range(10), 50, seed=0) for a in range(0, 500, 64)]
    assert np.array_equal(np.concatenate(chunks), labels)
    # every contiguous tenth (ADM's IS splits at 50k: 5,000 of 50,000) holds most classes, not one
    assert min(len(np.unique(part)) for part in labels.reshape(10, 50)) >= 8


def test_the_jacobi_solver_gives_the_sequential_samples_at_the_stage_level(chain, tmp_path):
    metrics, out = run_sample(chain, tmp_path / "exact", "sample.cfg_scale=[1.0]", "sample.solver=jacobi",
                              "sample.jacobi_chunk=16", "sample.jacobi_tol=1e-5")
    jacobi = load(out / "samples-cfg1.0.npz")
    sequential = load(chain[1]["sample"].dir / "samples-cfg1.0.npz")
    assert metrics["solver"] == "jacobi" and np.array_equal(jacobi["labels"], sequential["labels"])
    assert np.abs(jacobi["arr_0"].astype(int) - sequential["arr_0"].astype(int)).max() <= 1  # rounding only
    # per flow block: 64 tokens in chunks of 16, for each of the 6 batches; the passes each chunk took
    stats = metrics["solver_stats_cfg1.0"]
    assert [b["block"] for b in stats] == list(range(chain[0].flow.num_blocks)) and metrics["warnings"] == []
    for b in stats:
        assert b["chunks"] == 4 * 6 and b["capped_chunks"] == 0 and 1 <= b["max_passes_per_chunk"] <= 16
        assert b["passes"] == pytest.approx(b["mean_passes_per_chunk"] * b["chunks"])
    assert read_sampling(out / "samples-cfg1.0.npz")["solver_stats"] == stats
    assert metrics["sampling"] | {"jacobi_chunk": 16, "jacobi_tol": 1e-5, "jacobi_max_iters": 64,
                                  "jacobi_precision": "fp32"} == metrics["sampling"]
    # fewer passes than a chunk's tokens and a tolerance that is never met: the unsolved chunks are warned of, counted
    metrics, _ = run_sample(chain, tmp_path / "capped", "sample.cfg_scale=[1.0]", "sample.solver=jacobi",
                            "sample.jacobi_chunk=16", "sample.jacobi_tol=0", "sample.jacobi_max_iters=2")
    assert all(b["capped_chunks"] == b["chunks"] == 24 for b in metrics["solver_stats_cfg1.0"])
    assert "sample.jacobi_max_iters=2 is below sample.jacobi_chunk=16" in metrics["warnings"][0]
    assert [w for w in metrics["warnings"] if "24 of 24 Jacobi chunk solves stopped" in w]
    with pytest.raises(ValueError, match=r"sample.cuda_graph"):
        run_sample(chain, tmp_path / "graph", "sample.cuda_graph=true")


def test_the_stage_truncates_pixels_as_rae_and_adm_write_samples_unless_told_to_round():
    """sample.decode's default is sample.pixel_rounding's default: truncation (RAE sample_ddp.py, ADM), not rounding."""
    from types import SimpleNamespace

    from pipeline.models.rae import IMAGENET_MEAN, IMAGENET_STD

    levels = torch.tensor([0.0, 0.4, 0.6, 1.7, 127.4, 127.6, 254.6, 254.95, 255.3, 300.0, -3.0])  # in 0..255
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    normalized = (levels.view(1, 1, 1, -1).expand(1, 3, 1, -1) / 255 - mean) / std  # what the RAE decoder returns
    src = SimpleNamespace(decode=lambda codes: normalized.double())
    normalizer = SimpleNamespace(inverse=lambda features: features)
    decoder = torch.nn.Identity()
    decoder.pixel_mean, decoder.pixel_std = IMAGENET_MEAN, IMAGENET_STD  # an RAE decoder's pixel space
    codes = torch.zeros(1, 1, 1)
    truncated, _ = sample.decode(codes, src, normalizer, decoder, torch.device("cpu"))
    rounded, _ = sample.decode(codes, src, normalizer, decoder, torch.device("cpu"), "round")
    assert truncated[0, 0, :, 0].tolist() == [0, 0, 0, 1, 127, 127, 254, 254, 255, 255, 0]
    assert rounded[0, 0, :, 0].tolist() == [0, 0, 1, 2, 127, 128, 255, 255, 255, 255, 0]


def test_a_class_subset_samples_only_the_classes_the_flow_was_trained_on(stores, tiny_root):
    """data.classes names classes 1 and 3 of the 4: labels keep their ImageNet numbers, so the flow has 4 class
    embeddings, of which 0 and 2 were never trained. The flow records the trained set; sample draws only those, and
    the Bayes classifier chooses among them (main sampled all 4, half the samples from untrained embeddings)."""
    from pipeline.data.tiny_imagenet import SYNSETS
    from stages.likelihood import flow_classifier
    from stages.train_flow import flow_info

    cfg = stores("subset", f"data.classes=[{SYNSETS[1]},{SYNSETS[3]}]", "flow.width=32", "flow.heads=2",
                 "train.steps=10", "train.batch_size=8", "sample.per_class=3", "sample.cfg_scale=[1.0]",
                 "sample.batch_size=6", until="sample")
    manifests = run_pipeline(cfg, until="sample")
    info = flow_info(manifests["train_flow"])
    assert info["classes"] == [1, 3] and info["arch"]["num_classes"] == 4
    samples = load(manifests["sample"].dir / "samples-cfg1.0.npz")
    assert sorted(np.unique(samples["labels"]).tolist()) == [1, 3] and len(samples["labels"]) == 6
    assert np.bincount(samples["labels"]).tolist() == [0, 3, 0, 3]
    assert manifests["sample"].metrics["num_classes"] == 2
    upstream = {name: manifests[name] for name in ("compress", "train_flow")}
    classifier = flow_classifier(cfg, upstream, None)
    assert classifier["classes"] == 2 and classifier["images"] == 2 * 4  # the val images of both classes
