"""Text tokenizer conventions: no BOS, cut at EOT, incremental deltas."""

from __future__ import annotations

from pathlib import Path

from omniframe_mini_omni import tokens as tk
from omniframe_mini_omni.tokenizer import IncrementalDecoder, TextTokenizer


def test_encode_decode(tokenizer_dir: Path):
    tok = TextTokenizer(tokenizer_dir)
    ids = tok.encode("hello world")
    assert ids == [0, 1]  # no BOS/EOS
    assert tok.decode([0, 1, tk.EOT, 2, 3]) == "hello world"
    assert tok.decode([tk.PAD_T, 0, tk.ANSWER_T, 1]) == "hello world"


def test_incremental_bytelevel(tmp_path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "héllo wörld ✓ naïve café ✓✓"
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world"] * 5, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    t = TextTokenizer(tmp_path / "tokenizer.json")
    ids = t.encode(text)
    dec = IncrementalDecoder(t)
    deltas = [dec.push(i) for i in ids] + [dec.push(tk.EOT), dec.push(5)]
    assert "".join(deltas) + dec.flush() == text
    assert all("\ufffd" not in d for d in deltas)
