"""Typed pipeline configuration: YAML -> pydantic models, with dotted `--set` overrides.

Every field is *semantic* (it changes a stage's output and enters its fingerprint) unless it is
declared with `operational(...)` (batch sizes for inference, workers, device, progress, logging):
those never enter a fingerprint. The whole `runtime` and `storage` sections are operational. A field
declared with `added(...)` is semantic but enters a fingerprint only when it is not its default: a
key added later whose default keeps what was stored (e.g. `sample.solver: sequential`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

IMAGENET_CLASSES = 1000


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line naming the full key path."""


def operational(default: Any, description: str = "", **constraints: Any) -> Any:
    """A field that changes how a stage runs, never what it produces."""
    return Field(default, description=description, json_schema_extra={"operational": True}, **constraints)


def added(default: Any, description: str = "", **constraints: Any) -> Any:
    """A semantic field added after outputs were stored, whose default reproduces them: it enters a
    fingerprint only when set to another value, so every fingerprint stored before it existed stays valid.
    Its default must never change (that would silently match outputs of the old default)."""
    return Field(default, description=description, json_schema_extra={"omit_default": True}, **constraints)


class Section(BaseModel):
    # NaN and inf are refused everywhere (a NaN learning rate trains a NaN model; a NaN cfg_scale samples NaN)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


UnitInterval = Annotated[float, Field(ge=0, le=1)]  # a decay or a probability
AdamBeta = Annotated[float, Field(ge=0, lt=1)]


# --- where things live and how they run (all operational) -------------------------------------


URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # s3://, gs://, file://, any scheme://


class StorageConfig(Section):
    root: str = operational("data/artifacts", "artifact store root: a local or shared (NFS, Lustre) filesystem path; "
                                              "relative paths are taken from the working directory")

    @field_validator("root")
    @classmethod
    def filesystem_path(cls, root: str) -> str:
        if URL.match(root):
            raise ValueError(f"{root.split('://')[0]}:// roots are not supported (the store needs a filesystem: "
                             "atomic renames, exclusive creates); use a local or shared filesystem path")
        return root


class RuntimeConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = operational("auto")
    workers: int = operational(1, "parallel worker processes for shard/encode/compress/sample "
                                  "(Dask LocalCluster when > 1)", ge=1)
    dask_address: str | None = operational(None, "an existing Dask scheduler, e.g. tcp://127.0.0.1:8786")
    dask_worker_wait: float = operational(600.0, "seconds a stage waits when its Dask cluster has no worker (at the "
                                                 "start, or after losing the last one) before it fails; said at once",
                                          gt=0)
    nproc: int = operational(1, "torchrun processes per node for training stages", ge=1)
    progress: Literal["auto"] | bool = operational("auto", "progress bars: auto (on a terminal), true or false")
    log_level: str = operational("INFO")
    memory_check: bool = operational(True, "refuse a stage whose planned peak memory exceeds this machine's "
                                           "(srcflow plan shows the estimate); false trusts the batch sizes")


# --- data -------------------------------------------------------------------------------------


class TinyImageNetConfig(Section):
    """Parameters of the procedural dataset generated at `data.root` when it is missing and is `root`."""

    root: str | None = Field(None, description="the one path the set is generated at (when data.root is this path "
                                               "and missing): a mistyped data.root is an error, not a new dataset; "
                                               "null: never generated")
    classes: int = 4
    per_class: int = Field(32, gt=0)
    val_per_class: int = Field(8, ge=0)
    size: int = Field(64, gt=0)
    seed: int = 0
    kind: Literal["colours", "shapes"] = Field(
        "colours", description="colours: one shape and hue per class; shapes: classes differ only by shape "
                               "(configs/learn.yaml); enters fingerprints through the listing digest")


