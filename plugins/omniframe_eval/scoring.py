"""Content and latency scoring: text normalization, word error rate, answer containment,
percentiles. Pure functions over strings and numbers (no models), so they are cheap to test.

Word error rate follows the usual protocol of speech papers (the Whisper and Mini-Omni papers
among them): both texts go through Whisper's ``EnglishTextNormalizer`` (lower case, no
punctuation, spelled-out numbers and British spellings standardised), then
``(substitutions + deletions + insertions) / reference words``, summed over the corpus before
dividing (a corpus WER, not a mean of per-utterance WERs).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "BREAKDOWN",
    "latency_breakdown",
    "WordErrors",
    "basic_normalize",
    "contains_answer",
    "corpus_wer",
    "get_normalizer",
    "normalizer_name",
    "percentile",
    "summarize",
    "word_errors",
]


def basic_normalize(text: str) -> str:
    """Lower case, strip accents and punctuation, collapse spaces (the fallback normalizer)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = text.lower().replace("'", "")
    text = re.sub(r"[^\w\s]|_", " ", text)
    return re.sub(r"\s+", " ", text).strip()


@lru_cache(maxsize=1)
def _whisper_normalizer() -> Callable[[str], str] | None:
    try:
        from whisper.normalizers import EnglishTextNormalizer
    except Exception:  # openai-whisper missing or broken: fall back, and say so in the report
        return None
    return EnglishTextNormalizer()


def get_normalizer(kind: str = "whisper") -> Callable[[str], str]:
    """The text normalizer named ``kind``: ``whisper`` (Whisper's EnglishTextNormalizer, the
    standard for English WER; falls back to ``basic`` when openai-whisper is not installed),
    ``basic`` or ``none``."""
    if kind == "none":
        return lambda s: re.sub(r"\s+", " ", s).strip()
    if kind == "basic":
        return basic_normalize
    if kind == "whisper":
        norm = _whisper_normalizer()
        if norm is None:
            return basic_normalize

        def whisper_norm(text: str) -> str:
            return re.sub(r"\s+", " ", norm(text)).strip()

        return whisper_norm
    raise ValueError(f"unknown text normalizer {kind!r}; expected whisper, basic or none")


def normalizer_name(kind: str = "whisper") -> str:
    """What :func:`get_normalizer` really uses, for the report."""
    if kind == "whisper":
        if _whisper_normalizer() is None:
            return "basic (openai-whisper is not installed, so Whisper's normalizer was not used)"
        return "Whisper EnglishTextNormalizer (openai-whisper)"
    return kind


@dataclass(frozen=True)
class WordErrors:
    """Edit counts of one hypothesis against one reference (after normalization)."""

    substitutions: int
    deletions: int
    insertions: int
    ref_words: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        """Errors per reference word; ``inf`` when the reference is empty but the hypothesis
        is not, 0 when both are empty."""
        if self.ref_words == 0:
            return 0.0 if self.errors == 0 else math.inf
        return self.errors / self.ref_words

    def to_dict(self) -> dict[str, int]:
        return {"s": self.substitutions, "d": self.deletions, "i": self.insertions,
                "n": self.ref_words}


def word_errors(reference: str, hypothesis: str,
                normalize: Callable[[str], str] | None = None) -> WordErrors:
    """Levenshtein word alignment counts (jiwer) of ``hypothesis`` against ``reference``."""
    norm = normalize or get_normalizer("whisper")
    ref = norm(reference).split()
    hyp = norm(hypothesis).split()
    if not ref:
        return WordErrors(0, 0, len(hyp), 0)
    if not hyp:
        return WordErrors(0, len(ref), 0, len(ref))
    import jiwer

    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return WordErrors(out.substitutions, out.deletions, out.insertions, len(ref))


def corpus_wer(pairs: Iterable[tuple[str, str]],
               normalize: Callable[[str], str] | None = None) -> float | None:
    """Corpus WER over ``(reference, hypothesis)`` pairs: total errors / total reference words.
    None when there are no reference words at all."""
    errors = words = 0
    for ref, hyp in pairs:
        we = word_errors(ref, hyp, normalize)
        errors += we.errors
        words += we.ref_words
    return errors / words if words else None


def contains_answer(answer: str, references: Sequence[str],
                    normalize: Callable[[str], str] | None = None) -> bool | None:
    """Normalized containment: does the answer contain any reference as whole words?

    ``"The capital of France is Paris."`` contains ``"paris"``; ``"Parisian"`` does not.
    None when there is no non-empty reference."""
    norm = normalize or get_normalizer("whisper")
    refs = [norm(r) for r in references if r and r.strip()]
    refs = [r for r in refs if r]
    if not refs:
        return None
    hay = f" {norm(answer)} "
    return any(f" {r} " in hay for r in refs)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default, "linear"); None for no values."""
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """n, mean, p50, p90, p95, min and max of the non-missing values."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p95": None, "min": None,
                "max": None}
    return {
        "n": len(xs),
        "mean": sum(xs) / len(xs),
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p95": percentile(xs, 95),
        "min": min(xs),
        "max": max(xs),
    }


#: Segments of the voice-to-voice latency, in order; they add up to it when all are present.
BREAKDOWN = ("vad_wait", "asr", "first_text", "first_audio")
BREAKDOWN_LABELS = {
    "vad_wait": "VAD end-of-speech wait",
    "asr": "ASR (VAD decision → transcript)",
    "first_text": "to first text (LM; encoder too without ASR)",
    "first_audio": "first text → first audio",
}


def latency_breakdown(*, speech_end: float | None, vad_end: float | None,
                      transcript: float | None, first_text: float | None,
                      first_audio: float | None) -> dict[str, float | None]:
    """Split end-of-speech → first-audio into consecutive stages from monotonic timestamps.

    * ``vad_wait``: the user stopped speaking → the VAD decided so;
    * ``asr``: the VAD's decision → the final transcript (None without an ASR stage);
    * ``first_text``: the transcript (or, without one, the VAD decision) → the first answer
      text;
    * ``first_audio``: the first answer text → the first answer audio sample leaving the sink
      (without any text: the previous mark → first audio).

    Also ``voice_to_voice`` (their sum when all are present), ``response`` (VAD decision →
    first audio) and ``to_first_text`` (end of speech → first text). Missing marks give None.
    """

    def gap(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else b - a

    after_vad = transcript if transcript is not None else vad_end
    before_audio = first_text if first_text is not None else after_vad
    return {
        "vad_wait": gap(speech_end, vad_end),
        "asr": gap(vad_end, transcript),
        "first_text": gap(after_vad, first_text),
        "first_audio": gap(before_audio, first_audio),
        "voice_to_voice": gap(speech_end, first_audio),
        "response": gap(vad_end, first_audio),
        "to_first_text": gap(speech_end, first_text),
    }
