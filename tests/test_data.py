import hashlib
import re

import pytest

from anybit.data import BUILTIN_CORPORA, data_dir, detokenize_wikitext, load_corpus


@pytest.mark.parametrize(
    ("tokenized", "prose"),
    [
        ("a well @-@ known lobster , the 1 @,@ 000 pots .", "a well-known lobster, the 1,000 pots."),
        ("a length of 60 cm ( 24 in ) ; it isn 't red", "a length of 60 cm (24 in); it isn't red"),
        ('becoming " lobster red " on cooking', 'becoming "lobster red" on cooking'),
        (" = = Description = = \n", "= = Description = =\n"),
    ],
)
def test_detokenize_wikitext(tokenized: str, prose: str) -> None:
    assert detokenize_wikitext(tokenized) == prose


def test_shipped_corpora_match_their_recorded_checksums() -> None:
    """Every built-in corpus file is present and byte for byte the one data/README.md describes."""
    readme = (data_dir() / "README.md").read_text()
    for name in set(BUILTIN_CORPORA.values()):
        listed = re.search(rf"`{re.escape(name)}` \|[^\n]*`([0-9a-f]{{64}})`", readme)
        assert listed, f"{name} has no checksum in data/README.md"
        assert hashlib.sha256((data_dir() / name).read_bytes()).hexdigest() == listed.group(1)


def test_detokenized_view_keeps_the_words() -> None:
    raw, detok = load_corpus("wikitext2-valid"), load_corpus("wikitext2-valid-detok")
    assert " @-@ " in raw and " @-@ " not in detok and " , " not in detok
    assert raw.split()[:3] == detok.split()[:3] and len(detok) < len(raw)
    assert "Hamlet" in load_corpus("shakespeare")