class DataConfig(Section):
    root: str = "data/imagenet"
    layout: Literal["auto", "imagefolder", "kaggle", "hf-parquet", "wds", "ilsvrc-tar"] = Field(
        "auto", description="the form data.root holds (auto: detected): ImageFolder, Kaggle, the HF hub's parquet "
                            "files, WebDataset shards or the original ILSVRC2012 tars with the devkit; every form "
                            "gives an image the same key, label and stored bytes")
    classes: list[str] | int | None = Field(None, description="a list of synsets or a count of the first ones")
    max_per_class: int | None = Field(None, gt=0)
    resolution: int = Field(256, gt=0, description="image side in pixels (ADM center crop); the paper: 256 or 512")
    generate_tiny: TinyImageNetConfig | None = Field(
        None, description="generate the tiny procedural ImageNet at data.root when it does not exist (smoke/CI)"
    )


class ShardConfig(Section):
    samples_per_shard: int = Field(1000, gt=0)
    splits: list[Literal["train", "val"]] = ["train", "val"]
    workers: int = operational(4, "parallel processes", gt=0)


# --- the RAE (frozen encoder + decoder) -------------------------------------------------------


class EncoderArch(Section):
    """Overrides of the timm ViT for small random encoders (smoke/tests). Empty = encoder.name's real one."""

    embed_dim: int | None = Field(None, gt=0)
    depth: int | None = Field(None, gt=0)
    num_heads: int | None = Field(None, gt=0)
    patch_size: int | None = Field(None, gt=0)
    mlp_ratio: float | None = added(None, "MLP width / embed_dim (transformers' SigLIP and ViT-MAE keep 3072 for "
                                          "any width)", gt=0)


class EncoderConfig(Section):
    name: str = Field("vit_base_patch14_reg4_dinov2", description=(
        "the RAE encoder (timm name; pipeline/models/rae_family.py): vit_{small,base,large}_patch14_reg4_dinov2, "
        "vit_base_patch16_siglip_256 (SigLIP2-B, input 256), vit_base_patch16_224.mae (MAE-B, input 256)"))
    weights: str = Field("random", description="local .safetensors/.pth (timm or HF names), a transformers folder, a "
                                               "diffusers AutoencoderRAE folder, or 'random'")
    input_size: int = Field(224, gt=0, description="the encoder's input side (224: 16x16 tokens of DINOv2's 14 px)")
    arch: EncoderArch = EncoderArch()
    seed: int = 0


class EncodeConfig(Section):
    views: list[Literal["plain", "flip"]] = ["plain"]
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="the encoder forward's arithmetic: fp32 (TF32 matmuls on CUDA), as RAE encodes; bf16 "
                            "autocast is faster but ~0.4% off per token (benchmarks/encode.py measures it)")
    dtype: Literal["float16", "bfloat16"] = Field("float16", description="the stored features' dtype (after the "
                                                                         "forward)")
    stats: Literal["computed", "file"] = "computed"
    stats_file: str | None = None
    rows_per_shard: int = Field(256, gt=0, description="rows per Zarr shard: the unit of a writer and of resume")
    rows_per_chunk: int = Field(16, gt=0, description="rows per inner chunk: the unit of a random read")
    subset_per_class: int | None = Field(None, description="encode only the first K train images per class")
    decode: Literal["pil", "tensor", "nvjpeg"] = added(  # pil: the decode and crop of every store before the key
        "pil", description="JPEG decode + ADM crop: pil (PIL, ADM's exact path: the reference); tensor (torchvision's "
                           "decode + the crop on tensors, CPU threads, 2.3x pil per core; within 2 levels of pil on "
                           "0.4% of values); nvjpeg (batches decoded on the GPU, cropped there as PIL does; CUDA only; "
                           "what nvjpeg refuses is decoded on the CPU). benchmarks/encode.py `decode` measures them")
    batch_size: int = operational(64, gt=0)
    compile: bool = operational(False, "torch.compile the encoder on CUDA (ignored elsewhere); every batch is padded "
                                       "to batch_size so one graph serves them all; compiled before the first job")
    jobs_per_worker: int = operational(2, "shard jobs a worker runs at once, in threads: one job's tar read, "
                                          "JPEG decode and Zarr write overlap another's forward passes", gt=0)
    decode_threads: int | None = operational(None, "JPEG decode threads per worker, shared by its jobs "
                                                   "(default: the node's cores / runtime.workers)", gt=0)


