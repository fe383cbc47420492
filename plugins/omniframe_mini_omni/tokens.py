"""Mini-Omni vocabulary layout, special tokens, prompt builders and SNAC frame helpers.

Everything here is plain Python (no torch) so that data pipelines and tests can use it cheaply.

Layout (spec mini_omni.md §2): one shared embedding table of 181,120 rows.

- rows [0, 152000): text. 151,936 Qwen2 BPE ids, then 64 Mini-Omni text specials.
- rows [152000 + 4160*i, 152000 + 4160*(i+1)), i = 0..6: audio layer i. Each layer block holds
  4,096 SNAC codes and 64 audio specials. Audio ids are *local* (0..4159) in the logits and in
  SNAC, and *global* (shifted with :func:`layershift`) in the model inputs.

Every LM position holds 8 ids: streams 0..6 are the audio layers, stream 7 is text. A prompt is
therefore a list of 8 equally long lists of global ids (``streams[s][t]``).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

# --------------------------------------------------------------------------- vocabulary sizes
TEXT_TOKENIZER_SIZE = 151_936  # Qwen2 tokenizer size; Mini-Omni text specials start here
TEXT_VOCAB_SIZE = 152_000  # padded text vocabulary = width of the text logit slice
AUDIO_CODEBOOK_SIZE = 4_096  # SNAC codes per codebook
AUDIO_VOCAB_SIZE = 4_160  # codes + 64 specials = width of one audio logit slice
N_AUDIO_LAYERS = 7  # flat SNAC tokens per frame (1 + 2 + 4 codes of the 3 codebooks)
N_STREAMS = N_AUDIO_LAYERS + 1  # 7 audio streams + 1 text stream
TEXT_STREAM = N_AUDIO_LAYERS  # index of the text stream
PADDED_VOCAB_SIZE = TEXT_VOCAB_SIZE + N_AUDIO_LAYERS * AUDIO_VOCAB_SIZE  # 181,120

# --------------------------------------------------------------------------- text specials
# Raw ids, unknown to the tokenizer.
EOT = TEXT_TOKENIZER_SIZE + 0  # 151936 end of text
PAD_T = TEXT_TOKENIZER_SIZE + 1  # 151937 text pad
INPUT_T = TEXT_TOKENIZER_SIZE + 2  # 151938 start of input
ANSWER_T = TEXT_TOKENIZER_SIZE + 3  # 151939 "answer" task signal
ASR = TEXT_TOKENIZER_SIZE + 4  # 151940 "transcribe" task signal

# --------------------------------------------------------------------------- audio specials
# Local ids inside one audio layer; feed them through layershift(id, layer).
EOA = AUDIO_CODEBOOK_SIZE + 0  # 4096 end of audio (the real EOA; upstream misnames 4097)
PAD_A = AUDIO_CODEBOOK_SIZE + 1  # 4097 audio pad
INPUT_A = AUDIO_CODEBOOK_SIZE + 2  # 4098 start of input
ANSWER_A = AUDIO_CODEBOOK_SIZE + 3  # 4099 "speak" task signal
SPLIT = AUDIO_CODEBOOK_SIZE + 4  # 4100 defined upstream, unused by released inference
IMAGE = AUDIO_CODEBOOK_SIZE + 5  # 4101 Mini-Omni2 only
EOIMAGE = AUDIO_CODEBOOK_SIZE + 6  # 4102 Mini-Omni2 only


class Task(enum.StrEnum):
    """Mini-Omni tasks (reference code names). The prompt's last position selects the task."""

    A1A2 = "A1A2"  # speech in, speech + text out
    A1T2 = "A1T2"  # speech in, text out
    ASR = "ASR"  # speech in, transcript out (A1T1)
    T1A2 = "T1A2"  # text in, speech + text out
    T1T2 = "T1T2"  # text in, text out

    @property
    def audio_input(self) -> bool:
        """True when the prompt carries Whisper features (A1*, ASR)."""
        return self in (Task.A1A2, Task.A1T2, Task.ASR)

    @property
    def audio_output(self) -> bool:
        """True when the model speaks (decode loop stops on layer-6 EOA)."""
        return self in (Task.A1A2, Task.T1A2)


