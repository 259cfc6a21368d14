"""FID, Inception Score, KID and precision/recall with torch-fidelity's Inception-v3.

SRC-FLOW.md, "Evaluation protocol": papers report the ADM TensorFlow evaluator against
`VIRTUAL_imagenet256_labeled.npz`; the PyTorch route is torch-fidelity's `inception-v3-compat`
against the ADM mu/sigma (close, not bit-identical). This module is that route:

    samples (N, H, W, 3) uint8 -> Inception pool features (2048), unbiased logits and spatial
    features (2023), all from one forward pass
      -> FID  against the reference mu/sigma                      (fid_statistics_to_metric)
      -> sFID against the reference mu_s/sigma_s: the same Frechet distance on ADM's spatial
         features (Nash et al. 2021; guided-diffusion evaluations/evaluator.py)
      -> IS   on the logits, 10 splits                            (isc_features_to_metric)
      -> KID  against the reference pool features                 (kid_features_to_metric)
      -> precision/recall, k-NN manifolds of Kynkaennemi et al. 2019, on the Inception pool
         features like ADM (torch-fidelity's prc_features_to_metric takes any features; its
         VGG16 default only applies inside calculate_metrics, which is not used here)

A reference is a dict {mu, sigma, mu_s, sigma_s, pr_features, meta}: built from images, imported from an ADM
reference batch, or stored as a versioned .npz. The Inception weights are always a local file
(`evaluate.inception_weights`): torch-fidelity never downloads here.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.utils import get_featuresdict_from_dataset

from pipeline.artifacts import file_sha256
from pipeline.integrity import read_with_sha256
from storage_schemas.evaluation import ADM_KEYS, check_adm_reference, check_inception_file
from storage_schemas.samples import open_npz_array
from storage_schemas.success import write_atomic

FEATURE_EXTRACTOR = "inception-v3-compat"
FIDELITY_FEATURES = ("2048", "logits_unbiased")  # torch-fidelity's pool_3 (FID, KID, P/R), logits without bias (IS)
SPATIAL = "spatial"  # ADM's sFID features, tapped from the same pass (InceptionV3WithSpatial)
FEATURES = (*FIDELITY_FEATURES, SPATIAL)
# ADM's FID_SPATIAL_NAME "mixed_6/conv:0", first 7 channels (`spatial[..., :7]`, NHWC, flattened per image).
# In the 2015-12-05 TensorFlow graph the 17x17 blocks are mixed_3 (Mixed_6a), mixed_4..mixed_7
# (Mixed_6b..Mixed_6e), and the scope's first conv `mixed_N/conv` is the 1x1 branch; torch-fidelity's
# weight converter (utils/util_convert_inception_weights.py) maps mixed_6/conv/{conv2d_params,batchnorm} to
# Mixed_6d.branch1x1.{conv,bn}. The op `mixed_6/conv` is that conv's output after batchnorm and ReLU, i.e.
# the output of BasicConv2d Mixed_6d.branch1x1: (N, 192, 17, 17), of which channels 0..6 in (h, w, c) order.
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2,023
# torch.hub names checkpoints `<name>-<first hex digits of the sha256>.pth`: the official file's
# digest starts with this; any other digest (a stand-in) marks the metrics as not reportable.
OFFICIAL_WEIGHTS_SHA256_PREFIX = "6726825d"
REFERENCE_SCHEMA_VERSION = 2  # 2: mu_s/sigma_s (sFID)
ISC_SPLITS = 10
RNG_SEED = 2020  # torch-fidelity's default seed for IS shuffling and KID subsets


def compute_metrics(samples_uint8, reference: dict, weights_path, device="cpu", batch_size: int = 64,
                    kid_subset_size: int = 1000, pr_k: int = 3, verbose: bool = False) -> dict:
    """FID / IS / KID / precision / recall of (N, H, W, 3) uint8 samples (array or Dataset) against `reference`."""
    weights_sha256 = check_inception_weights(weights_path)
    check_reference_weights(reference, weights_sha256)  # before minutes of Inception, not after
    features = inception_features(samples_uint8, weights_path, device, batch_size, verbose)
    return metrics_from_features(features, reference, weights_sha256, device, kid_subset_size, pr_k, verbose)


def metrics_from_features(features: dict, reference: dict, weights_sha256: str, device="cpu",
                          kid_subset_size: int = 1000, pr_k: int = 3, verbose: bool = False) -> dict:
    """Every metric from one set of sample features (`inception_features` output), float64 throughout."""
    check_reference_weights(reference, weights_sha256)
    pool = torch.from_numpy(np.asarray(features["2048"], dtype=np.float64))
    logits = torch.from_numpy(np.asarray(features["logits_unbiased"], dtype=np.float64))
    n = len(pool)
    if n < 2:
        raise ValueError(f"metrics need at least 2 samples, got {n}")

    # FID: ||mu_s - mu_r||^2 + Tr(S_s + S_r - 2 (S_s S_r)^1/2) (Heusel et al. 2017).
    ref_stats = {"mu": np.asarray(reference["mu"], np.float64), "sigma": np.asarray(reference["sigma"], np.float64)}
    if ref_stats["mu"].shape != (pool.shape[1],):
        raise ValueError(f"reference mu has shape {ref_stats['mu'].shape}, samples have "
                         f"{pool.shape[1]}-d pool features")
    fid = fid_statistics_to_metric(fid_statistics(pool.numpy()), ref_stats, verbose)[KEY_METRIC_FID]
    # sFID: the same distance on the spatial features, when both sides have them (ADM's evaluator).
    sfid = None
    if features.get(SPATIAL) is not None and reference.get("mu_s") is not None:
        spatial = np.asarray(features[SPATIAL], dtype=np.float64)
        if reference["mu_s"].shape != (spatial.shape[1],):
            raise ValueError(f"reference mu_s has shape {reference['mu_s'].shape}, samples have "
                             f"{spatial.shape[1]}-d spatial features")
        spatial_reference = {"mu": reference["mu_s"], "sigma": reference["sigma_s"]}
        sfid = fid_statistics_to_metric(fid_statistics(spatial), spatial_reference, verbose)[KEY_METRIC_FID]

    # IS: exp E_x KL(p(y|x) || p(y)), mean/std over splits (Salimans et al. 2016).
    splits = min(ISC_SPLITS, n)
    isc = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=RNG_SEED)

    out = {
        "fid": fid,
        "sfid": sfid,
        "inception_score_mean": isc[KEY_METRIC_ISC_MEAN],
        "inception_score_std": isc[KEY_METRIC_ISC_STD],
        "kid_mean": None, "kid_std": None, "precision": None, "recall": None,
    }
    ref_pool = reference.get("pr_features")
    if ref_pool is not None:
        ref_pool = torch.from_numpy(np.asarray(ref_pool, dtype=np.float64))
        if min(n, len(ref_pool)) <= pr_k:
            raise ValueError(f"precision/recall with k={pr_k} needs more than {pr_k} samples and reference "
                             f"images, got {n} and {len(ref_pool)}")
        # KID: unbiased MMD^2 with a cubic polynomial kernel over random subsets (Binkowski et al. 2018).
        kid_subset_size = min(kid_subset_size, n, len(ref_pool))
        kid = kid_features_to_metric(pool, ref_pool, kid_subset_size=kid_subset_size, rng_seed=RNG_SEED,
                                     verbose=verbose)
        # Precision/recall: a point is on a manifold if it lies within the k-th-NN radius of one of
        # that set's points (Kynkaennemi et al. 2019); generated = input 1, real = input 2.
        dev = torch.device(device)
        prc = prc_features_to_metric(pool.to(dev), ref_pool.to(dev), prc_neighborhood=pr_k, save_cpu_ram=True,
                                     verbose=verbose)
        out.update(kid_mean=kid[KEY_METRIC_KID_MEAN], kid_std=kid[KEY_METRIC_KID_STD],
                   precision=prc[KEY_METRIC_PRECISION], recall=prc[KEY_METRIC_RECALL])

    return out | {
        "evaluator": "torch-fidelity",
        "evaluator_version": torch_fidelity.__version__,
        "feature_extractor": FEATURE_EXTRACTOR,
        "inception_weights_sha256": weights_sha256,
        "inception_weights_official": weights_sha256.startswith(OFFICIAL_WEIGHTS_SHA256_PREFIX),
        "num_samples": n,
        "num_reference": len(ref_pool) if ref_pool is not None else reference.get("meta", {}).get("num_images"),
        "isc_splits": splits,
        "kid_subset_size": kid_subset_size if ref_pool is not None else None,
        "pr_k": pr_k,
    }


# --- Inception features -------------------------------------------------------------------------


class UInt8Images(Dataset):
    """(N, H, W, 3) uint8 images (an ADM `arr_0`, possibly memory-mapped) as uint8 (3, H, W) tensors."""

    def __init__(self, images):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {tuple(images.shape)} {images.dtype}")
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1).contiguous()


def inception_features(images, weights_path, device="cpu", batch_size: int = 64,
                       verbose: bool = False, dtype: str = "float64") -> dict[str, np.ndarray]:
    """{'2048': (N, 2048) pool features, 'logits_unbiased': (N, 1008), 'spatial': (N, 2023)} of uint8 images
    (array or Dataset), one Inception pass."""
    check_inception_weights(weights_path)
    dataset = images if isinstance(images, Dataset) else UInt8Images(images)
    device = torch.device(device)
    cuda = device.type == "cuda"
    extractor = load_inception(weights_path, device, verbose, dtype)
    # get_featuresdict_from_dataset moves batches with .cuda(): the device context picks the GPU.
    with torch.cuda.device(device) if cuda else contextlib.nullcontext():
        features = get_featuresdict_from_dataset(dataset, extractor, batch_size, cuda, save_cpu_ram=True,
                                                 verbose=verbose)
    return {name: features[name].numpy() for name in FEATURES}


class InceptionV3WithSpatial(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 that also returns ADM's sFID features (SPATIAL_LAYER, see SPATIAL_DIM's
    comment) from the same forward pass: its outputs are torch-fidelity's features, then `spatial`. Built from
    `empty_state()` (torch-fidelity's constructor loads what it is given); the weights are loaded after."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tapped = None
        self.get_submodule(SPATIAL_LAYER).register_forward_hook(self._tap)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        if not state_dict:  # torch-fidelity's own load in __init__, of empty_state(): the weights come after
            return None
        return super().load_state_dict(state_dict, strict, assign)

    def _tap(self, module, inputs, output):
        self._tapped = output

    def forward(self, x):
        features = super().forward(x)
        if self._tapped is None:
            raise RuntimeError(f"InceptionV3WithSpatial: {SPATIAL_LAYER} did not run for features {self.features_list}")
        tapped, self._tapped = self._tapped, None
        # NCHW -> ADM's NHWC order, flattened: the order of ADM's mu_s/sigma_s
        spatial = tapped[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(tapped), -1)
        return (*features, spatial.to(torch.float32))

    def convert_features_tuple_to_dict(self, features):
        return dict(zip((*self.features_list, SPATIAL), features, strict=True))


def load_inception(weights_path, device="cpu", verbose: bool = False, dtype: str = "float64") -> InceptionV3WithSpatial:
    """torch-fidelity's inception-v3-compat (with the spatial tap) from a local weights file, float64 inside (or
    `dtype` float32: ~3x faster on a CPU, for stand-in code-path checks; evaluate.inception_dtype). The file is read
    once, its bytes checked against the sha256 the fingerprint holds and loaded with torch.load(weights_only=True);
    torch-fidelity gets the tensors, never the path (it would unpickle the file again, without restrictions)."""
    data = read_with_sha256(weights_path, check_inception_weights(weights_path), "evaluate.inception_weights")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        extractor = InceptionV3WithSpatial(
            FEATURE_EXTRACTOR, list(FIDELITY_FEATURES), verbose=verbose,
            feature_extractor_weights_path=empty_state(), feature_extractor_internal_dtype="float64")
        nn.Module.load_state_dict(extractor, state)  # strict: every key and shape of torch-fidelity's Inception
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as e:  # multi-line messages
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"evaluate.inception_weights: {weights_path} is not a torch-fidelity InceptionV3 "
                         f"state dict ({first})") from None
    # torch-fidelity 0.4.0's helpers.text_to_dtype maps "float64" to torch.float32, so the option
    # alone runs in float32; set the dtype its forward() casts to, and the weights, ourselves.
    extractor.feature_extractor_internal_dtype = getattr(torch, dtype)
    return extractor.to(device=device, dtype=getattr(torch, dtype))


# --- Reference statistics -----------------------------------------------------------------------


def fid_statistics(features) -> dict[str, np.ndarray]:
    """{'mu': mean, 'sigma': covariance (ddof=1)} of (N, D) features (pool or spatial), float64."""
    features = torch.from_numpy(np.asarray(features, dtype=np.float64))
    return fid_features_to_statistics(features)


def reference_from_features(features_2048, weights_sha256: str, meta: dict | None = None, spatial=None) -> dict:
    """A reference whose mu/sigma and pr_features all come from the same images' pool features (and mu_s/sigma_s
    from their spatial features, when given)."""
    features = np.asarray(features_2048)
    stats = fid_statistics(features)
    spatial_stats = fid_statistics(spatial) if spatial is not None else {"mu": None, "sigma": None}
    meta = {"source": "images", "num_images": len(features), "inception_weights_sha256": weights_sha256} | (meta or {})
    return _reference(stats["mu"], stats["sigma"], features.astype(np.float32), meta,
                      mu_s=spatial_stats["mu"], sigma_s=spatial_stats["sigma"])


def import_adm_reference_npz(path, weights_path, device="cpu", batch_size: int = 64, verbose: bool = False,
                             resolution: int | None = None, dtype: str = "float64") -> dict:
    """ADM's reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) -> a reference.

    mu/sigma and mu_s/sigma_s (sFID) are ADM's (TensorFlow Inception over the train set) and are used
    as they are; the pool features for KID and precision/recall come from torch-fidelity's Inception on
    the batch's `arr_0` images (10k for ImageNet). The batch's resolution (arr_0.shape[1]) is recorded,
    and must be `resolution` (data.resolution) when that is given.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference.path: {path} does not exist (an ADM reference batch .npz with "
                                f"{', '.join(ADM_KEYS)})")
    weights_sha256 = check_inception_weights(weights_path)
    batch_resolution = check_adm_reference(path, resolution)
    with np.load(path, allow_pickle=False) as npz:
        mu, sigma, mu_s, sigma_s = npz["mu"], npz["sigma"], npz["mu_s"], npz["sigma_s"]
    if np.shape(mu_s) != (SPATIAL_DIM,):
        raise ValueError(f"reference.path: {path} has mu_s of shape {np.shape(mu_s)}, expected ({SPATIAL_DIM},) "
                         f"(ADM's mixed_6/conv spatial features)")
    images = open_npz_array(path, "arr_0")  # memory-mapped when stored: 10k images at 512 px are 7.9 GB
    features = inception_features(images, weights_path, device, batch_size, verbose, dtype)["2048"]
    meta = {"source": "adm-npz", "file": path.name, "file_sha256": file_sha256(path), "num_images": len(images),
            "resolution": batch_resolution, "mu_sigma_from": "ADM TensorFlow Inception pool_3 and mixed_6/conv",
            "inception_weights_sha256": weights_sha256}
    return _reference(mu, sigma, features, meta, mu_s=mu_s, sigma_s=sigma_s)


