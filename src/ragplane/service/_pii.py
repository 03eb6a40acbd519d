"""PII and secret scanners: regular expressions find candidates, validators decide.

Each scanner is a compiled pattern that is deliberately a little loose, followed by
a validator that knows the structure of the thing: the Luhn check of a payment
card, the mod-97 check of an IBAN (and its length per country), the area/group/
serial ranges of a US SSN, the control letter of a Spanish DNI/NIE, the key of a
French NIR, the prefixes a UK NINO may not have. Phone numbers have no checksum, so
their validator looks at shape instead (an international prefix, an area code in
brackets, a national trunk ``0``, the North-American 3-3-4 grouping) and refuses
dates, IP addresses and ZIP+4 codes; a bare run of digits counts only when a phone
word (``call``, ``tel``, ``mobile`` …) stands next to it. Secrets are the
well-known prefixed token formats plus ``password=`` / ``api_key:`` style
assignments (only the value is the finding).

Overlaps are settled by priority, then length: a secret beats a national id (whose
checksums are stronger than Luhn's: a French NIR can pass both), a national id a
card, a card an IBAN, an IBAN an email, an email a phone number, so a card's digits
are never also reported as a phone number.

Everything is stdlib ``re``, one pass per scanner, linear in the text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = [
    "PII_KINDS",
    "Finding",
    "es_dni_valid",
    "fr_nir_valid",
    "iban_valid",
    "luhn_valid",
    "scan_pii",
    "us_ssn_valid",
]

PII_KINDS = ("secret", "national_id", "payment_card", "iban", "email", "phone")
_PRIORITY = {kind: i for i, kind in enumerate(PII_KINDS)}


@dataclass(frozen=True)
class Finding:
    """One thing a scanner found: its kind, where it is in the scanned text, and detail."""

    kind: str
    start: int
    end: int
    score: float = 1.0
    detail: str = ""


# --------------------------------------------------------------------------- checksums


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of payment cards; ``digits`` holds digits only."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# Lengths of the IBANs of the SWIFT registry's countries (the common ones; an unknown
# country still passes on mod 97 with a length between 15 and 34).
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BR": 29, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18,
    "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22,
    "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29,
    "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def iban_valid(iban: str) -> bool:
    """Mod-97 check of an IBAN given without spaces (upper case), and its length."""
    if not (15 <= len(iban) <= 34) or not iban[:2].isalpha() or not iban[2:4].isdigit():
        return False
    expected = _IBAN_LENGTHS.get(iban[:2])
    if expected is not None and expected != len(iban):
        return False
    rearranged = iban[4:] + iban[:4]
    try:
        number = int("".join(str(int(ch, 36)) for ch in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def us_ssn_valid(area: str, group: str, serial: str) -> bool:
    """The SSA's rules: no area 000, 666 or 900-999, no group 00, no serial 0000."""
    if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
        return False
    # numbers the SSA voided after they were printed in advertisements
    return f"{area}{group}{serial}" not in ("078051120", "219099999", "123456789")


_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def es_dni_valid(number: str, letter: str) -> bool:
    """Spanish DNI (8 digits) or NIE (X/Y/Z + 7 digits): the control letter."""
    first = number[0].upper()
    if first in "XYZ":
        number = str("XYZ".index(first)) + number[1:]
    return _DNI_LETTERS[int(number) % 23] == letter.upper()


def fr_nir_valid(nir: str) -> bool:
    """French NIR (social security number): 13 characters and a key, 97 - n mod 97."""
    body, key = nir[:13].upper(), nir[13:]
    body = body.replace("2A", "19").replace("2B", "18")  # Corsica
    if not body.isdigit():
        return False
    return 97 - int(body) % 97 == int(key)