class DecoderConfig(Section):
    weights: str | None = Field(None, description="released RAE decoder checkpoint; None trains one (fit_decoder)")
    hidden_size: int = Field(1152, gt=0)
    depth: int = Field(28, gt=0)
    num_heads: int = Field(16, gt=0)
    intermediate_size: int = Field(4096, gt=0)
    patch_size: int = Field(16, gt=0)


class FitDecoderConfig(Section):
    """RAE's stage-1 recipe (bytetriper/RAE configs/stage1/training/DINOv2-B_decXL.yaml, "RAE yaml" below, and
    src/train_stage1.py), less the GAN term; L1 on [0, 1] pixels as RAE computes it."""

    steps: int = Field(20000, gt=0)
    batch_size: int = Field(512, gt=0, description="RAE yaml training.global_batch_size")
    lr: float = Field(2e-4, gt=0, description="peak lr (RAE yaml training.optimizer.lr / scheduler.base_lr)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="cosine: linear warmup from 0 over warmup_steps, then cosine decay to final_lr at "
                              "`steps` (RAE yaml training.scheduler: type cosine, warmup_from_zero); constant: lr "
                              "throughout")
    warmup_steps: int | None = Field(None, ge=0, description="null = steps // 16 (RAE yaml training.scheduler."
                                     "warmup_epochs 1 of training.epochs 16)")
    final_lr: float = Field(2e-5, ge=0, description="the cosine's floor, reached at `steps` (RAE yaml "
                                                   "training.scheduler.final_lr, at base_lr 2e-4)")
    weight_decay: float = Field(0.0, ge=0, description="RAE yaml training.optimizer.weight_decay")
    noise_tau: float = Field(0.8, ge=0, description="RAE noise augmentation z + s*eps, s ~ noise_tau * U(0, 1) per "
                                                    "sample (RAE yaml stage_1.params.noise_tau)")
    ema_decay: UnitInterval = Field(0.9978, description="RAE yaml training.ema_decay")
    augment: Literal["none", "resize_random_crop"] = Field(
        "none", description="none: the stored features and their ADM center crops; resize_random_crop: RAE's "
                            "Resize(1.5 x data.resolution, bicubic) + RandomCrop(data.resolution) (src/train_stage1.py "
                            "stage1_transform), a fresh crop per step encoded by the frozen encoder at "
                            "encode.precision")
    lpips_weights: str | None = Field(None, description="local LPIPS weights: adds an LPIPS term (needs the lpips "
                                                        "package)")
    lpips_weight: float = Field(1.0, ge=0)
    grad_clip: float | None = added(None, "max global gradient norm; null = no clipping (RAE yaml "
                                          "training.clip_grad 0.0)", ge=0)
    report_images: int | None = Field(1000, gt=0, description="held-out val images (view 0) for psnr_val / l1_val and "
                                                              "the grid; None = all")
    seed: int = 0
    ckpt_every: int = operational(1000, ge=0)
    loader_threads: int = operational(8, "threads decoding JPEGs and reading feature rows for the next batches", gt=0)
    memory_mb: int = operational(1024, "hold the train pairs in memory when they fit (small sets); else stream per "
                                       "batch", ge=0)
    eval_batch_size: int = operational(64, gt=0)
    log_every: int = operational(100, "steps between training-curve points (TensorBoard, <output>/tensorboard)", gt=0)
    image_every: int = operational(1000, "steps between reconstruction grids in TensorBoard", gt=0)


# --- the compressor ----------------------------------------------------------------------------


class SRCConfig(Section):
    kind: Literal["pca", "learned"] = "learned"
    dim: int = Field(32, gt=0, description="code channels d per token (the paper: 32)")
    arch: Literal["mlp", "transformer"] = "mlp"
    hidden: int = Field(1024, gt=0)
    depth: int = Field(2, gt=0)
    heads: int = Field(4, gt=0, description="attention heads of the transformer arch")
    noise_sigma: float = Field(0.2, ge=0, description="constant code noise the SRC decoder trains under (and the "
                                                      "report's noisy rows)")
    steps: int = Field(5000, gt=0)
    batch_size: int = Field(256, gt=0, description="images per training step (all their tokens)")
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(1.0, ge=0)
    cosine_weight: float = Field(1.0, ge=0)
    pixel_loss_weight: float = Field(0.0, ge=0, description="MSE of RAE_dec(SRC(f)) vs RAE_dec(f) through the frozen "
                                                            "decoder")
    ema_decay: UnitInterval = 0.999
    seed: int = 0
    report_images: int = Field(256, gt=0, description="held-out val images (view 0) in the reconstruction report")
    ckpt_every: int = operational(500, ge=0)
    eval_batch_size: int = operational(64, "images per batch in the reconstruction report", gt=0)
    log_every: int = operational(100, "training steps between loss log lines and training-curve points", gt=0)
    image_every: int = operational(1000, "steps between reconstruction grids in TensorBoard (loads the RAE "
                                         "decoder at the first)", gt=0)