def save_reference(path, mu, sigma, pr_features=None, meta: dict | None = None, mu_s=None, sigma_s=None) -> Path:
    """Write a reference .npz (schema_version, mu, sigma, optional mu_s/sigma_s and pr_features, meta json)
    atomically."""
    ref = _reference(mu, sigma, pr_features, meta or {}, mu_s=mu_s, sigma_s=sigma_s)
    path = Path(path)
    arrays = {"schema_version": np.int64(REFERENCE_SCHEMA_VERSION), "mu": ref["mu"], "sigma": ref["sigma"],
              "meta": np.array(json.dumps(ref["meta"], sort_keys=True))}
    for name in ("mu_s", "sigma_s", "pr_features"):
        if ref[name] is not None:
            arrays[name] = ref[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: np.savez(f, **arrays))  # to the file object: savez would rename a temp name
    return path


def load_reference(path) -> dict:
    """Read a reference written by `save_reference`; refuses other schema versions and ADM batches."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} do not exist")
    with np.load(path, allow_pickle=False) as npz:
        if "schema_version" not in npz.files:
            hint = " (an ADM reference batch: read it with import_adm_reference_npz)" if "arr_0" in npz.files else ""
            raise ValueError(f"{path} has no schema_version entry, so it is not a srcflow reference{hint}")
        version = int(npz["schema_version"])
        if version != REFERENCE_SCHEMA_VERSION:
            raise ValueError(f"{path} has reference schema_version {version}; this code reads "
                             f"version {REFERENCE_SCHEMA_VERSION} only")
        optional = {name: npz[name] if name in npz.files else None for name in ("mu_s", "sigma_s", "pr_features")}
        return _reference(npz["mu"], npz["sigma"], optional.pop("pr_features"), json.loads(str(npz["meta"])),
                          **optional)


def check_reference_weights(reference: dict, weights_sha256: str) -> None:
    """Refuse a reference whose pool features came from other Inception weights than the samples'."""
    ref_sha = reference.get("meta", {}).get("inception_weights_sha256")
    if ref_sha is not None and ref_sha != weights_sha256:
        raise ValueError(f"reference features come from Inception weights sha256 {ref_sha[:12]}.., samples would "
                         f"use {weights_sha256[:12]}..; rebuild the reference with evaluate.inception_weights")


