"""PII and secret detection: each finder returns the spans it would replace, so redaction and its report
come from one place. Finders err towards precision on what is clearly not personal (documentation
addresses, version numbers, private IP ranges), because a redaction of ordinary text damages training data."""

from __future__ import annotations

import ipaddress
import re

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)(?![\w-])")
# RFC 2606 / 6761 names reserved for documentation never belong to anyone
_EXAMPLE_DOMAINS = ("example.com", "example.org", "example.net", "example", "test", "invalid", "localhost")
# international (+CC ...) or North American (NXX) NXX-XXXX numbers: looser patterns take dates, versions
# and tables of numbers for phones
_PHONE = re.compile(r"(?<![\w.+-])(?:\+\d{1,3}[ .-]?\(?\d{1,4}\)?(?:[ .-]\d{2,4}){2,4}"
                    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w.-])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
_IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")  # validated by ipaddress
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
_SECRET = re.compile(
    r"\b(?:sk-[A-Za-z0-9_-]{20,}|sk_live_[A-Za-z0-9]{16,}|gh[pousr]_[A-Za-z0-9]{30,}|xox[abpr]-[A-Za-z0-9-]{10,}"
    r"|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,})\b"
    r"|(?i:(?:api[_-]?key|secret|token|password|passwd)\s*[:=]\s*['\"]?)([A-Za-z0-9/+_.=-]{16,})")

KINDS = ("email", "phone", "ip", "card", "secret")
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP_ADDRESS>", "card": "<CARD_NUMBER>",
                "secret": "<SECRET>"}


def luhn_ok(digits: str) -> bool:
    total, double = 0, False
    for ch in reversed(digits):
        d = int(ch) * (2 if double else 1)
        total += d - 9 if d > 9 else d
        double = not double
    return total % 10 == 0


def _emails(text):
    for m in _EMAIL.finditer(text):
        domain = m.group(1).lower()
        if not any(domain == d or domain.endswith("." + d) for d in _EXAMPLE_DOMAINS):
            yield m.span()


def _phones(text):
    for m in _PHONE.finditer(text):
        if 9 <= sum(c.isdigit() for c in m.group()) <= 15:  # E.164 allows at most 15 digits
            yield m.span()


def _ips(text):
    for pattern in (_IPV4, _IPV6):
        for m in pattern.finditer(text):
            try:
                address = ipaddress.ip_address(m.group())
            except ValueError:
                continue
            if address.is_global:  # 127.0.0.1, 10.x, 192.168.x and documentation ranges are nobody's
                yield m.span()


def _cards(text):
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1:
            yield m.span()


def _secrets(text):
    for m in _SECRET.finditer(text):
        yield m.span(1) if m.group(1) else m.span()


FINDERS = {"email": _emails, "phone": _phones, "ip": _ips, "card": _cards, "secret": _secrets}


def redact(text: str, kinds: tuple[str, ...] | list[str] = KINDS) -> tuple[str, dict[str, int]]:
    """The text with each found span replaced by its placeholder, and how many of each kind were found.
    Secrets and cards are found first so their digits are not also taken for a phone number."""
    spans = []
    for kind in sorted(kinds, key=lambda k: ("secret", "card", "email", "ip", "phone").index(k)):
        for start, end in FINDERS[kind](text):
            if all(end <= s or start >= e for s, e, _ in spans):
                spans.append((start, end, kind))
    if not spans:
        return text, {}
    counts: dict[str, int] = {}
    out, last = [], 0
    for start, end, kind in sorted(spans):
        out += [text[last:start], PLACEHOLDERS[kind]]
        last = end
        counts[kind] = counts.get(kind, 0) + 1
    out.append(text[last:])
    return "".join(out), counts
