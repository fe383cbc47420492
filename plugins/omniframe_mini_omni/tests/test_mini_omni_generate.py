"""Decode loops (spec §5): delay pattern, stopping, text padding, batch trick, length bound.

The loop tests drive a scripted fake model: it returns one-hot logits chosen per call and per
batch row, and records every input, so that what the loop feeds back can be checked exactly.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from omniframe_mini_omni import tokens as tk
from omniframe_mini_omni.generate import (
    GenerationStream,
    SamplingOptions,
    generate,
    sample,
)

PAD_A, EOA, PAD_T, EOT = 4097, 4096, 151937, 151936
G0 = 152000  # first global id of audio layer 0


def shift(local: int, layer: int) -> int:
    return G0 + 4160 * layer + local


class ScriptedModel(torch.nn.Module):
    """Fake GPT: call n (0 = prefill) returns audio(row, n) (7 local ids) and text(row, n)."""

    def __init__(
        self,
        audio: Callable[[int, int], list[int]],
        text: Callable[[int, int], int],
        block_size: int = 2048,
    ) -> None:
        super().__init__()
        self.audio, self.text = audio, text
        self.config = SimpleNamespace(block_size=block_size)
        self.device = torch.device("cpu")
        self.calls: list[dict[str, Any]] = []
        self.cache: tuple[int, int] | None = None

    def set_kv_cache(self, batch_size: int, max_seq_length: int | None = None, **_: Any) -> None:
        self.cache = (batch_size, max_seq_length or self.config.block_size)

    def forward(self, input_ids, input_pos=None, *, last_only=False, audio_head_rows=None,
                text_head_rows=None, **kwargs):  # fmt: skip
        n = len(self.calls)
        self.calls.append(
            {"ids": input_ids.tolist(), "pos": input_pos, "last_only": last_only,
             "audio_head_rows": audio_head_rows, "text_head_rows": text_head_rows, **kwargs}
        )  # fmt: skip
        B, _, T = input_ids.shape
        T_out = 1 if last_only else T
        arows = range(B) if audio_head_rows is None else audio_head_rows
        trows = range(B) if text_head_rows is None else text_head_rows
        audio = torch.zeros(len(arows), T_out, 7, 4160)
        for j, r in enumerate(arows):
            for i, tok in enumerate(self.audio(r, n)):
                audio[j, -1, i, tok] = 10.0
        text = torch.zeros(len(trows), T_out, 152000)
        for j, r in enumerate(trows):
            text[j, -1, self.text(r, n)] = 10.0
        return audio, text


def delayed_audio(n_frames: int) -> Callable[[int, int], list[int]]:
    """Layer i: (i+1) pads, codes 100*i + f for f < n_frames, EOA, then pads."""

    def audio(row: int, n: int) -> list[int]:
        out = []
        for i in range(7):
            f = n - (i + 1)
            if 0 <= f < n_frames:
                out.append(100 * i + f)
            else:
                out.append(EOA if f == n_frames else PAD_A)
        return out

    return audio


def from_list(seq: list[int], default: int) -> Callable[[int, int], int]:
    return lambda row, n: seq[n] if n < len(seq) else default


def features(L: int = 3) -> torch.Tensor:
    return torch.zeros(L, 768)


# --------------------------------------------------------------------------- speech output
def test_a1a2_delay_stop_and_text_padding():
    F = 5
    text = [10, 11, 12, EOT, 99]  # 99 after EOT must become pad_t
    model = ScriptedModel(delayed_audio(F), from_list(text, 99))
    stream = GenerationStream(model, "A1A2", whisper_features=features(3), batch_parallel=False)
    steps = list(stream)

    # layer 6 samples EOA at call F + 7 = 12: that step is not recorded
    assert stream.stop_reason == "eoa"
    assert len(steps) == F + 7 == len(model.calls) - 1
    assert [s.text for s in steps] == [10, 11, 12, EOT] + [PAD_T] * (F + 3)
    # frames: frame f = layer i at step f + i + 1, completed at step f + 7
    frames = [(s.frame_index, s.frame) for s in steps if s.frame is not None]
    assert frames == [(f, tuple(100 * i + f for i in range(7))) for f in range(F)]
    assert all(s.frame_is_codes for s in steps if s.frame is not None)
    result = stream.result()
    assert result.frames == [list(fr) for _, fr in frames]
    assert result.audio_tokens[0][:3] == [PAD_A, 0, 1]

    # prefill: the A1A2 prompt with features at 1..L, last position only
    pre = model.calls[0]
    assert pre["ids"] == [tk.audio_input_prompt("A1A2", 3)]
    assert pre["pos"] == 0 and pre["whisper_lens"] == [3] and pre["last_only"]
    # every step feeds back the previous step's tokens (audio shifted per layer) at T, T+1, ...
    T = 6
    for k, call in enumerate(model.calls[1:]):
        assert call["pos"] == T + k
        prev = steps[k]
        fed = [row[0] for row in call["ids"][0]]
        assert fed == [shift(a, i) for i, a in enumerate(prev.audio)] + [prev.text]
        assert tuple(fed) == prev.fed
        assert call.get("whisper_features") is None
    # EOT is fed exactly once, then pad_t
    fed_text = [c["ids"][0][7][0] for c in model.calls[1:]]
    assert fed_text.count(EOT) == 1 and fed_text[fed_text.index(EOT) + 1 :] == [PAD_T] * 8


@pytest.mark.parametrize("faithful", [False, True])
def test_batch_parallel_rows(faithful: bool):
    F = 2
    audio0 = delayed_audio(F)

    def audio(row: int, n: int) -> list[int]:
        return audio0(row, n) if row == 0 else [7] * 7  # row 1's audio must be ignored

    def text(row: int, n: int) -> int:
        if row == 0:
            return 500 + n  # row 0's text must be ignored
        return [20, 21, EOT][n] if n < 3 else 77

    model = ScriptedModel(audio, text)
    steps = list(GenerationStream(model, "A1A2", whisper_features=features(2), faithful=faithful))
    assert len(steps) == F + 7
    assert [s.text for s in steps] == [20, 21, EOT] + [PAD_T] * (F + 4)
    want = [tuple(100 * i + f for i in range(7)) for f in range(F)]
    assert [s.frame for s in steps if s.frame] == want

    pre = model.calls[0]
    assert pre["ids"] == [tk.audio_input_prompt("A1A2", 2), tk.audio_input_prompt("A1T2", 2)]
    assert pre["whisper_lens"] == [2, 2] and pre["audio_rows"] == [True, True]
    if faithful:  # every head for every row at every position, like the reference
        assert pre["last_only"] is False
        assert pre["audio_head_rows"] is None and pre["text_head_rows"] is None
    else:  # only what is used: audio of row 0, text of row 1, last position
        assert pre["last_only"] is True
        assert pre["audio_head_rows"] == [0] and pre["text_head_rows"] == [1]
    for k, call in enumerate(model.calls[1:]):
        row0, row1 = call["ids"]
        prev = steps[k]
        assert [s[0] for s in row0[:7]] == [shift(a, i) for i, a in enumerate(prev.audio)]
        assert [s[0] for s in row1[:7]] == [shift(PAD_A, i) for i in range(7)]
        assert row0[7][0] == row1[7][0] == prev.text  # row 1's text, fed to both rows


def test_step0_is_not_checked_and_trace():
    # layer 6 says EOA at the prefill: the reference does not check step 0
    def audio(row: int, n: int) -> list[int]:
        return [PAD_A] * 6 + [EOA] if n in (0, 2) else [PAD_A] * 7

    model = ScriptedModel(audio, from_list([EOT, 5, 6], 8))
    buf = io.StringIO()
    stream = GenerationStream(model, "T1A2", text_ids=[1, 2], batch_parallel=False, trace=buf)
    steps = list(stream)
    assert stream.stop_reason == "eoa" and len(steps) == 2
    # EOT at step 0 does not end the text either (no check at step 0)
    assert [s.text for s in steps] == [EOT, 5]
    assert model.calls[0]["ids"] == [tk.text_input_prompt("T1A2", [1, 2])]
    assert "whisper_features" not in model.calls[0] or model.calls[0]["whisper_features"] is None
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines == [
        {"step": 0, "audio": [PAD_A] * 6 + [EOA], "text": EOT},
        {"step": 1, "audio": [PAD_A] * 7, "text": 5},
    ]


# --------------------------------------------------------------------------- text output
@pytest.mark.parametrize("task", ["A1T2", "ASR", "T1T2"])
def test_text_tasks_stop_at_eot_and_feed_pad_a(task: str):
    model = ScriptedModel(lambda r, n: [EOA] * 7, from_list([30, 31, 32, EOT], 9))
    kwargs = {"text_ids": [4, 5]} if task == "T1T2" else {"whisper_features": features(2)}
    result = generate(model, task, **kwargs)
    assert result.stop_reason == "eot"
    assert result.text_tokens == [30, 31, 32] and result.audio_tokens is None
    expected_prompt = (
        tk.text_input_prompt(task, [4, 5]) if task == "T1T2" else tk.audio_input_prompt(task, 2)
    )
    assert model.calls[0]["ids"] == [expected_prompt]
    assert model.calls[0]["audio_head_rows"] == []  # the audio heads are not computed
    for k, call in enumerate(model.calls[1:]):
        assert [s[0] for s in call["ids"][0]] == [shift(PAD_A, i) for i in range(7)] + [
            result.text_tokens[k]
        ]


# --------------------------------------------------------------------------- bounds
def test_length_bound_follows_the_reference_loop():
    model = ScriptedModel(lambda r, n: [PAD_A] * 7, lambda r, n: 3, block_size=64)
    T = 2 + 3  # T1T2 prompt with 2 text ids
    result = generate(model, "T1T2", text_ids=[1, 2], max_returned_tokens=T + 6)
    # range(2, M - T + 1) iterations + the prefill step = M - T recorded steps
    assert result.stop_reason == "max_length" and len(result.text_tokens) == 6
    assert max(c["pos"] for c in model.calls) == T + 6 - 2  # last position M - 2
    assert model.cache == (1, T + 6)
    with pytest.raises(ValueError, match="block_size"):
        GenerationStream(model, "T1T2", text_ids=[1], max_returned_tokens=65)
    with pytest.raises(ValueError, match="no room"):
        GenerationStream(model, "T1T2", text_ids=[1] * 61)


def test_max_steps_and_close():
    model = ScriptedModel(lambda r, n: [PAD_A] * 7, lambda r, n: 3)
    result = generate(model, "A1A2", whisper_features=features(), max_steps=4)
    assert result.stop_reason == "max_steps" and len(result.text_tokens) == 4
    stream = GenerationStream(model, "A1A2", whisper_features=features())
    next(stream)
    other = GenerationStream(model, "T1T2", text_ids=[1])
    with pytest.raises(RuntimeError, match="another GenerationStream"):
        next(other)
    stream.close()
    assert stream.stop_reason == "closed"
    assert len(generate(model, "T1T2", text_ids=[1], max_steps=2).text_tokens) == 2


def test_argument_errors():
    model = ScriptedModel(lambda r, n: [PAD_A] * 7, lambda r, n: 3)
    with pytest.raises(ValueError, match="whisper_features"):
        GenerationStream(model, "A1A2")
    with pytest.raises(ValueError, match="text_ids"):
        GenerationStream(model, "T1A2")
    with pytest.raises(ValueError, match="speech-output"):
        GenerationStream(model, "ASR", whisper_features=features(), batch_parallel=True)


# --------------------------------------------------------------------------- sampling
def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample(logits).tolist() == [1]  # defaults: top_k = 1 -> greedy
    assert sample(logits, SamplingOptions(top_k=None, temperature=0.0)).tolist() == [1]
    gen = torch.Generator().manual_seed(0)
    draws = {
        int(sample(logits, SamplingOptions(top_k=2, temperature=1.0), gen)) for _ in range(200)
    }
    assert draws == {1, 3}
    # nucleus: probs ~[0.03, 0.64, 0.09, 0.24]; top_p 0.8 keeps {1, 3}
    opts = SamplingOptions(top_k=None, temperature=1.0, top_p=0.8)
    draws = {int(sample(logits, opts, gen)) for _ in range(300)}
    assert draws == {1, 3}
    a = sample(logits.repeat(5, 1), SamplingOptions(top_k=None), torch.Generator().manual_seed(7))
    b = sample(logits.repeat(5, 1), SamplingOptions(top_k=None), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        SamplingOptions(top_p=0.0)


# --------------------------------------------------------------------------- real tiny model
def test_tiny_model_cached_decoding_equals_recomputation(tiny_model):
    """The tokens the loop records are the greedy tokens of the full, uncached sequence."""
    feats = torch.randn(4, 768, generator=torch.Generator().manual_seed(5))
    stream = GenerationStream(tiny_model, "A1A2", whisper_features=feats, max_steps=12)
    steps = list(stream)
    prompt = torch.tensor(stream.prompt)  # (2, 8, T)
    T = prompt.size(-1)
    row0 = torch.tensor([list(s.fed) for s in steps[:-1]]).T  # (8, n) fed to row 0
    row1 = row0.clone()
    row1[:7] = torch.tensor([shift(PAD_A, i) for i in range(7)])[:, None]
    ids = torch.cat([prompt, torch.stack([row0, row1])], dim=-1)
    with torch.no_grad():
        audio, text = tiny_model(ids, whisper_features=feats[None], whisper_lens=[4, 4])
    for k, s in enumerate(steps):
        assert audio[0, T - 1 + k].argmax(-1).tolist() == list(s.audio)
        assert int(text[1, T - 1 + k].argmax()) == s.text or s.text == PAD_T
    # faithful mode gives the same tokens
    again = GenerationStream(tiny_model, "A1A2", whisper_features=feats, max_steps=12,
                             faithful=True)  # fmt: skip
    assert [s.fed for s in again] == [s.fed for s in steps]


def test_tiny_model_seeded_sampling_is_reproducible(tiny_model):
    opts = SamplingOptions(temperature=1.0, top_k=50, top_p=0.9)
    runs = [
        generate(tiny_model, "T1A2", text_ids=[1, 2, 3], sampling=opts, seed=11, max_steps=10)
        for _ in range(2)
    ]
    assert runs[0].text_tokens == runs[1].text_tokens
    assert runs[0].audio_tokens == runs[1].audio_tokens


def test_bfloat16_and_trace_file(tiny_model, tmp_path):
    from omniframe_mini_omni.model import GPT

    model = GPT(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    model.to(torch.bfloat16)
    trace = tmp_path / "trace.jsonl"
    result = generate(model, "T1A2", text_ids=[1, 2], max_steps=9, trace=trace)
    lines = [json.loads(x) for x in trace.read_text().splitlines()]
    assert len(lines) == len(result.text_tokens) == 9
    assert [x["text"] for x in lines] == result.text_tokens
    assert all(len(x["audio"]) == 7 and all(0 <= a < 4160 for a in x["audio"]) for x in lines)
    assert len(result.frames) == 2