class CompressConfig(Section):
    source: Literal["features", "images"] = Field("features", alias="from")
    batch_size: int = operational(256, gt=0)

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


# --- the flow ---------------------------------------------------------------------------------


class FlowConfig(Section):
    width: int = Field(1024, gt=0)
    heads: int = Field(16, gt=0)
    num_blocks: int = Field(8, gt=0)
    layers_per_block: int = Field(2, gt=0)
    deep_layers: int | None = Field(16, gt=0)
    cond: Literal["additive", "prefix"] = "additive"
    scale: Literal["exp", "softplus"] = "softplus"
    start_token: bool = True
    soft_clip: float | None = Field(4.0, gt=0)
    label_drop: float = Field(0.1, ge=0, lt=1, description="probability of the null label in training (CFG's "
                                                         "unconditional branch)")
    noise_sigma: float | None = Field(None, ge=0, description="constant noise on the codes the flow learns; null = "
                                      "src.noise_sigma, the level the SRC decoder is trained to decode (one level)")
    allow_noise_mismatch: bool = operational(False, "ablations only: accept a flow.noise_sigma other than "
                                                    "src.noise_sigma (the decoder then sees a level it never saw)")


class TrainConfig(Section):
    steps: int = Field(400000, gt=0)
    batch_size: int = Field(256, gt=0, description="global batch (images), split evenly over runtime.nproc processes")
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(5000, ge=0, description="linear warmup, then cosine decay to 0 at `steps`")
    weight_decay: float = Field(1e-4, ge=0)
    adam_betas: tuple[AdamBeta, AdamBeta] = (0.9, 0.95)
    grad_clip: float | None = Field(1.0, ge=0, description="max global gradient norm; null = no clipping")
    ema_decay: UnitInterval = 0.9999
    shuffle_window: int = Field(16384, gt=0, description="images per shuffle window: the data order permutes "
                                "chunk-aligned blocks, then images inside each window (>= the split: a uniform "
                                "shuffle)")
    seed: int = 0
    ckpt_every: int = operational(5000, ge=0)
    log_every: int = operational(100, "steps between train NLL / bits-per-dim lines in the log, metrics.jsonl "
                                      "and TensorBoard", gt=0)
    image_every: int = operational(1000, "steps between sample grids in TensorBoard (the EMA flow's samples, "
                                         "decoded by the SRC and RAE decoders its codes came from)", gt=0)
    in_memory_limit_gb: float = operational(4.0, "hold the train codes in memory (per process) when they are "
                                            "at most this big, else stream shuffle windows from codes.zarr", ge=0)
    prefetch: int = operational(4, "batches assembled ahead of the training step", gt=0)
    eval_batch_size: int = operational(256, "batch of the held-out likelihood evaluation", gt=0)
    compile: Literal["auto"] | bool = operational("auto", "torch.compile the flow's loss (forward and backward); "
                                                  "auto: on CUDA, off on CPU")
    activation_checkpointing: bool = operational(False, "recompute each transformer layer's activations in the "
                                                 "backward pass (less memory for larger flows, ~1/3 more compute)")
    torchrun_args: list[str] | None = operational(None, "torchrun rendezvous arguments of the training stages "
                                                  "(fit_src, train_flow) replacing --standalone (multi-node), "
                                                  "e.g. [--nnodes=2, --node-rank=0, --master-addr=HEAD, "
                                                  "--master-port=29500]; the world size is --nnodes x "
                                                  "runtime.nproc; the other nodes join (README, Multi-node "
                                                  "training)")


