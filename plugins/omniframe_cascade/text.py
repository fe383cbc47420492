"""Text helpers for speaking a streamed answer: sentence splitting, clean-up, chunk text.

Pure Python, no model: the TTS stages use them, and they are tested on their own.

* :class:`SentenceSplitter` turns a stream of text deltas into speakable pieces as soon as
  a sentence (or clause) ends, or after ``max_words`` words when no punctuation comes.
  Concatenating everything it returns gives back exactly the text it was fed.
* :func:`clean_for_speech` removes markdown and symbols a synthesizer would read aloud.
* :func:`distribute_text` spreads a sentence's text over the audio chunks that speak it,
  so that a sink that stops half-way knows roughly which words were heard.
"""

from __future__ import annotations

import re

__all__ = ["SentenceSplitter", "clean_for_speech", "distribute_text", "word_error_rate"]

# A sentence or clause ends with . ! ? … ; : (closing quotes/brackets may follow) and then
# whitespace. Requiring the whitespace keeps decimals ("3.5") and "e.g." mid-word intact and
# means we never cut before we know the next character.
_BOUNDARY = re.compile(r"(?:[.!?…;:]+[\"'”’)\]]*|\n)\s+")
_COMMA = re.compile(r",\s+")
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "vs", "etc", "no", "fig", "approx",
    "dept", "est", "inc", "ltd", "co", "mt", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
    "sep", "sept", "oct", "nov", "dec",
})
_WORD = re.compile(r"\S+")


class SentenceSplitter:
    """Cuts streamed text into pieces worth speaking.

    Parameters:
        max_words: cut after this many complete words when no sentence end came (at the last
            comma if there is one after at least 3 words, else at the last word); None: only
            at sentence ends and at :meth:`flush`.
        min_chars: a sentence end closes a piece only once the piece has this many letters or
            digits (so "1. " or "Hi! " alone wait for more).
        comma_words: a comma (followed by a space) closes a piece once the piece has at least
            this many words, so a long first sentence starts sounding sooner; None: never.
        first_max_words: ``max_words`` for the first piece of an answer only (the one the
            listener waits for); None: the same as ``max_words``.
    """

    def __init__(self, max_words: int | None = 12, min_chars: int = 2,
                 comma_words: int | None = None, first_max_words: int | None = None) -> None:
        for name, value in (("max_words", max_words), ("comma_words", comma_words),
                            ("first_max_words", first_max_words)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None), got {value}")
        self.max_words = max_words
        self.min_chars = min_chars
        self.comma_words = comma_words
        self.first_max_words = first_max_words
        self.buffer = ""
        self.pieces = 0  # pieces returned since the last reset

    def push(self, text: str) -> list[str]:
        """Add a delta; return the pieces that are complete now (possibly none)."""
        self.buffer += text
        out: list[str] = []
        while True:
            cut = self._sentence_end() or self._word_limit()
            if not cut:
                return out
            out.append(self.buffer[:cut])
            self.buffer = self.buffer[cut:]
            self.pieces += 1

    def flush(self) -> str:
        """Return (and forget) whatever is buffered: the end of the answer."""
        rest, self.buffer = self.buffer, ""
        return rest

    def reset(self) -> None:
        """Forget the buffer and start a new answer (barge-in, next turn)."""
        self.buffer = ""
        self.pieces = 0

    def _sentence_end(self) -> int:
        for m in _BOUNDARY.finditer(self.buffer):
            head = self.buffer[: m.start()]
            if sum(c.isalnum() for c in head) < self.min_chars:
                continue
            if self.buffer[m.start()] == "." and _is_abbreviation(head):
                continue
            return m.end()
        if self.comma_words is not None:
            for m in _COMMA.finditer(self.buffer):
                if len(_WORD.findall(self.buffer[: m.start()])) >= self.comma_words:
                    return m.end()
        return 0

    def _word_limit(self) -> int:
        limit_words = self.max_words
        if self.pieces == 0 and self.first_max_words is not None:
            limit_words = self.first_max_words
        if limit_words is None:
            return 0
        # only complete words count: the last one is complete once whitespace follows it
        words = list(_WORD.finditer(self.buffer))
        if words and words[-1].end() == len(self.buffer):
            words = words[:-1]
        if len(words) < limit_words:
            return 0
        limit = words[limit_words - 1]
        for w in reversed(words[2:limit_words]):  # a comma after at least 3 words
            if w.group().endswith(","):
                return _after_space(self.buffer, w.end())
        return _after_space(self.buffer, limit.end())


def _after_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _is_abbreviation(head: str) -> bool:
    """True when the word before a period looks like an abbreviation or an initial."""
    m = re.search(r"(\S+)$", head)
    if m is None:
        return False
    word = m.group(1).strip("\"'“‘([").lower()
    if word in _ABBREVIATIONS:
        return True
    if len(word) == 1 and word.isalpha():  # an initial: "J. R. R. Tolkien"
        return True
    return "." in word and len(word) <= 6  # "e.g", "u.s"


_MARKDOWN = re.compile(r"[*_#`~|<>\[\]{}^]+")
_URL = re.compile(r"https?://\S+")
_SPACES = re.compile(r"\s+")


def clean_for_speech(text: str) -> str:
    """Text a synthesizer should read: markdown symbols, URLs and odd spacing removed."""
    text = _URL.sub(" link ", text)
    text = _MARKDOWN.sub(" ", text)
    text = text.replace("&", " and ")
    return _SPACES.sub(" ", text).strip()


def speakable(text: str) -> bool:
    """True when the text has at least one letter or digit."""
    return any(c.isalnum() for c in text)


def distribute_text(text: str, weights: list[float]) -> list[str]:
    """Split ``text`` into ``len(weights)`` consecutive parts, cutting only between words,
    each part taking a share of the characters proportional to its weight (for example
    the duration of each audio chunk). ``"".join(parts) == text`` always holds."""
    n = len(weights)
    if n == 0:
        return []
    total_w = sum(weights)
    if n == 1 or not text or total_w <= 0:
        return [text] + [""] * (n - 1)
    tokens = re.findall(r"\s*\S+\s*|\s+", text)
    parts = [""] * n
    bounds = []
    acc = 0.0
    for w in weights:
        acc += w
        bounds.append(acc / total_w)
    pos = 0
    idx = 0
    for tok in tokens:
        mid = (pos + len(tok) / 2) / len(text)
        while idx < n - 1 and mid > bounds[idx]:
            idx += 1
        parts[idx] += tok
        pos += len(tok)
    return parts


def _norm_words(text: str) -> list[str]:
    text = text.lower().replace("’", "'")
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    return [w.strip("'") for w in text.split() if w.strip("'")]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word error rate after lower-casing and removing punctuation (Levenshtein over words).

    A light stand-in for jiwer so that the plugin and its benchmark need nothing extra."""
    ref = _norm_words(reference)
    hyp = _norm_words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)
