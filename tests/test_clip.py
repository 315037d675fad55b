"""The Flax text encoders against transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`
on the same random weights, loaded through the production converter."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import assert_trees_equal, relative_error
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from jaxfuse.config import ConfigError
from jaxfuse.models.clip import BUFFERS, abstract_params, eos_positions, load_text_encoder
from jaxfuse.text_encoder_config import TextEncoderConfig
from jaxfuse.weight_conversion import match_checkpoint

WEIGHTS = "model.safetensors"
VOCAB = 100
BOS = VOCAB - 3
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=24, bos_token_id=BOS)
# name -> (transformers class, config, end token written in the ids, padding token, a token put
# before the end token so that the other pooling rule would pick the wrong position).
# CLIP-L-like: SDXL's legacy eos_token_id 2 (pool at the largest id), padded with the end token
# like SDXL's first tokenizer. bigG-like: a real end token id, padded with 0 like the second.
CASES = {
    "clip-l-like": (CLIPTextModel, dict(hidden_act="quick_gelu", eos_token_id=2), VOCAB - 1, VOCAB - 1, 2),
    "bigg-like": (CLIPTextModelWithProjection, dict(hidden_act="gelu", eos_token_id=VOCAB - 2),
                  VOCAB - 2, 0, VOCAB - 1),
}
END_POSITIONS = (5, 12)  # one per sequence of the batch

# The architecture fields of stabilityai/stable-diffusion-xl-base-1.0's two text encoder configs.
SDXL_TEXT_ENCODER = dict(
    architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=49408, hidden_size=768,
    intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
    hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0, eos_token_id=2,
    pad_token_id=1,
)
SDXL_TEXT_ENCODER_2 = {**SDXL_TEXT_ENCODER, "architectures": ["CLIPTextModelWithProjection"],
                       "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                       "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}


def random_encoder(model_class, config, seed=0):
    """A transformers text encoder whose every parameter is perturbed."""
    torch.manual_seed(seed)
    model = model_class(CLIPTextConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def token_ids(end, pad, decoy, seed=0):
    """[2, 77] int32: BOS, words (the decoy among them), the end token at END_POSITIONS, padding."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(END_POSITIONS), TINY["max_position_embeddings"]), pad, np.int32)
    for row, end_at in zip(ids, END_POSITIONS):
        row[0] = BOS
        row[1:end_at] = rng.integers(3, BOS, end_at - 1)
        row[2] = decoy
        row[end_at] = end
    return ids


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(model, saved folder, ids, reference penultimate hidden states, reference pooled output)."""
    model_class, extra, end, pad, decoy = CASES[request.param]
    model = random_encoder(model_class, {**TINY, **extra})
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    ids = token_ids(end, pad, decoy)
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), output_hidden_states=True)
    pooled = out.text_embeds if model_class is CLIPTextModelWithProjection else out.pooler_output
    return model, folder, ids, out.hidden_states[-2].numpy(), pooled.numpy()




def encode(folder, ids, **kwargs):
    encoder, params = load_text_encoder(folder, **kwargs)
    return jax.jit(encoder.apply)({"params": params}, ids)




def test_fp32_equals_transformers(case):
    _, folder, ids, ref_hidden, ref_pooled = case
    hidden, pooled = encode(folder, ids)
    assert hidden.shape == ref_hidden.shape and pooled.shape == ref_pooled.shape
    assert hidden.dtype == pooled.dtype == jnp.float32
    assert relative_error(hidden, ref_hidden) <= 5e-6  # measured 3.7e-7
    assert relative_error(pooled, ref_pooled) <= 5e-6  # measured 4.3e-7


def test_bf16_stays_close_to_transformers_fp32(case):
    _, folder, ids, ref_hidden, ref_pooled = case
    hidden, pooled = encode(folder, ids, dtype=jnp.bfloat16)
    assert hidden.dtype == pooled.dtype == jnp.bfloat16
    assert relative_error(hidden, ref_hidden) <= 3e-2  # measured 9.5e-3
    assert relative_error(pooled, ref_pooled) <= 3e-2  # measured 1.6e-2


def test_fp16_variant_loads(case, tmp_path):
    model, folder, *_ = case
    copy.deepcopy(model).half().save_pretrained(tmp_path, variant="fp16")
    assert not (tmp_path / WEIGHTS).exists()
    _, fp16_params = load_text_encoder(tmp_path)  # the only weights there: picked without asking
    _, chosen = load_text_encoder(tmp_path, variant="fp16")
    rounded = jax.tree.map(lambda p: np.asarray(p).astype(np.float16).astype(np.float32),
                           load_text_encoder(folder)[1])
    assert_trees_equal(fp16_params, rounded)
    assert_trees_equal(chosen, rounded)


def test_published_layout_loads(case, tmp_path):
    """Published SDXL checkpoints (transformers < 5) name every tensor `text_model.…` or
    `text_projection.…` and may carry the `position_ids` buffer; transformers 5 drops the prefix
    of CLIPTextModel's names and the buffer."""
    _, folder, *_ = case
    tensors = {(k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}"): v
               for k, v in load_file(folder / WEIGHTS).items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    save_file(tensors, tmp_path / WEIGHTS)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    assert_trees_equal(load_text_encoder(tmp_path)[1], load_text_encoder(folder)[1])


def test_sharded_checkpoint_loads(case, tmp_path):
    model, folder, *_ = case
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert_trees_equal(load_text_encoder(tmp_path)[1], load_text_encoder(folder)[1])


def test_pipeline_folder_is_accepted(case, tmp_path):
    _, folder, *_ = case
    (tmp_path / "text_encoder_2").symlink_to(folder)
    assert_trees_equal(load_text_encoder(tmp_path, component="text_encoder_2")[1],
                       load_text_encoder(folder)[1])


@pytest.mark.parametrize("config, preset", [(SDXL_TEXT_ENCODER, TextEncoderConfig.clip_l()),
                                            (SDXL_TEXT_ENCODER_2, TextEncoderConfig.open_clip_bigg())],
                         ids=["clip-l", "open-clip-bigg"])
def test_presets_match_transformers_name_for_name(config, preset):
    """transformers' real-size model (on the meta device: no memory) and ours have the same
    parameters, name for name and shape for shape."""
    assert TextEncoderConfig.from_transformers(config) == preset
    model_class = CLIPTextModelWithProjection if preset.with_projection else CLIPTextModel
    with torch.device("meta"):
        reference = model_class(CLIPTextConfig(**config))
    # transformers 5 drops the `text_model.` of CLIPTextModel's names; published files have it.
    prefix = "" if preset.with_projection else "text_model."
    shapes = {prefix + k: tuple(v.shape) for k, v in reference.state_dict().items()}
    abstract = abstract_params(preset)
    plan = match_checkpoint(shapes, abstract, BUFFERS)
    assert len(plan) == len(jax.tree.leaves(abstract)) == len(shapes)
    assert sum(np.prod(s) for s in shapes.values()) == sum(x.size for x in jax.tree.leaves(abstract))


def test_eos_positions_follow_the_legacy_rule_only_for_id_2():
    ids = jnp.array([[5, 7, 9, 7, 7], [5, 6, 7, 2, 2]])
    np.testing.assert_array_equal(eos_positions(ids, 7), [1, 2])
    np.testing.assert_array_equal(eos_positions(ids, 2), [2, 2])  # the largest id's first position


@pytest.mark.parametrize("field, value", [
    ("architectures", ["CLIPModel"]),
    ("architectures", None),
    ("model_type", "clip"),
    ("hidden_act", "gelu_new"),
    ("eos_token_id", [2, 49407]),
    ("num_attention_heads", 7),
    ("num_hidden_layers", 0),
])
def test_unsupported_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        TextEncoderConfig.from_transformers({**SDXL_TEXT_ENCODER, field: value})


def test_too_many_tokens_are_refused(case):
    _, folder, *_ = case
    with pytest.raises(ValueError, match="at most 77 tokens"):
        encode(folder, np.zeros((1, 78), np.int32))
