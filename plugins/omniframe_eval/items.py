"""The dataset item: one spoken input with what is known about it.

A dataset plugin registers a factory (``register_datasets`` hook) that takes its options as
keyword arguments and returns an iterable of :class:`EvalItem`. Iteration may be lazy (the
spoken QA set synthesizes audio as it goes), so ``--limit`` costs only what it uses.

An entry the dataset cannot use (a manifest line that is not JSON, a LibriSpeech transcript
line without its audio file) is still yielded, with ``problem`` saying why: the harness
records it as a failure instead of dropping it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["EvalItem", "Task"]

Task = Literal["qa", "asr"]


@dataclass(frozen=True)
class EvalItem:
    """One input of an evaluation dataset.

    Parameters:
        id: unique within the dataset; names cached results and output files.
        audio: path of the audio file the user "says" (wav/flac/ogg).
        transcript: what is said (reference for ASR word error rate); None when unknown.
            An empty string is a broken entry and is recorded as a failure.
        answers: reference answers for question answering (any one counts as correct).
        task: ``qa`` (the pipeline answers a question) or ``asr`` (the pipeline's transcript,
            or its text answer for a model prompted to transcribe, is scored against
            ``transcript``).
        meta: anything else worth keeping in the records (voice, rate, speaker).
        problem: set when the entry is unusable; the harness records it as a failure.
    """

    id: str
    audio: str
    transcript: str | None = None
    answers: tuple[str, ...] = ()
    task: Task = "qa"
    meta: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["answers"] = list(self.answers)
        return d
