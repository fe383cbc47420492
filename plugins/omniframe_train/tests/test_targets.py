"""Per-task training sequences, checked position by position (spec training.md §1.3-1.7)."""

from __future__ import annotations

import pytest
from omniframe_mini_omni import tokens as T
from omniframe_train.targets import (
    IGNORE,
    TTS_T,
    SampleError,
    build_sample,
    estimate_length,
    whisper_frames,
)

X = IGNORE
FRAMES = [[100 + 10 * f + i for i in range(7)] for f in range(3)]  # F = 3, layer i of frame f


def A(local: int, layer: int) -> int:
    return T.layershift(local, layer)


def test_a1a2_matches_the_worked_example() -> None:
    # spec training.md §1.3: L = 2, F = 3 frames with codes 100.., answer text "11 12"
    s = build_sample("A1A2", answer_ids=[11, 12], frames=FRAMES, n_frames=2)
    assert s.prompt_len == 5 and len(s) == 16 and s.whisper_len == 2
    pA, EOA, inA, anA = T.PAD_A, T.EOA, T.INPUT_A, T.ANSWER_A
    s0 = [inA, pA, pA, EOA, anA, pA, 100, 110, 120, EOA, pA, pA, pA, pA, pA, pA]
    assert s.input_ids[0] == [A(v, 0) for v in s0]
    s6 = [inA, pA, pA, EOA, anA] + [pA] * 7 + [106, 116, 126, EOA]
    assert s.input_ids[6] == [A(v, 6) for v in s6]
    assert s.input_ids[7] == [T.INPUT_T, T.PAD_T, T.PAD_T, T.EOT, T.ANSWER_T, 11, 12, T.EOT] + [
        T.PAD_T] * 8
    assert s.labels[0] == [X] * 5 + [pA, 100, 110, 120, EOA] + [pA] * 6  # pads supervised
    assert s.labels[6] == [X] * 5 + [pA] * 7 + [106, 116, 126, EOA]
    assert s.labels[7] == [X] * 5 + [11, 12, T.EOT] + [X] * 8  # pad_t after EOT masked
    for i in range(7):  # layer i: i+1 pads, codes, EOA, 6-i pads
        row = s.labels[i][5:]
        assert row == [pA] * (i + 1) + [f[i] for f in FRAMES] + [EOA] + [pA] * (6 - i)


def test_text_longer_than_audio_masks_the_audio_tail() -> None:
    frames = FRAMES[:1]  # F = 1 -> audio span 9
    s = build_sample("T1A2", answer_ids=list(range(20, 32)), frames=frames, text_ids=[5, 6])
    assert s.prompt_len == 5 and len(s) == 5 + 13
    assert s.labels[0][5:] == [T.PAD_A, 100, T.EOA] + [T.PAD_A] * 6 + [X] * 4
    assert s.input_ids[0][5 + 9:] == [A(T.PAD_A, 0)] * 4
    assert s.labels[7][5:] == list(range(20, 32)) + [T.EOT]
    # T1A2 prompt: (n+2) pad_a then answer_a; text input_t, toks, eot, answer_t
    assert s.input_ids[3][:5] == [A(T.PAD_A, 3)] * 4 + [A(T.ANSWER_A, 3)]
    assert s.input_ids[7][:5] == [T.INPUT_T, 5, 6, T.EOT, T.ANSWER_T]
    assert s.whisper_len == 0 and s.features is None


def test_equal_lengths_keep_the_audio_loss() -> None:
    # SLAM masks all audio labels when m + 1 == F + 8 (zero-length slice bug, spec §1.4)
    s = build_sample("A1A2", answer_ids=list(range(10)), frames=FRAMES[:3], n_frames=1)
    assert len(s) - s.prompt_len == 11
    for i in range(7):
        assert all(v != X for v in s.labels[i][s.prompt_len:])
    assert s.labels[7][s.prompt_len:] == list(range(10)) + [T.EOT]


