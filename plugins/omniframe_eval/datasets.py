"""The built-in evaluation datasets (registered through the ``register_datasets`` hook).

* ``spoken_qa``: questions from a text file in the repository, spoken by espeak-ng with
  several voices and rates, each with short reference answers. Works offline, anywhere.
* ``librispeech``: a LibriSpeech-layout folder (``root/<speaker>/<chapter>/*.trans.txt`` and
  ``*.flac``), for ASR word error rate as in the Mini-Omni paper's Table 2.
* ``manifest``: a folder of audio files described by a JSONL manifest.
* ``hf``: a Hugging Face dataset by name (LibriSpeech, VoiceAssistant-400K presets), for
  users who are online; offline it fails with a message that says what to do instead.

Each factory takes its options as keyword arguments and returns an iterator of
:class:`~omniframe_eval.items.EvalItem`. Problems with the whole dataset (a missing folder)
raise :class:`DatasetError`; problems with one entry become an item with ``problem`` set.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omniframe_eval.items import EvalItem

__all__ = [
    "DEFAULT_QA_TEXT",
    "DatasetError",
    "hf_dataset",
    "librispeech",
    "load_qa_text",
    "manifest",
    "spoken_qa",
]

DEFAULT_QA_TEXT = Path(__file__).with_name("spoken_qa.txt")
DEFAULT_VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-scotland", "en-029")
DEFAULT_RATES = (140, 165, 190)


class DatasetError(ValueError):
    """A dataset cannot be used at all; the message says why and what to do."""


def cache_root() -> Path:
    """Where generated or downloaded dataset audio is kept (``OMNIFRAME_CACHE`` or
    ``~/.cache/omniframe``)."""
    base = os.environ.get("OMNIFRAME_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "omniframe")
    return Path(base) / "eval"


def _write_wav_atomic(path: Path, samples: Any, sample_rate: int) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sf.write(str(tmp), samples, sample_rate, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ spoken QA


def load_qa_text(path: str | Path) -> list[tuple[str, tuple[str, ...]]]:
    """Parse a spoken-QA text file: ``question | answer [| another answer ...]`` a line."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"spoken_qa: question file {str(p)!r} does not exist")
    out: list[tuple[str, tuple[str, ...]]] = []
    for n, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [s.strip() for s in line.split("|")]
        question, answers = parts[0], tuple(a for a in parts[1:] if a)
        if not question or not answers:
            raise DatasetError(
                f"spoken_qa: {p}:{n}: expected 'question | answer [| answer ...]', got {raw!r}")
        out.append((question, answers))
    if not out:
        raise DatasetError(f"spoken_qa: {p} has no questions")
    return out