# --------------------------------------------------------------------------- patterns

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9_%+-])?"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)
# 12-19 digits, single spaces or dashes allowed between them
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){11,18}(?![\w-])")
_IBAN = re.compile(r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}")
_SSN = re.compile(r"(?<![\w-])(\d{3})([- ]?)(\d{2})\2(\d{4})(?![\w-])")
_NINO = re.compile(
    r"(?<!\w)(?!BG|GB|KN|NK|NT|TN|ZZ)([A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z])"
    r" ?(\d{2}) ?(\d{2}) ?(\d{2}) ?([A-D])(?!\w)",
    re.IGNORECASE,
)
_DNI = re.compile(r"(?<![\w-])([XYZ]-?\d{7}|\d{8})-?([A-Z])(?![\w-])")
_NIR = re.compile(
    r"(?<![\w])([12]) ?(\d{2}) ?(\d{2}) ?(\d{2}|2[AB]) ?(\d{3}) ?(\d{3}) ?(\d{2})(?!\w)",
    re.IGNORECASE,
)
# a phone-number candidate: optional + or 00, digits with single separators, brackets,
# and an optional extension
_PHONE = re.compile(
    r"(?<![\w+/.:-])\+?\(?\d[\d().\- /]{4,22}\d(?:\s?(?:x|ext\.?|#)\s?\d{1,6})?(?![\w/])"
)
_EXTENSION = re.compile(r"\s?(?:x|ext\.?|#)\s?\d{1,6}$")
_DIGITS = re.compile(r"\d+")
_NOT_SEPARATOR = re.compile(r"[\d()]")
_ZIP4 = re.compile(r"\d{5}-\d{4}")
_PHONE_CONTEXT = re.compile(
    r"\b(?:phone|tel|telephone|mobile|mob|cell|cellphone|call|calling|fax|whats\s?app|sms|"
    r"text\s+me|dial|reach\s+me|landline|hotline|desk|office)\b",
    re.IGNORECASE,
)
_SSN_CONTEXT = re.compile(r"\b(?:ssn|social\s+security|ss\s*#|taxpayer|tin)\b", re.IGNORECASE)
_DATE_SHAPE = re.compile(r"\d{4}[-./ ]\d{1,2}[-./ ]\d{1,2}|\d{1,2}[-./ ]\d{1,2}[-./ ]\d{2,4}")
_IP_SHAPE = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")

