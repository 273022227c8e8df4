"""The checks two questions must pass before one's cached answer may answer the other, as pure functions
of their text: the same numbers, versions, dates and identifiers; the same negations; the same direction
("X to Y" is not "Y to X"; "before" is not "after"). Embeddings place "convert an int to a string" and
"convert a string to an int" almost on top of each other (cosine 0.996 with MiniLM), so none of this can
be left to a similarity threshold."""

from __future__ import annotations

import re

NUMBER_WORDS = {"zero": "0", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
                "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "fifteen": "15",
                "eighteen": "18", "twenty": "20", "thirty": "30", "forty": "40", "fifty": "50", "hundred": "100",
                "twice": "2", "dozen": "12"}  # "one", "once", "a" are too often not numbers ("a flat one", "at once")
ORDINALS = {"first": "1", "second": "2", "third": "3", "fourth": "4", "fifth": "5", "last": "-1"}
# units a number is read with: "3 weeks" is not "3 days"
UNITS = {"second": "second", "seconds": "second", "minute": "minute", "minutes": "minute", "hour": "hour",
         "hours": "hour", "day": "day", "days": "day", "week": "week", "weeks": "week", "month": "month",
         "months": "month", "year": "year", "years": "year", "mg": "mg", "g": "g", "kg": "kg", "ml": "ml", "l": "l",
         "gb": "gb", "mb": "mb", "tb": "tb", "c": "c", "f": "f", "km": "km", "percent": "%", "%": "%"}
# named points in time that must agree (units of time without a number do not count)
TIME_WORDS = {"today", "tomorrow", "yesterday", "tonight", "morning", "evening", "night", "weekend", "weekday",
              "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "january",
              "february", "march", "april", "may", "june", "july", "august", "september", "october", "november",
              "december"}
TIME_ALIASES = {"jan": "january", "feb": "february", "mar": "march", "apr": "april", "jun": "june", "jul": "july",
                "aug": "august", "sep": "september", "sept": "september", "oct": "october", "nov": "november",
                "dec": "december", "nightly": "night", "weekends": "weekend", "weekdays": "weekday",
                "mornings": "morning", "evenings": "evening", "nights": "night"}
# "instead of X", "rather than X" and "avoid X" exclude X as "without X" does: "append instead of
# overwriting" asks what "write without overwriting" asks, and "what should I avoid eating" is the
# opposite of "what should I eat"
NEGATIONS = {"not", "no", "never", "without", "cannot", "nor", "neither", "!=", "instead", "rather", "avoid"}
# words whose swap turns a question into its opposite, as (axis, pole); only a swap on both sides counts
POLES = {}
for axis, low, high in [("when", "before", "after"), ("when", "within", "after"), ("when", "earlier", "later"),
                        ("when", "early", "late"), ("amount", "increase", "decrease"), ("amount", "more", "less"),
                        ("amount", "higher", "lower"), ("amount", "high", "low"), ("amount", "up", "down"),
                        ("amount", "maximum", "minimum"), ("amount", "max", "min"), ("tier", "upgrade", "downgrade"),
                        ("set", "add", "remove"), ("set", "insert", "delete"), ("switch", "on", "off"),
                        ("switch", "enable", "disable"), ("run", "start", "stop"), ("run", "open", "close"),
                        ("run", "opening", "closing"), ("run", "start", "end"), ("io", "read", "write"),
                        ("io", "import", "export"), ("io", "load", "save"), ("io", "encode", "decode"),
                        ("io", "parse", "dump"), ("pkg", "install", "uninstall"), ("trade", "buy", "sell"),
                        ("lock", "lock", "unlock"), ("speed", "faster", "slower"), ("string", "split", "join"),
                        ("place", "first", "last"), ("mood", "benefits", "risks"), ("mood", "pros", "cons")]:
    POLES.setdefault(low, (axis, 0))
    POLES.setdefault(high, (axis, 1))
# "X instead of Y" is not "Y instead of X"
DIRECTIONAL = {"to", "into", "from", "than", "onto", "vs", "versus", "instead", "rather"}
# words that make a relation between two numbers symmetric ("Python 2 or 3", "type 1 and type 2")
SYMMETRIC = {"or", "and", "between", "differ", "difference", "compare", "comparison", "vs", "versus"}
# operator symbols name what a question is about ("== and is" is not "= and =="); != is counted as a negation
OPERATOR_CHARS = set("=<>!+*/%&|^~@")
STOP = {"a", "an", "the", "i", "my", "me", "you", "your", "we", "our", "is", "are", "am", "be", "do", "does",
        "did", "can", "could", "should", "would", "will", "how", "what", "what's", "whats", "which", "why", "when",
        "where", "who", "it", "its", "it's", "of", "for", "in", "on", "at", "by", "and", "or", "if", "that",
        "this", "there", "to", "with", "as", "so", "any", "some", "get", "way", "there's", "python", "please",
        "possible", "okay", "ok", "safe", "now", "still", "yet", "really", "just", "also", "about", "have", "has",
        "need", "want", "i'm", "im", "go", "make", "use", "used", "using", "into", "from", "than", "onto"}
TOKEN = re.compile(r"[A-Za-z_][\w.]*\(?\)?|\d+(?:[.,/:]\d+)*[a-z]*|!=|==|[=<>]=?|\S")