def _reference(mu, sigma, pr_features, meta, mu_s=None, sigma_s=None) -> dict:
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    pr_features = None if pr_features is None else np.asarray(pr_features)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"reference mu/sigma must be (D,) and (D, D), got {mu.shape} and {sigma.shape}")
    if pr_features is not None and (pr_features.ndim != 2 or pr_features.shape[1] != len(mu)):
        raise ValueError(f"reference pr_features must be (N, {len(mu)}), got {pr_features.shape}")
    if (mu_s is None) != (sigma_s is None):
        raise ValueError("reference mu_s and sigma_s come together (sFID statistics); got only one")
    if mu_s is not None:
        mu_s, sigma_s = np.asarray(mu_s, dtype=np.float64), np.asarray(sigma_s, dtype=np.float64)
        if mu_s.ndim != 1 or sigma_s.shape != (len(mu_s), len(mu_s)):
            raise ValueError(f"reference mu_s/sigma_s must be (D,) and (D, D), got {mu_s.shape} and {sigma_s.shape}")
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "pr_features": pr_features,
            "meta": dict(meta)}


# --- Inception weights ---------------------------------------------------------------------------


def check_inception_weights(path) -> str:
    """The sha256 of the local Inception weights file; a one-line error when it is missing."""
    check_inception_file(path)
    return file_sha256(path)


