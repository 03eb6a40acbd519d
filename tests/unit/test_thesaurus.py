"""WordNet synonyms for the cache policy: the index format, inflections, errors, and
the installed WordNet 3.1."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragplane.errors import ConfigError
from ragplane.service.thesaurus import DEFAULT_WORDNET_DIR, Thesaurus, default_thesaurus

# a few lines in WordNet's index format: lemma pos synset_cnt p_cnt [ptrs] sense_cnt
# tagsense_cnt synset_offsets (the real files start with an indented license header)
INDEX = {
    "noun": """  1 license header line
shop n 2 2 @ ~ 2 1 00000010 00000011
store n 2 1 @ 2 1 00000010 00000012
box n 1 0 1 0 00000013
a_la_carte n 1 0 1 0 00000014
""",
    "verb": """start v 2 1 @ 2 2 00000020 00000021
begin v 1 0 1 1 00000020
close v 1 0 1 1 00000022
open v 1 1 ! 1 1 00000023
""",
    "adj": "fast a 1 0 1 1 00000030\nquick a 1 0 1 1 00000030\n",
    "adv": "",
}


def _write(tmp_path: Path, index: dict[str, str]) -> Path:
    for pos, text in index.items():
        (tmp_path / f"index.{pos}").write_text(text, encoding="utf-8")
    return tmp_path


def test_words_in_one_synset_are_synonyms_in_any_inflection(tmp_path: Path) -> None:
    index = dict(INDEX, adv="fast r 1 0 1 0 00000040\n")
    th = Thesaurus.load(_write(tmp_path, index))
    assert th.synonyms("shop", "store")
    assert th.synonyms("shops", "stores")  # plural -> lemma
    assert th.synonyms("started", "begin")  # -ed -> lemma
    assert th.synonyms("quickest", "fast")  # -est -> lemma
    assert not th.synonyms("open", "close")  # antonyms never share a synset
    assert not th.synonyms("store", "box")
    assert not th.synonyms("shop", "shops")  # the same word: a stem match, not a synonym
    assert not th.synonyms("unknown", "shop")


def test_a_missing_or_broken_index_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"index\.noun"):
        Thesaurus.load(tmp_path)
    broken = dict(INDEX, verb="start v x 0 1 1 00000020\n")
    with pytest.raises(ConfigError, match=r"index\.verb"):
        Thesaurus.load(_write(tmp_path, broken))


def test_the_installed_wordnet_is_found_and_knows_common_synonyms() -> None:
    assert (DEFAULT_WORDNET_DIR / "index.noun").is_file(), "run `make install`"
    th = default_thesaurus()
    assert th is not None
    assert th is default_thesaurus()  # read once
    assert th.synonyms("begin", "start")
    assert th.synonyms("kid", "child")
    assert th.synonyms("cancelled", "scrubbed")
    assert not th.synonyms("puppy", "kitten")
    assert not th.synonyms("increase", "decrease")