def layershift(token: int, layer: int) -> int:
    """Global id of local audio id ``token`` (0..4159) in audio layer ``layer`` (0..6)."""
    if not 0 <= layer < N_AUDIO_LAYERS:
        raise ValueError(f"audio layer must be in 0..{N_AUDIO_LAYERS - 1}, got {layer}")
    if not 0 <= token < AUDIO_VOCAB_SIZE:
        raise ValueError(f"local audio id must be in 0..{AUDIO_VOCAB_SIZE - 1}, got {token}")
    return token + TEXT_VOCAB_SIZE + AUDIO_VOCAB_SIZE * layer


def layer_base(layer: int) -> int:
    """First global id of audio layer ``layer`` (152000, 156160, ...)."""
    return TEXT_VOCAB_SIZE + AUDIO_VOCAB_SIZE * layer


def unshift(global_id: int) -> tuple[int, int]:
    """Inverse of :func:`layershift`: global audio id -> (layer, local id)."""
    offset = global_id - TEXT_VOCAB_SIZE
    if not 0 <= offset < N_AUDIO_LAYERS * AUDIO_VOCAB_SIZE:
        raise ValueError(f"{global_id} is not a global audio id (range {TEXT_VOCAB_SIZE}..)")
    return offset // AUDIO_VOCAB_SIZE, offset % AUDIO_VOCAB_SIZE


def audio_position(local: int) -> list[int]:
    """The same local audio id in every layer, shifted per layer: the 7 audio ids of a position."""
    return [layershift(local, i) for i in range(N_AUDIO_LAYERS)]


# --------------------------------------------------------------------------- prompts
Streams = list[list[int]]  # 8 streams x T global ids


def _from_positions(audio: Sequence[int], text: Sequence[int]) -> Streams:
    """Build 8 streams from per-position local audio specials and text ids."""
    if len(audio) != len(text):
        raise AssertionError("audio and text prompt parts must have the same length")
    streams = [[layershift(a, i) for a in audio] for i in range(N_AUDIO_LAYERS)]
    streams.append(list(text))
    return streams


def audio_input_prompt(task: Task | str, n_frames: int) -> Streams:
    """Prompt for a speech-input task (A1A2, A1T2, ASR); spec §3.2.

    Args:
        task: ``A1A2``, ``A1T2`` or ``ASR``.
        n_frames: L, the number of Whisper encoder frames kept (one LM position each).

    Returns:
        8 streams of L + 3 global ids. Whisper features go to positions 1..L of streams 0..6.
        audio: ``input_a``, L x ``pad_a``, ``eoa``, then ``answer_a`` (A1A2) or ``pad_a``;
        text: ``input_t``, L x ``pad_t``, ``eot``, then ``answer_t`` (``asr`` for ASR).
    """
    task = Task(task)
    if not task.audio_input:
        raise ValueError(f"{task} is a text-input task: use text_input_prompt()")
    if n_frames < 1:
        raise ValueError(f"a speech prompt needs at least one Whisper frame, got {n_frames}")
    last_a = ANSWER_A if task is Task.A1A2 else PAD_A
    last_t = ASR if task is Task.ASR else ANSWER_T
    audio = [INPUT_A] + [PAD_A] * n_frames + [EOA, last_a]
    text = [INPUT_T] + [PAD_T] * n_frames + [EOT, last_t]
    return _from_positions(audio, text)


