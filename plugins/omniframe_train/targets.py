"""Training sequences: the 8-stream inputs and labels of every Mini-Omni task (spec training.md §1).

Pure Python (no torch) so that the layout can be tested position by position.

A :class:`Sample` is one training sequence: ``input_ids[s][t]`` (8 streams x T global ids, what
the model reads) and ``labels[s][t]`` (what the model must predict *at* position t, aligned with
the inputs, -100 where nothing is supervised). The loss pairs the logits of position t with
``labels[t + 1]`` (the usual next-token shift), so the logits at the prompt's last position (the
task signal) predict the first answer position.

Answer span of N positions, after the prompt (spec §1.3, §1.7):

- text stream: the m answer tokens, EOT, then ``pad_t`` up to N. Labels: tokens + EOT; the
  ``pad_t`` after EOT is -100. For TTS the text stream carries the read text but is not
  supervised (mini-omni #101).
- audio layer i (speech-out tasks): (i+1) x ``pad_a``, the F codes of layer i, EOA, (6-i) x
  ``pad_a`` (F + 8 positions, all supervised, pads included), then ``pad_a`` with -100 up to N.
  Inputs are global ids (layer-shifted), labels local ids (0..4159).
- audio layers of text-out tasks: ``pad_a`` everywhere, never supervised.

N = max(m + 1, F + 8) (F + 8 = 0 for text-out tasks). The SLAM reconstruction masks *all* audio
labels when m + 1 == F + 8 exactly (a zero-length slice); this implementation does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from omniframe_mini_omni import tokens as T

IGNORE = -100

# omniframe extension (not in the released inference code): the text-stream task signal of the
# stage-1 TTS task. T1A2 ("answer this text by voice") and TTS ("read this text aloud") would
# otherwise share one prompt (spec training.md §1.7, §6.6). 151941 is the 6th of the 64 reserved
# Mini-Omni text specials, unused by the release.
TTS_T = T.TEXT_TOKENIZER_SIZE + 5

TASKS = ("A1A2", "A1T2", "ASR", "T1A2", "T1T2", "TTS")
AUDIO_IN_TASKS = frozenset({"A1A2", "A1T2", "ASR"})
AUDIO_OUT_TASKS = frozenset({"A1A2", "T1A2", "TTS"})
TEXT_LOSS_TASKS = frozenset({"A1A2", "A1T2", "ASR", "T1A2", "T1T2"})  # TTS: audio loss only


class SampleError(ValueError):
    """An example that cannot become a training sequence (the message says why)."""


@dataclass
class Sample:
    """One training sequence.

    Parameters:
        task: one of :data:`TASKS`.
        input_ids: 8 streams of T global ids (streams 0..6 audio layers, 7 text).
        labels: 8 streams of T targets aligned with the inputs (local ids for audio streams,
            text ids for the text stream, -100 = not supervised).
        whisper_len: L, the Whisper frames written at positions 1..L of the audio streams
            (0 for text-input tasks).
        prompt_len: positions before the answer span (L + 3 or n + 3).
        features: the (L, D) Whisper features (numpy) for speech-input tasks, else None.
        key: an identifier of the source example (logs, bad-row reports).
    """

    task: str
    input_ids: list[list[int]]
    labels: list[list[int]]
    whisper_len: int
    prompt_len: int
    features: object | None = None
    key: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids[0])


def tts_prompt(text_ids: Sequence[int]) -> list[list[int]]:
    """Prompt of the TTS task (read ``text_ids`` aloud): the T1A2 prompt with ``_tts`` (151941)
    instead of ``_answer_t`` as the last text token, so the two never collide."""
    streams = T.text_input_prompt("T1A2", text_ids)
    streams[T.TEXT_STREAM][-1] = TTS_T
    return streams


def prompt_for(task: str, *, n_frames: int = 0, text_ids: Sequence[int] | None = None
               ) -> list[list[int]]:
    """The prompt (8 streams) of ``task``: the released inference builders, plus TTS."""
    if task == "TTS":
        if text_ids is None:
            raise SampleError("task TTS needs the text to read (text_ids)")
        return tts_prompt(text_ids)
    if task not in TASKS:
        raise SampleError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return T.build_prompt(task, n_frames=n_frames if task in AUDIO_IN_TASKS else None,
                          text_ids=text_ids)


def answer_span(task: str, answer_ids: Sequence[int], frames: Sequence[Sequence[int]] | None
                ) -> tuple[list[list[int]], list[list[int]]]:
    """Inputs and labels of the answer span (8 streams of N positions), spec §1.3-1.4.

    Args:
        task: the task (decides which streams are supervised).
        answer_ids: the m answer text ids (< 151936), without EOT.
        frames: F SNAC frames of 7 local codes for speech-out tasks (else None).
    """
    bad = [t for t in answer_ids if not 0 <= int(t) < T.TEXT_TOKENIZER_SIZE]
    if bad:
        raise SampleError(f"answer text ids must be tokenizer ids < {T.TEXT_TOKENIZER_SIZE}, "
                          f"got {bad[:5]}")
    speaks = task in AUDIO_OUT_TASKS
    if speaks and not frames:
        raise SampleError(f"task {task} speaks: it needs the answer's SNAC frames (got none)")
    if not speaks and frames:
        raise SampleError(f"task {task} answers in text only; it takes no SNAC frames")
    m = len(answer_ids)
    audio_len = len(frames) + 8 if speaks else 0
    n = max(m + 1, audio_len)
    text_in = [int(t) for t in answer_ids] + [T.EOT] + [T.PAD_T] * (n - m - 1)
    if task in TEXT_LOSS_TASKS:
        text_lab = [int(t) for t in answer_ids] + [T.EOT] + [IGNORE] * (n - m - 1)
    else:
        text_lab = [IGNORE] * n
    audio_in: list[list[int]] = []
    audio_lab: list[list[int]] = []
    if speaks:
        rows = T.delay_frames(frames)  # 7 rows of F + 8 local ids
        for i, row in enumerate(rows):
            tail = n - len(row)
            audio_in.append([T.layershift(a, i) for a in row] + [T.layershift(T.PAD_A, i)] * tail)
            audio_lab.append(list(row) + [IGNORE] * tail)
    else:
        for i in range(T.N_AUDIO_LAYERS):
            audio_in.append([T.layershift(T.PAD_A, i)] * n)
            audio_lab.append([IGNORE] * n)
    return audio_in + [text_in], audio_lab + [text_lab]


def build_sample(
    task: str,
    *,
    answer_ids: Sequence[int],
    frames: Sequence[Sequence[int]] | None = None,
    n_frames: int = 0,
    text_ids: Sequence[int] | None = None,
    features: object | None = None,
    key: str = "",
    max_len: int | None = None,
) -> Sample:
    """One task's training sequence from one example.

    Args:
        task: ``A1A2``, ``A1T2``, ``ASR``, ``T1A2``, ``T1T2`` or ``TTS``.
        answer_ids: answer text ids (ASR: the transcript; TTS: the read text).
        frames: answer SNAC frames (speech-out tasks).
        n_frames: L, Whisper frames of the question (speech-input tasks).
        text_ids: question text ids (text-input tasks).
        features: (L, D) Whisper features, kept on the sample for the collator.
        max_len: refuse sequences longer than this (block_size, 2048 for Mini-Omni).
    """
    if task not in TASKS:
        raise SampleError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if task in AUDIO_IN_TASKS:
        if n_frames < 1:
            raise SampleError(f"task {task} needs speech input (n_frames >= 1), got {n_frames}")
        if features is not None and len(features) < n_frames:  # type: ignore[arg-type]
            raise SampleError(f"{len(features)} feature frames for n_frames={n_frames}")  # type: ignore[arg-type]
    elif text_ids is None:
        raise SampleError(f"task {task} needs the question text (text_ids)")
    prompt = prompt_for(task, n_frames=n_frames, text_ids=text_ids)
    ans_in, ans_lab = answer_span(task, answer_ids, frames)
    p = len(prompt[0])
    input_ids = [prompt[s] + ans_in[s] for s in range(T.N_STREAMS)]
    labels = [[IGNORE] * p + ans_lab[s] for s in range(T.N_STREAMS)]
    if max_len is not None and len(input_ids[0]) > max_len:
        raise SampleError(f"sequence of {len(input_ids[0])} positions exceeds max_len={max_len} "
                          "(prompt + answer must fit block_size); shorten or filter the example")
    return Sample(task=task, input_ids=input_ids, labels=labels,
                  whisper_len=n_frames if task in AUDIO_IN_TASKS else 0, prompt_len=p,
                  features=features if task in AUDIO_IN_TASKS else None, key=key)


def whisper_frames(n_samples: int, sample_rate: int = 16000) -> int:
    """L = int(ms / 20) + 1, capped at 1500 (spec mini_omni.md §7)."""
    ms = n_samples * 1000.0 / sample_rate
    return min(int(ms / 20) + 1, 1500)


def estimate_length(task: str, *, n_frames: int = 0, n_text_in: int = 0, n_answer: int = 0,
                    n_snac: int = 0) -> int:
    """Sequence length of a task without building it (length bucketing, filtering)."""
    prompt = n_frames + 3 if task in AUDIO_IN_TASKS else n_text_in + 3
    audio = n_snac + 8 if task in AUDIO_OUT_TASKS else 0
    return prompt + max(n_answer + 1, audio)
