"""Text corpora to token windows: evaluation windows (GPTQ protocol) and seeded calibration samples.

Built-in corpora are the files shipped in the repository's `data/` folder (see `data/README.md`):
WikiText-2 (evaluation and calibration), a detokenized view of its validation split, and three plays of
Shakespeare as a second evaluation text. Any other argument is read as a UTF-8 text file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from anybit.errors import AnybitError

BUILTIN_CORPORA = {
    "wikitext2": "wiki.test.raw",  # evaluation
    "wikitext2-valid": "wiki.valid.tokens",  # calibration
    "wikitext2-valid-detok": "wiki.valid.tokens",  # calibration, read through `detokenize_wikitext`
    "shakespeare": "shakespeare.txt",  # a second evaluation text, never used for calibration
}


def data_dir() -> Path:
    """Folder of the shipped corpora: $ANYBIT_DATA, the wheel's copy, or the source checkout's data/."""
    if "ANYBIT_DATA" in os.environ:
        return Path(os.environ["ANYBIT_DATA"])
    here = Path(__file__).resolve().parent
    for candidate in (here / "data", here.parents[1] / "data"):
        if (candidate / BUILTIN_CORPORA["wikitext2"]).is_file():
            return candidate
    raise AnybitError("the shipped data/ folder was not found; set ANYBIT_DATA to its location")


def resolve_corpus(name_or_path: str) -> Path:
    """Path of a built-in corpus name or of a text file."""
    if name_or_path in BUILTIN_CORPORA:
        return data_dir() / BUILTIN_CORPORA[name_or_path]
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        known = ", ".join(BUILTIN_CORPORA)
        raise AnybitError(f"dataset not found: {name_or_path} (give a text file or one of: {known})")
    return path


def load_corpus(name_or_path: str) -> str:
    """The text of a built-in corpus (after its view, if it has one) or of a text file."""
    path = resolve_corpus(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AnybitError(f"cannot read {path} as UTF-8 text: {exc}") from exc
    view = CORPUS_VIEWS.get(name_or_path)
    return text if view is None else view(text)


# WikiText's word-tokenized spacing, undone: (pattern, replacement), applied in order
_WIKITEXT_SPACING = [
    (re.compile(r" @([-,.])@ "), r"\1"),  # 1 @,@ 000 -> 1,000; well @-@ known -> well-known
    (re.compile(r" ([.,;:!?%)\]}]|'s|'re|'ve|'d|'ll|'m|'t)(?=\s|$)"), r"\1"),  # no space before closing marks
    (re.compile(r"([(\[{$]) "), r"\1"),  # no space after opening brackets
    (re.compile(r'" ([^"\n]*?) "'), r'"\1"'),  # "a quote" inside its quotation marks
    (re.compile(r"(?m)^ = (.*) = $"), r"= \1 ="),  # headings keep their markers, without the outer spaces
]


def detokenize_wikitext(text: str) -> str:
    """WikiText's tokenized spacing (" @-@ ", " , ", "( x )") turned back into ordinary prose spacing.

    An approximation: the release's `<unk>` words stay as they are, and quotation marks are paired per line.
    """
    for pattern, replacement in _WIKITEXT_SPACING:
        text = pattern.sub(replacement, text)
    return text


CORPUS_VIEWS: dict[str, Callable[[str], str]] = {"wikitext2-valid-detok": detokenize_wikitext}


def tokenize_corpus(tokenizer, text: str) -> torch.Tensor:
    """The whole text tokenized once, as a 1-D int64 tensor (no special tokens added)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids.to(torch.int64)


def check_token_ids(ids: torch.Tensor, embedding_rows: int) -> torch.Tensor:
    """`ids`, once every id is known to have a row in the model's embedding (the tokenizer may be foreign)."""
    if ids.numel() and int(ids.max()) >= embedding_rows:
        raise AnybitError(
            f"the tokenizer produced token id {int(ids.max())}, but the model's embedding has {embedding_rows} rows: "
            "tokenizer and model do not belong together"
        )
    return ids


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens from the start; the incomplete tail is dropped."""
    n = ids.numel() // seqlen
    if n == 0:
        raise AnybitError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at uniformly random starts, reproducible from `seed`."""
    if ids.numel() <= seqlen:
        raise AnybitError(f"calibration text has {ids.numel()} tokens, needs more than --seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