_SECRETS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "private_key",
        re.compile(
            r"-----BEGIN (?P<label>(?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY"
            r"(?: BLOCK)?)-----.*?(?:-----END (?P=label)-----|\Z)",
            re.DOTALL,
        ),
    ),
    ("anthropic_api_key", re.compile(r"(?<![\w-])sk-ant-[A-Za-z0-9_-]{20,}")),
    ("openai_api_key", re.compile(r"(?<![\w-])sk-(?!ant-)[A-Za-z0-9_-]{20,}")),
    ("stripe_key", re.compile(r"(?<![\w-])[rs]k_(?:live|test)_[A-Za-z0-9]{16,}")),
    ("aws_access_key_id", re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b")),
    (
        "github_token",
        re.compile(r"(?<![\w-])(?:gh[pousr]_[A-Za-z0-9]{30,255}|github_pat_\w{22,255})"),
    ),
    ("slack_token", re.compile(r"(?<![\w-])xox[abposre]-[A-Za-z0-9-]{10,}")),
    ("slack_webhook", re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9/]{20,}")),
    ("google_api_key", re.compile(r"(?<![\w-])AIza[0-9A-Za-z_-]{35}")),
    ("jwt", re.compile(r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")),
    ("bearer_token", re.compile(r"\bBearer\s+(?P<value>[A-Za-z0-9._~+/-]{20,}=*)")),
    (
        "credential_assignment",
        re.compile(
            r"(?i)(?<![a-z0-9])(?:password|passwd|pwd|passphrase|secret|client[_-]?secret|secret[_-]?key|"
            r"api[_-]?key|apikey|access[_-]?key|access[_-]?token|auth[_-]?token|private[_-]?key|"
            r"aws_secret_access_key)\b[\"']?\s{0,3}(?:[:=]|=>)\s{0,3}[\"']?"
            r"(?P<value>[^\s\"',;]{4,200})"
        ),
    ),
)
_PLACEHOLDER_VALUE = re.compile(
    r"^(?:\*+|x+|\.+|<[^>]*>|\$\{?\w+\}?|%\w+%|\{\{.*\}\}|null|none)$", re.I
)


# --------------------------------------------------------------------------- scanners


def _emails(text: str) -> Iterator[Finding]:
    for m in _EMAIL.finditer(text):
        yield Finding("email", m.start(), m.end())


def _cards(text: str) -> Iterator[Finding]:
    for m in _CARD.finditer(text):
        raw = m.group()
        digits = raw.replace(" ", "").replace("-", "")
        n = len(digits)
        if digits[0] not in "123456" or len(set(digits)) == 1:
            continue
        if n == 12 and digits[0] not in "56":  # 12 digits: Maestro only
            continue
        if luhn_valid(digits):
            yield Finding("payment_card", m.start(), m.end(), detail=f"{n}_digits")


def _ibans(text: str) -> Iterator[Finding]:
    for m in _IBAN.finditer(text):
        raw = m.group()
        compact = raw.replace(" ", "")
        expected = _IBAN_LENGTHS.get(compact[:2])
        lengths = [expected] if expected else range(min(len(compact), 34), 14, -1)
        for length in lengths:
            if length > len(compact) or not iban_valid(compact[:length]):
                continue
            end = m.start() + _offset_of_nth(raw, length)
            if end < len(text) and text[end].isalnum():
                break  # cut in the middle of a word: not an IBAN
            yield Finding("iban", m.start(), end, detail=compact[:2])
            break


def _offset_of_nth(raw: str, n: int) -> int:
    """The offset just after the ``n``-th character of ``raw`` that is not a space."""
    seen = 0
    for i, ch in enumerate(raw):
        seen += ch != " "
        if seen == n:
            return i + 1
    return len(raw)


def _national_ids(text: str) -> Iterator[Finding]:
    for m in _SSN.finditer(text):
        area, sep, group, serial = m.groups()
        if not us_ssn_valid(area, group, serial):
            continue
        if not sep and not _SSN_CONTEXT.search(text, max(0, m.start() - 40), m.start()):
            continue  # nine bare digits are an SSN only when something says so
        yield Finding("national_id", m.start(), m.end(), detail="us_ssn")
    for m in _NINO.finditer(text):
        yield Finding("national_id", m.start(), m.end(), detail="uk_nino")
    for m in _DNI.finditer(text):
        number, letter = m.groups()
        if es_dni_valid(number.replace("-", ""), letter):
            detail = "es_nie" if number[0].isalpha() else "es_dni"
            yield Finding("national_id", m.start(), m.end(), detail=detail)
    for m in _NIR.finditer(text):
        if fr_nir_valid("".join(m.groups())):
            yield Finding("national_id", m.start(), m.end(), detail="fr_nir")


def _phone_shape_ok(body: str, context: bool) -> bool:
    """Whether ``body`` (extension removed) is shaped like a phone number."""
    groups = _DIGITS.findall(body)
    digits = sum(len(g) for g in groups)
    if body[0] == "+":
        return 8 <= digits <= 15 and body[1] != "0"
    if body.count("(") != body.count(")") or body.count("(") > 1:
        return False
    if _DATE_SHAPE.fullmatch(body) or _IP_SHAPE.fullmatch(body) or _ZIP4.fullmatch(body):
        return False
    if body.startswith("00") and body[2:3] not in ("", "0"):  # international call prefix
        return 10 <= digits <= 15
    if "(" in body:
        return 7 <= digits <= 13
    if len(groups) == 1:  # a bare run of digits: a national number (0 then not 0), or context
        return (body[0] == "0" and body[1] != "0" and 10 <= digits <= 11) or (
            context and 9 <= digits <= 13
        )
    if not 7 <= digits <= 13 or any(len(g) > 8 for g in groups[1:]):
        return False
    if len(set(_NOT_SEPARATOR.sub("", body))) > 1:
        return False  # one kind of separator, as people write them
    if [len(g) for g in groups] == [3, 2, 4]:
        return False  # the shape of a US SSN (valid or not), not a phone number
    if body[0] == "0":  # national trunk prefix
        return digits >= 9 and body[1] != "0"
    nanp = [len(g) for g in groups] == [3, 3, 4] and body[0] in "23456789"
    return nanp or (context and digits >= 8)


def _phones(text: str) -> Iterator[Finding]:
    previous_end = 0
    for m in _PHONE.finditer(text):
        start, end = m.span()
        ext = _EXTENSION.search(m.group())
        body_end = start + ext.start() if ext else end
        # a phone word shortly before (not past another number) or right after
        context = (
            _PHONE_CONTEXT.search(text, max(previous_end, start - 25), start) is not None
            or _PHONE_CONTEXT.search(text, end, min(len(text), end + 12)) is not None
        )
        previous_end = end
        # a candidate may have swallowed a neighbouring number: try dropping a group
        # at either end before giving up
        tries = [(start, body_end, end)]
        spaces = [i for i in range(start, body_end) if text[i] == " "]
        if spaces:
            tries += [(start, spaces[-1], spaces[-1]), (spaces[0] + 1, body_end, end)]
        for s, b, e in tries:
            body = text[s:b].rstrip(" -./")
            if body and body[-1].isdigit() and _phone_shape_ok(body, context):
                yield Finding("phone", s, e if b == body_end else s + len(body))
                break


def _secrets(text: str) -> Iterator[Finding]:
    for detail, pattern in _SECRETS:
        for m in pattern.finditer(text):
            if "value" in pattern.groupindex:
                if _PLACEHOLDER_VALUE.match(m.group("value")):
                    continue
                start, end = m.span("value")
            else:
                start, end = m.span()
            yield Finding("secret", start, end, detail=detail)


_SCANNERS: dict[str, Callable[[str], Iterator[Finding]]] = {
    "secret": _secrets,
    "payment_card": _cards,
    "iban": _ibans,
    "national_id": _national_ids,
    "email": _emails,
    "phone": _phones,
}


def scan_pii(text: str, kinds: tuple[str, ...] = PII_KINDS) -> list[Finding]:
    """Every PII/secret finding of ``kinds`` in ``text``, without overlaps, in text order."""
    found: list[Finding] = []
    for kind in kinds:
        found.extend(_SCANNERS[kind](text))
    if len(found) < 2:
        return found
    found.sort(key=lambda f: (_PRIORITY[f.kind], f.start - f.end))
    kept: list[Finding] = []
    for f in found:
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    kept.sort(key=lambda f: f.start)
    return kept