def text_input_prompt(task: Task | str, text_ids: Sequence[int]) -> Streams:
    """Prompt for a text-input task (T1A2, T1T2); spec §3.2.

    Args:
        task: ``T1A2`` or ``T1T2``.
        text_ids: the n BPE ids of the input text (no BOS/EOS), each < 151936.

    Returns:
        8 streams of n + 3 global ids. audio: (n+2) x ``pad_a`` then ``answer_a`` (T1A2) or
        ``pad_a`` (T1T2); text: ``input_t``, the n ids, ``eot``, ``answer_t``.
    """
    task = Task(task)
    if task.audio_input:
        raise ValueError(f"{task} is a speech-input task: use audio_input_prompt()")
    ids = [int(t) for t in text_ids]
    bad = [t for t in ids if not 0 <= t < TEXT_TOKENIZER_SIZE]
    if bad:
        raise ValueError(
            f"text ids must be tokenizer ids in 0..{TEXT_TOKENIZER_SIZE - 1}, got {bad[:5]}"
        )
    n = len(ids)
    last_a = ANSWER_A if task is Task.T1A2 else PAD_A
    audio = [PAD_A] * (n + 2) + [last_a]
    text = [INPUT_T, *ids, EOT, ANSWER_T]
    return _from_positions(audio, text)


def build_prompt(
    task: Task | str, *, n_frames: int | None = None, text_ids: Sequence[int] | None = None
) -> Streams:
    """Dispatch to :func:`audio_input_prompt` or :func:`text_input_prompt` by task."""
    task = Task(task)
    if task.audio_input:
        if n_frames is None:
            raise ValueError(f"task {task} needs n_frames (the number of Whisper frames)")
        return audio_input_prompt(task, n_frames)
    if text_ids is None:
        raise ValueError(f"task {task} needs text_ids (the tokenized input text)")
    return text_input_prompt(task, text_ids)


def batch_prompts(n_frames: int) -> tuple[Streams, Streams]:
    """The two rows of batch parallel decoding (A1A2 + A1T2, spec §3.2 / §5.4).

    Row 0 is the A1A2 prompt (last audio ``answer_a``), row 1 the A1T2 prompt (last audio
    ``pad_a``); both text streams end with ``answer_t``.
    """
    return audio_input_prompt(Task.A1A2, n_frames), audio_input_prompt(Task.A1T2, n_frames)


# --------------------------------------------------------------------------- SNAC frames
# Within-frame order is depth-first (spec §6.1):
#   stream  0       1       2       3       4       5       6
#   code    cb0[f]  cb1[2f] cb2[4f] cb2[4f+1] cb1[2f+1] cb2[4f+2] cb2[4f+3]
FRAME_LAYOUT: tuple[tuple[int, int], ...] = (
    (0, 0),
    (1, 0),
    (2, 0),
    (2, 1),
    (1, 1),
    (2, 2),
    (2, 3),
)  # (codebook, position within the frame) of each of the 7 flat streams
CODES_PER_FRAME = (1, 2, 4)  # codes of SNAC codebooks 0, 1, 2 per frame


def _check_code(code: int, where: str) -> int:
    code = int(code)
    if not 0 <= code < AUDIO_CODEBOOK_SIZE:
        raise ValueError(
            f"{where}: {code} is not a SNAC code (0..{AUDIO_CODEBOOK_SIZE - 1}); "
            "audio specials (EOA 4096, pad 4097, ...) must never reach the codec"
        )
    return code


def frames_to_codebooks(frames: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int]]:
    """Regroup F flat 7-code frames into SNAC's 3 codebooks of F, 2F and 4F codes."""
    books: tuple[list[int], list[int], list[int]] = ([], [], [])
    for f, frame in enumerate(frames):
        if len(frame) != N_AUDIO_LAYERS:
            raise ValueError(f"frame {f} has {len(frame)} codes, expected {N_AUDIO_LAYERS}")
        per_book: tuple[list[int], list[int], list[int]] = ([0], [0, 0], [0, 0, 0, 0])
        for s, (book, pos) in enumerate(FRAME_LAYOUT):
            per_book[book][pos] = _check_code(frame[s], f"frame {f} stream {s}")
        for book in range(3):
            books[book].extend(per_book[book])
    return books