class SampleConfig(Section):
    per_class: int = Field(50, gt=0, description="samples of every class (paper protocol: 50 x 1000 classes)")
    cfg_scale: list[float] = Field([1.0], min_length=1, description="one sample set (samples-cfg{w}.npz) per value")
    cfg_mode: Literal["tarflow", "starflow"] = "starflow"
    cfg_anneal: bool = Field(False, description="tarflow mode: ramp w linearly over each block's token steps")
    denoise: Literal["auto", "none", "tweedie"] = Field(
        "auto", description="tweedie: x + sigma^2 grad log p(x | y), sigma = flow.noise_sigma; none: decode the noisy "
                            "codes; auto: tweedie when the SRC decoder was trained on clean codes (PCA) and the flow "
                            "on noisy ones, else none (a learned SRC decoder already decodes that noise)")
    classes: int | None = added(None, "sample only the flow's first K classes (a rehearsal's handful); null = every "
                                      "class, as the evaluation protocol needs", gt=0)
    seed: int = Field(0, description="sample i's noise is seeded by (seed, i): any sharding gives the same samples")
    solver: Literal["sequential", "jacobi"] = added("sequential", "the inverse of each flow block: one token per "
                                                    "step (exact), or block-wise Jacobi fixed-point iterations")
    jacobi_chunk: int = added(64, "jacobi: tokens solved together", gt=0)
    jacobi_tol: float = added(1e-3, "jacobi: stop a chunk when max_b ||x_new - x|| / ||x_new|| is below this", ge=0)
    jacobi_max_iters: int = added(64, "jacobi: at most this many passes per chunk; below jacobi_chunk, a chunk that "
                                      "misses jacobi_tol leaves its last tokens unsolved (warned, counted)", gt=0)
    pixel_rounding: Literal["truncate", "round"] = Field(
        "truncate", description="decoder output in [0, 1] x 255 -> uint8: truncate, as RAE's and ADM's samplers "
                                "write the samples FIDs are reported on, or round to the nearest level")
    batch_size: int = added(125, "samples per pass of the flow and the decoders; semantic: the matmuls round "
                                 "differently at another batch, which moves a few pixels by one level (at 125, "
                                 "the batch of every stored sample set, it stays out of the fingerprint)", gt=0)
    chunk_size: int = operational(1000, "samples per job and per resume unit (a committed chunk file), rounded up to "
                                        "a multiple of batch_size: the batches are the same whatever the chunks",
                                  gt=0)
    grid_per_class: int = operational(4, "samples of each class in grid-cfg{w}.png", gt=0)
    grid_classes: int = operational(16, "classes (the first ones) in grid-cfg{w}.png", gt=0)
    cuda_graph: bool = operational(False, "CUDA only: static KV caches and each network step of the inverse "
                                   "captured once as a CUDA graph and replayed (the same samples up to rounding)")


class ReferenceConfig(Section):
    kind: Literal["train", "adm_npz"] = Field(
        "train", description="train: Inception statistics of the train shards (ADM center crop at data.resolution); "
                             "adm_npz: ADM's reference batch at `path` (comparable with published FIDs)")
    path: str | None = Field(None, description="the ADM reference batch .npz for kind adm_npz")
    max_images: int | None = Field(None, gt=1, description="kind train: at most this many train images, class-balanced "
                                                           "(round-robin over classes in shard order); None = all")
    pr_images: int = Field(10000, ge=4, description="kind train: images whose pool features are kept for KID and "
                                                    "precision/recall, the first of the class-balanced order (ADM: "
                                                    "10k)")
    allow_class_subset: bool = operational(False, "rehearsals only: accept kind adm_npz (all 1,000 classes) with a "
                                                  "data.classes subset; its scores are not the protocol's")
    loader_threads: int = operational(4, "threads reading and decoding train shards ahead of the Inception", gt=0)


