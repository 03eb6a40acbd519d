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
weaker ones pass the default threshold of 0.5. The weights and rules were written
from general knowledge of injection attacks before measuring on any corpus; see
docs/guardrails.md for how they do.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
from dataclasses import dataclass

__all__ = ["HeuristicInjectionClassifier", "InjectionEvidence"]


@dataclass(frozen=True)
class InjectionEvidence:
    """What the classifier saw: the score, the features that fired and their spans."""

    score: float
    features: tuple[str, ...]
    start: int
    end: int


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE | re.MULTILINE)


_INSTRUCTIONS_EN = (
    r"(?:instructions?|prompts?|rules?|directives?|guidelines?|guardrails?|constraints?|"
    r"restrictions?|programming|commands?|orders|polic(?:y|ies)|safety\s+(?:rules|"
    r"guidelines|filters?|protocols?)|filters?|training|system\s+(?:prompt|message)|"
    r"context|directions|configuration|limitations?)"
)
_QUALIFIER_EN = r"(?:previous|prior|above|earlier|preceding|initial|original|old|existing|all|any|every|your|the|these|those|system|developer)"  # noqa: E501

# (name, weight, pattern)
_FEATURES: tuple[tuple[str, float, re.Pattern[str]], ...] = (
    (
        "override",
        0.75,
        _rx(
            r"\b(?:ignore|disregard|forget|bypass|override|overrule|skip|neglect|abandon|"
            r"discard|drop|dismiss|set\s+aside|throw\s+out|stop\s+following|do\s+not\s+follow|"
            r"don'?t\s+follow|no\s+longer\s+follow)\s+(?:(?:all|any|of|every|each|the|your|my|"
            r"these|those|its)\s+)*"
            + _QUALIFIER_EN
            + r"\b(?:\s+[\w'\u2019-]+){0,3}?\s+"
            + _INSTRUCTIONS_EN
            + r"\b"
        ),
    ),
    (
        "override",
        0.7,
        _rx(
            r"\b(?:ignore|disregard|forget)\s+(?:all\s+|everything\s+)?(?:(?:that\s+)?(?:was\s+)?"
            r"(?:said|written|told|stated)\s+)?(?:above|before\s+this|prior\s+to\s+this|"
            r"you\s+(?:were|have\s+been)\s+(?:told|given|instructed))"
        ),
    ),
    (
        "override",
        0.45,
        _rx(
            r"(?:\bnew|\bupdated|\breal|\btrue|\bactual|\bsecret|\bhidden|\boverriding|"
            r"\bpriority|\badmin(?:istrator)?|\bsystem)\s+(?:instructions?|directives?|"
            r"orders|commands?|task)\s*[:\-]"
        ),
    ),
    (
        "override",
        0.35,
        _rx(
            r"\bfrom\s+now\s+on\b.{0,40}\b(?:you|your)\b|\binstead\s*,?\s+(?:you\s+(?:must|"
            r"will|should)|(?:only\s+)?(?:reply|respond|answer|say|output|print|write))\b"
        ),
    ),
    # German, French, Spanish, Italian: verb … instruction noun
    (
        "override",
        0.75,
        _rx(
            r"\b(?:ignorier\w*|vergiss|vergessen\s+sie|missachte\w*|übergeh\w*|verwirf|"
            r"ignore[rz]?|ignorez|oublie[rz]?|néglige[rz]?|ignora(?:r|d)?|olvida(?:r|d)?|"
            r"omite|descarta|dimentica(?:re)?|trascura|non\s+considerare)"
            r"(?:\s+[\w'\u2019-]+){0,5}?\s+(?:anweisungen|instruktionen|regeln|vorgaben|befehle|"
            r"richtlinien|instructions|consignes|règles|directives|instrucciones|reglas|"
            r"indicaciones|directrices|órdenes|normas|istruzioni|regole|direttive|"
            r"indicazioni)\b"
        ),
    ),
    (
        "persona",
        0.45,
        _rx(
            r"\byou\s+are\s+(?:now|no\s+longer)\b|\bfrom\s+now\s+on\s+you\s+(?:are|will\s+be|"
            r"act)\b|\bdu\s+bist\s+(?:jetzt|nun|ab\s+sofort)\b|\b(?:tu\s+es|vous\s+êtes)\s+"
            r"(?:maintenant|désormais)\b|\bahora\s+eres\b|\bora\s+sei\b|\bd'ora\s+in\s+poi\b"
        ),
    ),
    (
        "persona",
        0.7,
        _rx(
            r"\b(?:act|acting|behave|respond|answer|operate|pretend|roleplay|role-play|play|"
            r"become|be|simulate|emulate|you\s+are|you'?re)\b.{0,60}?\b(?:(?:with(?:out)?|no|"
            r"free\s+(?:of|from)|zero|any)\s+(?:any\s+|all\s+|the\s+|your\s+)?(?:ethical\s+|"
            r"moral\s+|content\s+|safety\s+)?(?:restrictions?|limits|limitations|filters?|"
            r"filtering|censorship|guidelines|rules|boundaries|morals?|ethics|guardrails|"
            r"policies)|unrestricted|unfiltered|uncensored|unbound|unlimited|jailbroken|"
            r"unaligned|amoral)\b"
        ),
    ),
    (
        "persona",
        0.6,
        _rx(
            r"\b(?:DAN|do\s+anything\s+now|developer\s+mode|dev\s+mode|god\s+mode|jailbreak(?:"
            r"ed)?\s+mode|sudo\s+mode|admin\s+mode|debug\s+mode|unrestricted\s+mode|"
            r"evil\s+(?:mode|twin|assistant|ai|bot))\b(?!\s+(?:is|was)\s+a\s+(?:name|film))"
        ),
    ),
    (
        "persona",
        0.5,
        _rx(
            r"\b(?:not|no\s+longer|never)\s+(?:bound|restricted|limited|constrained|governed)\s+"
            r"by\b|\b(?:has|have)\s+(?:been\s+)?(?:freed|liberated|broken\s+free|released)\s+"
            r"from\b|\bdoes\s*n[o']t\s+(?:have\s+to\s+)?(?:follow|obey|abide\s+by)\s+(?:any\s+)?"
            r"(?:rules|policies|guidelines)"
        ),
    ),
    (
        "exfiltration",
        0.7,
        _rx(
            r"\b(?:reveal|show|print|repeat|output|display|tell|disclose|leak|dump|share|give|"
            r"list|recite|copy|paste|write\s+out|spell\s+out|return|echo|expose|provide|send)"
            r"\b(?:\s+[\w'\u2019-]+){0,4}?\s+(?:(?:your|the|its|my)\s+)?(?:(?:full|entire|whole|"
            r"complete|exact|original|initial|hidden|secret|internal|confidential|private|"
            r"underlying|previous)\s+)*(?:system\s*(?:prompt|message|instructions?)|"
            r"(?:initial|original|hidden|secret|internal|developer|pre-?prompt)\s+"
            r"(?:prompt|instructions?|rules|message)|pre-?prompt|meta-?prompt)\b"
        ),
    ),
    (
        "exfiltration",
        0.55,
        _rx(
            r"\b(?:reveal|show|print|repeat|output|display|tell|disclose|leak|dump|share|give|"
            r"list|recite|what\s+(?:are|were|is))\b(?:\s+[\w'\u2019-]+){0,3}?\s+your\s+(?:own\s+)?"
            r"(?:instructions|rules|guidelines|directives|api\s+keys?|credentials|passwords?|"
            r"secrets?|tokens?|configuration|training\s+data)\b"
        ),
    ),
    (
        "exfiltration",
        0.45,
        _rx(
            r"\b(?:everything|all(?:\s+the)?\s+text|the\s+text|all\s+instructions|words)\s+"
            r"(?:above|before)\b.{0,40}\b(?:verbatim|word\s+for\s+word|exactly|in\s+full)\b|"
            r"\b(?:repeat|print|output|copy)\s+(?:everything|all(?:\s+the\s+text)?)\s+"
            r"(?:above|before|so\s+far)\b|\b(?:starting|beginning)\s+with\s+['\"]?you\s+are\b"
        ),
    ),
    (
        "exfiltration",
        0.6,
        _rx(
            r"\b(?:send|forward|post|upload|exfiltrate|transmit|email|e-mail|leak|copy|append|"
            r"include|embed)\b.{0,60}?\b(?:conversation|chat\s+history|history|messages|"
            r"credentials|api\s+keys?|tokens?|passwords?|secrets?|session|cookies?|user\s+data|"
            r"personal\s+data|environment\s+variables|memory|context)\b.{0,60}?\b(?:to|into|"
            r"at)\s+(?:https?://|www\.|[\w.+-]+@[\w-]+\.|(?:this|the\s+following|my|an?)\s+"
            r"(?:url|link|address|endpoint|server|webhook|email))"
        ),
    ),
    (
        "exfiltration",
        0.5,
        _rx(r"!\[[^\]]*\]\(https?://[^)\s]+\?[^)\s]*=(?:\{|\[|%7B|<|\$)"),
    ),
    (
        "exfiltration",
        0.7,
        _rx(
            r"\b(?:zeig\w*|gib|verrat\w*|nenn\w*|wiederhol\w*|révèle[rz]?|montre[rz]?|"
            r"affiche[rz]?|répète[rz]?|donne[rz]?|revela[rd]?|muestra|muéstrame|dime|repite|"
            r"rivela(?:re)?|mostra(?:mi)?|ripeti|dimmi)\b.{0,40}?\b(?:system[\s-]?prompt\w*|"
            r"systemanweisung\w*|prompt\s+(?:système|du\s+système|del\s+sistema|di\s+sistema)|"
            r"instructions\s+(?:initiales|cachées|système)|instrucciones\s+(?:iniciales|"
            r"ocultas|del\s+sistema)|istruzioni\s+(?:iniziali|nascoste|di\s+sistema)|"
            r"(?:versteckten|ursprünglichen)\s+anweisungen)"
        ),
    ),
    (
        "delimiter",
        0.6,
        _rx(
            r"</?\s*(?:system|assistant|sys|instructions?|admin|developer|im_start|im_end|"
            r"context|user_query|tool_result|untrusted)\s*>|<\|(?:im_start|im_end|system|"
            r"assistant|user|endoftext|eot_id|start_header_id|end_header_id)\|>|\[/?INST\]|"
            r"<</?SYS>>|\[/?(?:SYSTEM|ADMIN)\]|\{\{\s*system\s*\}\}"
        ),
    ),
    (
        "delimiter",
        0.45,
        _rx(
            r"^\s*(?:#{2,}|={3,}|-{3,}|\*{3,})\s*(?:new\s+|updated\s+)?(?:system|admin|"
            r"developer|instructions?|assistant)\b|^\s*(?:system|developer)\s*(?:message|"
            r"prompt|override|note)?\s*:\s*\S"
        ),
    ),
    (
        "delimiter",
        0.4,
        _rx(
            r"\b(?:end|close|stop)\s+of\s+(?:the\s+)?(?:user\s+input|document|context|"
            r"conversation|prompt|instructions|data|email|message)\b\s*[-=*#\])>]{2,}|"
            r"[-=*#\[(<]{2,}\s*(?:end|begin|start)\s+(?:of\s+)?(?:user\s+input|document|"
            r"system|instructions|prompt)"
        ),
    ),
    (
        "indirect",
        0.55,
        _rx(
            r"\b(?:ai|a\.i\.|assistant|llm|chatbot|chat\s*bot|language\s+model|model|agent|"
            r"bot|gpt|copilot|claude|gemini)s?\s+(?:that\s+is\s+|who\s+is\s+)?(?:reading|"
            r"processing|summari[sz]ing|parsing|analy[sz]ing|reviewing|scanning|browsing)\s+"
            r"(?:this|these|the\s+following)\b|\b(?:note|message|instructions?|attention|"
            r"important|reminder)\s+(?:to|for)\s+(?:the\s+|any\s+|all\s+)?(?:ai|a\.i\.|"
            r"assistant|llm|chatbot|language\s+model|model|agent|bot|gpt)s?\b|\bif\s+you\s+"
            r"are\s+(?:an?\s+)?(?:ai|a\.i\.|assistant|llm|chatbot|language\s+model|large\s+"
            r"language\s+model|bot|agent|automated\s+system)\b|\b(?:dear|hey|hello|hi)\s+"
            r"(?:ai|assistant|llm|chatbot|agent|bot|gpt|claude|copilot)\b\s*[,:!]"
        ),
    ),
    (
        "indirect",
        0.5,
        _rx(
            r"\b(?:do\s+not|don'?t|never|without)\s+(?:tell(?:ing)?|inform(?:ing)?|mention(?:"
            r"ing)?|notify(?:ing)?|alert(?:ing)?|let(?:ting)?|reveal(?:ing)?\s+(?:this\s+)?to|"
            r"ask(?:ing)?)\s+(?:the\s+)?(?:user|human|customer|operator|them)\b(?!\s+(?:name|"
            r"id|account))"
        ),
    ),
    (
        "indirect",
        0.35,
        _rx(
            r"\b(?:call|invoke|use|run|execute|trigger)\s+(?:the\s+)?[\w.-]+\s+(?:tool|"
            r"function|plugin|action|api)\b.{0,80}\b(?:send|delete|transfer|forward|wire|"
            r"pay|export|exfiltrate|grant|disable|remove)\b"
        ),
    ),
    (
        "indirect",
        0.3,
        _rx(
            r"\b(?:when|while|after|before)\s+(?:you\s+)?(?:summari[sz]ing|summari[sz]e|"
            r"processing|reading|answering|translating)\b.{0,60}\b(?:you\s+must|always|also|"
            r"instead|make\s+sure\s+to|be\s+sure\s+to)\b"
        ),
    ),
)

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
_MAX_SCAN = 20_000  # characters scored; an injection longer than this is split by the caller


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


