"""Rule-based answer extraction (no LLM judge), in two modes.

``mode="vlmevalkit"`` (the default) reads an answer the way VLMEvalKit's ``exact_matching`` evaluation
does, so that scores compare with published numbers (re-implemented from VLMEvalKit's
``vlmeval/utils/matching_util.py`` ``can_infer``, ``vlmeval/dataset/utils/multiple_choice.py`` and
``vlmeval/dataset/utils/yorn.py`` ``YOrN_Extraction`` with ``vlmeval/smp/misc.py``
``process_punctuation``). Multiple choice:

1. an answer holding one of a few refusal phrases ("Cannot determine the answer", ...) is no answer;
2. the characters ``.()[],:;!*#{}`` become spaces and the answer is cut at white space; when exactly one
   option letter is a token, and its first occurrence is among the last four tokens, that letter is
   the answer (``"B"``, ``"(C) blue"``, ``"I think C"``; ``"B. it is the green one here"`` is not);
   when no option letter but a ``Z`` is a token, the answer is none;
3. ``answer is X`` (case-insensitive, ``X`` in A-D, bold allowed) picks ``X``;
4. else, unless the answer is longer than twice the options' texts together, the single option whose
   text (lower-cased) the answer contains; two or more (``"dark red"`` among red / dark red), none:
   no answer.

An answer that pandas reads as missing (``"None"``, ``"NA"``, ``""``, ...) is read as the text ``nan``, as
VLMEvalKit's prediction file gives it. Yes / no: lower-cased, punctuation handled as VLMEvalKit's
``process_punctuation`` does (``-`` ``,`` ``?`` ``!`` brackets and quotes removed or made spaces, periods
not between digits removed; ``*``, ``:``, ``'`` and ``。`` kept), cut at white space: the token ``yes``
without ``no`` is Yes, ``no`` without ``yes`` is No, else no answer (``**Yes**``, ``Yes:`` are none).

``mode="lenient"``: ivcprune's earlier, more generous rules, first that decides wins: an option letter at
the start closed by punctuation (``"B. because ..."``); ``answer is B`` / ``option B``; a single
standalone capital option letter (the pronoun "I" and a sentence-opening article "A cat ..." aside);
a single option text, the longest when one contains the others. An answer naming two different option
letters (``"Both B and A"``, ``"A, not B"``) is never credited. Yes / no by the words ``yes`` / ``no``
(letters only: ``**Yes**`` is Yes).

Either way ``None`` means unparsed, scored wrong and counted (``n_unparseable``).
"""

from __future__ import annotations

import re
from typing import Any

MODES = ("vlmevalkit", "lenient")
DEFAULT_MODE = "vlmevalkit"

# the strings pandas' read_csv / read_excel read as missing by default (pandas >= 2; ``None`` since 2.0)
PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})


def _mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown answer mode {mode!r}; one of {', '.join(MODES)}")
    return mode


# -- VLMEvalKit's exact matching -----------------------------------------------------------------------
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_API_FAILURE = "Failed to obtain answer via API"
_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_ANSWER_IS = re.compile(r"(?:correct\s+)?answer\s+is\s+\**([ABCD])\**", re.IGNORECASE)
_NONE = "Z"  # VLMEvalKit's letter for "no answer"


def _as_read(answer: Any) -> str:
    """The prediction as VLMEvalKit has it after its file round trip (pandas: missing -> ``nan``)."""
    text = "nan" if answer is None else str(answer)
    return "nan" if text in PANDAS_NA else text


def _letter_token(text: str, options: dict[str, str]) -> str | None:
    """Rules 1-3: a letter, ``Z`` (no answer, decided), or ``None`` (undecided: go on to the texts)."""
    if _API_FAILURE in text:
        return None
    if any(r in text for r in _REFUSALS):
        return _NONE
    tokens = text.translate(_SEPARATORS).split()
    named = [c for c in options if c in tokens]
    if len(named) == 1:
        if tokens.index(named[0]) > len(tokens) - 5:
            return named[0]
    elif not named and _NONE in tokens:
        return _NONE
    m = _ANSWER_IS.search(text)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    return None