class EvaluateConfig(Section):
    inception_weights: str = Field(
        "data/weights/weights-inception-2015-12-05-6726825d.pth",
        description="torch-fidelity's FID Inception, a local file (never downloaded); its sha256 enters the "
                    "fingerprints of reference and evaluate")
    make_standin: bool = operational(
        False, "smoke/CI only: when inception_weights is missing, write a seeded stand-in Inception there at plan "
               "time; every metric computed with it is marked inception_weights: stand-in")
    inception_dtype: Literal["float64", "float32"] = added(
        "float64", "the Inception's arithmetic: float64 (this project's reportable metrics), or float32, "
                   "torch-fidelity's own default and ~3x faster on a CPU (the smoke config's stand-in code-path check)")
    kid_subset_size: int = Field(1000, gt=1)
    dinov2_weights: str | None = added(
        None, "a local DINOv2-L/14 file (dinov2_vitl14_pretrain.pth, or timm / transformers names): adds FD_DINOv2 "
              "beside FID, through torch-fidelity's DINOv2 extractor (pipeline/metrics/fd_dinov2.py); its sha256 keys "
              "the reference statistics. Not a number of the SRC-Flow paper")
    bayes_max_images: int | None = Field(
        None, ge=1, description="the flow as a Bayes-rule classifier on at most this many val images, class-balanced "
                                "(each costs one flow pass per class); None = the whole val split")
    batch_size: int = operational(64, gt=0)


class Config(Section):
    storage: StorageConfig = StorageConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    data: DataConfig = DataConfig()
    shard: ShardConfig = ShardConfig()
    encoder: EncoderConfig = EncoderConfig()
    encode: EncodeConfig = EncodeConfig()
    decoder: DecoderConfig = DecoderConfig()
    fit_decoder: FitDecoderConfig = FitDecoderConfig()
    src: SRCConfig = SRCConfig()
    compress: CompressConfig = CompressConfig()
    flow: FlowConfig = FlowConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    reference: ReferenceConfig = ReferenceConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    def check_relations(self) -> None:
        """Relations between keys that no single field can check; each error names its keys."""
        f, e = self.flow, self.encode
        if f.width % f.heads:
            raise ValueError(f"flow.width={f.width} is not divisible by flow.heads={f.heads}")
        if e.rows_per_shard % e.rows_per_chunk:
            raise ValueError(f"encode.rows_per_chunk={e.rows_per_chunk} does not divide "
                             f"encode.rows_per_shard={e.rows_per_shard}")
        d = self.fit_decoder
        if d.final_lr > d.lr:
            raise ValueError(f"fit_decoder.final_lr={d.final_lr} exceeds fit_decoder.lr={d.lr}: "
                             "the cosine decays to it")
        if d.warmup_steps is not None and d.warmup_steps > d.steps:
            raise ValueError(f"fit_decoder.warmup_steps={d.warmup_steps} exceeds fit_decoder.steps={d.steps}")
        classes = self.data.classes
        if self.reference.kind == "adm_npz" and classes is not None and not self.reference.allow_class_subset and (
                len(classes) if isinstance(classes, list) else classes) < IMAGENET_CLASSES:
            raise ValueError("reference.kind=adm_npz: ADM's reference batch holds all 1,000 ImageNet classes, but "
                             "data.classes selects a subset; samples of the subset would be scored against all "
                             "classes: use reference.kind=train (the subset's own train images)")
        nodes = torchrun_nodes(self.train.torchrun_args)
        world = self.runtime.nproc * nodes
        batches = [("train.batch_size", self.train.batch_size)]
        batches += [("src.batch_size", self.src.batch_size)] if self.src.kind == "learned" else []
        for key, batch in batches:
            if batch % world:
                raise ValueError(f"{key}={batch} does not split over the world size {world} (runtime.nproc="
                                 f"{self.runtime.nproc} x {nodes} node(s) of train.torchrun_args); use a multiple "
                                 f"of {world}")
        from pipeline.models.rae_family import encoder_shape  # torch-free: the RAE encoders' sizes

        channels = self.encoder.arch.embed_dim or encoder_shape(self.encoder.name).embed_dim
        if self.src.dim > channels:
            raise ValueError(f"src.dim={self.src.dim} exceeds the encoder's {channels} channels "
                             f"(encoder.arch.embed_dim, {self.encoder.name})")
        self.check_shapes(channels)

    def check_shapes(self, channels: int) -> None:
        """The model shapes fit each other: widths split into whole heads, the encoder's patches tile its input, and
        the decoder's tokens x patch give back the crop (data.resolution)."""
        from pipeline.models.rae_family import encoder_shape

        a, d, s = self.encoder.arch, self.decoder, self.src
        shape = encoder_shape(self.encoder.name)
        patch, heads = a.patch_size or shape.patch_size, a.num_heads or shape.num_heads
        if self.encoder.input_size % patch:
            raise ValueError(f"encoder.input_size={self.encoder.input_size} is not a multiple of the encoder's patch "
                             f"{patch} (encoder.arch.patch_size, {self.encoder.name})")
        if channels % heads:
            raise ValueError(f"encoder.arch.embed_dim={channels} is not divisible by the encoder's {heads} heads "
                             f"(encoder.arch.num_heads, {self.encoder.name})")
        if d.hidden_size % d.num_heads:
            raise ValueError(f"decoder.hidden_size={d.hidden_size} is not divisible by decoder.num_heads={d.num_heads}")
        grid = self.encoder.input_size // patch
        if grid * d.patch_size != self.data.resolution:
            raise ValueError(f"decoder.patch_size: {grid}x{grid} tokens x patch {d.patch_size} decode to "
                             f"{grid * d.patch_size} px but data.resolution is {self.data.resolution} (patch_size "
                             f"{self.data.resolution / grid:g} would match)")
        if s.kind == "learned" and s.arch == "transformer" and s.hidden % s.heads:
            raise ValueError(f"src.hidden={s.hidden} is not divisible by src.heads={s.heads} (src.arch: transformer)")

    @model_validator(mode="after")
    def relations(self) -> Config:
        """Relations between keys (`check_relations`), and one noise level: flow.noise_sigma is the SRC's
        (SRC-FLOW.md "Constant-noise regularization"); null takes it, another value is an ablation that must say so."""
        self.check_relations()
        sigma, src_sigma = self.flow.noise_sigma, self.src.noise_sigma
        if sigma is None:
            self.flow.noise_sigma = src_sigma
        elif sigma != src_sigma and not self.flow.allow_noise_mismatch:
            raise ValueError(f"flow.noise_sigma={sigma} differs from src.noise_sigma={src_sigma}: the SRC decoder "
                             "would decode codes at a noise level it never saw; leave flow.noise_sigma null (= "
                             "src.noise_sigma), or set flow.allow_noise_mismatch=true for an ablation")
        return self