def codebooks_to_frames(
    cb0: Sequence[int], cb1: Sequence[int], cb2: Sequence[int]
) -> list[list[int]]:
    """Inverse of :func:`frames_to_codebooks`: 3 codebooks (F, 2F, 4F codes) -> F frames of 7."""
    n = len(cb0)
    if len(cb1) != 2 * n or len(cb2) != 4 * n:
        raise ValueError(
            f"codebook lengths must be F, 2F, 4F; got {len(cb0)}, {len(cb1)}, {len(cb2)}"
        )
    books = (cb0, cb1, cb2)
    frames = []
    for f in range(n):
        frame = []
        for book, pos in FRAME_LAYOUT:
            idx = f * CODES_PER_FRAME[book] + pos
            frame.append(_check_code(books[book][idx], f"codebook {book}[{idx}]"))
        frames.append(frame)
    return frames


def parse_answer_snac(text: str) -> list[list[int]]:
    """Parse a VoiceAssistant-400K ``answer_snac`` string into F frames of 7 local codes.

    The format is whitespace-separated frames, each ``#`` followed by 7 codes in the flat
    depth-first order. Raises ``ValueError`` naming the first offending token.
    """
    parts = text.split()
    if len(parts) % 8:
        raise ValueError(f"answer_snac has {len(parts)} tokens; expected a multiple of 8 ('#' + 7)")
    frames = []
    for f in range(len(parts) // 8):
        chunk = parts[8 * f : 8 * f + 8]
        if chunk[0] != "#":
            raise ValueError(f"answer_snac token {8 * f} is {chunk[0]!r}, expected '#'")
        try:
            codes = [int(c) for c in chunk[1:]]
        except ValueError as e:
            raise ValueError(f"answer_snac frame {f}: non-integer code in {chunk[1:]}") from e
        frames.append([_check_code(c, f"answer_snac frame {f}") for c in codes])
    return frames


def format_answer_snac(frames: Sequence[Sequence[int]]) -> str:
    """Serialise frames of 7 local codes as ``# c0 .. c6 # c0 .. c6 ...``."""
    out = []
    for f, frame in enumerate(frames):
        if len(frame) != N_AUDIO_LAYERS:
            raise ValueError(f"frame {f} has {len(frame)} codes, expected {N_AUDIO_LAYERS}")
        out.append("#")
        out.extend(str(_check_code(c, f"frame {f}")) for c in frame)
    return " ".join(out)


def delay_frames(frames: Sequence[Sequence[int]]) -> list[list[int]]:
    """Answer-span audio rows with the delay pattern (training targets, local ids).

    Layer i holds (i+1) x pad, the F codes of that layer, EOA, then (6-i) x pad: F + 8 each.
    """
    rows = []
    for i in range(N_AUDIO_LAYERS):
        codes = [_check_code(frame[i], f"frame stream {i}") for frame in frames]
        rows.append([PAD_A] * (i + 1) + codes + [EOA] + [PAD_A] * (N_AUDIO_LAYERS - 1 - i))
    return rows


def undelay(audio_rows: Sequence[Sequence[int]]) -> list[list[int]]:
    """Aligned frames from 7 delayed rows of decoded local ids (frame f = layer i at f+i+1).

    The number of frames is ``len(row 6) - 7``: the steps where the last layer has produced a
    token. Values are returned as decoded (specials included); validate before SNAC.
    """
    if len(audio_rows) != N_AUDIO_LAYERS:
        raise ValueError(f"expected {N_AUDIO_LAYERS} audio rows, got {len(audio_rows)}")
    n = max(0, min(len(r) - (i + 1) for i, r in enumerate(audio_rows)))
    return [[int(audio_rows[i][f + i + 1]) for i in range(N_AUDIO_LAYERS)] for f in range(n)]


def is_code_frame(frame: Sequence[int]) -> bool:
    """True when all 7 values are SNAC codes (no specials)."""
    return len(frame) == N_AUDIO_LAYERS and all(0 <= c < AUDIO_CODEBOOK_SIZE for c in frame)
