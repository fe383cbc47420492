"""Mini-Omni's engine step with static shapes: a KV slot pool, one batched attention, sampling
on the device and CUDA graphs (issue 12's GPU path).

:class:`StaticEngineModel` is an :class:`~omniframe_mini_omni.engine.MiniOmniEngineModel`
whose decode step has the same shapes every time, so that on a GPU it runs as one replayed
CUDA graph instead of ~700 eager kernel launches, and the host waits for the device once per
step (to read the sampled ids back). The scheduling stays the generic engine's
(:mod:`omniframe.engine`); the per-turn bookkeeping stays the parent's.

**Prefill: all but the last position.** A new turn's prompt runs eagerly (one causal forward,
flash/efficient SDPA on a GPU) for positions 0..T-2 of its first row, without heads, straight
into its slot's rows of the pool; batch-parallel A1A2 copies them to the second row (the two
rows differ only in the last position, as in FastLM's shared-prefix prefill). Position T-1 of
every row then runs *inside the same engine step's batched decode*, with everyone's decode
step: the turn's first tokens come out of that step, sampled like every later one, and a
joining turn costs the running ones its T-1 prefill positions, not an extra eager step.

**KV pool.** One (2 * capacity, G, max_len + 1, hs) tensor per layer for keys and one for
values, allocated once. A request takes a *slot*: rows 2s and 2s+1 (batch-parallel A1A2 uses
both, other tasks the first). The prefill writes into the slot's rows through views of the
pool; the batched steps write one position per row with ``index_copy_`` at tensor positions.
Position ``max_len`` of every row is scratch: rows that do not decode in a step (free slots,
a turn paused by backpressure, the idle second row of a one-row task) write there and are
never read, so nothing a running turn stored is ever overwritten. A freed slot is reused
without clearing: a row reads only the positions its own turn wrote (the mask below).

**One attention call for all rows.** The decode step attends over the pool's first ``Lb``
positions of its first ``Rb`` rows (views: no copy), with a boolean mask ``key <= pos`` per
row. The q_per_kv query heads of a group become q_per_kv "queries" of that group's one K/V
head, so grouped-query attention is plain SDPA on (Rb, G, q_per_kv, hs) queries and
(Rb, G, Lb, hs) keys, with the mask broadcast, and no expanded K/V.

**Buckets.** ``Rb`` is the smallest power of two (at least 2) covering the highest row in
use, capped at the pool; ``Lb`` the smallest power of two (at least :data:`MIN_LEN_BUCKET`)
covering the longest running turn, capped at ``max_len``. Each (Rb, Lb, sampled) is one CUDA
graph, captured the first time it is needed (or ahead, :meth:`StaticEngineModel.capture`) into
one shared memory pool; ``sampled`` False is a greedy-only graph without the sort and the noise.
Slots are handed out lowest first, so Rb follows the number of running turns. The graphs
share one memory pool: safe because they never run concurrently (one driver thread, one
stream) and none reads another's intermediates (inputs, KV pool and output buffer live
outside the pool), the condition PyTorch's CUDA-graph notes give for sharing in any replay
order. The LM stage captures every bucket at setup on a GPU (time logged).

**Sampling on the device** (:mod:`.device_sampling`): per-row settings and seeds are inputs of
the graph, the noise is counter based (seed, position, head), so a turn's draws do not depend
on the batch it runs in. Greedy turns take the argmax, as the solo path does.

**What matches what.** Greedy tokens: the solo run's as far as float rounding allows (the
batched linears and the masked attention round differently from the solo path's kernels, as
between any two kernels; in float32 on the tested cases they are identical). Seeded sampling:
reproducible within this engine model, alone or in any batch (another random stream than
:func:`generate.sample`'s ``torch.multinomial``). The token-exact float32 mode stays the
parent's ``exact=True``.

On a CPU this class runs the same step eagerly (what the tests check); the CPU's fast engine is
the parent with the small-batch kernel.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniframe.engine import Work

from . import tokens
from .device_sampling import gumbel_heads, sample_rows
from .engine import MiniOmniEngineModel, TurnRequest, _installed, _Turn
from .fastpath import FastLM
from .model import KVCache, apply_rope

ATTENTION_BACKENDS = {None: None, "efficient": "EFFICIENT_ATTENTION",
                      "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
MIN_LEN_BUCKET = 64
"""Smallest attention length bucket (positions)."""

# host buffer columns (int64): 8 input ids, then these
_POS, _WPOS, _GREEDY, _TOPK, _SEED = 8, 9, 10, 11, 12
_INT_COLS = 13
_TEMP, _TOPP = 0, 1  # float32 columns


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """model.RMSNorm's math (float32, cast back)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + eps)
    return (x * weight.float()).to(dtype)