def torchrun_nodes(args: list[str] | None) -> int:
    """The node count of train.torchrun_args (`--nnodes N` or `--nnodes=N`; 1 without). ValueError, naming the
    key, for what a training stage cannot run: an elastic range MIN:MAX (the world size, which splits the global
    batch, must stay fixed), --nproc-per-node (runtime.nproc sets it), --standalone with several nodes."""
    args = list(args or [])
    nodes = "1"
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in ("--nproc-per-node", "--nproc_per_node"):
            raise ValueError(f"train.torchrun_args: {arg} is set by runtime.nproc (processes per node); leave it out")
        if name == "--nnodes":
            nodes = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    low, _, high = nodes.partition(":")
    if not low.isdigit() or int(low) < 1 or (high and high != low):
        raise ValueError(f"train.torchrun_args: --nnodes {nodes!r} must be a fixed node count (an elastic range "
                         f"would change the world size that splits the global batch)")
    if int(low) > 1 and "--standalone" in args:
        raise ValueError(f"train.torchrun_args: --standalone is one node, but --nnodes is {low}; give the "
                         f"rendezvous instead (--master-addr/--master-port or --rdzv-backend=c10d)")
    return int(low)


# --- loading ----------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (or defaults) + `section.key=value` overrides -> a validated Config."""
    raw: dict[str, Any] = {} if path is None else read_config_file(Path(path))
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, source=str(path) if path else "defaults", overrides=overrides)