def check_inception_state(path) -> None:
    """A one-line ValueError unless `path` holds torch-fidelity's Inception state dict (its keys and shapes; the
    tensors are memory-mapped, not read)."""
    from pipeline.models.rae import load_state_mmap  # the one checkpoint reader (timm is imported with it)

    check_inception_file(path)
    try:
        state = load_state_mmap(path)
    except Exception as e:  # a damaged file, or one torch.load(weights_only=True) refuses
        raise ValueError(f"evaluate.inception_weights: {path} could not be read ({type(e).__name__}) "
                         f"(expected torch-fidelity's Inception state dict)") from None
    with torch.device("meta"):
        model = _standin_inception()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tensors = state.items() if isinstance(state, dict) else []
    got = {k: tuple(v.shape) for k, v in tensors if isinstance(v, torch.Tensor)}
    if got != expected:
        missing = [k for k in expected if k not in got]
        bad = [k for k in expected if k in got and got[k] != expected[k]]
        detail = (f"{len(missing)} expected keys missing (e.g. {', '.join(missing[:3])})" if missing else
                  f"{len(bad)} shape mismatches (e.g. {bad[0]}: {got[bad[0]]} vs {expected[bad[0]]})" if bad else
                  f"{len(got) - len(expected)} unexpected keys")
        raise ValueError(f"evaluate.inception_weights: {path} is not torch-fidelity's Inception: {detail}")