def _espeak_names(kind: str = "") -> set[str] | None:
    import shutil
    import subprocess

    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        return None
    arg = f"--voices={kind}" if kind else "--voices"
    try:
        out = subprocess.run([exe, arg], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 5:
            names.add(cols[1].lower())  # language code, e.g. en-gb
            names.add(cols[3].lower())  # voice name
            names.add(cols[4].rsplit("/", 1)[-1].lower())  # file, e.g. en-us / adam
    return names


def _check_voices(voices: Sequence[str]) -> None:
    """espeak-ng quietly falls back to its default voice for unknown names: refuse them."""
    langs = _espeak_names()
    if langs is None:  # no espeak-ng: the synthesis itself says so
        return
    variants = _espeak_names("variant") or set()
    for v in voices:
        base, _, variant = v.lower().partition("+")
        if base not in langs or (variant and variant not in variants):
            english = sorted(n for n in langs if n.startswith("en"))
            raise DatasetError(
                f"spoken_qa: espeak-ng has no voice {v!r}. English voices: "
                f"{', '.join(english)}; add a variant with '+', e.g. en-us+f3")


def spoken_qa(text: str | None = None, voices: Sequence[str] = DEFAULT_VOICES,
              rates: Sequence[int] = DEFAULT_RATES, sample_rate: int = 16000,
              lead_silence_s: float = 0.3, pitch: int = 50,
              cache_dir: str | None = None) -> Iterator[EvalItem]:
    """Questions from ``text`` (default: the packaged ``spoken_qa.txt``) spoken by espeak-ng.

    Item ``i`` is spoken with ``voices[i % V]`` at ``rates[(i % V + i // V) % R]`` words per
    minute (V voices, R rates): consecutive items vary in both, and each voice cycles through
    the rates, so every voice × rate pair occurs within V × R items. The audio is made on
    first use and kept in ``cache_dir`` (default: ``~/.cache/omniframe/eval/spoken_qa/<hash>``);
    espeak-ng is deterministic, so the same settings give the same files.
    """
    import numpy as np

    from omniframe.testing import espeak

    if not voices or not rates:
        raise DatasetError("spoken_qa: voices and rates must each list at least one value")
    _check_voices(voices)
    qa = load_qa_text(text or DEFAULT_QA_TEXT)
    key = hashlib.sha256(json.dumps(
        [2, qa, list(voices), list(rates), sample_rate, lead_silence_s, pitch]).encode()
    ).hexdigest()[:12]
    folder = Path(cache_dir) if cache_dir else cache_root() / "spoken_qa" / key
    lead = np.zeros(int(lead_silence_s * sample_rate), np.float32)
    for i, (question, answers) in enumerate(qa):
        voice = voices[i % len(voices)]
        rate = int(rates[(i % len(voices) + i // len(voices)) % len(rates)])
        item_id = f"qa-{i + 1:03d}"
        path = folder / f"{item_id}.wav"
        if not path.exists():
            try:
                speech = espeak(question, voice=voice, rate=rate, sample_rate=sample_rate,
                                pitch=pitch)
            except RuntimeError as exc:  # espeak-ng missing: the whole set is unusable
                raise DatasetError(f"spoken_qa needs espeak-ng to speak its questions: {exc}") \
                    from exc
            except Exception as exc:  # espeak-ng failed on this text: a failed item
                yield EvalItem(id=item_id, audio=str(path), transcript=question, answers=answers,
                               meta={"voice": voice, "rate": rate},
                               problem=f"espeak-ng could not speak it with voice {voice!r}: "
                                       f"{type(exc).__name__}: {exc}")
                continue
            _write_wav_atomic(path, np.concatenate([lead, speech]), sample_rate)
        yield EvalItem(id=item_id, audio=str(path), transcript=question, answers=answers,
                       task="qa", meta={"voice": voice, "rate": rate})


# ----------------------------------------------------------------------------- LibriSpeech


def librispeech(root: str, extensions: Sequence[str] = (".flac", ".wav")) -> Iterator[EvalItem]:
    """A LibriSpeech-layout folder: ``root/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt``
    with one ``<utterance-id> <TRANSCRIPT>`` a line, and ``<utterance-id>.flac`` beside it.

    ``root`` is one split, e.g. ``LibriSpeech/test-clean``. Items are sorted by id. A
    transcript line whose audio file is missing is yielded with ``problem`` set."""
    base = Path(os.path.expanduser(root))
    if not base.is_dir():
        raise DatasetError(
            f"librispeech: {str(base)!r} is not a folder. Give one split of LibriSpeech, e.g. "
            f"root: /data/LibriSpeech/test-clean (download it from openslr.org/12)")
    trans = sorted(base.glob("*/*/*.trans.txt")) or sorted(base.rglob("*.trans.txt"))
    if not trans:
        raise DatasetError(
            f"librispeech: no *.trans.txt under {str(base)!r}; expected the LibriSpeech layout "
            f"root/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt")
    for tf in trans:
        for n, raw in enumerate(tf.read_text(encoding="utf-8").splitlines(), 1):
            line = raw.strip()
            if not line:
                continue
            utt, _, text = line.partition(" ")
            audio = next((tf.parent / f"{utt}{ext}" for ext in extensions
                          if (tf.parent / f"{utt}{ext}").exists()),
                         tf.parent / f"{utt}{extensions[0]}")
            problem = None
            if not audio.exists():
                problem = f"audio file {str(audio)!r} is missing (listed in {tf.name}:{n})"
            yield EvalItem(id=utt, audio=str(audio), transcript=text.strip(), task="asr",
                           meta={"speaker": utt.split("-")[0]}, problem=problem)


# -------------------------------------------------------------------------------- manifest


def manifest(path: str, task: str = "qa") -> Iterator[EvalItem]:
    """A JSONL manifest, one object a line::

        {"id": "q1", "audio": "q1.wav", "transcript": "what is ...", "answers": ["paris"]}

    ``audio`` is relative to the manifest's folder (or absolute); ``id`` defaults to the line
    number; ``transcript`` (or ``text``) and ``answers`` (a list, or ``answer``: a string) are
    optional; ``task`` (``qa``/``asr``) defaults to the ``task`` option. A line that is not
    valid is yielded as a failed item saying why."""
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise DatasetError(f"manifest: {str(p)!r} does not exist; give a JSONL file")
    seen: set[str] = set()
    for n, raw in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        fallback_id = f"line-{n}"
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError as exc:
            yield EvalItem(id=fallback_id, audio="", problem=f"{p.name}:{n} is not valid JSON: "
                                                            f"{exc.msg}")
            continue
        if not isinstance(entry, dict):
            yield EvalItem(id=fallback_id, audio="",
                           problem=f"{p.name}:{n}: expected a JSON object, got "
                                   f"{type(entry).__name__}")
            continue
        item_id = str(entry.get("id") or fallback_id)
        if item_id in seen:
            item_id = f"{item_id}@{n}"
        seen.add(item_id)
        audio = entry.get("audio") or entry.get("path")
        transcript = entry.get("transcript", entry.get("text"))
        answers = entry.get("answers", entry.get("answer", ()))
        if isinstance(answers, str):
            answers = (answers,)
        item_task = entry.get("task", task)
        problem = None
        if not audio or not isinstance(audio, str):
            problem = f"{p.name}:{n}: no 'audio' path"
            audio = ""
        elif item_task not in ("qa", "asr"):
            problem = f"{p.name}:{n}: task must be 'qa' or 'asr', got {item_task!r}"
        audio_path = (p.parent / os.path.expanduser(audio)) if audio else Path("")
        yield EvalItem(
            id=item_id, audio=str(audio_path) if audio else "",
            transcript=None if transcript is None else str(transcript),
            answers=tuple(str(a) for a in answers), task=item_task if not problem else "qa",
            meta={k: v for k, v in entry.items()
                  if k not in ("id", "audio", "path", "transcript", "text", "answers", "answer",
                               "task")},
            problem=problem,
        )


# ---------------------------------------------------------------------- Hugging Face hub

HF_PRESETS: dict[str, dict[str, Any]] = {
    "librispeech": {"name": "openslr/librispeech_asr", "config": "clean", "split": "test",
                    "audio_field": "audio", "transcript_field": "text", "task": "asr",
                    "id_field": "id"},
    "voiceassistant": {"name": "gpt-omni/VoiceAssistant-400K", "config": None,
                       "split": "train", "audio_field": "question_audio",
                       "transcript_field": "question", "answers_field": "answer",
                       "task": "qa", "id_field": "index"},
}


def hf_dataset(name: str, config: str | None = None, split: str | None = None,
               audio_field: str | None = None, transcript_field: str | None = None,
               answers_field: str | None = None, id_field: str | None = None,
               task: str | None = None, streaming: bool = True,
               cache_dir: str | None = None) -> Iterator[EvalItem]:
    """A Hugging Face dataset by name, streamed with the ``datasets`` library.

    ``name`` is a hub id or a preset: ``librispeech`` (openslr/librispeech_asr, clean, test)
    or ``voiceassistant`` (gpt-omni/VoiceAssistant-400K, the Mini-Omni training set's QA
    part). Audio is written to wav files under ``cache_dir`` as items are used."""
    preset = dict(HF_PRESETS.get(name, {}))
    repo = preset.get("name", name)
    config = config if config is not None else preset.get("config")
    split = split or preset.get("split") or "test"
    audio_field = audio_field or preset.get("audio_field", "audio")
    transcript_field = transcript_field or preset.get("transcript_field")
    answers_field = answers_field or preset.get("answers_field")
    id_field = id_field or preset.get("id_field")
    task = task or preset.get("task", "qa")
    try:
        import datasets as hfds
    except ImportError:
        raise DatasetError(
            f"hf: loading {repo!r} needs the 'datasets' package: pip install datasets "
            f"(or pip install 'omniframe[datasets]'). "
            f"Offline, use the 'librispeech' dataset on a local LibriSpeech folder or a "
            f"'manifest' of local files instead.") from None
    try:
        ds = hfds.load_dataset(repo, config, split=split, streaming=streaming)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetError(
            f"hf: could not load {repo!r} (config {config!r}, split {split!r}) from the "
            f"Hugging Face hub: {first}. Are you offline? Download it on a machine with "
            f"internet and use it as a local folder ('librispeech' dataset for LibriSpeech "
            f"layout, or a 'manifest' JSONL of audio files), or set HF_DATASETS_OFFLINE=1 "
            f"with a filled cache.") from exc
    folder = Path(cache_dir) if cache_dir else cache_root() / "hf" / repo.replace("/", "__")
    for n, row in enumerate(ds):
        item_id = str(row.get(id_field, n)) if id_field else str(n)
        item_id = item_id.replace("/", "_")
        path = folder / f"{item_id}.wav"
        problem = None
        if not path.exists():
            audio = row.get(audio_field)
            if not isinstance(audio, dict) or "array" not in audio:
                problem = f"row {n}: no decoded audio in field {audio_field!r}"
            else:
                _write_wav_atomic(path, audio["array"], int(audio["sampling_rate"]))
        answers = row.get(answers_field) if answers_field else ()
        if isinstance(answers, str):
            answers = (answers,)
        yield EvalItem(
            id=item_id, audio=str(path),
            transcript=str(row[transcript_field]) if transcript_field and
            row.get(transcript_field) is not None else None,
            answers=tuple(str(a) for a in (answers or ())), task=task,  # type: ignore[arg-type]
            meta={"hf": repo, "row": n}, problem=problem,
        )