def read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping. `extends: OTHER.yaml` (relative to the file) starts from OTHER's mapping and
    replaces what this file sets, key by key inside sections: a variant (configs/imagenet256-dinov2-s.yaml) states
    only what differs."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen:
        raise ConfigError(f"config file {path}: extends {base} loops back to a file that extends it")
    return _merged(read_config_file(base_path, (*seen, path.resolve())), raw)


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def validate_config(raw: dict[str, Any], source: str = "config", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """`overrides`: the `--set` items applied to `raw`; an error in a key one of them set names that item, not
    `source`."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        if not key:  # a relation between sections: the message names its keys
            raise ConfigError(f"{source}: {err['msg'].removeprefix('Value error, ')}{more}") from None
        where = next((f"--set {item}" for item in overrides if overlaps(item.partition("=")[0].strip(), key)), source)
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{where}: unknown key {key}{known_keys_hint(err['loc'])}{more}") from None
        message = err["msg"].removeprefix("Value error, ")  # a field validator's own message
        raise ConfigError(f"{where}: {key}: {message} (got {err.get('input')!r}){more}") from None


def overlaps(a: str, b: str) -> bool:
    """Dotted keys of which one is the other or inside it (`data` and `data.root`)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def known_keys_hint(loc: tuple) -> str:
    """`(did you mean encode.batch_size?); known: ...` for an unknown key at `loc`."""
    import difflib

    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return ""
        model = candidates[0]
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    guess = f" (did you mean {'.'.join(map(str, [*loc[:-1], close[0]]))}?)" if close else ""
    return f"{guess}; known: {', '.join(model.model_fields)}"


def config_sources(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every leaf of the resolved config (`srcflow config`): {key, value, source, operational}, where source is the
    `--set` item that set it, the config file, `default`, or `derived` (a value the validator filled in: a null
    flow.noise_sigma takes src.noise_sigma)."""
    cfg = load_config(path, overrides)
    in_file = flatten(yaml.safe_load(Path(path).read_text()) or {}) if path is not None else {}
    defaults = flatten(config_dict(Config()))
    rows = []
    for key, value in flatten(config_dict(cfg)).items():
        item = next((i for i in reversed(overrides) if overlaps(i.partition("=")[0].strip(), key)), None)
        if item is not None:
            source = f"--set {item}"
        else:  # the validator fills in only nulls (flow.noise_sigma)
            source, said = (str(path), in_file[key]) if key in in_file else ("default", defaults.get(key, value))
            source = f"derived (null in {source})" if said is None and value is not None else source
        rows.append({"key": key, "value": value, "source": source, "operational": is_operational(cfg, key)})
    return rows


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists, nulls and empty mappings are leaves."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def is_operational(cfg: Config, key: str) -> bool:
    """Whether the dotted key (aliases allowed: compress.from) is, or lies inside, an operational field."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, BaseModel):
            return False
        fields = type(node).model_fields
        name = next((n for n, f in fields.items() if part in (n, f.alias)), None)
        if name is None:
            return False
        if (fields[name].json_schema_extra or {}).get("operational") or type(node) in (StorageConfig, RuntimeConfig):
            return True
        node = getattr(node, name)
    return False


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`a.b.c=value` with value parsed as YAML (`16`, `0.5`, `[plain, flip]`, `null`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {item!r}: key {key!r} must be section.key")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def semantic_values(model: BaseModel) -> dict[str, Any]:
    """The fields of a section that determine outputs (operational ones dropped), JSON-ready."""
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra or {}
        value = getattr(model, name)
        if extra.get("operational") or (extra.get("omit_default") and value == field.default):
            continue
        out[name] = semantic_values(value) if isinstance(value, BaseModel) else _jsonable(value)
    return out


def semantic_of(cfg: Config, paths: tuple[str, ...]) -> dict[str, Any]:
    """What enters a stage's fingerprint: the semantic values of config sections or dotted fields, keyed by
    path. An `added` field named by its dotted path is left out at its default, as inside a section."""
    out: dict[str, Any] = {}
    for path in paths:
        value = select(cfg, path)
        parent, _, name = path.rpartition(".")
        field = type(select(cfg, parent)).model_fields[name] if parent else None
        if field is not None and (field.json_schema_extra or {}).get("omit_default") and value == field.default:
            continue
        out[path] = semantic_values(value) if isinstance(value, BaseModel) else value
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def select(cfg: Config, dotted: str) -> Any:
    """`select(cfg, "data.resolution")` -> the value; `select(cfg, "src")` -> the section."""
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def config_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json", by_alias=True)
