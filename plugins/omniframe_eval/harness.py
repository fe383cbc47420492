"""The evaluation harness: pipelines × dataset → per-item records → one report.

For every pipeline of an eval config and every dataset item, the harness loads the pipeline
config, points its source at the item's audio (the source's ``input_option``), switches real-time
replay on or off (the source's ``realtime`` option), sends file sinks into the run folder, builds
the pipeline (models are shared through the process-wide resources cache, so they load once per
config) and runs it. From the :class:`~omniframe.metrics.RunResult` it keeps the turn's
timestamps, transcript and text answer, and the answer audio, which the spoken-answer ASR
transcribes. Each item's record is appended to ``records.jsonl`` as soon as it is done, keyed by
pipeline × item and a fingerprint of everything that shapes it, so an interrupted run resumes
where it stopped. Failures (bad entries, pipeline errors, timeouts, no answer) are records too.

With ``jobs`` > 1 (``--jobs N``) up to N items of a pipeline run at once, as asyncio tasks in
this process over the same loaded models (the model cache shares them; sessions on one model
are safe). Records are still saved, reported and passed to ``on_record`` in item order (an item
that finishes early waits in memory for the ones before it; on an error or Ctrl-C every
finished item is saved at once), so a deterministic pipeline gives the same records and report
as with ``jobs`` 1, latencies apart: those are measured under the load of N items at once. The
global random generators are seeded before every item, which makes a sampling pipeline
reproducible only with ``jobs`` 1: give its stages their own seed (e.g. ``lm.options.seed``)
to compare runs with more jobs.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from omniframe.model_uris import is_random
from omniframe_eval.evalconfig import EvalConfig, PipelineEntry
from omniframe_eval.items import EvalItem

__all__ = ["Harness", "HarnessError", "PipelineInfo", "RecordStore", "load_items"]

log = structlog.get_logger("omniframe.eval")

RECORDS = "records.jsonl"
PIPELINES = "pipelines.json"
RUN = "run.json"
JUDGES = "judges.json"


class HarnessError(RuntimeError):
    """The evaluation cannot run at all (not one item's failure); the message says why."""


# ------------------------------------------------------------------------------ helpers


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _exc_chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cause = getattr(cur, "cause", None)
        cur = cause if isinstance(cause, BaseException) else (cur.__cause__ or cur.__context__)


def _model_missing(exc: BaseException) -> BaseException | None:
    from omniframe.model_uris import ModelNotAvailable

    for e in _exc_chain(exc):
        if isinstance(e, ModelNotAvailable):
            return e
    return None


def _random_models(data: Any) -> list[str]:
    """Every ``random://`` URI among a pipeline config's option values."""
    found: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str) and is_random(x):
            found.append(x)

    for st in data.get("pipeline", []):
        if isinstance(st, dict):
            walk(st.get("options", {}))
    return found


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and (when already imported) torch, before each item."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a core dependency
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def load_items(cfg: EvalConfig, limit: int | None = None) -> list[EvalItem]:
    """The dataset's items (the first ``limit`` only), ids made unique."""
    from omniframe.plugins import get_registry
    from omniframe_eval.datasets import DatasetError

    reg = get_registry()
    factory = reg.datasets.get(cfg.dataset.name)
    if factory is None:
        raise HarnessError(
            f"no dataset named {cfg.dataset.name!r}; installed datasets: "
            f"{', '.join(sorted(reg.datasets)) or 'none'}")
    try:
        items_iter = factory(**cfg.dataset.options)
    except TypeError as exc:
        raise HarnessError(f"dataset {cfg.dataset.name!r}: bad options "
                           f"{sorted(cfg.dataset.options)}: {exc}") from exc
    except DatasetError as exc:
        raise HarnessError(str(exc)) from exc
    limit = limit if limit is not None else cfg.limit
    try:
        if limit and cfg.sample == "spread":
            everything = list(items_iter)
            step = len(everything) / limit
            picks = sorted({int(i * step) for i in range(limit)}) if everything else []
            items = [everything[i] for i in picks]
        else:
            items = list(itertools.islice(items_iter, limit) if limit else items_iter)
    except DatasetError as exc:
        raise HarnessError(str(exc)) from exc
    seen: dict[str, int] = {}
    out = []
    for it in items:
        if it.id in seen:
            seen[it.id] += 1
            it = EvalItem(**{**it.__dict__, "id": f"{it.id}#{seen[it.id]}",
                             "problem": it.problem or f"duplicate id {it.id!r} in the dataset"})
        else:
            seen[it.id] = 0
        out.append(it)
    if not out:
        raise HarnessError(f"dataset {cfg.dataset.name!r} has no items")
    return out


