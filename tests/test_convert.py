"""diffusers checkpoint conversion: variants, shards, the converted format and its errors."""

import copy
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from conftest import assert_trees_equal
from diffusers import UNet2DConditionModel as DiffusersUNet
from safetensors.numpy import load_file, save_file

import jaxfuse
from checkpoints_conversion.convert_diffusers import main
from jaxfuse.config import UNetConfig
from jaxfuse.models.unet import abstract_params
from jaxfuse.oracle import BASE_LIKE, SDXL_BASE_CONFIG, SDXL_REFINER_CONFIG, random_unet
from jaxfuse.pipeline import load_pipeline
from jaxfuse.weight_conversion import ConversionError, export_checkpoint, match_checkpoint

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def model():
    return random_unet(BASE_LIKE)


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("unet")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def params(folder):
    return jaxfuse.load_unet(folder)[1]


# Every test runs in its own folder: nothing lands where pytest was started.
pytestmark = pytest.mark.usefixtures("in_tmp_path")


def edited_copy(folder, tmp_path, edit):
    """A copy of the UNet folder whose tensors went through `edit(dict) -> None`."""
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, tmp_path / WEIGHTS)
    return tmp_path


def test_missing_tensor_is_listed(folder, tmp_path):
    broken = edited_copy(folder, tmp_path, lambda t: t.pop("mid_block.attentions.0.proj_out.weight"))
    with pytest.raises(ConversionError, match=r"missing in checkpoint.*: 1\n\s+mid_block/attentions_0/proj_out/kernel"):
        jaxfuse.load_unet(broken)


def test_extra_tensor_is_listed(folder, tmp_path):
    def add(t):
        t["down_blocks.0.resnets.0.extra.weight"] = np.ones(3, np.float32)
    broken = edited_copy(folder, tmp_path, add)
    with pytest.raises(ConversionError, match=r"unused in checkpoint.*: 1\n\s+down_blocks.0.resnets.0.extra.weight"):
        jaxfuse.load_unet(broken)


def test_wrong_shape_is_listed(folder, tmp_path):
    def reshape(t):
        t["conv_in.weight"] = np.zeros((32, 4, 1, 1), np.float32)
    broken = edited_copy(folder, tmp_path, reshape)
    with pytest.raises(ConversionError, match=r"wrong shape: 1\n\s+conv_in.weight: checkpoint \(32, 4, 1, 1\)") as e:
        jaxfuse.load_unet(broken)
    assert "missing" not in str(e.value)


def test_fp16_variant_loads(model, params, tmp_path):
    copy.deepcopy(model).half().save_pretrained(tmp_path, variant="fp16")
    assert not (tmp_path / WEIGHTS).exists()
    _, fp16_params = jaxfuse.load_unet(tmp_path)  # the only file there: picked without asking
    _, chosen = jaxfuse.load_unet(tmp_path, variant="fp16")
    rounded = jax.tree.map(lambda p: np.asarray(p).astype(np.float16).astype(np.float32), params)
    assert_trees_equal(fp16_params, rounded)
    assert_trees_equal(chosen, rounded)