class _UnloadedInceptionV3(FeatureExtractorInceptionV3):
    """torch-fidelity's InceptionV3 that keeps PyTorch's initialisation instead of loading a checkpoint."""

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return None


def empty_state() -> io.BytesIO:
    """A torch file of an empty dict: what torch-fidelity's constructor is given to load instead of a path."""
    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return empty


def _standin_inception() -> FeatureExtractorInceptionV3:
    """torch-fidelity's Inception with PyTorch's initialisation (no checkpoint read)."""
    return _UnloadedInceptionV3(FEATURE_EXTRACTOR, ["2048"], feature_extractor_weights_path=empty_state())


def make_standin_inception_weights(path, seed: int = 0) -> str:
    """Write a stand-in for the Inception weights (same architecture and state-dict keys); return its sha256.

    Only for tests and smoke runs: it proves the code path, never a reportable number. PyTorch's
    default init shrinks activations layer by layer until features collapse (FID ~1e-13), so the
    convs get Kaiming-normal init (fan_in, ReLU); BatchNorm keeps its identity statistics.
    """
    model = _standin_inception()
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu", generator=generator)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.in_features ** -0.5, generator=generator)
            nn.init.zeros_(module.bias)
    # torch-fidelity reads the file with torch.load(path) + load_state_dict(strict): a plain state dict.
    # Saved through a buffer: torch.save names the archive after the file, and the bytes (so the
    # sha256 recorded with every metric) should depend on the seed only.
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return file_sha256(path)