def layer_pre(x: Tensor, norm_w: Tensor, eps: float, qkv_w: Tensor, qkv_b: Tensor | None,
              cos: Tensor, sin: Tensor, G: int, q_per_kv: int,
              hs: int) -> tuple[Tensor, Tensor, Tensor]:
    """A block's work before attention for one position per row: norm_1, the fused QKV
    projection, RoPE. x (R, 1, C) -> q (R, G, q_per_kv, hs), k and v (R * G, hs).

    A pure function of tensors (weights passed in), so that one ``torch.compile`` serves every
    layer and every row count (dynamic batch)."""
    R = x.size(0)
    h = _rms_norm(x, norm_w, eps)
    qkv = F.linear(h, qkv_w, qkv_b).view(R, 1, G, q_per_kv + 2, hs).permute(0, 2, 3, 1, 4)
    q = apply_rope(qkv[:, :, :q_per_kv].reshape(R, G * q_per_kv, 1, hs), cos, sin)
    k = apply_rope(qkv[:, :, q_per_kv], cos, sin)  # (R, G, 1, hs)
    v = qkv[:, :, q_per_kv + 1]
    return q.reshape(R, G, q_per_kv, hs), k.reshape(R * G, hs), v.reshape(R * G, hs)


def layer_post(x: Tensor, y: Tensor, proj_w: Tensor, norm_w: Tensor, eps: float, fc_1: Tensor,
               fc_2: Tensor, mlp_proj: Tensor) -> Tensor:
    """A block's work after attention: output projection and residual, norm_2, SwiGLU MLP
    and residual. x (R, 1, C), y (R, 1, nh * hs) -> (R, 1, C)."""
    x = x + F.linear(y, proj_w)
    h = _rms_norm(x, norm_w, eps)
    return x + F.linear(F.silu(F.linear(h, fc_1)) * F.linear(h, fc_2), mlp_proj)


def bucket(n: int, minimum: int, cap: int) -> int:
    """The smallest power of two >= max(n, minimum), at most ``cap`` (``n`` must be <= cap)."""
    if n > cap:
        raise ValueError(f"{n} exceeds the largest bucket {cap}")
    b = max(1, minimum)
    while b < n:
        b *= 2
    return min(b, cap)


