import pytest

from pipeline.config import ConfigError, load_config, semantic_values
from tests.conftest import SMOKE


def test_override_is_type_checked():
    cfg = load_config(SMOKE, ["src.dim=16", "encode.views=[plain]", "flow.soft_clip=null"])
    assert cfg.src.dim == 16 and cfg.encode.views == ["plain"] and cfg.flow.soft_clip is None


def test_unknown_key_fails_with_one_line_naming_the_full_path():
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, ["encode.batchsize=3"])
    msg = str(e.value)
    assert "\n" not in msg and "encode.batchsize" in msg and "batch_size" in msg  # hints the known keys


def test_bad_type_fails_with_one_line_naming_the_full_path():
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, ["src.dim=lots"])
    assert "\n" not in str(e.value) and "src.dim" in str(e.value) and "lots" in str(e.value)


def test_an_operational_field_keeps_its_bounds():
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, ["encode.jobs_per_worker=0"])
    assert "\n" not in str(e.value) and "encode.jobs_per_worker" in str(e.value)
    assert "jobs_per_worker" not in semantic_values(load_config(SMOKE).encode)


def test_unknown_section_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("shrad: {samples_per_shard: 3}\n")
    with pytest.raises(ConfigError, match="unknown key shrad"):
        load_config(bad)


def test_missing_config_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_operational_fields_are_not_semantic():
    cfg = load_config(SMOKE)
    assert "batch_size" not in semantic_values(cfg.encode) and "rows_per_shard" in semantic_values(cfg.encode)
    assert "workers" not in semantic_values(cfg.shard) and semantic_values(cfg.runtime) == {}
    assert "batch_size" in semantic_values(cfg.train)  # a training batch changes the result
    assert "compile" not in semantic_values(cfg.encode)
    # encode.decode is semantic, added after stores existed: it enters only when not at its default (pil)
    assert "decode" not in semantic_values(cfg.encode)
    assert semantic_values(load_config(SMOKE, ["encode.decode=tensor"]).encode)["decode"] == "tensor"


def test_paper_configs_validate():
    from tests.conftest import REPO

    for name in ("imagenet256.yaml", "imagenet512.yaml"):
        load_config(REPO / "configs" / name)


def test_the_learn_config_validates_and_draws_the_shape_only_set():
    from tests.conftest import REPO

    cfg = load_config(REPO / "configs" / "learn.yaml")
    assert cfg.data.generate_tiny.kind == "shapes" and cfg.data.generate_tiny.classes == 4
    assert load_config(SMOKE).data.generate_tiny.kind == "colours"  # the default: smoke's set is unchanged


def test_one_noise_level_null_follows_the_src_and_a_mismatch_needs_the_opt_in():
    cfg = load_config(SMOKE, ["src.noise_sigma=0.3"])
    assert cfg.flow.noise_sigma == 0.3  # null: the SRC's level
    assert load_config(SMOKE, ["src.noise_sigma=0.3", "flow.noise_sigma=0.3"]).flow.noise_sigma == 0.3
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, ["flow.noise_sigma=0.5"])
    msg = str(e.value)
    assert "\n" not in msg and "flow.noise_sigma=0.5" in msg and "src.noise_sigma=0.2" in msg
    assert "flow.allow_noise_mismatch" in msg
    ablation = load_config(SMOKE, ["flow.noise_sigma=0.5", "flow.allow_noise_mismatch=true"])
    assert ablation.flow.noise_sigma == 0.5


def test_the_resolved_noise_level_keeps_the_fingerprint_of_an_explicit_one():
    """null resolves to the SRC's value, so stores built with an explicit, equal flow.noise_sigma stay valid."""
    implicit, explicit = load_config(SMOKE), load_config(SMOKE, ["flow.noise_sigma=0.2"])
    assert semantic_values(implicit.flow) == semantic_values(explicit.flow)
    assert "allow_noise_mismatch" not in semantic_values(implicit.flow)


