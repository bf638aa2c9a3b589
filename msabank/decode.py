"""Stage 3 (spec §5): decode over the frozen prefill context at a static shape, stops checked on the device.

One decode step (`decode_step`) feeds one token per sample and writes its K/V into each layer's cache at a
column held in a device tensor (`index_copy_`), then attends over the layer's whole allocated width under
the cache's mask, so every step launches the same kernels on the same shapes. On CUDA that step
(with the greedy choice and the stop bookkeeping) is captured once per (batch, cache width) in a
`torch.cuda.CUDAGraph` and replayed; widths are bucketed (`cache_width`) so rounds and questions of similar
size reuse a graph (a bounded LRU per model). On CPU the same functions run eagerly, attending over the
live columns only (measured: the padded width costs attention work there and saves no launch).

The host sees the tokens once per block (`BLOCKS`): per-sample done flags, lengths and the stop ids are on
the device; `stop_text` (the interleave's `<End-of-Retrieve>` is plain text over several tokens) is looked
for on the host in each block's decoded tail, and tokens a sample produced after its stop are discarded,
so the result equals the per-token loop's (samples are independent rows). This module does not route,
prefill or parse transcripts (msabank.stages, msabank.interleave).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from msabank.errors import ConfigError
from msabank.kernels import attention
from msabank.model import MSAModel
from msabank.prompt import Tokenizer

log = logging.getLogger(__name__)

OnTokens = Callable[[int, list[int]], None]
"""on_tokens(sample, token_ids): a sample's new tokens, once per host block (streaming)."""

MODES = ("auto", "graph", "eager")
GRAPHS_PER_MODEL = 16
"""Captured graphs kept per model (LRU). A graph holds its own cache buffers: for the embedded model a few
hundred KB, for MSA-4B at batch 1 and 2,048 columns 36 layers x 2 x 8 x 2,048 x 128 x 2 B = 302 MB."""
GRAPH_BYTES_PER_MODEL = 4 << 30
"""Static buffer bytes the captured graphs of one model hold together at most (LRU eviction before a new
capture): the count alone let 16 MSA-4B graphs pin 16 x 302 MB at batch 1 x 2,048 columns, or 16 x 9.7 GB
at batch 8 x 8,192. A graph larger than the whole budget is still captured, alone."""
MAX_STOP_IDS = 8
"""Stop ids a graph's static buffer holds (padded with -1); more make a graph of their own."""
BLOCKS_CUDA = (4, 8, 16, 32)
"""Tokens between host round trips on CUDA, growing: a generation that stops early wastes at most a few
replayed steps (~the launch cost of one graph each), a long one syncs every 32 tokens."""
BLOCKS_CPU = (1,)
"""On CPU the host is the device: reading the flags costs nothing, a wasted step costs a whole forward."""
CPU_LIVE_COLUMNS = True
"""On CPU attend over the live columns only (measured, one thread, 450 live of 1,280 columns: 88 us per
layer sliced, 153 us over the whole width). False runs the CUDA graph's full-width step (tests)."""

_logged: set[str] = set()
_compiled: dict[Callable[..., torch.Tensor], Callable[..., torch.Tensor]] = {}


def compile_enabled() -> bool:
    """MSABANK_DECODE_COMPILE=1: the captured step is `torch.compile`d first (inductor fuses the ~56 small
    kernels per layer of the eager step: norms, RoPE, residual adds), one compiled function for every
    bucket (shapes become dynamic after the first recompile). Off by default: compiling takes tens of
    seconds per model and has not been measured against the plain graph yet."""
    return os.environ.get("MSABANK_DECODE_COMPILE", "0") == "1"


def _step_fn(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    if not compile_enabled():
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)  # type: ignore[assignment]
    return _compiled[fn]


def resolve_mode(mode: str | None, device: torch.device) -> str:
    """'graph' or 'eager' for a model on `device`; `mode` None reads MSABANK_DECODE (default 'auto': graph
    on CUDA, eager elsewhere). An explicit 'graph' off CUDA is a ConfigError."""
    want = mode if mode is not None else os.environ.get("MSABANK_DECODE", "auto")
    if want not in MODES:
        raise ConfigError(f"unknown decode mode {want!r}", hint="use one of auto, graph, eager (MSABANK_DECODE)")
    if want == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if want == "graph" and device.type != "cuda":
        raise ConfigError(f"decode='graph' needs a CUDA device; the model is on {device.type}",
                          hint="use decode='eager' (or 'auto'), or set MSABANK_DECODE=auto")
    return want


