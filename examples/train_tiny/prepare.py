"""Data for the train_tiny example: short command phrases spoken by espeak-ng.

Writes under ``build/``: 16 kHz wavs, ``train.jsonl`` (training voices and rates), ``eval.jsonl``
(held-out voices, a rate never used in training), ``qa.jsonl`` (a text-only echo task for the
stage-2 ASR : text-QA mix) and ``tokenizer.json`` (a word-level tokenizer over the small
vocabulary; the model's text vocabulary slice keeps its full 152,000 rows).
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"

VERBS = ["turn on", "turn off", "open", "close"]
COLORS = ["red", "green", "blue", "white"]
THINGS = ["light", "door", "window", "fan", "lamp"]
PLACES = ["", "in the kitchen", "in the garden"]

TRAIN_VOICES = ["en-us", "en-gb", "en-029", "en-gb-scotland", "en-us+f3", "en-gb-x-rp+m3"]
TRAIN_RATES = [135, 165, 195]
EVAL_VOICES = ["en-us-nyc", "en-gb-x-gbclan+f2"]  # never heard in training
EVAL_RATE = 150


def phrases() -> list[str]:
    out = []
    for verb, color, thing, place in itertools.product(VERBS, COLORS, THINGS, PLACES):
        out.append(" ".join(w for w in (verb, "the", color, thing, place) if w))
    return out


def write_tokenizer(words: list[str], path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(path))


def speak(text: str, voice: str, rate: int, path: Path) -> int:
    import soundfile as sf

    from omniframe.testing import espeak

    if not path.is_file():
        sf.write(path, espeak(text, voice=voice, rate=rate, sample_rate=16000), 16000)
    return sf.info(str(path)).frames


def main(n_train: int = 240, n_eval: int = 40, seed: int = 0) -> None:
    rng = random.Random(seed)
    wav = BUILD / "wav"
    wav.mkdir(parents=True, exist_ok=True)
    all_phrases = phrases()
    words = sorted({w for p in all_phrases for w in p.split()})
    write_tokenizer(words, BUILD / "tokenizer.json")
    combos = [(v, r) for v in TRAIN_VOICES for r in TRAIN_RATES]
    train = []
    for i in range(n_train):
        text = rng.choice(all_phrases)
        voice, rate = rng.choice(combos)
        name = f"train{i:04d}.wav"
        n = speak(text, voice, rate, wav / name)
        train.append({"id": f"tiny:{name[:-4]}", "audio": f"wav/{name}", "text": text,
                      "voice": voice, "rate": rate, "n_samples": n})
    evals = []
    for i in range(n_eval):
        text = rng.choice(all_phrases)
        voice = EVAL_VOICES[i % len(EVAL_VOICES)]
        name = f"eval{i:04d}.wav"
        n = speak(text, voice, EVAL_RATE, wav / name)
        evals.append({"id": f"tiny:{name[:-4]}", "audio": f"wav/{name}", "text": text,
                      "voice": voice, "rate": EVAL_RATE, "n_samples": n})
    qa = [{"question": p, "answer": p} for p in all_phrases]  # text -> text echo
    for name, rows in (("train", train), ("eval", evals), ("qa", qa)):
        (BUILD / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(train)} train clips ({len(TRAIN_VOICES)} voices x {len(TRAIN_RATES)} rates), "
          f"{len(evals)} eval clips (held-out voices {EVAL_VOICES}), {len(all_phrases)} phrases, "
          f"{len(words)} words -> {BUILD}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
