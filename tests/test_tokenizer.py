"""Tokenizer folders of both layouts: the classic vocab.json + merges.txt, and the tokenizer.json
alone that `save_pretrained` writes with transformers 5. Each loads, and tokenizes and encodes as
diffusers does from the same folder."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from jaxfuse.pipeline import load_pipeline
from jaxfuse.sampling.image import Direct
from jaxfuse.spec import PipelineError, PipelineSpec

# Words the tiny vocabulary spells whole, words that fall back to bytes, capitals, punctuation,
# doubled spaces, accents and a symbol outside Latin-1, an empty prompt, and one longer than 77
# tokens (cut off).
PROMPTS = ["a red circle at the top left", "Blue  SQUARE, green triangle!", "a café — naïve ☆ star", "",
           " ".join(["red circle"] * 60)]
HEIGHT, WIDTH, STEPS = 64, 96, 3
LAYOUTS = ["classic", "tokenizer.json"]


@pytest.fixture(scope="module")
def folders(tiny_sdxl_folder, tmp_path_factory):
    """layout -> pipeline folder: the tiny pipeline's own (classic) and the same pipeline loaded by
    diffusers and saved again by the installed transformers."""
    saved = tmp_path_factory.mktemp("saved")
    StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_folder).save_pretrained(saved)
    return {"classic": tiny_sdxl_folder, "tokenizer.json": saved}


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request, folders, tmp_path_factory):
    """(our pipeline, diffusers' pipeline) of one layout's folder."""
    folder = folders[request.param]
    for tokenizer in ("tokenizer", "tokenizer_2"):
        files = {p.name for p in (folder / tokenizer).iterdir()}
        if request.param == "classic":
            assert {"vocab.json", "merges.txt"} <= files and "tokenizer.json" not in files
        else:
            assert "tokenizer.json" in files and not {"vocab.json", "merges.txt"} & files
    ours = load_pipeline(folder, cache_dir=tmp_path_factory.mktemp("cache"), log=lambda _: None)
    return ours, StableDiffusionXLPipeline.from_pretrained(folder)


def test_token_ids_equal_diffusers(layout, folders):
    """Both tokenizers, padded to 77 (the second with "!", as SDXL's) and cut at 77, as diffusers
    tokenizes; and the same ids from either layout."""
    ours, reference = layout
    for encoder, tokenizer in zip(ours.text.encoders, (reference.tokenizer, reference.tokenizer_2)):
        expected = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids
        np.testing.assert_array_equal(encoder.token_ids(PROMPTS), expected)
    first, second = (encoder.token_ids([""])[0] for encoder in ours.text.encoders)
    assert first[2] == first[1] and second[2] == reference.tokenizer_2.convert_tokens_to_ids("!") != first[2]
    for encoder, name in zip(ours.text.encoders, ("tokenizer", "tokenizer_2")):
        classic = CLIPTokenizer.from_pretrained(folders["classic"] / name)
        np.testing.assert_array_equal(encoder.token_ids(PROMPTS), classic(PROMPTS, padding="max_length", max_length=77,
                                                                          truncation=True).input_ids)


def test_prompt_embeddings_equal_diffusers(layout):
    ours, reference = layout
    context, pooled = ours.text.encode(Direct(), PROMPTS)
    with torch.no_grad():
        ref_context, _, ref_pooled, _ = reference.encode_prompt(PROMPTS, device="cpu",
                                                                do_classifier_free_guidance=False)
    assert context.shape == ref_context.shape and pooled.shape == ref_pooled.shape
    assert np.abs(np.asarray(context) - ref_context.numpy()).max() < 1e-5  # measured 1.1e-6 (EPYC)
    assert np.abs(np.asarray(pooled) - ref_pooled.numpy()).max() < 1e-5  # measured 9.5e-7


def test_image_equals_diffusers(layout):
    ours, reference = layout
    noise = np.random.default_rng(0).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    kwargs = dict(prompt=PROMPTS[2], negative_prompt=PROMPTS[1], guidance_scale=6.0, height=HEIGHT, width=WIDTH,
                  num_inference_steps=STEPS)
    image = ours(**kwargs, latents=noise)
    expected = reference(**kwargs, latents=torch.from_numpy(noise), output_type="np").images
    assert image.shape == expected.shape == (1, HEIGHT, WIDTH, 3)
    assert np.abs(image - expected).max() < 5e-5  # measured 4.2e-6


@pytest.mark.parametrize("source, remove, message", [
    ("tokenizer.json", "tokenizer/tokenizer.json", "missing tokenizer/tokenizer.json"),
    ("classic", "tokenizer_2/merges.txt", "missing tokenizer_2/merges.txt"),
    ("classic", "tokenizer/tokenizer_config.json", "missing tokenizer/tokenizer_config.json"),
])
def test_a_tokenizer_folder_of_neither_layout_names_both(folders, tmp_path, source, remove, message):
    broken = tmp_path / "broken"
    shutil.copytree(folders[source], broken)
    (broken / remove).unlink()
    with pytest.raises(PipelineError, match=f"{message}. A tokenizer folder holds tokenizer_config.json with "
                                            "either tokenizer.json or vocab.json and merges.txt."):
        PipelineSpec.read(broken)


def test_threads_tokenizing_at_once_each_get_their_own_padding():
    """A fast tokenizer keeps its padding settings on one shared object: threads sharing a pipeline
    tokenize one at a time (without the encoder's lock this run fails: ragged ids, measured)."""
    from concurrent.futures import ThreadPoolExecutor

    from transformers import CLIPTokenizerFast

    from jaxfuse.demo import DEMO_MODEL
    from jaxfuse.pipeline.text import TextEncoder

    encoder = TextEncoder(CLIPTokenizerFast.from_pretrained(DEMO_MODEL / "tokenizer_2", local_files_only=True),
                          None, None)
    prompts = [["a"], ["a red circle at the top left and a blue square at the bottom right"], ["b c", "d e f g"]]
    with ThreadPoolExecutor(8) as pool:
        shapes = set(pool.map(lambda i: encoder.token_ids(prompts[i % 3]).shape, range(3000)))
    assert shapes == {(1, 77), (2, 77)}