def _printable(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    return text if text and letters / len(text) > 0.85 else None


class HeuristicInjectionClassifier:
    """Scores text 0..1 for prompt injection with weighted, general heuristics."""

    def __init__(self, features: tuple[tuple[str, float, re.Pattern[str]], ...] = _FEATURES):
        self._features = features

    def score(self, text: str) -> float:
        return self.evidence(text).score

    def evidence(self, text: str) -> InjectionEvidence:
        """The score with the features that fired and the span that holds them."""
        text = text[:_MAX_SCAN]
        hits: dict[str, float] = {}
        spans: list[tuple[int, int]] = []
        plain = unicodedata.normalize("NFKC", text).translate(_NORMALISE)
        same_offsets = len(plain) == len(text)
        self._match(plain, hits, spans if same_offsets else None, "")
        if not same_offsets:
            spans.append((0, len(text)))
        for name, variant in self._variants(plain):
            before = len(hits)
            self._match(variant, hits, None, name)
            if len(hits) > before:
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
        for name, weight, pattern in self._features:
            key = f"{prefix}{name}"
            if hits.get(key, 0.0) >= weight:
                continue
            m = pattern.search(text)
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
        self._match(decoded, inner, None, "")
        if inner:
            weight = 1.0
            for w in inner.values():
                weight *= 1.0 - w
            hits[f"{how}:" + "+".join(sorted(inner))] = 1.0 - weight
            spans.append(span)