def test_the_sampler_keys_keep_stored_sample_fingerprints_at_their_defaults():
    """sample.solver and sample.jacobi_* were added after sample outputs were stored: at their defaults they
    stay out of the semantic values (the fingerprints stay), set otherwise they enter them. (pixel_rounding came with
    sample code version 3, which made every stored sample stale: a plain semantic key.)"""
    before = {"per_class", "cfg_scale", "cfg_mode", "cfg_anneal", "denoise", "seed", "pixel_rounding"}
    at_125 = ["sample.batch_size=125"]  # semantic since it moves pixels; at 125 (its default) it stays out
    assert set(semantic_values(load_config(SMOKE, at_125).sample)) == before
    assert set(semantic_values(load_config(SMOKE, [*at_125, "sample.solver=sequential"]).sample)) == before
    assert semantic_values(load_config(SMOKE).sample)["batch_size"] == 32  # the smoke config's
    jacobi = semantic_values(load_config(SMOKE, ["sample.solver=jacobi", "sample.jacobi_tol=1e-4"]).sample)
    assert jacobi["solver"] == "jacobi" and jacobi["jacobi_tol"] == 1e-4 and "jacobi_chunk" not in jacobi
    compiled = load_config(SMOKE, [*at_125, "sample.cuda_graph=true", "train.compile=true",
                                   "train.activation_checkpointing=true"])
    assert set(semantic_values(compiled.sample)) == before  # operational
    assert not {"compile", "activation_checkpointing"} & set(semantic_values(compiled.train))


def test_fit_decoder_grad_clip_and_the_curve_keys_keep_stored_fingerprints_at_their_defaults():
    """fit_decoder.grad_clip was added (null: no clipping, as RAE trains) after decoder outputs were stored; the
    training-curve intervals are operational."""
    default = semantic_values(load_config(SMOKE).fit_decoder)
    assert "grad_clip" not in default and "log_every" not in default and "image_every" not in default
    curves = ["fit_decoder.log_every=7", "fit_decoder.image_every=7", "src.image_every=7", "train.log_every=7"]
    assert semantic_values(load_config(SMOKE, curves).fit_decoder) == default
    assert semantic_values(load_config(SMOKE, ["fit_decoder.grad_clip=1.0"]).fit_decoder)["grad_clip"] == 1.0


@pytest.mark.parametrize("override, key", [
    ("src.dim=100000", "src.dim"), ("data.resolution=0", "data.resolution"), ("train.lr=-1", "train.lr"),
    ("flow.heads=5", "flow.heads"), ("flow.width=0", "flow.width"), ("runtime.workers=0", "runtime.workers"),
    ("encode.rows_per_chunk=64", "encode.rows_per_chunk"), ("encode.rows_per_chunk=5", "encode.rows_per_chunk"),
    ("src.lr=0", "src.lr"), ("runtime.nproc=0", "runtime.nproc"), ("encode.precision=fp16", "encode.precision"),
    ("sample.solver=newton", "sample.solver"), ("sample.jacobi_chunk=0", "sample.jacobi_chunk"),
    ("sample.jacobi_tol=-1", "sample.jacobi_tol"), ("train.compile=maybe", "train.compile"),
    ("encode.decode=turbo", "encode.decode"), ("fit_decoder.image_every=0", "fit_decoder.image_every"),
    ("train.torchrun_args=[--nnodes=1:4]", "train.torchrun_args"),
    ("train.torchrun_args=[--nproc-per-node=8]", "train.torchrun_args"),
    ("train.torchrun_args=[--standalone,--nnodes=2]", "train.torchrun_args"),
    ("train.torchrun_args=[--nnodes=3]", "train.batch_size"), ("runtime.nproc=3", "train.batch_size"),
    # the pre-checks the README promised, which main left to fail (or run) inside a stage
    ("encode.batch_size=0", "encode.batch_size"), ("compress.batch_size=0", "compress.batch_size"),
    ("sample.batch_size=-1", "sample.batch_size"), ("train.ema_decay=2", "train.ema_decay"),
    ("flow.label_drop=1.5", "flow.label_drop"), ("src.steps=-5", "src.steps"), ("src.depth=0", "src.depth"),
    ("encoder.input_size=0", "encoder.input_size"), ("train.adam_betas=[2,2]", "train.adam_betas"),
    ("sample.cfg_scale=[.nan]", "sample.cfg_scale"), ("train.lr=.inf", "train.lr"),
    ("src.noise_sigma=.nan", "src.noise_sigma"), ("fit_decoder.ema_decay=-0.1", "fit_decoder.ema_decay"),
    ("train.weight_decay=-1", "train.weight_decay"), ("sample.chunk_size=0", "sample.chunk_size"),
    # shapes that do not fit each other (issue #24 "Bad input"): the smoke encoder is 56 px / patch 7, 64 wide, 2 heads
    ("decoder.patch_size=7", "decoder.patch_size"), ("decoder.num_heads=3", "decoder.num_heads"),
    ("encoder.input_size=60", "encoder.input_size"), ("encoder.arch.num_heads=3", "encoder.arch.num_heads"),
    ("data.resolution=256", "decoder.patch_size"), ("sample.classes=0", "sample.classes"),
])
def test_bad_values_and_relations_fail_before_work_in_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, [override])
    msg = str(e.value)
    assert "\n" not in msg and key in msg, msg


