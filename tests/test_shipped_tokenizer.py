"""The tokenizer jaxfuse ships (`jaxfuse.clip_tokenizer`) gives CLIP's ids, pads as SDXL's two
tokenizers do, writes folders that transformers loads back to the same tokenizer, and feeds
`TextEncoder`."""

import json

import numpy as np
import pytest
from transformers import CLIPTokenizer, CLIPTokenizerFast

from jaxfuse.clip_tokenizer import FILES, TOKENIZER_NAMES, shipped_tokenizer, write_tokenizer_folder
from jaxfuse.pipeline.text import TextEncoder

BOS, EOS, EXCLAMATION = 49406, 49407, 256  # EXCLAMATION: "!</w>"
# Prompt -> open_clip's ids from <|startoftext|> to <|endoftext|>, before padding. Produced once with
# open_clip_torch 3.3.0's own tokenizer: open_clip/tokenizer.py from the wheel, imported beside ftfy 6.3.1
# (open_clip itself not installed), `SimpleTokenizer()(prompts)`, each row cut after its 49407. Plain
# words; capitals, punctuation, digits and a contraction; accents and emoji; runs of whitespace; CJK;
# empty; and a prompt of 104 tokens (106 with the markers) cut to 77.
OPEN_CLIP_IDS = {
    "a photograph of an astronaut riding a horse": [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407],
    "Hello, World! It's 3:45pm -- 100% SDXL (v1.0).": [
        49406, 3306, 267, 1002, 256, 585, 568, 274, 281, 275, 276, 990, 2432, 272, 271, 271, 260, 3080, 8833, 263,
        341, 272, 269, 271, 1818, 49407],
    "a café in Zürich: naïve crème brûlée 🍰🙂": [
        49406, 320, 15304, 530, 89, 6522, 4021, 281, 1097, 35689, 563, 1075, 12138, 614, 711, 127, 119, 75, 13489,
        43732, 14860, 49407],
    "  Two   spaces\tand a TAB  ": [49406, 1237, 9006, 537, 320, 14724, 49407],
    "東京の夜景": [49406, 48338, 21078, 105, 21575, 23170, 250, 48132, 363, 49407],
    "": [49406, 49407],
    "a very detailed painting of a castle on a hill at sunset, " * 8: [
        49406, *[320, 1070, 12609, 3086, 539, 320, 3540, 525, 320, 2682, 536, 3424, 267] * 5,
        320, 1070, 12609, 3086, 539, 320, 3540, 525, 320, 2682, 49407],
}
PROMPTS = list(OPEN_CLIP_IDS)
PAD_IDS = {"tokenizer": EOS, "tokenizer_2": 0}


def expected_ids(name: str) -> np.ndarray:
    """[len(PROMPTS), 77]: open_clip's ids padded with `name`'s pad id. SDXL's tokenizer_2 makes its pad
    token "!" a special token, so a "!" in a prompt reads as 0 where open_clip reads "!</w>"; diffusers
    tokenizes SDXL prompts so (huggingface/diffusers#4153), and jaxfuse follows diffusers."""
    rows = []
    for ids in OPEN_CLIP_IDS.values():
        if name == "tokenizer_2":
            ids = [0 if i == EXCLAMATION else i for i in ids]
        rows.append(ids + [PAD_IDS[name]] * (77 - len(ids)))
    return np.asarray(rows)


def padded_ids(tokenizer, prompts=PROMPTS) -> np.ndarray:
    return np.asarray(tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids)


@pytest.fixture(scope="module")
def tokenizers():
    return {name: shipped_tokenizer(name) for name in TOKENIZER_NAMES}


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_vocabulary(tokenizers, name):
    tokenizer = tokenizers[name]
    assert isinstance(tokenizer, CLIPTokenizerFast)
    assert len(tokenizer) == tokenizer.vocab_size == 49408 and tokenizer.model_max_length == 77
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>", "!", "!</w>"]) == [BOS, EOS, 0, 256]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (BOS, EOS, EOS)
    assert len((FILES / "merges.txt").read_text(encoding="utf-8").splitlines()) == 1 + 48894


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_ids_equal_open_clip(tokenizers, name):
    assert len(OPEN_CLIP_IDS[PROMPTS[-1]]) == 77  # the long prompt is cut, ending in <|endoftext|>
    np.testing.assert_array_equal(padded_ids(tokenizers[name]), expected_ids(name))


def test_padding(tokenizers):
    """tokenizer pads with <|endoftext|> (49407), tokenizer_2 with "!" (0), as SDXL's."""
    for name, pad in PAD_IDS.items():
        assert tokenizers[name].pad_token_id == pad
        assert padded_ids(tokenizers[name], [""]).tolist() == [[BOS, EOS] + [pad] * 75]


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_written_folder_loads_equal(tokenizers, name, tmp_path):
    write_tokenizer_folder(tmp_path, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == 77
    shipped = tokenizers[name]
    for cls in (CLIPTokenizerFast, CLIPTokenizer):  # one class in transformers 5, slow and fast in 4
        loaded = cls.from_pretrained(tmp_path, local_files_only=True)
        assert len(loaded) == len(shipped) and loaded.model_max_length == 77
        assert loaded.special_tokens_map == shipped.special_tokens_map
        np.testing.assert_array_equal(padded_ids(loaded), padded_ids(shipped))


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_text_encoder_token_ids(tokenizers, name, capsys):
    ids = TextEncoder(tokenizers[name], None, None).token_ids(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77) and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, expected_ids(name))
    assert capsys.readouterr().err.count("longer than CLIP's 77 tokens") == 1


def test_unknown_name():
    with pytest.raises(ValueError, match="tokenizer_3"):
        shipped_tokenizer("tokenizer_3")
