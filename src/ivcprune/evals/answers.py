"""Rule-based answer extraction (no LLM judge).

Multiple choice, in this order, first rule that decides wins:

1. the answer *starts* with an option letter closed by punctuation or the end: ``"B"``, ``"B."``,
   ``"(B) cat"``, ``"B: cat"``;
2. an explicit statement: ``"answer is B"``, ``"Answer: (B)"``, ``"option B"``;
3. exactly one option letter appears as a standalone capital in the answer (``"I think C"``; the
   pronoun "I" and the article "A" -- ``"A cat ..."`` -- do not count);
4. exactly one option's text appears in the answer (case-insensitive; when one option's text contains
   another's, the longer match is taken);
5. otherwise the answer is unparsed and scored wrong.

Yes / no: the answer's words are lower-cased; ``yes`` without ``no`` is Yes, ``no`` without ``yes`` is
No, anything else (both, neither) is unparsed and scored wrong.
"""

from __future__ import annotations

import re

_LEADING = re.compile(r"^\s*[\(\[]?\s*([A-Z])\s*(?:[\)\]\.:,]|$)")
_STATED = re.compile(r"(?i:answer\s*(?:is|:)|option|choice)\s*[:\-]?\s*[\(\[]?\s*([A-Z])\b(?!')")
_CAPITAL = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")
_ARTICLE = re.compile(r"(?<![A-Za-z'])A\s+(?!(?:or|and)\b)[a-z]")  # "A cat", not "A or B"


def extract_choice(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer picks, or ``None``; ``options`` maps letters to option texts."""
    text = (answer or "").strip()
    if not text or not options:
        return None
    letters = set(options)
    m = _LEADING.match(text)
    if m and m.group(1) in letters:
        return m.group(1)
    stated = set(_STATED.findall(text)) & letters
    if len(stated) == 1:
        return stated.pop()
    capitals = set(_CAPITAL.findall(text)) & letters
    capitals.discard("I")  # the pronoun
    if "A" in capitals and _ARTICLE.search(text):
        capitals.discard("A")  # the article
    if len(capitals) == 1:
        return capitals.pop()
    lower = text.lower()
    hits = [k for k, v in options.items() if str(v).strip() and str(v).strip().lower() in lower]
    if len(hits) > 1:  # prefer the longest option text when one contains another
        longest = max(hits, key=lambda k: len(str(options[k])))
        hits = [longest] if all(str(options[k]).lower() in str(options[longest]).lower() for k in hits) else hits
    if len(hits) == 1:
        return hits[0]
    return None


def extract_yes_no(answer: str) -> str | None:
    """``"Yes"``, ``"No"`` or ``None`` (both or neither)."""
    words = set(re.findall(r"[a-z]+", (answer or "").lower()))
    yes, no = "yes" in words, "no" in words
    if yes and not no:
        return "Yes"
    if no and not yes:
        return "No"
    return None