def test_the_world_size_is_nodes_times_processes_and_splits_every_trained_batch():
    from pipeline.config import torchrun_nodes

    assert torchrun_nodes(None) == 1 and torchrun_nodes(["--nnodes", "4", "--node-rank=1"]) == 4
    assert torchrun_nodes(["--nnodes=2:2", "--rdzv-backend=c10d"]) == 2
    two_nodes = "train.torchrun_args=[--nnodes=2,--node-rank=0,--master-addr=HEAD,--master-port=29500]"
    load_config(SMOKE, ["runtime.nproc=2", two_nodes, "train.batch_size=64", "src.batch_size=32"])  # world 4
    with pytest.raises(ConfigError, match=r"src.batch_size=30 does not split over the world size 4 \(runtime.nproc=2 "
                                          r"x 2 node\(s\) of train.torchrun_args\)"):
        load_config(SMOKE, ["runtime.nproc=2", two_nodes, "train.batch_size=64", "src.batch_size=30"])
    load_config(SMOKE, ["runtime.nproc=2", two_nodes, "src.kind=pca", "src.batch_size=30"])  # pca: no training


def test_a_transformer_src_whose_width_does_not_split_into_its_heads_is_refused():
    with pytest.raises(ConfigError, match=r"src.hidden=128 is not divisible by src.heads=3 \(src.arch: transformer\)"):
        load_config(SMOKE, ["src.arch=transformer", "src.heads=3"])
    load_config(SMOKE, ["src.arch=mlp", "src.heads=3"])  # heads are the transformer's only


def test_an_unknown_stage_for_force_is_one_line_naming_the_stages(tmp_path, tiny_root):
    from typer.testing import CliRunner

    from srcflow.cli import app

    sets = [f"storage.root={tmp_path}", f"data.root={tiny_root}", "data.generate_tiny=null",
            f"evaluate.inception_weights={tiny_root.parent / 'standin-inception.pth'}"]
    r = CliRunner().invoke(app, ["run", "--config", str(SMOKE), *[a for x in sets for a in ("--set", x)],
                                 "--force", "nosuch"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "--force: unknown stage 'nosuch'" in r.output and "train_flow" in r.output
    assert not (tmp_path / "shard").exists()  # nothing ran


@pytest.mark.parametrize("classes", ["[n01440764,n01443537]", "100"])
def test_adms_all_class_reference_is_refused_for_a_class_subset(classes):
    """ADM's reference batch covers the 1,000 classes: a subset's samples would be scored against classes the flow
    never saw; the subset's own train images (reference.kind train) are the reference."""
    with pytest.raises(ConfigError, match=r"reference.kind=adm_npz: .* data.classes selects a subset") as e:
        load_config(SMOKE, [f"data.classes={classes}", "reference.kind=adm_npz"])
    assert "\n" not in str(e.value)
    assert load_config(SMOKE, [f"data.classes={classes}"]).reference.kind == "train"
    assert load_config(SMOKE, ["data.classes=1000", "reference.kind=adm_npz"]).data.classes == 1000
