"""Prompt-injection heuristics: weighted features, combined as a noisy OR.

The classifier looks for what injections have to say to work, not for known
attack strings:

- ``override``: an instruction-override verb aimed at instructions, rules or the
  system prompt ("disregard the earlier guidelines"), in English, German, French,
  Spanish and Italian; the object has to be instruction-like, so "ignore the typo"
  or "forget my old address" do not count;
- ``persona``: a role or persona hijack ("you are now …", "pretend you have no
  restrictions", DAN, developer mode), where the persona is an unrestricted one;
  "act as a reviewer for my essay" is not;
- ``exfiltration``: requests for the system prompt, hidden instructions, or the
  assistant's keys and credentials, and requests to send conversation data to an
  address or URL;
- ``delimiter``: role tags and chat-template tokens in user text (``</system>``,
  ``<|im_start|>``, ``[INST]``, ``### system``, ``<<SYS>>``), fake end-of-context
  markers;
- ``indirect``: text that addresses the AI reading it ("note to the AI
  assistant", "if you are a language model"), asks to hide actions from the user,
  or smuggles a tool call;
- ``encoded``: base64 and hex runs, ROT13, reversed text and leetspeak are decoded
  (one level) and the decoded text is scored with the same features; an encoded
  payload counts only when what it decodes to would count.

Each feature has a weight (how sure one hit makes us); the score is
``1 - prod(1 - w)`` over the features that fired, so one strong feature or two
weaker ones pass the default threshold of 0.5. The rule table itself is
:mod:`ragplane.service._injection_features`; this module normalises, decodes and
scores. The weights and rules were written from general knowledge of injection attacks
before measuring on any corpus; see docs/guardrails.md for how they do.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
import urllib.parse
from dataclasses import dataclass

from ragplane.service._injection_features import CASED_FEATURES, FEATURES, TRIGGER

__all__ = ["HeuristicInjectionClassifier", "InjectionEvidence"]


@dataclass(frozen=True)
class InjectionEvidence:
    """What the classifier saw: the score, the features that fired and their spans."""

    score: float
    features: tuple[str, ...]
    start: int
    end: int


_NORMALISE = str.maketrans(
    {
        "\u200b": "", "\u200c": "", "\u200d": "", "\u2060": "", "\ufeff": "", "\u00ad": "",
        # Cyrillic and Greek look-alikes of Latin letters
        "\u0430": "a", "\u0435": "e", "\u043e": "o", "\u0440": "p", "\u0441": "c",
        "\u0443": "y", "\u0445": "x", "\u0456": "i",
        "\u03bf": "o", "\u03b1": "a", "\u03b5": "e", "\u03b9": "i",
    }
)  # fmt: skip
_LEET = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"}
)
_SPACED = re.compile(r"\b(?:[A-Za-z][ .\-_*]){3,}[A-Za-z]\b")  # "i g n o r e"
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{16,}={0,2}(?![A-Za-z0-9+/=_-])")
_HEX = re.compile(r"\b(?:[0-9a-fA-F]{2}[ :]?){12,}\b")
_LEET_HINT = re.compile(r"[a-z][0-9@$!][a-z]|[0-9@$][a-z]{2}", re.IGNORECASE)
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|x([0-9a-fA-F]{2}))")
_BINARY = re.compile(r"\b(?:[01]{8}\s?){6,}")
_MORSE = re.compile(r"(?:[.\-]{1,7}[ /]+){8,}[.\-]{1,7}")
_MORSE_CODE = {
    ".-": "a", "-...": "b", "-.-.": "c", "-..": "d", ".": "e", "..-.": "f", "--.": "g",
    "....": "h", "..": "i", ".---": "j", "-.-": "k", ".-..": "l", "--": "m", "-.": "n",
    "---": "o", ".--.": "p", "--.-": "q", ".-.": "r", "...": "s", "-": "t", "..-": "u",
    "...-": "v", ".--": "w", "-..-": "x", "-.--": "y", "--..": "z", "-----": "0",
    ".----": "1", "..---": "2", "...--": "3", "....-": "4", ".....": "5", "-....": "6",
    "--...": "7", "---..": "8", "----.": "9",
}  # fmt: skip
# a long text is scored in windows of this many characters (overlapping by _OVERLAP),
# and its score is the best window's: padding cannot push an injection out of sight
_WINDOW = 8_000
_OVERLAP = 400


def _decode_base64(blob: str) -> str | None:
    try:
        raw = base64.b64decode(blob + "=" * (-len(blob) % 4), altchars=b"-_", validate=False)
    except (binascii.Error, ValueError):
        return None
    return _printable(raw)


def _decode_hex(blob: str) -> str | None:
    try:
        raw = bytes.fromhex(re.sub(r"[ :]", "", blob))
    except ValueError:
        return None
    return _printable(raw)


def _decode_morse(code: str) -> str:
    words = re.split(r"\s*/\s*|\s{3,}", code.strip())
    return " ".join("".join(_MORSE_CODE.get(sym, "") for sym in w.split()) for w in words)


def _decode_binary(bits: str) -> str:
    raw = bytes(int(b, 2) for b in re.findall(r"[01]{8}", bits))
    return _printable(raw) or ""


def _untag(ch: str) -> str:
    """Unicode tag characters (U+E0020..E007E) smuggle invisible ASCII."""
    return chr(ord(ch) - 0xE0000) if "\U000e0020" <= ch <= "\U000e007e" else ch


def _printable(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    return text if text and letters / len(text) > 0.85 else None


class HeuristicInjectionClassifier:
    """Scores text 0..1 for prompt injection with weighted, general heuristics."""

    def __init__(
        self,
        features: tuple[tuple[str, float, re.Pattern[str]], ...] = FEATURES,
        cased_features: tuple[tuple[str, float, re.Pattern[str]], ...] = CASED_FEATURES,
    ) -> None:
        self._features = features  # patterns in lower case, matched on the lower-cased text
        self._cased = cased_features

    def score(self, text: str) -> float:
        return self.evidence(text).score

    def evidence(self, text: str) -> InjectionEvidence:
        """The score with the features that fired and the span that holds them."""
        if len(text) <= _WINDOW:
            return self._evidence(text)
        best = InjectionEvidence(0.0, (), 0, 0)
        for offset in range(0, len(text) - _OVERLAP, _WINDOW - _OVERLAP):
            found = self._evidence(text[offset : offset + _WINDOW])
            if found.score > best.score:
                best = InjectionEvidence(
                    found.score, found.features, offset + found.start, offset + found.end
                )
        return best

    def _evidence(self, text: str) -> InjectionEvidence:
        hits: dict[str, float] = {}
        spans: list[tuple[int, int]] = []
        plain = unicodedata.normalize("NFKC", text).translate(_NORMALISE)
        same_offsets = len(plain) == len(text)
        self._match(plain, hits, spans if same_offsets else None, "")
        if not same_offsets:
            spans.append((0, len(text)))
        for name, variant in self._variants(plain):
            if not TRIGGER.search(variant):
                continue  # no word any feature starts from: skip the full pass
            found: dict[str, float] = {}
            self._match(variant, found, None, name)
            # what the plain text already showed is not counted twice
            new = {k: w for k, w in found.items() if k.removeprefix(name) not in hits}
            if new:
                hits.update(new)
                spans.append((0, len(text)))
        for m in _BASE64.finditer(plain):
            self._encoded(_decode_base64(m.group()), "base64", hits, spans, m.span())
        for m in _HEX.finditer(plain):
            self._encoded(_decode_hex(m.group()), "hex", hits, spans, m.span())
        score = 1.0
        for weight in hits.values():
            score *= 1.0 - weight
        start = min((s for s, _ in spans), default=0)
        end = max((e for _, e in spans), default=0)
        return InjectionEvidence(round(1.0 - score, 4), tuple(sorted(hits)), start, end)

    def _match(
        self,
        text: str,
        hits: dict[str, float],
        spans: list[tuple[int, int]] | None,
        prefix: str,
    ) -> None:
        low = text.lower()
        if spans is not None and len(low) != len(text):
            spans.append((0, len(text)))  # lower() moved offsets: the whole text
            spans = None
        for features, subject in ((self._features, low), (self._cased, text)):
            for name, weight, pattern in features:
                key = f"{prefix}{name}"
                if hits.get(key, 0.0) >= weight:
                    continue
                m = pattern.search(subject)
                if m is None:
                    continue
                hits[key] = weight
                if spans is not None:
                    spans.append(m.span())

    def _variants(self, text: str) -> list[tuple[str, str]]:
        """Obfuscated spellings of the text, undone: leetspeak, spacing, ROT13, reversal."""
        out: list[tuple[str, str]] = []
        if _LEET_HINT.search(text):
            out.append(("leetspeak:", text.translate(_LEET)))
        if _SPACED.search(text):
            out.append(("spaced:", _SPACED.sub(lambda m: re.sub(r"[ .\-_*]", "", m.group()), text)))
        if len(_PERCENT.findall(text)) >= 3:
            out.append(("percent:", urllib.parse.unquote(text)))
        if len(_ESCAPE.findall(text)) >= 3:
            out.append(
                ("escapes:", _ESCAPE.sub(lambda m: chr(int(m.group(1) or m.group(2), 16)), text))
            )
        if any("\U000e0000" <= ch <= "\U000e007f" for ch in text):
            out.append(("unicode_tags:", "".join(_untag(ch) for ch in text)))
        binary = [_decode_binary(m.group()) for m in _BINARY.finditer(text)]
        if any(binary):
            out.append(("binary:", " ".join(b for b in binary if b)))
        morse = [_decode_morse(m.group()) for m in _MORSE.finditer(text)]
        if morse:
            out.append(("morse:", " ".join(morse)))
        out.append(("rot13:", codecs.encode(text, "rot13")))
        out.append(("reversed:", text[::-1]))
        return out

    def _encoded(
        self,
        decoded: str | None,
        how: str,
        hits: dict[str, float],
        spans: list[tuple[int, int]],
        span: tuple[int, int],
    ) -> None:
        if not decoded:
            return
        inner: dict[str, float] = {}
        if TRIGGER.search(decoded):
            self._match(decoded, inner, None, "")
        if inner:
            weight = 1.0
            for w in inner.values():
                weight *= 1.0 - w
            hits[f"{how}:" + "+".join(sorted(inner))] = 1.0 - weight
            spans.append(span)