def words(text: str) -> list[str]:
    """Lower-cased tokens with contractions opened ("isn't" -> "is", "not")."""
    text = text.lower().replace("’", "'")
    text = re.sub(r"\b(can)'t\b", r"\1 not", text)
    text = re.sub(r"\bwon't\b", "will not", text)
    text = re.sub(r"n't\b", " not", text)
    out = []
    for tok in TOKEN.findall(text):
        tok = tok.rstrip(".,;:?!")
        if tok and tok not in "?.,;:!\"'`()":
            out.append(tok.strip("'\"`"))
    return [w for w in out if w]


def _number(tok: str) -> tuple[str, str | None] | None:
    """A number and the unit written into it ("500mg", "2-month" is read by facts), or None."""
    m = re.fullmatch(r"(\d+(?:[.,/:]\d+)*)(st|nd|rd|th)?([a-z]*)", tok)
    if m:
        return m.group(1).replace(",", ""), UNITS.get(m.group(3)) if m.group(3) else None
    if tok in NUMBER_WORDS:
        return NUMBER_WORDS[tok], None
    return None


def facts(text: str) -> dict:
    """What must agree between two questions for one answer to serve both."""
    toks = words(text)
    numbers = []
    for i, t in enumerate(toks):
        n = _number(t)
        if n is not None:
            value, unit = n
            nxt = i + 2 if i + 2 < len(toks) and toks[i + 1] == "-" else i + 1  # "3-week", "2-month"
            if unit is None and nxt < len(toks):
                unit = UNITS.get(toks[nxt])
            numbers.append((value, unit or ""))
    # the numbers in the order they come ("one" is left out here as everywhere: "catch two exceptions in
    # one clause" and "can one block handle two exceptions" ask the same)
    in_order = [v for v, _ in numbers]
    ordinals = sorted({ORDINALS[t] for t in toks if t in ORDINALS})
    idents = sorted({t.removesuffix("()") for t in toks if re.search(r"[_.()]|\d", t) and _number(t) is None
                     and t not in ("()", ".")})
    times = {TIME_ALIASES.get(t, t.removesuffix("s") if t.removesuffix("s") in TIME_WORDS else t) for t in toks}
    times &= TIME_WORDS
    times |= {f"{t} {toks[i + 1]}" for i, t in enumerate(toks[:-1])  # "last month" is not "this month"
              if t in ("this", "last", "next") and UNITS.get(toks[i + 1]) in ("day", "week", "month", "year")}
    negations = sum(1 for t in toks if t in NEGATIONS)
    operators = sorted(t for t in toks if t != "!=" and all(c in OPERATOR_CHARS for c in t))
    poles: dict[str, set[int]] = {}
    for t in toks:
        if t in POLES:
            axis, pole = POLES[t]
            poles.setdefault(axis, set()).add(pole)
    return {"numbers": numbers, "ordinals": ordinals, "idents": idents, "operators": operators,
            "times": sorted(times), "negations": negations, "in_order": in_order,
            "symmetric": any(t in SYMMETRIC for t in toks),
            "poles": poles, "directional": any(t in DIRECTIONAL for t in toks), "arrows": _arrows(toks),
            "ends": _ends(toks)}


def _ends(toks: list[str], window: int = 3) -> set[tuple[int, str]]:
    """(0, w) for content words shortly after "to"/"into"/"onto", (1, w) after "from": "shipping to Canada"
    and "shipping from Canada" name the same place as opposite ends."""
    out = set()
    for i, t in enumerate(toks):
        end = 0 if t in ("to", "into", "onto") else 1 if t == "from" else None
        if end is not None:
            for w in toks[i + 1:i + 1 + window]:
                if w in DIRECTIONAL:  # "from savings to checking": checking belongs to "to"
                    break
                if w not in STOP and w not in NEGATIONS:
                    out.add((end, w))
    return out


def _arrows(toks: list[str], window: int = 3) -> set[tuple[str, str]]:
    """(x, y) for content words x shortly before and y shortly after a directional word: "convert an int to
    a string" gives (convert, string), (int, string)."""
    out = set()
    for i, t in enumerate(toks):
        if t in DIRECTIONAL:
            before = [w for w in toks[max(0, i - window):i] if w not in STOP and w not in NEGATIONS]
            after = [w for w in toks[i + 1:i + 1 + window] if w not in STOP and w not in NEGATIONS]
            out.update((x, y) for x in before for y in after if x != y)
    return out


def disagreement(a: dict, b: dict) -> str | None:
    """Why two questions' facts cannot share an answer (None: they may)."""
    if sorted(a["numbers"]) != sorted(b["numbers"]):
        return "numbers differ"
    if a["directional"] and b["directional"] and len(a["numbers"]) > 1 and a["numbers"] != b["numbers"]:
        return "numbers in another order"
    if (sorted(a["in_order"]) == sorted(b["in_order"]) and a["in_order"] != b["in_order"]
            and not (a["symmetric"] or b["symmetric"])):
        return "numbers in another order"
    if a["ordinals"] and b["ordinals"] and a["ordinals"] != b["ordinals"]:
        return "ordinals differ"
    if a["idents"] != b["idents"]:
        return "identifiers differ"
    if a["operators"] != b["operators"]:
        return "operators differ"
    if a["times"] != b["times"]:
        return "dates or times differ"
    if a["negations"] % 2 != b["negations"] % 2:
        return "one is negated"
    if any(axis in b["poles"] and b["poles"][axis] != poles for axis, poles in a["poles"].items()):
        return "opposite direction words"
    if any((1 - end, w) in b["ends"] and (end, w) not in b["ends"] for end, w in a["ends"]):
        return "the same place at the other end"
    if any((y, x) in b["arrows"] for x, y in a["arrows"]):
        return "the same terms in the opposite direction"
    return None