def cache_width(needed: int) -> int:
    """Cache columns allocated for `needed`: rounded up to a multiple of 128, or of 1/8 of the size above
    1,024 columns (at most 12.5% padding), so generations of similar size share one captured graph."""
    step = max(128, 1 << max(needed.bit_length() - 4, 0))
    return -(-needed // step) * step


# ---------------------------------------------------------------------------------------------------
# The static step
# ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class DecodeState:
    """Everything one decode step reads and writes, as device tensors (a captured graph's static inputs)."""

    k: list[torch.Tensor]
    """Per layer (B, Hkv, S_l, D) cache keys; the step writes column `cols[l]`."""
    v: list[torch.Tensor]
    """Per layer (B, Hkv, S_l, D)."""
    bias: list[torch.Tensor]
    """Per layer (B, S_l) additive attention mask in the model dtype: 0 on the columns a token may read
    (template, its chunks, the prompt, tokens fed so far), -inf elsewhere. SDPA turns a bool mask into
    this every call (measured on the CPU: 88 -> 46 us per call at 450 columns, the same result)."""
    ids: torch.Tensor
    """(B,) int64: the token each sample feeds next (the last one chosen)."""
    positions: torch.Tensor
    """(B,) int64: its position."""
    cols: torch.Tensor
    """(L,) int64: the cache column it goes to in each layer (prompt_start + prompt length + step - 1)."""
    step: torch.Tensor
    """(1,) int64: tokens chosen so far (the next one is written at tokens[:, step])."""
    tokens: torch.Tensor
    """(B, N) int64: every chosen token by step, also after a sample's stop (discarded on the host)."""
    lengths: torch.Tensor
    """(B,) int64: tokens a sample kept (up to and including its stop)."""
    done: torch.Tensor
    """(B,) bool: the sample stopped or reached its limit."""
    stopped: torch.Tensor
    """(B,) bool: the sample emitted a stop id (or, set by the host, its output contains stop_text)."""
    limits: torch.Tensor
    """(B,) int64: max_new_tokens of each sample."""
    stops: torch.Tensor
    """(S,) int64 stop ids, -1 padding (never a token)."""


def decode_step(model: MSAModel, st: DecodeState, live: Sequence[int] | None = None) -> torch.Tensor:
    """Feed `st.ids` at `st.positions`, writing K/V at column `st.cols[l]` of each layer; (B, V) float32 logits.

    The token attends over its layer's whole cache under `bias` (template, its chunks, the prompt, earlier
    tokens and itself: its column is opened before attending), exactly the per-token loop's mask.
    `live`: per layer, attend over the first live[l] columns only (the CPU path); None: the whole width, the
    same shapes every step (the CUDA graph). GQA without copying the cache: for one query token the G query
    heads of a KV head are G query rows against that head, (B, Hkv, G, D) (HF repeat_kv order h = kv·G + j),
    where repeat_interleave would copy (B, H, S, D) twice per layer per token.
    """
    cfg = model.config
    b, group = st.ids.shape[0], cfg.num_heads // cfg.num_kv_heads
    cos, sin = model.rope(st.positions[:, None])
    h = model.model.embed_tokens(st.ids[:, None])
    for i, layer in enumerate(model.model.layers):
        q, k, v = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin)  # q (B, H, 1, D), k/v (B, Hkv, 1, D)
        col = st.cols[i : i + 1]
        # .to: under autocast (the trainer's evaluation) a float32 model's projections come out bf16
        st.k[i].index_copy_(2, col, k.to(st.k[i].dtype))
        st.v[i].index_copy_(2, col, v.to(st.v[i].dtype))
        st.bias[i].index_fill_(1, col, 0.0)
        kc, vc, mask = st.k[i], st.v[i], st.bias[i]
        if live is not None:
            kc, vc, mask = kc[:, :, : live[i]], vc[:, :, : live[i]], mask[:, : live[i]]
        o = attention(q.reshape(b, cfg.num_kv_heads, group, cfg.head_dim), kc, vc, mask[:, None, None, :])
        h = layer.finish(h, o.reshape(b, cfg.num_heads, 1, cfg.head_dim))
    return model.lm_head(model.model.norm(h[:, -1])).float()