class RecordStore:
    """``records.jsonl``: one JSON object a line, appended and flushed per item.

    A torn last line (a crash mid-write) is ignored; when a key appears twice the last wins."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / RECORDS

    def load(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return out
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "key" in rec:
                    out[rec["key"]] = rec
        return out

    def append(self, rec: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # a torn line from a crash must not glue onto the next record
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    with self.path.open("a", encoding="utf-8") as g:
                        g.write("\n")
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def clear(self) -> None:
        if self.path.exists():
            self.path.unlink()


@dataclass
class PipelineInfo:
    """What the harness decided about one pipeline (saved in ``pipelines.json``)."""

    name: str
    config: str
    fingerprint: str
    device: str = "cpu"
    stages: list[str] = field(default_factory=list)
    fallback_used: bool = False
    fallback_reason: str | None = None
    content_meaningful: bool = True
    content_note: str | None = None
    realtime_replay: bool | None = None
    start_error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ------------------------------------------------------------------------------ harness


class Harness:
    """Runs an :class:`EvalConfig` into a run folder and builds the report.

    Parameters:
        cfg: the evaluation config.
        out: the run folder (records, answer audio, report).
        resume: reuse records of a previous run with the same fingerprint.
        retry_failed: with ``resume``, run failed items again.
        limit: only the first N dataset items (overrides the config's ``limit``).
        progress: show progress bars (tqdm, on stderr).
        on_record: called with each new record after it is saved (tests use it to crash).
        jobs: how many items of a pipeline run at once (overrides the config's ``jobs``).
    """

    def __init__(self, cfg: EvalConfig, out: str | Path, *, resume: bool = True,
                 retry_failed: bool = False, limit: int | None = None, progress: bool = True,
                 on_record: Callable[[dict[str, Any]], None] | None = None,
                 command: str | None = None, jobs: int | None = None) -> None:
        jobs = cfg.jobs if jobs is None else jobs
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise HarnessError(f"jobs is how many items run at once: a whole number, 1 or "
                               f"more (got {jobs!r})")
        self.jobs = jobs
        self.cfg = cfg
        self.out = Path(out)
        self.resume = resume
        self.retry_failed = retry_failed
        self.limit = limit
        self.progress = progress
        self.on_record = on_record
        self.command = command
        self.store = RecordStore(self.out)
        self._asr: Any = None
        self._asr_error: str | None = (None if cfg.spoken_answer_asr.enabled
                                       else "switched off in the config")
        self._embedder: Any = None
        self._embed_error: str | None = (None if cfg.embedding.enabled
                                         else "switched off in the config")
        self._dnsmos: Any = None
        self._dnsmos_error: str | None = (None if cfg.dnsmos.enabled
                                          else "switched off in the config")
        # parallel items ask for a judge from worker threads: it must load once
        self._judge_lock = threading.Lock()

    # ---------------------------------------------------------------- pipeline set-up

    def _pipeline_data(self, entry: PipelineEntry, extra: list[str] | None = None
                       ) -> dict[str, Any]:
        from omniframe.config import ConfigError, apply_overrides

        try:
            data = self._raw_pipeline(entry)
            if not isinstance(data, dict):
                raise HarnessError(f"pipeline {entry.name!r}: {entry.label} holds a "
                                   f"{type(data).__name__}, not a mapping with a 'pipeline' list")
            overrides = [*entry.overrides, *(extra or [])]
            if overrides:
                data = apply_overrides(data, overrides)
        except ConfigError as exc:
            raise HarnessError(f"pipeline {entry.name!r}: {exc}") from exc
        return data

    def _raw_pipeline(self, entry: PipelineEntry) -> dict[str, Any]:
        from omniframe.config import read_yaml

        if isinstance(entry.config, dict):
            return copy.deepcopy(entry.config)
        return read_yaml(self.cfg.resolve_path(entry.config))

    def _stage_code(self, entry: PipelineEntry) -> str:
        """A hash of the Python files of the packages that hold the pipeline's stage classes
        (tests excluded): results cached with older plugin code are not reused."""
        import importlib.util

        from omniframe.plugins import get_registry

        try:
            data = self._raw_pipeline(entry)
            reg = get_registry()
            files: set[str] = set()
            for st in data.get("pipeline", []):
                cls = reg.stages.get((st.get("kind"), st.get("plugin")))
                if cls is None:
                    continue
                spec = importlib.util.find_spec(cls.__module__.split(".")[0])
                roots = list(spec.submodule_search_locations or []) if spec else []
                for root in roots:
                    files.update(str(f) for f in Path(root).rglob("*.py")
                                 if "tests" not in f.relative_to(root).parts)
            h = hashlib.sha256()
            for f in sorted(files):
                h.update(f.encode())
                h.update(Path(f).read_bytes())
            return h.hexdigest()[:16]
        except Exception:  # unknown stages: the config error shows up when it runs
            return ""

    def _fingerprint(self, entry: PipelineEntry) -> str:
        if isinstance(entry.config, dict):
            text = json.dumps(entry.config, sort_keys=True)
        else:
            path = self.cfg.resolve_path(entry.config)
            text = (path.read_bytes().decode("utf-8", "replace") if path.is_file()
                    else f"<missing {path}>")
        return _sha({
            "pipeline_yaml": text,
            "code": self._stage_code(entry), "entry": entry.model_dump(), "mode": self.cfg.mode,
            "dataset": self.cfg.dataset.model_dump(), "seed": self.cfg.seed,
            "source_options": self.cfg.source_options,
            "asr": self.cfg.spoken_answer_asr.model_dump(),
            "embedding": self.cfg.embedding.model_dump(),
            "dnsmos": self.cfg.dnsmos.model_dump(),
        })

    def check_pipelines(self) -> None:
        """Validate every pipeline of the evaluation as the items will run it (its overrides,
        its fallback's, the harness's own source and sink settings; every stage's options;
        the stages fitting together) before any item runs: a config error stops the whole
        run with every problem listed, instead of failing each item the same way."""
        from omniframe.config import ConfigError, build_pipeline, parse_config
        from omniframe.pipeline import PipelineError

        probe = EvalItem(id="config-check", audio="config-check.wav")
        problems: list[str] = []
        for entry in self.cfg.pipelines:
            variants: list[tuple[str, list[str] | None]] = [("", None)]
            if entry.fallback is not None:
                variants.append((" with its fallback", entry.fallback.overrides))
            for how, extra in variants:
                try:
                    data = self._pipeline_data(entry, extra)
                    item_data, _ = self._item_data(data, probe, entry.name, realtime=False,
                                                   make_dirs=False)
                    build_pipeline(parse_config(item_data, entry.label), source=entry.label,
                                   collect=False)
                except HarnessError as exc:
                    problems.append(f"{exc}{how}")
                except (ConfigError, PipelineError) as exc:
                    problems.append(f"pipeline {entry.name!r}{how}: {exc}")
        if problems:
            raise HarnessError("\n".join(problems))

    def _item_data(self, data: dict[str, Any], item: EvalItem, pipeline: str,
                   realtime: bool, make_dirs: bool = True) -> tuple[dict[str, Any], list[str]]:
        """The pipeline config for one item: source → item audio, sinks → run folder."""
        from omniframe.plugins import PluginError, get_registry

        data = copy.deepcopy(data)
        stages = data.get("pipeline")
        if not isinstance(stages, list) or not stages or not isinstance(stages[0], dict):
            raise HarnessError(f"pipeline {pipeline!r}: the config has no 'pipeline' list")
        reg = get_registry()
        notes: list[str] = []
        src = stages[0]
        try:
            cls = reg.stage(src.get("kind", ""), src.get("plugin", ""))
        except PluginError as exc:
            raise HarnessError(f"pipeline {pipeline!r}: {exc}") from exc
        opt = getattr(cls, "input_option", None)
        if src.get("kind") != "source" or not opt:
            raise HarnessError(
                f"pipeline {pipeline!r}: its first stage ({src.get('kind')}:{src.get('plugin')}) "
                f"is not a source that reads a file (no input_option), so the harness cannot "
                f"feed it the dataset's audio. Use a file source, e.g. "
                f"{{kind: source, plugin: file}}.")
        options = src.setdefault("options", {}) or {}
        src["options"] = options
        options[opt] = item.audio
        fields = cls.Options.model_fields
        if "realtime" in fields:
            options["realtime"] = realtime
        elif realtime:
            notes.append(f"source {src.get('plugin')!r} has no 'realtime' option: audio was "
                         f"not paced, so latencies are not what a user would experience")
        for k, v in self.cfg.source_options.items():
            if k in fields:
                options[k] = v
        has_sink = False
        for i, st in enumerate(stages):
            if not isinstance(st, dict) or st.get("kind") != "sink":
                continue
            has_sink = True
            try:
                scls = reg.stage("sink", st.get("plugin", ""))
            except PluginError as exc:
                raise HarnessError(f"pipeline {pipeline!r}: {exc}") from exc
            sopts = st.setdefault("options", {}) or {}
            st["options"] = sopts
            out_opt = getattr(scls, "output_option", None)
            if out_opt:
                suffixes = getattr(scls, "output_suffixes", ()) or (".out",)
                target = self.out / "sinks" / pipeline / f"{_safe(item.id)}.{i}{suffixes[0]}"
                if make_dirs:
                    target.parent.mkdir(parents=True, exist_ok=True)
                sopts[out_opt] = str(target)
            if "realtime" in scls.Options.model_fields:
                sopts["realtime"] = False
        if not has_sink and ("sink", "null") in reg.stages:
            stages.append({"kind": "sink", "plugin": "null", "name": "eval-null-sink"})
        return data, notes

    async def _start(self, entry: PipelineEntry, items: list[EvalItem]) -> tuple[
            PipelineInfo, dict[str, Any] | None]:
        """Probe the pipeline: build it and warm it up on the first usable item; switch to
        the fallback when its models cannot be had."""
        from omniframe.audio import read_audio
        from omniframe.config import ConfigError, parse_config

        info = PipelineInfo(name=entry.name, config=entry.label,
                            fingerprint=self._fingerprint(entry))
        try:
            data = self._pipeline_data(entry)
        except HarnessError as exc:
            info.start_error = str(exc)
            return info, None
        probe = None
        for it in items:
            if it.problem or (it.transcript is not None and not it.transcript.strip()):
                continue
            try:
                read_audio(it.audio)
            except Exception:  # AudioError, or soundfile's own errors for odd files
                continue
            probe = it
            break

        async def try_run(d: dict[str, Any]) -> BaseException | None:
            if probe is None:
                return None
            try:
                item_data, _ = self._item_data(d, probe, entry.name, realtime=False)
                cfg = parse_config(item_data, entry.label)
                from omniframe.config import build_pipeline

                for _ in range(max(1, self.cfg.warmup)):
                    seed_everything(self.cfg.seed)
                    pipe = build_pipeline(cfg, source=entry.label, collect=False)
                    import anyio

                    with anyio.fail_after(self.cfg.item_timeout_s * 2):
                        await pipe.run()
                    if not self.cfg.warmup:
                        break
            except Exception as exc:
                return exc
            return None

        if self.cfg.warmup or entry.fallback is not None:
            err = await try_run(data)
            missing = _model_missing(err) if err is not None else None
            if missing is not None and entry.fallback is not None:
                info.fallback_used = True
                info.fallback_reason = str(missing)
                try:
                    data = self._pipeline_data(entry, entry.fallback.overrides)
                except HarnessError as exc:
                    info.start_error = str(exc)
                    return info, None
                err = await try_run(data)
            if err is not None:
                from omniframe.pipeline import StageError

                if isinstance(err, (HarnessError, ConfigError)) or (
                        isinstance(err, StageError) and err.phase == "setup"):
                    info.start_error = f"{type(err).__name__}: {err}" if not isinstance(
                        err, (HarnessError, ConfigError)) else str(err)
                    return info, None
                info.notes.append(f"warm-up run failed ({type(err).__name__}: {err}); items "
                                  f"were still run one by one")
        try:
            cfg = parse_config(data, entry.label)
            info.device = cfg.device
            info.stages = [f"{s.kind}:{s.plugin}" for s in cfg.pipeline]
        except ConfigError as exc:
            info.start_error = str(exc)
            return info, None
        randoms = _random_models(data)
        if entry.content_metrics == "no":
            info.content_meaningful = False
            info.content_note = "content metrics switched off for this pipeline in the config"
        elif entry.content_metrics == "auto" and randoms:
            info.content_meaningful = False
            info.content_note = (
                f"runs on random weights ({', '.join(sorted(set(randoms)))}): its text and "
                f"speech are noise, so its content metrics (WER, answer quality, spoken-vs-text "
                f"agreement) are not meaningful and are not reported. Its latency and real-time "
                f"factor are meaningful: compute cost does not depend on the weight values.")
        src_ok = None
        try:
            from omniframe.plugins import get_registry

            st0 = data["pipeline"][0]
            cls = get_registry().stage(st0["kind"], st0["plugin"])
            src_ok = "realtime" in cls.Options.model_fields
        except Exception:
            src_ok = None
        info.realtime_replay = bool(src_ok) and self.cfg.mode == "realtime"
        return info, data

    # -------------------------------------------------------------------- judges

    def _judge_asr(self) -> Any:
        with self._judge_lock:
            return self._judge_asr_locked()

    def _judge_asr_locked(self) -> Any:
        if self._asr is None and self._asr_error is None:
            j = self.cfg.spoken_answer_asr
            if not j.enabled:
                self._asr_error = "switched off in the config"
            else:
                from omniframe_eval.judges import JudgeUnavailable, SpokenAnswerAsr

                asr = SpokenAnswerAsr(j.model, j.compute_type, j.beam_size, j.cpu_threads)
                try:
                    asr.load()
                    self._asr = asr
                except JudgeUnavailable as exc:
                    self._asr_error = str(exc)
        return self._asr

    def _judge_embed(self) -> Any:
        with self._judge_lock:
            return self._judge_embed_locked()

    def _judge_embed_locked(self) -> Any:
        if self._embedder is None and self._embed_error is None:
            j = self.cfg.embedding
            if not j.enabled:
                self._embed_error = "switched off in the config"
            else:
                from omniframe_eval.judges import Embedder, JudgeUnavailable

                emb = Embedder(j.model)
                try:
                    emb.load()
                    self._embedder = emb
                except JudgeUnavailable as exc:
                    self._embed_error = str(exc)
        return self._embedder

    def _judge_dnsmos(self) -> Any:
        with self._judge_lock:
            return self._judge_dnsmos_locked()

    def _judge_dnsmos_locked(self) -> Any:
        if self._dnsmos is None and self._dnsmos_error is None:
            from omniframe_eval.judges import Dnsmos, JudgeUnavailable

            d = Dnsmos(self.cfg.dnsmos.model)
            try:
                d.load()
                self._dnsmos = d
            except JudgeUnavailable as exc:
                self._dnsmos_error = str(exc)
        return self._dnsmos

    # ---------------------------------------------------------------------- items

    def _base_record(self, info: PipelineInfo, item: EvalItem) -> dict[str, Any]:
        return {
            "key": f"{info.name}/{item.id}",
            "pipeline": info.name,
            "item": item.id,
            "fingerprint": _sha([info.fingerprint, item.to_dict()]),
            "status": "failed",
            "reason": None,
            "mode": self.cfg.mode,
            "seed": self.cfg.seed,
            "task": item.task,
            "audio": item.audio,
            "reference_transcript": item.transcript,
            "reference_answers": list(item.answers),
            "meta": item.meta,
            "fallback": info.fallback_used,
            "jobs": self.jobs,
        }

    async def _run_item(self, info: PipelineInfo, data: dict[str, Any] | None,
                        item: EvalItem) -> dict[str, Any]:
        import anyio
        import numpy as np

        from omniframe.audio import AudioError, read_audio, validate_samples
        from omniframe.config import ConfigError, build_pipeline, parse_config
        from omniframe.frames import ErrorFrame, OutputAudioFrame
        from omniframe.pipeline import PipelineError, StageError

        rec = self._base_record(info, item)

        def fail(reason: str) -> dict[str, Any]:
            rec["status"] = "failed"
            rec["reason"] = reason
            return rec

        if item.problem:
            return fail(f"bad dataset entry: {item.problem}")
        if item.transcript is not None and not item.transcript.strip():
            return fail("bad dataset entry: empty reference transcript (the entry says the "
                        "audio has no words; fix or drop it)")
        try:
            samples, sr = read_audio(item.audio)
            validate_samples(samples, sr, f"audio file {item.audio!r}")
        except AudioError as exc:
            return fail(f"bad audio: {exc}")
        except Exception as exc:  # soundfile raises its own types for odd files
            return fail(f"bad audio: {item.audio!r} could not be read: {type(exc).__name__}: "
                        f"{exc}")
        rec["input_audio_s"] = round(len(samples) / sr, 4)
        if data is None:
            return fail(f"pipeline could not start: {info.start_error}")
        try:
            item_data, notes = self._item_data(data, item, info.name,
                                               realtime=self.cfg.mode == "realtime")
            cfg = parse_config(item_data, info.config)
            pipe = build_pipeline(cfg, source=info.config, collect=True)
        except (HarnessError, ConfigError, PipelineError) as exc:
            return fail(f"pipeline config: {exc}")
        for n in notes:
            if n not in info.notes:
                info.notes.append(n)
        seed_everything(self.cfg.seed)
        t0 = time.monotonic()
        try:
            with anyio.fail_after(self.cfg.item_timeout_s):
                result = await pipe.run()
        except TimeoutError:
            return fail(f"timed out after {self.cfg.item_timeout_s:g} s (item_timeout_s)")
        except StageError as exc:
            return fail(f"pipeline error: {exc}")
        except Exception as exc:
            return fail(f"pipeline error: {type(exc).__name__}: {exc}")
        rec["wall_s"] = round(result.wall_s, 4)
        rec["setup_s"] = round(result.setup_s, 4)
        rec["elapsed_s"] = round(time.monotonic() - t0, 4)
        rec["run_rtf"] = None if result.rtf is None else round(result.rtf, 4)
        # the source's busy time is mostly pacing (real-time replay), not compute
        rec["stage_busy_s"] = {k: round(v.busy_s, 4) for k, v in result.stages.items()
                               if v.kind != "source"}
        frames = result.frames or []
        warnings = [f"{f.stage}: {f.message}" for f in frames if isinstance(f, ErrorFrame)]
        if warnings:
            rec["warnings"] = warnings
        turns = result.turns
        rec["turns"] = len(turns)
        if not turns:
            return fail("no user turn: the VAD found no speech in the item's audio")
        answered = [t for t in turns if t.text or t.first_audio_ts is not None or t.audio_out_s]
        main = answered[-1] if answered else turns[-1]
        rec["turn"] = main.turn
        rec["transcript"] = " ".join(t.transcript.strip() for t in turns if t.transcript).strip()
        rec["has_transcript"] = any(t.transcript_ts is not None for t in turns)
        rec["answer_text"] = main.text.strip()
        rec["end_reason"] = main.end_reason
        rec["interrupted"] = main.interrupted
        from omniframe_eval.scoring import latency_breakdown

        lat = latency_breakdown(speech_end=main.speech_end_ts, vad_end=main.vad_end_ts,
                                transcript=main.transcript_ts, first_text=main.first_text_ts,
                                first_audio=main.first_audio_ts)
        lat["rtf"] = main.rtf
        # VocalBench's name for the model-side latency: whole input handed over → first chunk
        lat["first_chunk_latency"] = lat["response"]
        rec["latency"] = {k: None if v is None else round(v, 4) for k, v in lat.items()}
        chunks = [f for f in frames if isinstance(f, OutputAudioFrame) and f.turn == main.turn]
        audio = None
        out_sr = chunks[0].sample_rate if chunks else None
        if chunks:
            audio = np.concatenate([np.asarray(c.samples, np.float32) for c in chunks])
        rec["answer_audio_s"] = round(len(audio) / out_sr, 4) if audio is not None and out_sr \
            else 0.0
        if audio is not None and self.cfg.keep_audio and out_sr:
            import soundfile as sf

            wav = self.out / "audio" / info.name / f"{_safe(item.id)}.wav"
            wav.parent.mkdir(parents=True, exist_ok=True)
            sf.write(str(wav), audio, out_sr, subtype="PCM_16")
            rec["answer_wav"] = str(wav.relative_to(self.out))
        if not answered:
            return fail(f"no answer: the pipeline produced neither text nor audio for turn "
                        f"{main.turn} (end reason: {main.end_reason})")
        if len(turns) > 1:
            rec["note"] = (f"the VAD split the item into {len(turns)} turns; the last answered "
                           f"one (turn {main.turn}) is scored")
        if _entry(self.cfg, info.name).expects_audio and main.first_audio_ts is None:
            return fail(f"no answer audio: the pipeline answered in text only "
                        f"({rec['answer_text'][:60]!r})")
        if audio is not None and out_sr:  # speech quality: every pipeline, random or not
            import anyio.to_thread

            mos = await anyio.to_thread.run_sync(self._judge_dnsmos)
            if mos is not None:
                try:
                    rec["dnsmos"] = await anyio.to_thread.run_sync(mos.score, audio, out_sr)
                except Exception as exc:  # scoring must not lose the item
                    rec["dnsmos_error"] = f"{type(exc).__name__}: {exc}"
        if info.content_meaningful:
            await self._judge(rec, item, audio, out_sr)
        rec["status"] = "ok"
        return rec

    async def _judge(self, rec: dict[str, Any], item: EvalItem, audio: Any,
                     sr: int | None) -> None:
        import anyio.to_thread

        if audio is not None and sr:
            asr = await anyio.to_thread.run_sync(self._judge_asr)
            if asr is not None:
                try:
                    rec["spoken_text"] = await anyio.to_thread.run_sync(asr.transcribe, audio, sr)
                except Exception as exc:  # scoring must not lose the item
                    rec["spoken_text_error"] = f"{type(exc).__name__}: {exc}"
        if item.answers and rec.get("answer_text") is not None:
            emb = await anyio.to_thread.run_sync(self._judge_embed)
            if emb is not None:
                try:
                    sim = await anyio.to_thread.run_sync(emb.similarity, rec["answer_text"],
                                                         list(item.answers))
                    rec["embedding_similarity"] = None if sim is None else round(sim, 4)
                except Exception as exc:
                    rec["embedding_error"] = f"{type(exc).__name__}: {exc}"

    # ------------------------------------------------------------------------ run

    def _run_info(self, items: list[EvalItem]) -> dict[str, Any]:
        from omniframe_eval.device import describe_device, device_label

        devices = sorted({_read_device(self, p) for p in self.cfg.pipelines})
        info = describe_device(devices[0] if devices else "cpu")
        label = self.cfg.device_label
        if label == "auto":
            label = device_label(info)
        try:
            import importlib.metadata as md

            version = md.version("omniframe")
        except Exception:
            version = None
        return {
            "name": self.cfg.name,
            "description": self.cfg.description,
            "mode": self.cfg.mode,
            "seed": self.cfg.seed,
            "dataset": self.cfg.dataset.model_dump(),
            "items": [it.id for it in items],
            "limit": self.limit if self.limit is not None else self.cfg.limit,
            "sample": self.cfg.sample,
            "device": info,
            "device_label": label,
            "normalizer": self.cfg.normalizer,
            "spoken_answer_asr": self.cfg.spoken_answer_asr.model_dump(),
            "embedding": self.cfg.embedding.model_dump(),
            "dnsmos": self.cfg.dnsmos.model_dump(),
            "item_timeout_s": self.cfg.item_timeout_s,
            "jobs": self.jobs,
            "warmup": self.cfg.warmup,
            "omniframe_version": version,
            "command": self.command,
            "pipelines": [p.model_dump() for p in self.cfg.pipelines],
        }

    async def run(self) -> dict[str, Any]:
        """Run every pipeline over the dataset (resuming where possible); return the report
        data (see :func:`omniframe_eval.report.build_report`)."""
        items = load_items(self.cfg, self.limit)
        self.check_pipelines()
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            self.store.clear()
        cached = self.store.load() if self.resume else {}
        run_info = self._run_info(items)
        prev_pipes: dict[str, Any] = {}
        ppath = self.out / PIPELINES
        if self.resume and ppath.exists():
            try:
                prev_pipes = json.loads(ppath.read_text())
            except (json.JSONDecodeError, OSError):
                prev_pipes = {}
        pipes: dict[str, dict[str, Any]] = {}
        records: dict[str, list[dict[str, Any]]] = {}
        for entry in self.cfg.pipelines:
            fp = self._fingerprint(entry)
            todo: list[EvalItem] = []
            done: dict[str, dict[str, Any]] = {}
            for it in items:
                rec = cached.get(f"{entry.name}/{it.id}")
                probe = self._base_record(PipelineInfo(entry.name, entry.label, fp), it)
                if rec is not None and rec.get("fingerprint") == probe["fingerprint"] and not (
                        self.retry_failed and rec.get("status") != "ok"):
                    done[it.id] = rec
                else:
                    todo.append(it)
            prev = prev_pipes.get(entry.name)
            if not todo and prev and prev.get("fingerprint") == fp:
                info = PipelineInfo(**prev)
                data = None
            else:
                log.info("starting pipeline", pipeline=entry.name, items=len(todo))
                info, data = await self._start(entry, todo or items)
            pipes[entry.name] = info.to_dict()
            self._save_pipes(pipes, prev_pipes)
            bar = _progress(len(items), entry.name, self.progress, initial=len(done))
            try:
                await self._run_items(info, data, todo, done, bar)
            finally:
                bar.close()
            pipes[entry.name] = info.to_dict()  # notes found while running
            self._save_pipes(pipes, prev_pipes)
            records[entry.name] = [done[it.id] for it in items]
        from omniframe_eval.device import current_load

        run_info["device"]["load_end"] = current_load()
        (self.out / RUN).write_text(json.dumps(run_info, indent=2, default=str))
        judges = self._judge_status()
        from omniframe_eval.report import build_report

        return build_report(run_info, pipes, records, judges=judges)

    def _save(self, rec: dict[str, Any], done: dict[str, dict[str, Any]],
              notify: bool = True) -> None:
        self.store.append(rec)
        done[rec["item"]] = rec
        if notify and self.on_record is not None:
            self.on_record(rec)

    async def _run_items(self, info: PipelineInfo, data: dict[str, Any] | None,
                         todo: list[EvalItem], done: dict[str, dict[str, Any]],
                         bar: Any) -> None:
        """Run ``todo`` (``self.jobs`` at once), saving each record in item order."""
        jobs = min(self.jobs, len(todo))
        if jobs <= 1:
            for it in todo:
                rec = await self._run_item(info, data, it)
                self._save(rec, done, notify=False)
                bar.update(1)
                bar.set_postfix_str(_counts(done.values()))
                if self.on_record is not None:
                    self.on_record(rec)
            return
        import anyio

        finished: dict[int, dict[str, Any]] = {}  # done, waiting for the items before them
        next_save = 0
        queue = iter(enumerate(todo))  # shared by the workers: each item is taken once
        running = jobs
        all_done = anyio.Event()

        def save_in_order() -> None:
            nonlocal next_save
            while next_save in finished:
                rec = finished.pop(next_save)
                next_save += 1
                self._save(rec, done)

        def save_the_rest() -> None:
            """After an error or a cancel: keep every finished item (nothing is lost)."""
            for i in sorted(finished):
                self._save(finished.pop(i), done, notify=False)

        async def worker() -> None:
            nonlocal running
            try:
                for i, it in queue:
                    rec = await self._run_item(info, data, it)
                    finished[i] = rec
                    bar.update(1)
                    bar.set_postfix_str(_counts([*done.values(), *finished.values()]))
                    save_in_order()
            finally:
                running -= 1
                if running == 0:
                    all_done.set()

        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(jobs):
                    tg.start_soon(worker)
                try:
                    await all_done.wait()
                finally:  # runs at once on a cancel, before the workers have stopped
                    save_the_rest()
        except BaseExceptionGroup as group:  # one error: raise it as jobs 1 would
            error = _sole(group)
            if error is None:
                raise
        finally:
            save_the_rest()
        if error is not None:
            raise error

    def _judge_status(self) -> dict[str, str | None]:
        """Why a scoring model was not available, kept in ``judges.json`` so that a resumed
        run whose items all come from the cache reports the same."""
        path = self.out / JUDGES
        key = _sha([self.cfg.spoken_answer_asr.model_dump(), self.cfg.embedding.model_dump(),
                    self.cfg.dnsmos.model_dump()])
        prev: dict[str, Any] = {}
        if self.resume and path.exists():
            try:
                prev = json.loads(path.read_text())
            except (json.JSONDecodeError, OSError):
                prev = {}
        if prev.get("key") != key:
            prev = {}
        status = {
            "spoken_answer_asr": self._asr_error or (None if self._asr is not None
                                                     else prev.get("spoken_answer_asr")),
            "embedding": self._embed_error or (None if self._embedder is not None
                                               else prev.get("embedding")),
            "dnsmos": self._dnsmos_error or (None if self._dnsmos is not None
                                             else prev.get("dnsmos")),
        }
        path.write_text(json.dumps({"key": key, **status}, indent=2))
        return status

    def _save_pipes(self, pipes: dict[str, Any], prev: dict[str, Any]) -> None:
        merged = {**prev, **pipes}
        tmp = self.out / f".{PIPELINES}.tmp"
        tmp.write_text(json.dumps(merged, indent=2))
        os.replace(tmp, self.out / PIPELINES)


def _entry(cfg: EvalConfig, name: str) -> PipelineEntry:
    return next(p for p in cfg.pipelines if p.name == name)


def _read_device(harness: Harness, entry: PipelineEntry) -> str:
    try:
        data = harness._raw_pipeline(entry)
        return str(data.get("device", "cpu")) if isinstance(data, dict) else "cpu"
    except Exception:
        return "cpu"


def _sole(group: BaseExceptionGroup) -> BaseException | None:
    """The one exception in a task group's (nested) group, or None when there are several."""
    found: list[BaseException] = []

    def walk(g: BaseExceptionGroup) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                found.append(e)

    walk(group)
    return found[0] if len(found) == 1 else None


def _safe(item_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.#" else "_" for c in item_id)


def _counts(recs: Iterable[dict[str, Any]]) -> str:
    ok = failed = 0
    for r in recs:
        if r.get("status") == "ok":
            ok += 1
        else:
            failed += 1
    return f"ok={ok} failed={failed}"


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, desc: str, enabled: bool, initial: int = 0) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="item", initial=initial, file=sys.stderr,
                dynamic_ncols=True, leave=True)