@pytest.mark.parametrize("task", ["ASR", "A1T2"])
def test_speech_in_text_out(task: str) -> None:
    s = build_sample(task, answer_ids=[7, 8, 9], n_frames=3)
    last_t = T.ASR if task == "ASR" else T.ANSWER_T
    assert s.input_ids[7] == [T.INPUT_T, T.PAD_T, T.PAD_T, T.PAD_T, T.EOT, last_t, 7, 8, 9, T.EOT]
    for i in range(7):
        assert s.input_ids[i] == [A(T.INPUT_A, i)] + [A(T.PAD_A, i)] * 3 + [
            A(T.EOA, i), A(T.PAD_A, i)] + [A(T.PAD_A, i)] * 4
        assert s.labels[i] == [X] * 10  # text-out tasks: no audio loss (#61)
    assert s.labels[7] == [X] * 6 + [7, 8, 9, T.EOT]
    assert s.whisper_len == 3


def test_t1t2() -> None:
    s = build_sample("T1T2", answer_ids=[42], text_ids=[1, 2, 3])
    assert s.input_ids[7] == [T.INPUT_T, 1, 2, 3, T.EOT, T.ANSWER_T, 42, T.EOT]
    assert s.input_ids[0] == [A(T.PAD_A, 0)] * 8
    assert s.labels[7] == [X] * 6 + [42, T.EOT]
    assert all(v == X for i in range(7) for v in s.labels[i])


def test_tts_has_its_own_signal_and_only_audio_loss() -> None:
    tts = build_sample("TTS", answer_ids=[5, 6], frames=FRAMES[:2], text_ids=[5, 6])
    t1a2 = build_sample("T1A2", answer_ids=[5, 6], frames=FRAMES[:2], text_ids=[5, 6])
    p = tts.prompt_len
    assert tts.input_ids[7][p - 1] == TTS_T and t1a2.input_ids[7][p - 1] == T.ANSWER_T
    assert [r[:p] for r in tts.input_ids[:7]] == [r[:p] for r in t1a2.input_ids[:7]]
    assert tts.labels[7] == [X] * len(tts)  # text not supervised (#101)
    assert tts.input_ids[7][p:p + 3] == [5, 6, T.EOT]  # but the text stream carries it
    assert tts.labels[:7] == t1a2.labels[:7]


def test_errors_name_the_problem() -> None:
    with pytest.raises(SampleError, match="needs the answer's SNAC frames"):
        build_sample("A1A2", answer_ids=[1], n_frames=2)
    with pytest.raises(SampleError, match="text only"):
        build_sample("ASR", answer_ids=[1], frames=FRAMES, n_frames=2)
    with pytest.raises(SampleError, match="needs speech input"):
        build_sample("ASR", answer_ids=[1])
    with pytest.raises(SampleError, match="unknown task"):
        build_sample("A2A1", answer_ids=[1])
    with pytest.raises(SampleError, match="exceeds max_len"):
        build_sample("ASR", answer_ids=[1], n_frames=50, max_len=20)
    with pytest.raises(SampleError, match="tokenizer ids"):
        build_sample("T1T2", answer_ids=[T.EOT], text_ids=[1])
    with pytest.raises(ValueError, match="not a SNAC code"):
        build_sample("T1A2", answer_ids=[1], frames=[[4096] * 7], text_ids=[1])


def test_lengths() -> None:
    assert whisper_frames(16000) == 51 and whisper_frames(16000 * 40) == 1500
    for task, kw in [("A1A2", dict(frames=FRAMES, n_frames=4)), ("ASR", dict(n_frames=4)),
                     ("T1T2", dict(text_ids=[1, 2])), ("TTS", dict(frames=FRAMES, text_ids=[1]))]:
        s = build_sample(task, answer_ids=[3, 4], **kw)
        est = estimate_length(task, n_frames=kw.get("n_frames", 0),
                              n_text_in=len(kw.get("text_ids", [])), n_answer=2,
                              n_snac=len(kw.get("frames", [])))
        assert est == len(s), task
