"""Rebuilds vocab.json and merges.txt beside this file from the BPE merges in an open_clip_torch wheel
(read as a zip: nothing is installed).

    pip download open_clip_torch==3.3.0 --no-deps -d /tmp/oc
    python -m jaxfuse.clip_tokenizer.build /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

from jaxfuse.clip_tokenizer import BOS, DATA_FILES, EOS, FILES
from jaxfuse.demo.architecture import byte_symbols

MERGES_IN_WHEEL = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# CLIP reads the first 49152 - 256 - 2 merges of the file: its vocabulary of 49408 ids is 2 x 256 byte
# symbols, one token per merge, BOS and EOS.
MERGE_COUNT = 48894


def read_merges(wheel: Path) -> list[str]:
    """The merges CLIP uses, "first second" each, from the wheel's gzip file (whose first line is a
    header)."""
    with zipfile.ZipFile(wheel) as archive:
        lines = gzip.decompress(archive.read(MERGES_IN_WHEEL)).decode("utf-8").split("\n")
    merges = lines[1:MERGE_COUNT + 1]
    malformed = [m for m in merges if len(m.split(" ")) != 2]
    if len(merges) != MERGE_COUNT or malformed:
        raise ValueError(f"{wheel}: expected {MERGE_COUNT} merges of two symbols, got {len(merges)} "
                         f"({len(malformed)} malformed)")
    return merges


def vocabulary(merges: list[str]) -> dict[str, int]:
    """Token -> id as CLIP numbers them: byte symbols, the same ending a word, each merge's result,
    then BOS and EOS (49406, 49407)."""
    symbols = byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in merges), BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{len(tokens) - len(vocab)} tokens appear twice")
    return vocab


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheel", type=Path, help="an open_clip_torch wheel (.whl)")
    merges = read_merges(parser.parse_args(argv).wheel)
    vocab = vocabulary(merges)
    vocab_file, merges_file = (FILES / file for file in DATA_FILES)
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {FILES}")


if __name__ == "__main__":
    main()