def _option_text(text: str, options: dict[str, str]) -> str | None:
    low = text.lower()
    if len(low) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    hits = [c for c, v in options.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def _choice_vlmevalkit(answer: Any, options: dict[str, str]) -> str | None:
    text = _as_read(answer)
    letter = _letter_token(text, options)
    if letter is None:
        letter = _option_text(text, options)
    if letter == _NONE and _NONE not in options:
        return None
    return letter


def _punctuation(text: str) -> str:
    """VLMEvalKit's ``process_punctuation`` (its period rule removes at most 32 periods: ``re.UNICODE``,
    32, lands in ``sub``'s count)."""
    out = text
    thousands = re.search(r"(\d)(,)(\d)", text) is not None
    for p in (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
              "!"):
        if p + " " in text or " " + p in text or thousands:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return re.sub(r"(?<!\d)\.(?!\d)", "", out, count=32)


def _yes_or_no(words) -> str | None:
    """"Yes" or "No" when exactly one of them is among ``words``."""
    yes, no = "yes" in words, "no" in words
    if yes != no:
        return "Yes" if yes else "No"
    return None


def _yes_no_vlmevalkit(answer: Any) -> str | None:
    return _yes_or_no(_punctuation(_as_read(answer).lower()).split())


# -- lenient rules ---------------------------------------------------------------------------------------
_LEADING = re.compile(r"^\s*[\(\[]?\s*([A-Z])\s*(?:[\)\]\.:,]|$)")
_STATED = re.compile(r"(?i:answer\s*(?:is|:)|option|choice)\s*[:\-]?\s*[\(\[]?\s*([A-Z])\b(?!')")
_CAPITAL = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")
# the article: "A" opening the answer or a sentence, then a lower-case word ("A cat ..."); "and A seem" is a letter
_ARTICLE = re.compile(r"(?:^|[.!?:]\s+)\s*A\s+(?!(?:or|and)\b)[a-z]")


def _choice_lenient(answer: Any, options: dict[str, str]) -> str | None:
    text = str(answer or "").strip()
    if text in PANDAS_NA or not options:  # "N/A" is no answer, not the letter A
        return None
    letters = set(options)
    m = _LEADING.match(text)
    leading = {m.group(1)} & letters if m else set()
    stated = set(_STATED.findall(text)) & letters
    capitals = set(_CAPITAL.findall(text)) & letters
    capitals.discard("I")  # the pronoun
    if "A" in capitals and _ARTICLE.search(text) and "A" not in leading | stated:
        capitals.discard("A")  # the article
    named = leading | stated | capitals
    if len(named) > 1:  # two different letters: ambiguous, never credited
        return None
    if len(named) == 1:
        return named.pop()
    lower = text.lower()
    hits = [k for k, v in options.items() if str(v).strip() and str(v).strip().lower() in lower]
    if len(hits) > 1:  # prefer the longest option text when one contains the others
        longest = max(hits, key=lambda k: len(str(options[k])))
        hits = [longest] if all(str(options[k]).lower() in str(options[longest]).lower() for k in hits) else hits
    return hits[0] if len(hits) == 1 else None


def _yes_no_lenient(answer: Any) -> str | None:
    return _yes_or_no(set(re.findall(r"[a-z]+", str(answer or "").lower())))


# -- entry points ----------------------------------------------------------------------------------------
def extract_choice(answer: Any, options: dict[str, str], mode: str = DEFAULT_MODE) -> str | None:
    """The option letter an answer picks, or ``None`` (no answer, ambiguous); ``options`` maps letters to
    option texts (missing options left out). ``mode``: ``"vlmevalkit"`` or ``"lenient"``."""
    if _mode(mode) == "lenient":
        return _choice_lenient(answer, options)
    return _choice_vlmevalkit(answer, dict(options or {}))


def extract_yes_no(answer: Any, mode: str = DEFAULT_MODE) -> str | None:
    """``"Yes"``, ``"No"`` or ``None`` (both, neither, unreadable) under ``mode``."""
    return _yes_no_lenient(answer) if _mode(mode) == "lenient" else _yes_no_vlmevalkit(answer)


def extract(task: str, answer: Any, options: dict[str, str] | None = None, mode: str = DEFAULT_MODE) -> str | None:
    """The prediction of a multiple-choice (``mcq``) or ``yesno`` answer under ``mode``."""
    if task == "mcq":
        return extract_choice(answer, options or {}, mode)
    if task == "yesno":
        return extract_yes_no(answer, mode)
    raise ValueError(f"no rule-based answer for the task {task!r}")


def predictions(task: str, answer: Any, options: dict[str, str] | None = None,
                mode: str = DEFAULT_MODE) -> dict[str, Any]:
    """The record fields of an answer: ``pred`` under ``mode``, ``pred_<m>`` under every mode, ``answers``."""
    preds = {m: extract(task, answer, options, m) for m in MODES}
    return {"pred": preds[_mode(mode)], **{f"pred_{m}": p for m, p in preds.items()}, "answers": mode}