def record(st: DecodeState, nxt: torch.Tensor) -> None:
    """Bookkeeping of one chosen token per sample, on the device (no host sync): store it, count it for the
    samples still running, stop on a stop id or the limit, and set up the next step's input."""
    running = ~st.done
    st.tokens.index_copy_(1, st.step, nxt[:, None])
    st.lengths.add_(running.long())
    # A device isin: broadcast compare against the padded stop ids (any over an empty set is False).
    hit = (nxt[:, None] == st.stops[None, :]).any(1) & running
    st.stopped.logical_or_(hit)
    st.done.logical_or_(hit | (st.lengths >= st.limits))
    st.step.add_(1)
    st.ids.copy_(nxt)
    st.positions.add_(1)
    st.cols.add_(1)


def greedy_step(model: MSAModel, st: DecodeState, live: Sequence[int] | None = None) -> torch.Tensor:
    """One whole greedy step (what a graph captures): forward, argmax (first max on ties), record."""
    logits = decode_step(model, st, live)
    record(st, logits.argmax(-1))
    return logits


# ---------------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------------


class StepGraph:
    """One captured step over static buffers of a (batch, width) bucket: all layers share width `width`.

    `greedy`: the graph also chooses (argmax) and records; otherwise it yields logits and sampling plus
    `record` run eagerly on the same buffers."""

    def __init__(self, model: MSAModel, batch: int, width: int, n_stops: int, greedy: bool) -> None:
        cfg, dev, dt = model.config, model.device, model.dtype
        shape = (batch, cfg.num_kv_heads, width, cfg.head_dim)
        layers = cfg.num_layers

        def z(*s: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(*s, dtype=dtype, device=dev)

        self.state = DecodeState(
            k=[torch.zeros(shape, dtype=dt, device=dev) for _ in range(layers)],
            v=[torch.zeros(shape, dtype=dt, device=dev) for _ in range(layers)],
            bias=[torch.full((batch, width), float("-inf"), dtype=dt, device=dev) for _ in range(layers)],
            ids=z(batch), positions=z(batch), cols=z(layers), step=z(1), tokens=z(batch, width),
            lengths=z(batch), done=z(batch, dtype=torch.bool), stopped=z(batch, dtype=torch.bool),
            limits=z(batch), stops=torch.full((n_stops,), -1, dtype=torch.long, device=dev))
        self.width, self.greedy = width, greedy
        self.nbytes = graph_bytes(model, batch, width, n_stops)
        self.lock = threading.Lock()
        step = _step_fn(greedy_step if greedy else decode_step)
        self.fn: Callable[[], torch.Tensor] = lambda: step(model, self.state)
        self._capture(dev)

    def _capture(self, dev: torch.device) -> None:
        # Warm-up on a side stream before capture (PyTorch's CUDA graph recipe): lazy inits, cuBLAS
        # workspaces and the allocator's pool happen outside the graph. The warm-up writes the buffers;
        # `_load` overwrites everything a generation reads.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._reset_inputs()
                self.fn()
        torch.cuda.current_stream(dev).wait_stream(side)
        self._reset_inputs()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.fn()

    def _reset_inputs(self) -> None:
        for x in (self.state.ids, self.state.positions, self.state.cols, self.state.step):
            x.zero_()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class _Graphs:
    """Per model: an LRU of captured `StepGraph`s by (batch, width, stop slots, greedy), and the keys whose
    capture failed (never retried)."""

    def __init__(self) -> None:
        self.lru: collections.OrderedDict[tuple[int, int, int, bool], StepGraph] = collections.OrderedDict()
        self.failed: set[tuple[int, int, int, bool]] = set()


_GRAPHS: weakref.WeakKeyDictionary[MSAModel, _Graphs] = weakref.WeakKeyDictionary()
_GRAPHS_LOCK = threading.Lock()


def graph_bytes(model: MSAModel, batch: int, width: int, n_stops: int) -> int:
    """Bytes of one StepGraph's static buffers: per layer K and V (B, Hkv, width, D) and the additive mask
    (B, width) in the model dtype, the (B, width) chosen tokens and the small int64 state."""
    cfg = model.config
    item = torch.empty((), dtype=model.dtype).element_size()
    per_layer = (2 * cfg.num_kv_heads * cfg.head_dim + 1) * batch * width * item
    return cfg.num_layers * per_layer + 8 * (batch * width + 5 * batch + cfg.num_layers + 1 + n_stops)


def step_graph(model: MSAModel, batch: int, width: int, n_stops: int, greedy: bool) -> StepGraph | None:
    """The captured step for this bucket (captured now if new), or None when capture failed: the caller
    decodes eagerly (logged once per reason). Before a capture, least recently used graphs are dropped
    until the new one fits GRAPH_BYTES_PER_MODEL and GRAPHS_PER_MODEL (a generation still decoding with a
    dropped graph keeps its buffers until it ends)."""
    key = (batch, width, n_stops, greedy)
    with _GRAPHS_LOCK:
        graphs = _GRAPHS.setdefault(model, _Graphs())
        if key in graphs.lru:
            graphs.lru.move_to_end(key)
            return graphs.lru[key]
        if key in graphs.failed:
            return None
        need = graph_bytes(model, batch, width, n_stops)
        while graphs.lru and (len(graphs.lru) >= GRAPHS_PER_MODEL
                              or sum(g.nbytes for g in graphs.lru.values()) + need > GRAPH_BYTES_PER_MODEL):
            graphs.lru.popitem(last=False)
        try:
            g = StepGraph(model, batch, width, n_stops, greedy)
        except RuntimeError as err:  # capture (or compile: dynamo's errors are RuntimeErrors) refused: eager serves
            graphs.failed.add(key)
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if reason not in _logged:
                _logged.add(reason)
                log.warning("decode: CUDA graph capture failed (%s); decoding eagerly", reason)
            return None
        graphs.lru[key] = g
        return g


def captured_graphs(model: MSAModel) -> int:
    """How many step graphs this model holds (tests: reuse across calls of one bucket)."""
    g = _GRAPHS.get(model)
    return len(g.lru) if g is not None else 0


# ---------------------------------------------------------------------------------------------------
# The block loop
# ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Decoded:
    """What `decode` returns, per sample in batch order."""

    tokens: list[list[int]]
    """Kept ids; ends with the stop id when one fired."""
    stopped: list[bool]
    """A stop id or stop_text ended the sample (else its limit)."""
    step_logits: list[torch.Tensor]
    """(B, V) float32 of every step the per-token loop would have run, only with keep_logits (step 0
    included, on the device)."""
    steps: int
    """Steps the per-token loop runs: the longest sample's length."""


def upload(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A small int64 host list on `device` without a stream sync: a non-blocking copy (the driver stages
    pageable memory before returning; no pin_memory, a cudaHostAlloc for a tensor this small, issue 12),
    where a blocking copy_ synchronises the stream (3 such syncs per generation before: limits, columns,
    stop ids)."""
    return torch.tensor(list(values), dtype=torch.long).to(device, non_blocking=device.type == "cuda")


def _bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) bool -> additive mask: 0 where valid, -inf elsewhere."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))


def _eager_state(k: list[torch.Tensor], v: list[torch.Tensor], valid: list[torch.Tensor], b: int, n: int,
                 stop_ids: Sequence[int]) -> DecodeState:
    dev = k[0].device
    z = lambda *s, dtype=torch.long: torch.zeros(*s, dtype=dtype, device=dev)  # noqa: E731
    return DecodeState(k=k, v=v, bias=[_bias(x, k[0].dtype) for x in valid], ids=z(b), positions=z(b),
                       cols=z(len(k)), step=z(1), tokens=z(b, n), lengths=z(b), done=z(b, dtype=torch.bool),
                       stopped=z(b, dtype=torch.bool), limits=z(b), stops=upload(stop_ids, dev))


def _load(st: DecodeState, k: list[torch.Tensor], v: list[torch.Tensor], valid: list[torch.Tensor],
          stop_ids: Sequence[int]) -> None:
    """Copy a prefill's caches into a graph's buffers (the first columns of each layer; the rest masked:
    whatever an earlier generation left there is finite and never read)."""
    for i in range(len(k)):
        s = k[i].shape[2]
        st.k[i][:, :, :s].copy_(k[i])
        st.v[i][:, :, :s].copy_(v[i])
        st.bias[i].fill_(float("-inf"))
        st.bias[i][:, :s].masked_fill_(valid[i], 0.0)
    st.stops.copy_(upload([*stop_ids, *[-1] * (st.stops.shape[0] - len(stop_ids))], st.stops.device))
    for x in (st.tokens, st.lengths, st.done, st.stopped):
        x.zero_()


def decode(
    model: MSAModel,
    k: list[torch.Tensor],
    v: list[torch.Tensor],
    valid: list[torch.Tensor],
    starts: Sequence[int],
    first_logits: torch.Tensor,
    last_positions: torch.Tensor,
    *,
    limits: Sequence[int],
    stop_ids: Sequence[int],
    stop_text: str | None,
    tokenizer: Tokenizer | None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    choose: Callable[[torch.Tensor, float, float, torch.Generator | None], torch.Tensor],
    keep_logits: bool = False,
    keep_cache: bool = False,
    mode: str | None = None,
    on_tokens: OnTokens | None = None,
) -> Decoded:
    """Decode after a prefill: the same tokens as the per-token loop, with a host round trip per block.

    k, v, valid: each layer's cache (B, Hkv, S_l, D) / (B, S_l) bool. starts[l]: the cache column of the
    first token fed in layer l (prompt_start + prompt length). first_logits (B, V) float32 from the prefill;
    last_positions (B,) the position of each prompt's last token. `choose(logits, temperature, top_p,
    generator)` picks tokens (msabank.stages._choose); greedy (temperature <= 0) runs inside the graph.
    keep_cache: leave the caches as the per-token loop leaves them (the fed tokens' K/V written and valid,
    nothing after); otherwise their content after decode is unspecified.
    """
    b, n = first_logits.shape[0], max(limits)
    stop_ids = sorted(set(int(s) for s in stop_ids))
    greedy = temperature <= 0
    graph: StepGraph | None = None
    if resolve_mode(mode, first_logits.device) == "graph" and n > 1:  # one token: the prefill's, no decode
        width = max(x.shape[2] for x in k)
        graph = step_graph(model, b, width, max(MAX_STOP_IDS, len(stop_ids)), greedy)
    args = (starts, first_logits, last_positions, limits, stop_text, tokenizer, temperature, top_p, generator, choose,
            keep_logits, on_tokens)
    # A graph's buffers serve one generation at a time: another thread (or an on_tokens callback that
    # generates) holding it decodes eagerly instead of waiting.
    if graph is not None and graph.lock.acquire(blocking=False):
        try:
            _load(graph.state, k, v, valid, stop_ids)
            out = _run(model, graph.state, graph, *args, live=None)
            if keep_cache:  # the decoded columns back into the caller's caches (the rest came from them)
                for i, s0 in enumerate(starts):
                    end = min(s0 + out.steps - 1, k[i].shape[2])
                    k[i][:, :, s0:end].copy_(graph.state.k[i][:, :, s0:end])
                    v[i][:, :, s0:end].copy_(graph.state.v[i][:, :, s0:end])
        finally:
            graph.lock.release()
    else:
        st = _eager_state(k, v, valid, b, n, stop_ids)
        # CPU: attend over the live columns only (full width would cost attention work and save no launch).
        cpu = first_logits.device.type == "cpu" and CPU_LIVE_COLUMNS
        out = _run(model, st, None, *args, live=list(starts) if cpu else None)
    if keep_cache:
        for i, s0 in enumerate(starts):
            end = s0 + out.steps - 1  # step s fed column s0 + s - 1; the last chosen token is never fed
            valid[i][:, s0:end] = True
            valid[i][:, end:] = False
            k[i][:, :, end:] = 0  # a block may have run past the last stop
            v[i][:, :, end:] = 0
    return out


def _run(model: MSAModel, st: DecodeState, graph: StepGraph | None, starts: Sequence[int], first_logits: torch.Tensor,
         last_positions: torch.Tensor, limits: Sequence[int], stop_text: str | None, tok: Tokenizer | None,
         temperature: float, top_p: float, generator: torch.Generator | None,
         choose: Callable[[torch.Tensor, float, float, torch.Generator | None], torch.Tensor], keep_logits: bool,
         on_tokens: OnTokens | None, live: list[int] | None) -> Decoded:
    b, n = len(limits), max(limits)
    dev = first_logits.device
    # Step 0 is the prefill's token: record it with the inputs one step back, so record() advances them to
    # the first decode step (position last + 1, column starts[l]). Limits and columns: one upload.
    small = upload([*limits, *(s - 1 for s in starts)], dev)
    st.limits.copy_(small[:b])
    st.cols.copy_(small[b:])
    st.step.zero_()
    st.positions.copy_(last_positions)
    record(st, choose(first_logits, temperature, top_p, generator))
    greedy = temperature <= 0
    logits_kept = [first_logits] if keep_logits else []
    blocks = BLOCKS_CPU if dev.type == "cpu" else BLOCKS_CUDA
    # The marker spans at most len(stop_text) tokens (one char each at worst): decode only that tail.
    tail = len(stop_text) + 1 if stop_text else 0
    kept: list[list[int]] = [[] for _ in range(b)]  # host copy of each sample's kept tokens
    final = [False] * b  # the host has seen this sample end
    stopped = [False] * b
    step, seen, block_i = 1, 0, 0  # steps recorded; steps already copied to the host
    # With blocks of several steps (CUDA) the first block follows the prefill's token on the device, unseen:
    # a round trip first would stall the device between prefill and decode (a stop at step 0 wastes
    # blocks[0] - 1 steps, discarded like any step past a stop).
    blind = blocks[0] > 1 and n > 1
    while True:
        if blind:
            blind = False
            run = min(blocks[0], n - step)
            block_i = 1
            step = _steps(model, st, graph, run, step, live, greedy, temperature, top_p, generator, choose,
                          logits_kept if keep_logits else None)
            continue
        # One host round trip: lengths, flags and the new tokens in one copy.
        snap = torch.cat([st.lengths[:, None], st.done[:, None].long(), st.stopped[:, None].long(),
                          st.tokens[:, seen:step]], 1).tolist()
        for s in range(b):
            if final[s]:
                continue
            length, done_s, stop_s, new = snap[s][0], bool(snap[s][1]), bool(snap[s][2]), snap[s][3:]
            fresh = new[: length - len(kept[s])]
            cut = _stop_text_at(tok, kept[s], fresh, stop_text, tail) if stop_text else None
            if cut is not None:  # stop_text ended it at fresh[cut - 1]: what followed is discarded
                fresh, done_s, stop_s = fresh[:cut], True, True
                st.done[s], st.stopped[s] = True, True
                st.lengths[s] = len(kept[s]) + cut
            kept[s] += fresh
            if on_tokens is not None and fresh:
                on_tokens(s, fresh)
            final[s], stopped[s] = done_s, stop_s
        seen = step
        if all(final) or step >= n:
            break
        run = min(blocks[min(block_i, len(blocks) - 1)], n - step)
        block_i += 1
        step = _steps(model, st, graph, run, step, live, greedy, temperature, top_p, generator, choose,
                      logits_kept if keep_logits else None)
    steps = max(len(t) for t in kept)
    return Decoded(tokens=kept, stopped=stopped, step_logits=logits_kept[:steps], steps=steps)


def _steps(model: MSAModel, st: DecodeState, graph: StepGraph | None, run: int, step: int, live: list[int] | None,
           greedy: bool, temperature: float, top_p: float, generator: torch.Generator | None,
           choose: Callable[[torch.Tensor, float, float, torch.Generator | None], torch.Tensor],
           logits_kept: list[torch.Tensor] | None) -> int:
    """Run `run` decode steps from step `step` on the device (no host sync); returns the next step."""
    for _ in range(run):
        lv = [x + step for x in live] if live is not None else None  # step s writes column starts + s - 1
        if graph is not None and greedy:
            logits = graph.replay()
        else:
            logits = graph.replay() if graph is not None else decode_step(model, st, lv)
            if greedy:
                record(st, logits.argmax(-1))
            else:
                record(st, choose(logits, temperature, top_p, generator))
        if logits_kept is not None:
            logits_kept.append(logits.clone())
        step += 1
    return step


def _stop_text_at(tok: Tokenizer | None, before: list[int], fresh: list[int], stop_text: str, tail: int) -> int | None:
    """The first j (1-based) such that the decoded tail of before + fresh[:j] contains stop_text (the
    per-token loop's check, token by token), else None."""
    assert tok is not None, "stop_text needs a tokenizer"
    seq = before + fresh
    if len(fresh) > 1 and stop_text.isascii():
        # One decode of the block's whole window first (a CUDA block is up to 32 tokens: 32 decodes per
        # sample before): ASCII bytes decode to themselves whatever surrounds them (byte-level tokenizers,
        # U+FFFD only for broken multi-byte sequences), so a marker in any per-token window is in this one.
        if stop_text not in tok.decode(seq[max(0, len(before) + 1 - tail) :]):
            return None
    for j in range(1, len(fresh) + 1):
        end = len(before) + j
        if stop_text in tok.decode(seq[max(0, end - tail) : end]):
            return j
    return None
