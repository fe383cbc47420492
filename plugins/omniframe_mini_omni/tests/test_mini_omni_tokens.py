"""Token layout, prompts (spec §3.2, written out independently here) and SNAC frame helpers."""

from __future__ import annotations

import pytest
from omniframe_mini_omni import tokens as tk
from omniframe_mini_omni.tokens import Task

# Spec §2 numbers, typed in again rather than derived from the module under test.
TEXT_BASE = 152000
LAYER = 4160


def g(local: int, layer: int) -> int:
    return TEXT_BASE + LAYER * layer + local


def test_vocabulary_constants():
    assert (tk.EOT, tk.PAD_T, tk.INPUT_T, tk.ANSWER_T, tk.ASR) == (
        151936, 151937, 151938, 151939, 151940,
    )  # fmt: skip
    assert (tk.EOA, tk.PAD_A, tk.INPUT_A, tk.ANSWER_A, tk.SPLIT, tk.IMAGE, tk.EOIMAGE) == (
        4096, 4097, 4098, 4099, 4100, 4101, 4102,
    )  # fmt: skip
    assert tk.PADDED_VOCAB_SIZE == 181120
    assert [tk.layer_base(i) for i in range(7)] == [
        152000, 156160, 160320, 164480, 168640, 172800, 176960,
    ]  # fmt: skip
    assert tk.layershift(tk.EOA, 0) == 156096 and tk.layershift(tk.EOA, 6) == 181056
    assert tk.layershift(tk.PAD_A, 6) == 181057
    assert tk.unshift(181056) == (6, 4096)
    with pytest.raises(ValueError):
        tk.layershift(4160, 0)
    with pytest.raises(ValueError):
        tk.layershift(0, 7)


def _expected(audio_locals: list[int], text: list[int]) -> list[list[int]]:
    """Position-by-position expected streams: 7 audio layers (same local id) + text."""
    out = [[g(a, layer) for a in audio_locals] for layer in range(7)]
    out.append(text)
    return out


@pytest.mark.parametrize("L", [1, 4])
def test_speech_input_prompts(L: int):
    pad_a, in_a, eoa, ans_a = 4097, 4098, 4096, 4099
    pad_t, in_t, eot, ans_t, asr = 151937, 151938, 151936, 151939, 151940
    audio_a1a2 = [in_a] + [pad_a] * L + [eoa, ans_a]
    audio_a1t2 = [in_a] + [pad_a] * L + [eoa, pad_a]
    text = [in_t] + [pad_t] * L + [eot, ans_t]
    text_asr = [in_t] + [pad_t] * L + [eot, asr]
    assert tk.audio_input_prompt("A1A2", L) == _expected(audio_a1a2, text)
    assert tk.audio_input_prompt("A1T2", L) == _expected(audio_a1t2, text)
    assert tk.audio_input_prompt("ASR", L) == _expected(audio_a1t2, text_asr)
    row0, row1 = tk.batch_prompts(L)
    assert row0 == _expected(audio_a1a2, text) and row1 == _expected(audio_a1t2, text)
    for p in (row0, row1):
        assert all(len(s) == L + 3 for s in p)


def test_text_input_prompts():
    toks = [11, 22, 33]
    n = len(toks)
    pad_a, ans_a = 4097, 4099
    text = [151938, *toks, 151936, 151939]
    assert tk.text_input_prompt(Task.T1A2, toks) == _expected([pad_a] * (n + 2) + [ans_a], text)
    assert tk.text_input_prompt(Task.T1T2, toks) == _expected([pad_a] * (n + 3), text)
    assert tk.build_prompt("T1T2", text_ids=toks) == tk.text_input_prompt("T1T2", toks)
    assert tk.build_prompt("ASR", n_frames=2) == tk.audio_input_prompt("ASR", 2)
    with pytest.raises(ValueError, match="text ids"):
        tk.text_input_prompt("T1T2", [151936])
    with pytest.raises(ValueError, match="n_frames"):
        tk.build_prompt("A1A2")
    with pytest.raises(ValueError):
        tk.audio_input_prompt("T1A2", 3)


def test_frame_regrouping_depth_first():
    # frame f: [cb0[f], cb1[2f], cb2[4f], cb2[4f+1], cb1[2f+1], cb2[4f+2], cb2[4f+3]]
    cb0 = [1, 2]
    cb1 = [10, 11, 12, 13]
    cb2 = [100, 101, 102, 103, 104, 105, 106, 107]
    frames = [[1, 10, 100, 101, 11, 102, 103], [2, 12, 104, 105, 13, 106, 107]]
    assert tk.frames_to_codebooks(frames) == (cb0, cb1, cb2)
    assert tk.codebooks_to_frames(cb0, cb1, cb2) == frames
    with pytest.raises(ValueError, match="SNAC code"):
        tk.frames_to_codebooks([[1, 2, 3, 4, 5, 6, 4096]])


def test_answer_snac_roundtrip_and_validation():
    frames = [[1, 2, 3, 4, 5, 6, 7], [4095, 0, 0, 0, 0, 0, 9]]
    s = tk.format_answer_snac(frames)
    assert s == "# 1 2 3 4 5 6 7 # 4095 0 0 0 0 0 9"
    assert tk.parse_answer_snac(s) == frames
    assert tk.parse_answer_snac("  #\t1 2 3 4 5 6 7\n") == [[1, 2, 3, 4, 5, 6, 7]]
    with pytest.raises(ValueError, match="multiple of 8"):
        tk.parse_answer_snac("# 1 2 3")
    with pytest.raises(ValueError, match="expected '#'"):
        tk.parse_answer_snac("1 # 2 3 4 5 6 7")
    with pytest.raises(ValueError, match="SNAC code"):
        tk.parse_answer_snac("# 1 2 3 4 5 6 4096")


def test_delay_and_undelay():
    frames = [[100 + i + 10 * f for i in range(7)] for f in range(3)]
    rows = tk.delay_frames(frames)
    pad, eoa = 4097, 4096
    for i, row in enumerate(rows):
        assert len(row) == 3 + 8
        assert row[: i + 1] == [pad] * (i + 1)
        assert row[i + 1 : i + 4] == [frames[f][i] for f in range(3)]
        assert row[i + 4] == eoa
        assert row[i + 5 :] == [pad] * (6 - i)
    # decoded rows stop before layer 6's EOA: drop the last position of every row
    assert tk.undelay([r[:-1] for r in rows]) == frames
