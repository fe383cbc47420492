"""Text tokenizer (HF ``tokenizers``, Qwen2 ``tokenizer.json``) with Mini-Omni's conventions.

No BOS/EOS is added. Mini-Omni's text specials (ids >= 151936) are unknown to the tokenizer:
decoding stops at the first end-of-text and drops any other special.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from . import tokens


class TextTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` loaded from ``tokenizer.json``."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer.json not found at {path}; a Mini-Omni folder needs the Qwen2 "
                "tokenizer.json next to lit_model.pth"
            )
        self.path = path
        self.processor = Tokenizer.from_file(str(path))

    @property
    def vocab_size(self) -> int:
        return self.processor.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``: no BOS, no EOS, no Mini-Omni specials."""
        ids = self.processor.encode(text, add_special_tokens=False).ids
        bad = [i for i in ids if i >= tokens.TEXT_TOKENIZER_SIZE]
        if bad:
            raise ValueError(
                f"tokenizer produced ids {bad[:5]} >= {tokens.TEXT_TOKENIZER_SIZE}, which collide "
                "with Mini-Omni's text specials: is this the Qwen2 tokenizer?"
            )
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, cut at the first end-of-text, other Mini-Omni specials dropped."""
        return self.processor.decode(clean_text_ids(ids))


def clean_text_ids(ids: Iterable[int]) -> list[int]:
    """Ids up to the first ``EOT`` (151936), without the other text specials."""
    out = []
    for i in ids:
        i = int(i)
        if i == tokens.EOT:
            break
        if 0 <= i < tokens.TEXT_TOKENIZER_SIZE:
            out.append(i)
    return out


class IncrementalDecoder:
    """Turns a stream of text ids into text deltas that never split a UTF-8 character.

    ``push(id)`` returns the new text ("" while a byte-level token is incomplete, and for
    specials). Concatenating the deltas equals ``tokenizer.decode(all ids)``; ``flush()``
    returns whatever is still held back.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.ended = False

    def push(self, token: int | None) -> str:
        if token is None or self.ended:
            return ""
        if token == tokens.EOT:
            self.ended = True
            return ""
        if not 0 <= token < tokens.TEXT_TOKENIZER_SIZE:
            return ""
        self.ids.append(int(token))
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd") or not full.startswith(self.text):
            return ""  # incomplete multi-byte character: wait for the next token
        delta, self.text = full[len(self.text) :], full
        return delta

    def flush(self) -> str:
        full = self.tokenizer.decode(self.ids)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text = full
        return delta

    def extend(self, ids: Sequence[int]) -> str:
        return "".join(self.push(i) for i in ids)
