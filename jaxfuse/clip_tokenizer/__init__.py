"""CLIP's BPE tokenizer, shipped with jaxfuse: a single-file SDXL checkpoint carries no tokenizer.

SDXL tokenizes twice with the same vocabulary (49,408 ids, 48,894 merges, lower-cased, 77 tokens):
`tokenizer` (CLIP ViT-L) pads with "<|endoftext|>", `tokenizer_2` (OpenCLIP ViT-bigG) with "!". The
settings are those of stabilityai/stable-diffusion-xl-base-1.0's tokenizer folders. vocab.json and
merges.txt come from open_clip (MIT); NOTICE.md says how `build.py` rebuilds them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from transformers import CLIPTokenizerFast

FILES = Path(__file__).parent
DATA_FILES = ("vocab.json", "merges.txt")
TOKENIZER_NAMES = ("tokenizer", "tokenizer_2")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD_TOKENS = {"tokenizer": EOS, "tokenizer_2": "!"}
MODEL_MAX_LENGTH = 77


def special_tokens(name: str) -> dict[str, str]:
    """special_tokens_map.json of SDXL's folder `name`."""
    if name not in PAD_TOKENS:
        raise ValueError(f"unknown tokenizer {name!r}; SDXL has {', '.join(TOKENIZER_NAMES)}")
    return {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD_TOKENS[name], "unk_token": EOS}


def tokenizer_config(name: str) -> dict:
    """tokenizer_config.json of SDXL's folder `name`, less the bookkeeping transformers adds when
    saving (added_tokens_decoder, tokenizer_file)."""
    return {"add_prefix_space": False, **special_tokens(name), "clean_up_tokenization_spaces": True,
            "do_lower_case": True, "errors": "replace", "model_max_length": MODEL_MAX_LENGTH,
            "tokenizer_class": "CLIPTokenizer"}


def shipped_tokenizer(name: str) -> CLIPTokenizerFast:
    """SDXL's tokenizer `name` ("tokenizer" or "tokenizer_2") from the shipped files; reads nothing
    else and writes nothing."""
    settings = {key: value for key, value in tokenizer_config(name).items() if key != "tokenizer_class"}
    return CLIPTokenizerFast.from_pretrained(FILES, local_files_only=True, **settings)


def write_tokenizer_folder(dst: Path, name: str) -> None:
    """Writes SDXL's tokenizer folder `name` (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) into `dst`, which `CLIPTokenizer.from_pretrained` loads."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for file in DATA_FILES:
        shutil.copyfile(FILES / file, dst / file)
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(name), indent=2) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(special_tokens(name), indent=2) + "\n")