class _PoolView(KVCache):
    """A request's rows of the pool as a :class:`model.KVCache` (views, nothing allocated):
    the prefill writes the prompt's keys and values straight into the pool."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        nn.Module.__init__(self)
        self.register_buffer("k", k, persistent=False)
        self.register_buffer("v", v, persistent=False)


class StaticEngineModel(MiniOmniEngineModel):
    """The static-shape engine step (module docstring). Use as the engine's model with
    ``Engine(StaticEngineModel(model, capacity=N), capacity=N, ...)``.

    Args:
        model: the GPT (any dtype, any device).
        capacity: slots in the KV pool (turns decoding at once): at least the engine's capacity.
        max_len: positions per row (prompt + answer); default the model's ``block_size``.
        graphs: replay CUDA graphs (default: on a CUDA device). Off: the same step eagerly.
        attention: the SDPA backend of the step (``flash`` cannot take its mask):
            ``efficient``, ``cudnn``, ``math``, or None for PyTorch's choice. The step's
            shapes are fixed per bucket, so cuDNN's per-shape planning is paid once there.
        compile: run each block's pre- and post-attention work (:func:`layer_pre`,
            :func:`layer_post`) and the sampling noise (:func:`device_sampling.gumbel_heads`)
            through ``torch.compile`` (one compilation each for every layer and row count;
            paid at the first step or :meth:`capture`): fuses the norms, RoPE, activations
            and the noise hash. The eager float32 step is ~1,150 PyTorch ops at the released
            size (~1,900 when a row samples), most of them elementwise kernels of a few
            microseconds each on a GPU, which a graph replays but does not shorten.
    """

    def __init__(self, model: Any, *, capacity: int, max_len: int | None = None,
                 graphs: bool | None = None, compile: bool = False,
                 attention: str | None = None) -> None:
        super().__init__(model, exact=False, step_kernels=False)
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {sorted(map(str, ATTENTION_BACKENDS))},"
                             f" got {attention!r}")
        self.attention = attention
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        c = model.config
        self.max_len = int(max_len or c.block_size)
        if not 1 < self.max_len <= c.block_size:
            raise ValueError(f"max_len must be in 2..block_size={c.block_size}, got {max_len}")
        self.capacity = capacity
        self.rows = 2 * capacity
        device = torch.device(model.device)
        self.device = device
        self.graphs = device.type == "cuda" if graphs is None else graphs
        if self.graphs and device.type != "cuda":
            raise ValueError("graphs=True needs a CUDA device")
        G, hs, L1 = c.n_query_groups, c.head_size, self.max_len + 1
        with torch.inference_mode():
            shape = (self.rows, G, L1, hs)
            try:
                self.k_pool = [torch.zeros(shape, device=device, dtype=model.dtype)
                               for _ in model.transformer.h]
                self.v_pool = [torch.zeros(shape, device=device, dtype=model.dtype)
                               for _ in model.transformer.h]
            except torch.OutOfMemoryError as exc:
                self.k_pool = self.v_pool = []
                need = capacity * self.slot_bytes(model, self.max_len) / 1e9
                raise RuntimeError(
                    f"the engine's KV pool for {capacity} turns of {self.max_len} positions "
                    f"needs {need:.2f} GB on {device}, which is not free: lower the capacity "
                    "(the LM stage's engine_capacity) or max_len") from exc
            # static inputs of the step (device) and their host mirrors (pinned on CUDA)
            self._ibuf = torch.zeros(self.rows, _INT_COLS, dtype=torch.long, device=device)
            self._fbuf = torch.ones(self.rows, 2, dtype=torch.float32, device=device)
            self._out = torch.zeros(self.rows, tokens.N_STREAMS, dtype=torch.long, device=device)
        pin = device.type == "cuda"
        self._ihost = torch.zeros(self.rows, _INT_COLS, dtype=torch.long, pin_memory=pin)
        self._fhost = torch.ones(self.rows, 2, dtype=torch.float32, pin_memory=pin)
        self._ihost[:, _GREEDY] = 1
        self._ihost[:, _WPOS] = self.max_len
        idle = [tokens.layershift(tokens.PAD_A, i) for i in range(tokens.N_AUDIO_LAYERS)]
        self._ihost[:, :8] = torch.tensor([*idle, tokens.PAD_T])
        self.compiled = compile
        self._pre: Any = layer_pre
        self._post: Any = layer_post
        self._noise: Any = gumbel_heads
        if compile:
            self._pre = torch.compile(layer_pre, dynamic=True, fullgraph=True)
            self._post = torch.compile(layer_post, dynamic=True, fullgraph=True)
            # the counter hash: ~30 elementwise int64 ops per call, fused into one kernel
            self._noise = torch.compile(gumbel_heads, dynamic=True, fullgraph=True)
        self._free = list(range(capacity))  # a heap: the lowest slot first
        self._slots: dict[int, int] = {}  # work id -> slot
        self._graphs: dict[tuple[int, int, bool], Any] = {}
        self._mempool: Any = None

    @staticmethod
    def slot_bytes(model: Any, max_len: int | None = None) -> int:
        """Bytes of KV pool one slot (2 rows) takes for ``model`` at ``max_len`` positions."""
        c = model.config
        positions = int(max_len or c.block_size) + 1
        elem = torch.empty((), dtype=model.dtype).element_size()
        return 2 * 2 * c.n_layer * c.n_query_groups * positions * c.head_size * elem

    def disable_compile(self) -> None:
        """Run the step's eager functions from now on (and drop the graphs captured so far)."""
        self.compiled = False
        self._pre, self._post, self._noise = layer_pre, layer_post, gumbel_heads
        self._graphs.clear()

    # ------------------------------------------------------------------ slots
    @property
    def free_slots(self) -> int:
        return len(self._free)

    def _slot_of(self, work: Work) -> int:
        return self._slots.get(work.id, -1)

    def _max_returned(self, r: TurnRequest) -> int | None:
        if r.max_returned_tokens is not None and r.max_returned_tokens > self.max_len:
            raise ValueError(
                f"max_returned_tokens={r.max_returned_tokens} is more than the engine's KV pool "
                f"holds per turn ({self.max_len} positions): lower it or build the engine with "
                "a larger max_len")
        return r.max_returned_tokens or self.max_len

    def _caches(self, work: Work, rows: int, length: int) -> list[Any]:
        if not self._free:
            raise RuntimeError(
                f"the KV pool's {self.capacity} slots are all in use: the engine admits more "
                "turns than the pool holds (build it with capacity >= the engine's)")
        slot = heapq.heappop(self._free)
        self._slots[work.id] = slot
        r: TurnRequest = work.payload
        s = r.sampling
        greedy = s.top_k == 1 or s.temperature == 0.0
        seed = r.seed if r.seed is not None else random.getrandbits(32)
        r0 = 2 * slot
        for row in (r0, r0 + 1):
            self._ihost[row, _GREEDY] = int(greedy)
            self._ihost[row, _TOPK] = int(s.top_k or 0)
            self._ihost[row, _SEED] = int(seed) & 0xFFFFFFFF
            self._fhost[row, _TEMP] = float(s.temperature) if s.temperature > 0 else 1.0
            self._fhost[row, _TOPP] = float(s.top_p)
        return [_PoolView(k[r0 : r0 + rows, :, :length], v[r0 : r0 + rows, :, :length])
                for k, v in zip(self.k_pool, self.v_pool, strict=True)]

    prefill_joins_step = True  # the prompt's last position runs in the batched step

    def _prefill(self, work: Work) -> None:
        """Positions 0..T-2 of row 0 into the slot (no heads), copied to row 1 (the rows of
        batch-parallel decoding differ only in the last position: FastLM's shared prefix);
        position T-1 of every row is left to the next batched step."""
        try:
            turn = self._new_turn(work)
            model, stream = self.model, turn.stream
            T = stream.prompt_length
            ids = torch.tensor(stream.prompt[:1], dtype=torch.long, device=model.device)
            feats = stream.features.to(model.device) if stream.features is not None else None
            with _installed(model, turn.caches), FastLM(model).prefill():
                model.forward_embeddings(
                    model.embed(ids[:, :, : T - 1], feats,
                                [stream.whisper_len] if feats is not None else None,
                                [True] if feats is not None else None),
                    0, last_only=True)
            if turn.rows == 2:
                for cache in turn.caches:
                    cache.k[1, :, : T - 1] = cache.k[0, :, : T - 1]
                    cache.v[1, :, : T - 1] = cache.v[0, :, : T - 1]
            turn.last_prompt = [[stream_ids[-1] for stream_ids in row] for row in stream.prompt]
            turn.pos = T - 1
        except BaseException:
            self._free_slot(work)
            raise

    def release(self, work: Work) -> None:
        super().release(work)
        self._free_slot(work)

    def _free_slot(self, work: Work) -> None:
        slot = self._slots.pop(work.id, None)
        if slot is not None:
            heapq.heappush(self._free, slot)

    # ------------------------------------------------------------------ sampling
    def _sample(self, audio: Tensor | None, text: Tensor, ints: Tensor, floats: Tensor,
                pos: Tensor, sampled: bool) -> Tensor:
        """(R, 8) ids: the 7 audio heads (zeros without audio logits), then the text head."""
        seed = ints[:, _SEED]
        kw = dict(greedy=ints[:, _GREEDY].bool(), temperature=floats[:, _TEMP],
                  top_k=ints[:, _TOPK], top_p=floats[:, _TOPP], seed=seed, pos=pos,
                  any_sampled=sampled)
        n_audio = tokens.N_AUDIO_LAYERS
        audio_noise = text_noise = None
        if sampled:  # every head's noise in two calls (compiled: two fused kernels)
            heads = torch.arange(n_audio + 1, device=pos.device)
            if audio is not None:
                audio_noise = self._noise(seed, pos, heads[:n_audio], audio.size(-1))
            text_noise = self._noise(seed, pos, heads[n_audio:], text.size(-1))[:, 0]
        cols = []
        for h in range(n_audio):
            cols.append(sample_rows(audio[:, h], head=h, **kw,
                                    gumbel=None if audio_noise is None else audio_noise[:, h])
                        if audio is not None else torch.zeros_like(pos))
        cols.append(sample_rows(text, head=n_audio, gumbel=text_noise, **kw))
        return torch.stack(cols, dim=1)

    # ------------------------------------------------------------------ decode
    def _decode(self, turns: list[_Turn]) -> None:
        host = self._ihost
        host[:, _POS] = 0
        host[:, _WPOS] = self.max_len  # scratch unless the row decodes now
        top = 0
        longest = 0
        rows: list[int] = []
        values: list[list[int]] = []
        for t in turns:
            r0 = 2 * t.slot
            if t.last_prompt is not None:  # the prompt's last position: the first tokens
                inputs = t.last_prompt
            else:
                inputs = [[i[0] for i in row] for row in t.stream._next_input(t.audio, t.text)]
            for j, row_ids in enumerate(inputs):
                rows.append(r0 + j)
                values.append([*row_ids, t.pos, t.pos])
            top = max(top, r0 + t.rows)
            longest = max(longest, t.pos + 1)
        host[rows, : _WPOS + 1] = torch.tensor(values, dtype=torch.long)
        self.last_rows = sum(t.rows for t in turns)
        Rb = bucket(top, 2, self.rows)
        Lb = bucket(longest, MIN_LEN_BUCKET, self.max_len)
        sampled = any(not t.greedy for t in turns)
        nb = self.device.type == "cuda"
        self._ibuf.copy_(host, non_blocking=nb)
        self._fbuf.copy_(self._fhost, non_blocking=nb)
        if self.graphs:
            self._replay(Rb, Lb, sampled)
        else:
            self._forward(Rb, Lb, sampled)
        ids = self._out[:Rb].tolist()  # the step's one wait for the device
        for t in turns:
            r0 = 2 * t.slot
            audio = ids[r0][: tokens.N_AUDIO_LAYERS] if t.speaks else None
            text = ids[r0 + (1 if t.stream.batch_parallel else 0)][tokens.N_AUDIO_LAYERS]
            if t.last_prompt is not None:  # step 0: recorded without checks (as solo)
                t.last_prompt = None
                t.pos += 1
                self._record(t, audio, text)
                continue
            if t.text_done and t.greedy and t.speaks:
                text = tokens.PAD_T  # the solo path's FastLM drops the head after EOT
            self._after_step(t, audio, text)

    def _forward(self, Rb: int, Lb: int, sampled: bool) -> None:
        """The step over rows [0, Rb) attending positions [0, Lb): static shapes, no host sync.
        Writes the (Rb, 8) sampled ids to ``self._out``."""
        model = self.model
        c = model.config
        G, hs = c.n_query_groups, c.head_size
        nh, q_per_kv = c.n_head, c.q_per_kv
        L1 = self.max_len + 1
        ints, floats = self._ibuf[:Rb], self._fbuf[:Rb]
        pos, wpos = ints[:, _POS], ints[:, _WPOS]
        dev = ints.device
        x = model.embed(ints[:, :8, None])  # (Rb, 1, C)
        cos_all, sin_all = model._rope_tables(dev)
        cos = cos_all[pos][:, None, None, :]  # (Rb, 1, 1, hs)
        sin = sin_all[pos][:, None, None, :]
        mask = (torch.arange(Lb, device=dev)[None, :] <= pos[:, None])[:, None, None, :]
        rows = torch.arange(Rb, device=dev)
        write = ((rows[:, None] * G + torch.arange(G, device=dev)[None, :]) * L1
                 + wpos[:, None]).reshape(-1)  # (Rb * G,) flat row of each new key
        scale = 1.0 / math.sqrt(hs)
        pre, post = self._pre, self._post
        for layer, block in enumerate(model.transformer.h):
            a, mlp = block.attn, block.mlp
            q, k, v = pre(x, block.norm_1.weight, block.norm_1.eps, a.attn.weight, a.attn.bias,
                          cos, sin, G, q_per_kv, hs)
            kp, vp = self.k_pool[layer], self.v_pool[layer]
            kp.view(-1, hs).index_copy_(0, write, k)
            vp.view(-1, hs).index_copy_(0, write, v)
            with self._attention_backends():
                y = F.scaled_dot_product_attention(
                    q, kp[:Rb, :, :Lb], vp[:Rb, :, :Lb],
                    attn_mask=mask, scale=scale)  # (Rb, G, q_per_kv, hs): head g*q_per_kv+s
            x = post(x, y.reshape(Rb, 1, nh * hs), a.proj.weight, block.norm_2.weight,
                     block.norm_2.eps, mlp.fc_1.weight, mlp.fc_2.weight, mlp.proj.weight)
        hidden = model.transformer.ln_f(x)[:, 0]  # (Rb, C)
        ids = self._sample(model.audio_logits(hidden), model.text_logits(hidden), ints, floats,
                           pos, sampled)
        self._out[:Rb].copy_(ids)

    def _attention_backends(self) -> AbstractContextManager[Any]:
        if self.attention is None:
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, ATTENTION_BACKENDS[self.attention])])

    # ------------------------------------------------------------------ CUDA graphs
    def _replay(self, Rb: int, Lb: int, sampled: bool) -> None:
        key = (Rb, Lb, sampled)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(*key)
        graph.replay()

    def _capture(self, Rb: int, Lb: int, sampled: bool) -> Any:
        """Capture the step of one bucket. The warm-up runs compute the step of the current
        inputs (what the replay then recomputes): idempotent writes to the pool."""
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(Rb, Lb, sampled)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
            self._forward(Rb, Lb, sampled)
        self._graphs[(Rb, Lb, sampled)] = graph
        return graph

    def buckets(self) -> list[tuple[int, int]]:
        """Every (Rb, Lb) a step may use."""
        def powers(lo: int, cap: int) -> list[int]:
            out = []
            b = lo
            while b < cap:
                out.append(b)
                b *= 2
            return [*out, cap]

        return [(r, n) for r in powers(2, self.rows) for n in powers(MIN_LEN_BUCKET, self.max_len)]

    def capture(self, keys: Iterable[tuple[int, int, bool]] | None = None) -> int:
        """Capture graphs ahead of traffic (default: every bucket, greedy and sampled); returns
        how many were captured. Runs the step on idle inputs (all rows write scratch)."""
        if not self.graphs:
            return 0
        if keys is None:
            keys = [(r, n, s) for r, n in self.buckets() for s in (False, True)]
        n = 0
        saved = self._ihost[:, [_POS, _WPOS]].clone()
        try:
            self._ihost[:, _POS] = 0
            self._ihost[:, _WPOS] = self.max_len
            with torch.inference_mode():
                self._ibuf.copy_(self._ihost)
                self._fbuf.copy_(self._fhost)
                for key in keys:
                    if key not in self._graphs:
                        self._capture(*key)
                        n += 1
            torch.cuda.synchronize(self.device)
        finally:
            self._ihost[:, [_POS, _WPOS]] = saved
        return n
