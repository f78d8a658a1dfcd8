"""MMMU answer parsing and scoring: the official rules (MMMU-Benchmark/MMMU eval/eval_utils.py), quirks kept.

Kept on purpose so numbers compare with published LLaVA-1.5 MMMU scores: the open-answer sentence split
runs after lower-casing (its first alternative can never fire), single letters normalise to
``" x"``/``"x "``, and unparseable multiple-choice answers fall back to ``random.Random(42)``.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

MULTIPLE_CHOICE = "multiple-choice"
FALLBACK_SEED = 42

_MC_STRIP_CHARS = [",", ".", "!", "?", ";", ":", "'"]
_OPEN_INDICATORS = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
_TRIVIAL_TAILS = [":", ",", ".", "!", "?", ";", ":", "'"]

# Official extract_numbers patterns, verbatim. Note pattern_simple's ``\d+\b``: an integer glued to a
# unit ("5kg") is not extracted, exactly as in the official code.
PATTERN_COMMAS = r"-?\b\d{1,3}(?:,\d{3})+\b"
PATTERN_SCIENTIFIC = r"-?\d+(?:\.\d+)?[eE][+-]?\d+"
PATTERN_SIMPLE = r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"

Normalized = str | float


@dataclass(frozen=True)
class Score:
    pred: str | list[Normalized]  # a letter (multiple choice) or normalised candidates (open)
    correct: bool
    fell_back: bool  # multiple choice only: no letter found, a random one was drawn


# ----------------------------------------------------------------------------- multiple choice


def _mc_candidates(response: str, all_choices: list[str], index2ans: dict[str, str]) -> tuple[list[str], str]:
    """Candidate letters and which rule found them: 'bracket', 'letter' or 'text'."""
    cands = [c for c in all_choices if f"({c})" in response]
    if cands:
        return cands, "bracket"
    cands = [c for c in all_choices if f" {c} " in response]
    if cands:
        return cands, "letter"
    if len(response.split()) > 5:
        lower = response.lower()
        cands = [c for c, text in index2ans.items() if text.lower() in lower]
        if cands:
            return cands, "text"
    return [], ""


def _last_match(response: str, cands: list[str], rule: str, index2ans: dict[str, str]) -> str:
    """Among several candidates, the one whose match starts last (first wins ties, like np.argmax)."""
    def start(c: str) -> int:
        if rule == "bracket":
            return response.rfind(f"({c})")
        if rule == "letter":
            return response.rfind(f" {c} ")
        return response.lower().rfind(index2ans[c].lower())

    starts = [start(c) for c in cands]
    return cands[starts.index(max(starts))]


def parse_multi_choice_response(
    response: str, all_choices: list[str], index2ans: dict[str, str], rng: random.Random,
) -> tuple[str, bool]:
    """``(letter, fell_back)`` following the official parse_multi_choice_response."""
    for ch in _MC_STRIP_CHARS:
        response = response.strip(ch)
    response = f" {response} "  # spaces so " A " matches at the ends
    cands, rule = _mc_candidates(response, all_choices, index2ans)
    if not cands:
        if not all_choices:
            return "", True  # nothing to draw from; scored wrong
        return rng.choice(all_choices), True
    if len(cands) == 1:
        return cands[0], False
    return _last_match(response, cands, rule, index2ans), False


def eval_multi_choice(answer: str | list[str], pred: str) -> bool:
    if isinstance(answer, list):
        return pred in answer
    return pred == answer


# ----------------------------------------------------------------------------- open


def check_is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(text: str) -> list[Normalized]:
    """Numbers to ``[round(x, 2)]``; strings lower-cased, a single char padded both ways."""
    text = text.strip()
    if check_is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    if len(text) == 1:
        return [" " + text, text + " "]  # avoid trivial substring matches
    return [text]


def extract_numbers(text: str) -> list[str]:
    return (re.findall(PATTERN_COMMAS, text) + re.findall(PATTERN_SCIENTIFIC, text)
            + re.findall(PATTERN_SIMPLE, text))


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    subs = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys: list[str] = []
    for i, sub in enumerate(subs):
        indicators = _OPEN_INDICATORS + (["="] if i == len(subs) - 1 else [])
        shortest: str | None = None
        for ind in indicators:
            if ind in sub:
                tail = sub.split(ind)[-1].strip()
                # Official uses ``if not shortest``: an empty tail is replaced by the next one found.
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL_TAILS:
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list[Normalized]:
    """Normalised candidate answers (strings and rounded floats), order-preserving, deduplicated."""
    keys = _key_subresponses(response)
    raw = keys + [n for k in keys for n in extract_numbers(k)]
    normalized = [n for r in raw for n in normalize_str(r)]
    return list(dict.fromkeys(normalized))


def eval_open(answer: str | list[str], preds: list[Normalized]) -> bool:
    golds = answer if isinstance(answer, list) else [answer]
    norm_answers = [n for g in golds for n in normalize_str(str(g))]
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(a, str) and a in pred for a in norm_answers):
                return True
        elif pred in norm_answers:
            return True
    return False


# ----------------------------------------------------------------------------- entry point


def _default_choices(index2ans: dict[str, str], answer: str | list[str]) -> list[str]:
    """Letters when the caller gave none: index2ans's keys, else A-D (extended to cover the gold)."""
    if index2ans:
        return list(index2ans)
    golds = answer if isinstance(answer, list) else [answer]
    top = max([ord("D")] + [ord(g) for g in golds if len(g) == 1 and "A" <= g <= "Z"])
    return [chr(c) for c in range(ord("A"), top + 1)]


def score_response(
    question_type: str, response: str, answer: str | list[str],
    all_choices: list[str] | None = None, index2ans: dict[str, str] | None = None,
    rng: random.Random | None = None,
) -> Score:
    """Parse ``response`` and judge it against ``answer``; any type but multiple-choice is open.

    Pass one ``rng`` (``random.Random(42)``) through a whole run, in subject order, to reproduce the
    official fallback draws; None makes a fresh ``Random(42)`` for this call.
    """
    response = "" if response is None else str(response)
    if question_type == MULTIPLE_CHOICE:
        index2ans = dict(index2ans or {})
        choices = list(all_choices) if all_choices is not None else _default_choices(index2ans, answer)
        rng = rng if rng is not None else random.Random(FALLBACK_SEED)
        pred, fell_back = parse_multi_choice_response(response, choices, index2ans, rng)
        return Score(pred=pred, correct=eval_multi_choice(answer, pred), fell_back=fell_back)
    preds = parse_open_response(response)
    return Score(pred=preds, correct=eval_open(answer, preds), fell_back=False)