def test_sharded_checkpoint_loads(model, params, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / f"{WEIGHTS}.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert_trees_equal(jaxfuse.load_unet(tmp_path)[1], params)


def test_pickled_weights_are_refused(model, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(ConversionError, match="never unpickles.*safetensors"):
        jaxfuse.load_unet(tmp_path)


@pytest.mark.parametrize("damage", [lambda data: data[: len(data) // 2], lambda data: b"\xff" * 8 + data[8:]],
                         ids=["truncated", "garbage-header"])
def test_unreadable_safetensors_names_the_file(folder, tmp_path, damage):
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    weights = tmp_path / WEIGHTS
    weights.write_bytes(damage((folder / WEIGHTS).read_bytes()))
    with pytest.raises(ConversionError, match="truncated or damaged; download it again") as e:
        jaxfuse.load_unet(tmp_path)
    assert str(weights) in str(e.value)


@pytest.mark.parametrize("component, safetensors, pickled", [
    ("unet", WEIGHTS, "diffusion_pytorch_model.bin"),
    ("text_encoder", "model.safetensors", "pytorch_model.bin"),
])
def test_pipeline_with_pickled_weights_is_one_conversion_error(tiny_sdxl_folder, tmp_path, component, safetensors,
                                                                pickled):
    """A model folder holding only `*.bin` (diffusers' and transformers' pickled names): one
    ConversionError naming the folder, raised by jaxfuse itself, and nothing cached."""
    pipeline = tmp_path / "pipeline"
    shutil.copytree(tiny_sdxl_folder, pipeline)
    weights = pipeline / component / safetensors
    torch.save({k: torch.from_numpy(v) for k, v in load_file(weights).items()}, weights.with_name(pickled))
    weights.unlink()
    with pytest.raises(ConversionError, match="holds only pickled weights") as e:
        load_pipeline(pipeline, cache_dir=tmp_path / "cache", log=lambda _: None)
    assert str(pipeline / component) in str(e.value)
    assert e.value.__cause__ is None and e.value.__context__ is None
    assert not (tmp_path / "cache").exists()


def test_pipeline_folder_is_accepted(folder, params, tmp_path):
    (tmp_path / "unet").symlink_to(folder)
    assert_trees_equal(jaxfuse.load_unet(tmp_path)[1], params)


def test_cli_converts_and_never_overwrites(folder, params, tmp_path, capsys):
    dst = tmp_path / "converted"
    assert main([str(folder), str(dst)]) == 0
    assert_trees_equal(jaxfuse.load_unet(dst)[1], params)
    before = sorted(p.relative_to(dst) for p in dst.rglob("*"))
    assert main([str(folder), str(dst)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.relative_to(dst) for p in dst.rglob("*")) == before


@pytest.mark.parametrize("where", ["a file", "inside a file"])
def test_cli_into_a_file_is_one_clear_error(folder, tmp_path, capsys, where):
    """Once a NotADirectoryError traceback."""
    afile = tmp_path / "afile"
    afile.write_bytes(b"precious")
    dst = afile if where == "a file" else afile / "converted"
    assert main([str(folder), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot write into {dst}: {afile} is a file, not a folder.\n"
    assert afile.read_bytes() == b"precious"


@pytest.mark.parametrize("value, dtype, message", [
    (float("nan"), "float32", "tensors holding NaN or infinity (the file is damaged: restore it from its original "
                              "copy): 1\n    conv_in.weight in "),
    (float("inf"), "float32", "tensors holding NaN or infinity"),
    (1e6, "float16", "tensors with values beyond their dtype's range (convert to float32): 1\n    conv_in.weight in "),
])
def test_cli_refuses_weights_that_are_not_finite(folder, tmp_path, capsys, value, dtype, message):
    """Once copied as they were, with "converted"; a float16 conversion that overflows is the same."""
    def poison(tensors):
        tensors["conv_in.weight"][0, 0, 0, 0] = value
    (tmp_path / "src").mkdir()
    broken = edited_copy(folder, tmp_path / "src", poison)
    dst = tmp_path / "converted"
    assert main([str(broken), str(dst), "--dtype", dtype]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: the checkpoint's values must be finite, or every image it makes is NaN:")
    assert message in err and out == "" and not dst.exists()


@pytest.mark.parametrize("config, preset", [(SDXL_BASE_CONFIG, UNetConfig.sdxl_base()),
                                            (SDXL_REFINER_CONFIG, UNetConfig.sdxl_refiner())],
                         ids=["sdxl-base", "sdxl-refiner"])
def test_full_size_sdxl_matches_diffusers_name_for_name(config, preset):
    """diffusers' real-size model (on the meta device: no memory) and ours have the same
    parameters, name for name and shape for shape."""
    assert UNetConfig.from_diffusers(config) == preset
    with torch.device("meta"):
        reference = DiffusersUNet(**{k: v for k, v in config.items() if not k.startswith("_")})
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    abstract = abstract_params(preset)
    plan = match_checkpoint(shapes, abstract)
    assert len(plan) == len(jax.tree.leaves(abstract)) == len(shapes)
    assert sum(np.prod(s) for s in shapes.values()) == sum(x.size for x in jax.tree.leaves(abstract))


def test_sdxl_base_has_its_published_parameter_count():
    assert sum(x.size for x in jax.tree.leaves(abstract_params(UNetConfig.sdxl_base()))) == 2_567_463_684


def test_runtime_imports_neither_torch_nor_diffusers():
    """transformers is imported for its tokenizer only, which must not pull torch in."""
    code = ("import sys, jaxfuse, jaxfuse.generate, checkpoints_conversion.convert_diffusers; "
            "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_export_is_the_inverse_of_conversion(model, params):
    """Exporting the converted tree gives back diffusers' own names, layouts and values."""
    exported = export_checkpoint(params)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert sorted(exported) == sorted(state)
    for name, tensor in state.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
