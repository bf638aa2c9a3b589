"""Block decode with device-side stops (msabank.decode) against a plain per-token loop, on the CPU.

`reference_generate` is the loop `stages.generate` ran before: one step per token over the cache sliced to
the live columns, attention through `sparse_attention` (K/V repeated per query head), the token to the
host every step, stop ids and `stop_text` checked in Python per sample per token. The block loop must give
its tokens exactly, its finish reasons, its step logits and caches (float32: within the goldens' 1e-4,
logits of magnitude ~20 here; the GQA attention sums in another order), also with blocks of several tokens (the CUDA schedule) and with the
full-width static step a CUDA graph replays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pytest
import torch

from msabank import decode as D
from msabank import interleave, stages
from msabank.errors import ConfigError
from msabank.kernels import sparse_attention
from msabank.model import MSAModel, load_model
from msabank.prompt import Prompt, question_prompt
from msabank.stages import InMemoryMemory, encode_documents, generate

DOCS = [(0, "Mira planted."), (1, "The lighthouse keeper on Gull Point ret."), (2, "Copper kettles.")]
QUESTIONS = ("Who planted?", "When did the keeper on Gull Point retire from the lighthouse?", "Kettles?")


@pytest.fixture(scope="module")
def setup(golden: Path) -> tuple[MSAModel, InMemoryMemory]:
    model = load_model(golden / "tiny-msa")
    enc = dict(zip((n for n, _ in DOCS), encode_documents(model, DOCS)))
    return model, InMemoryMemory(enc, 2)


class _Docs:
    """The interleave loop's documents over DOCS (numbers are the indices)."""

    def __len__(self) -> int:
        return len(DOCS)

    def user_ids(self, numbers):
        return {n: f"d{n}" for n in numbers}

    def texts(self, numbers):
        return {n: (f"d{n}", DOCS[n][1]) for n in numbers if 0 <= n < len(DOCS)}


def _old_step(model: MSAModel, caches: list[stages.LayerCache], ids: torch.Tensor, positions: torch.Tensor,
              col_offset: int) -> torch.Tensor:
    cos, sin = model.rope(positions[:, None])
    h = model.model.embed_tokens(ids[:, None])
    self_col = torch.ones(ids.shape[0], 1, 1, dtype=torch.bool, device=ids.device)
    for layer, cache in zip(model.model.layers, caches):
        q, k, v = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin)
        col = cache.prompt_start + col_offset
        cache.k[:, :, col] = k[:, :, 0]
        cache.v[:, :, col] = v[:, :, 0]
        cache.valid[:, col] = True
        h = layer.finish(h, sparse_attention(q, cache.k[:, :, : col + 1], cache.v[:, :, : col + 1],
                                             cache.valid[:, :col], self_col))
    return model.lm_head(model.model.norm(h[:, -1])).float()


def reference_generate(model: MSAModel, prompts: Sequence[Prompt], memory: InMemoryMemory, *,
                       max_new_tokens: Sequence[int], stop_ids: Sequence[int], stop_text: str | None = None,
                       temperature: float = 0.0, seed: int | None = None):
    """The per-token loop: (tokens, finish reasons, step logits (steps, B, V) on the model's device, caches).
    Also the GPU tests' oracle (tests/gpu/test_decode.py)."""
    tok = model.tokenizer
    gen = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    with torch.inference_mode():
        template = stages.template_prefix(model)
        t0 = template[0].shape[2]
        batch = stages.pad_batch(prompts, pad_id=tok.pad_id, first_position=t0 + model.config.top_k)
        batch = stages.PaddedPrompts(*(x.to(model.device) for x in (batch.input_ids, batch.attention_mask,
                                                                      batch.routing_mask, batch.positions)))
        caches, _, logits = stages._prefill(model, batch, memory, template, max(max_new_tokens), None, None)
        steps, last_pos, b = [logits], batch.positions[:, -1], len(prompts)
        tokens: list[list[int]] = [[] for _ in range(b)]
        done, stopped = [False] * b, [False] * b
        tail = len(stop_text) + 1 if stop_text else 0
        for step in range(max(max_new_tokens)):
            if step:
                logits = _old_step(model, caches, nxt, last_pos + step, batch.input_ids.shape[1] + step - 1)
                steps.append(logits)
            nxt = stages._choose(logits, temperature, 1.0, gen)
            for s, tid in enumerate(nxt.tolist()):
                if not done[s]:
                    tokens[s].append(tid)
                    stopped[s] = tid in stop_ids or (stop_text is not None and stop_text in tok.decode(tokens[s][-tail:]))
                    done[s] = stopped[s] or len(tokens[s]) >= max_new_tokens[s]
            if all(done):
                break
    return tokens, ["stop" if x else "length" for x in stopped], torch.stack(steps), caches


@pytest.fixture(params=["cpu", "blocks", "static"])
def schedule(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """cpu: the CPU path (a host check per token, live columns); blocks: the CUDA schedule's host round trip
    every few tokens (here 3, then 5); static: blocks plus the full-width step a CUDA graph replays."""
    if request.param != "cpu":
        monkeypatch.setattr(D, "BLOCKS_CPU", (3, 5))
    if request.param == "static":
        monkeypatch.setattr(D, "CPU_LIVE_COLUMNS", False)
    return request.param


def _prompts(model: MSAModel, n: int = 3) -> list[Prompt]:
    return [question_prompt(model.tokenizer, q) for q in QUESTIONS[:n]]


def _close(name: str, mine: torch.Tensor, ref: torch.Tensor, atol: float = 1e-4) -> None:
    assert mine.shape == ref.shape, f"{name}: shape {tuple(mine.shape)} != {tuple(ref.shape)}"
    err = (mine - ref).abs().max().item() if mine.numel() else 0.0
    assert err <= atol, f"{name}: max abs err {err:.3g} > {atol}"


def _same(model, memory, prompts, *, limits, stop_ids, stop_text=None, temperature=0.0, seed=None):
    ref_tokens, ref_finish, ref_logits, ref_caches = reference_generate(
        model, prompts, memory, max_new_tokens=limits, stop_ids=stop_ids, stop_text=stop_text,
        temperature=temperature, seed=seed)
    streamed: dict[int, list[int]] = {}
    out = generate(model, prompts, memory, max_new_tokens=limits, stop_ids=stop_ids, stop_text=stop_text,
                   temperature=temperature, seed=seed, keep_logits=True, keep_cache=True,
                   on_tokens=lambda s, ids: streamed.setdefault(s, []).extend(ids))
    assert out.tokens == ref_tokens
    assert out.finish_reasons == ref_finish
    assert streamed == {s: t for s, t in enumerate(ref_tokens)}
    assert out.step_logits.shape == ref_logits.shape
    _close("step_logits", out.step_logits, ref_logits)
    for i, (mine, ref) in enumerate(zip(out.cache, ref_caches)):
        assert mine.prompt_start == ref.prompt_start and mine.k.shape == ref.k.shape
        assert torch.equal(mine.valid, ref.valid)
        _close(f"L{i}/k", mine.k, ref.k)
        _close(f"L{i}/v", mine.v, ref.v)
    return out


def test_stop_ids_end_each_sample_where_the_loop_does(setup, schedule) -> None:
    model, mem = setup
    prompts = _prompts(model)
    free = reference_generate(model, prompts, mem, max_new_tokens=[9] * 3, stop_ids=[])[0]
    stops = [free[0][1], free[1][4]]  # sample 0 stops at its 2nd token, sample 1 at its 5th (or earlier)
    out = _same(model, mem, prompts, limits=[9] * 3, stop_ids=stops)
    assert out.finish_reasons[:2] == ["stop", "stop"] and len(out.tokens[0]) <= 2 and len(out.tokens[1]) <= 5


def test_stop_text_spanning_a_block_boundary(setup, schedule) -> None:
    model, mem = setup
    prompts = _prompts(model, 2)
    free = reference_generate(model, prompts, mem, max_new_tokens=[10, 10], stop_ids=[])[0]
    # Blocks end after tokens 1, 4, 9: a marker made of tokens 4 and 5 is split by the second boundary.
    marker = model.tokenizer.decode(free[0][3:5])
    out = _same(model, mem, prompts, limits=[10, 10], stop_ids=[], stop_text=marker)
    assert out.finish_reasons[0] == "stop" and 2 <= len(out.tokens[0]) <= 5
    assert marker in model.tokenizer.decode(out.tokens[0])


def test_per_sample_limits_and_mixed_prompt_lengths(setup, schedule) -> None:
    model, mem = setup
    prompts = _prompts(model)
    assert len({len(p.ids) for p in prompts}) == 3  # left padding differs per sample
    out = _same(model, mem, prompts, limits=[2, 7, 4], stop_ids=[])
    assert [len(t) for t in out.tokens] == [2, 7, 4] and out.finish_reasons == ["length"] * 3


def test_one_token_and_every_sample_stopping_at_once(setup, schedule) -> None:
    model, mem = setup
    prompts = _prompts(model, 2)
    _same(model, mem, prompts, limits=[1, 1], stop_ids=[])
    first = reference_generate(model, prompts, mem, max_new_tokens=[1, 1], stop_ids=[])[0]
    out = _same(model, mem, prompts, limits=[6, 6], stop_ids=[first[0][0], first[1][0]])
    assert [len(t) for t in out.tokens] == [1, 1]


def test_seeded_sampling_equals_the_loop(setup, schedule) -> None:
    model, mem = setup
    _same(model, mem, _prompts(model), limits=[6, 3, 5], stop_ids=[], temperature=1.0, seed=3)


class EagerGraph(D.StepGraph):
    """The graph path's buffers and bookkeeping with the captured step run eagerly (no CUDA here)."""

    def _capture(self, dev: torch.device) -> None:
        self.replays = 0

    def replay(self) -> torch.Tensor:
        self.replays += 1
        return self.fn()


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_graph_path_buffers_on_cpu(setup, monkeypatch: pytest.MonkeyPatch, temperature: float) -> None:
    """What the CUDA path does around the graph (one width for every layer, the prefill's caches copied in
    and the decoded columns back, an LRU per (batch, width) bucket), with an eager stand-in for the graph."""
    model, mem = setup
    monkeypatch.setattr(D, "StepGraph", EagerGraph)
    monkeypatch.setattr(D, "resolve_mode", lambda mode, device: "graph")
    monkeypatch.setattr(D, "BLOCKS_CPU", D.BLOCKS_CUDA)
    monkeypatch.setattr(D, "_GRAPHS", type(D._GRAPHS)())
    prompts = _prompts(model)
    free = reference_generate(model, prompts, mem, max_new_tokens=[9] * 3, stop_ids=[])[0]
    _same(model, mem, prompts, limits=[9, 4, 7], stop_ids=[free[0][5]], temperature=temperature, seed=2,
          stop_text=model.tokenizer.decode(free[1][1:3]))
    assert D.captured_graphs(model) == 1
    _same(model, mem, prompts, limits=[8, 8, 8], stop_ids=[], temperature=temperature, seed=2)  # same bucket
    assert D.captured_graphs(model) == 1
    graph = next(iter(D._GRAPHS[model].lru.values()))
    assert graph.replays > 0 and graph.greedy == (temperature <= 0)


def test_decode_modes_and_widths(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    model, mem = setup
    cpu = torch.device("cpu")
    assert D.resolve_mode(None, cpu) == "eager" and D.resolve_mode("auto", torch.device("cuda")) == "graph"
    with pytest.raises(ConfigError):
        D.resolve_mode("graph", cpu)
    monkeypatch.setenv("MSABANK_DECODE", "bogus")
    with pytest.raises(ConfigError):
        generate(model, _prompts(model, 1), mem, max_new_tokens=2)
    monkeypatch.setenv("MSABANK_DECODE", "eager")
    assert generate(model, _prompts(model, 1), mem, max_new_tokens=2).tokens
    assert [D.cache_width(n) for n in (1, 128, 129, 1000, 1024, 1025, 3000)] == [128, 128, 256, 1024, 1024, 1152, 3072]
    assert all(0 <= D.cache_width(n) - n < max(128, n / 8) for n in range(1, 20_000, 37))  # <= 12.5% padding


def test_interleave_streams_each_rounds_tokens(golden: Path) -> None:
    """interleave.run's on_tokens(question, round, ids) gives every generated token of every round: the
    round's own tokens, then (in the round that hands off) the answer's."""
    model = load_model(golden / "tiny-msa")
    enc = dict(zip((n for n, _ in DOCS), encode_documents(model, DOCS)))

    tok = model.tokenizer
    for handoff_after in (0, None):  # 0: every question hands off at once (the answer streams); None: rounds
        streamed: dict[tuple[int, int], list[int]] = {}
        answers = interleave.run(model, InMemoryMemory(enc, 2), _Docs(), list(QUESTIONS[:2]),
                                 limits=interleave.Limits(max_rounds=1, max_new_tokens=6), handoff_after=handoff_after,
                                 on_tokens=lambda q, r, ids: streamed.setdefault((q, r), []).extend(ids))
        assert set(streamed) == {(q, rnd.index) for q, a in enumerate(answers) for rnd in a.rounds}
        for q, a in enumerate(answers):
            for rnd in a.rounds:
                got = streamed[(q, rnd.index)]
                assert got[: len(rnd.tokens)] == rnd.tokens
                if rnd.ended == "handoff":
                    assert len(got) > len(rnd.tokens) and rnd.generated.endswith(tok.decode(got[len(rnd.tokens):]))
                else:
                    assert got == rnd.tokens


def test_decode_under_autocast_writes_the_cache_in_its_dtype(setup) -> None:
    """The trainer evaluates a float32 model under bf16 autocast (msabank.train.run_default): the projections
    come out bf16 while the static cache is float32. Decode must store them in the cache's dtype (it raised
    in index_copy_ on the H200, 2026-12-02) and choose the same tokens as the per-token loop under autocast."""
    model, memory = setup
    prompts = _prompts(model, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_tokens, _, _, _ = reference_generate(model, prompts, memory, max_new_tokens=[6, 6], stop_ids=())
        out = generate(model, prompts, memory, max_new_tokens=6, stop_ids=())
    assert out.tokens == ref_tokens
    assert all(len(t) == 6 for t in out.tokens)


def test_graph_lru_is_bounded_by_bytes(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """Captured graphs are dropped least recently used first once their buffers would pass
    GRAPH_BYTES_PER_MODEL (not only past GRAPHS_PER_MODEL); a graph larger than the budget still serves."""
    model, mem = setup
    monkeypatch.setattr(D, "StepGraph", EagerGraph)
    monkeypatch.setattr(D, "resolve_mode", lambda mode, device: "graph")
    monkeypatch.setattr(D, "_GRAPHS", type(D._GRAPHS)())
    prompts = _prompts(model, 1)
    widths = {}
    for new in (4, 150, 300):  # three width buckets (prompt + chunks + new tokens, rounded up to 128)
        out = generate(model, prompts, mem, max_new_tokens=new, stop_ids=[])
        widths[new] = max(D._GRAPHS[model].lru)[1] if len(D._GRAPHS[model].lru) == 1 else None
        monkeypatch.setattr(D, "_GRAPHS", type(D._GRAPHS)())
    assert all(widths.values()) and len(set(widths.values())) == 3
    size = {n: D.graph_bytes(model, 1, w, D.MAX_STOP_IDS) for n, w in widths.items()}
    assert size[4] < size[150] < size[300]
    monkeypatch.setattr(D, "GRAPH_BYTES_PER_MODEL", size[4] + size[150])
    ref = {n: generate(model, prompts, mem, max_new_tokens=n, stop_ids=[], decode="eager").tokens for n in size}
    keys = lambda: [k[1] for k in D._GRAPHS[model].lru]  # noqa: E731
    assert generate(model, prompts, mem, max_new_tokens=4, stop_ids=[]).tokens == ref[4]
    assert generate(model, prompts, mem, max_new_tokens=150, stop_ids=[]).tokens == ref[150]
    assert keys() == [widths[4], widths[150]]  # both fit
    assert generate(model, prompts, mem, max_new_tokens=4, stop_ids=[]).tokens == ref[4]  # reused: most recent
    assert keys() == [widths[150], widths[4]]
    assert generate(model, prompts, mem, max_new_tokens=300, stop_ids=[]).tokens == ref[300]
    assert keys() == [widths[300]]  # with either of the others it would pass the budget: both dropped
    assert generate(model, prompts, mem, max_new_tokens=4, stop_ids=[]).tokens == ref[4]
    assert keys() == [widths[4]]
    monkeypatch.setattr(D, "GRAPH_BYTES_PER_MODEL", size[300] - 1)  # less than one graph: captured, alone
    assert generate(model, prompts, mem, max_new_tokens=300, stop_ids=[]).tokens == ref[300]
    assert keys() == [widths[300]] and D._GRAPHS[model].lru[max(D._GRAPHS[model].lru)].nbytes == size[300]


def test_stop_text_check_decodes_a_block_once_and_finds_what_the_loop_finds(setup) -> None:
    """`_stop_text_at` first decodes a block's whole window (one decode instead of one per token) and only
    then looks token by token: the same first position as the per-token loop's check, on random blocks of
    bytes (multi-byte characters split across tokens, the marker split across the block boundary)."""
    model, _ = setup
    tok = model.tokenizer
    marker = "<End-of-Retrieve>"
    ids = tok.encode(marker)
    pieces = [ids, tok.encode("é ü 漢字"), tok.encode("plain words"), [200, 201], [195], [65, 66]]
    g = torch.Generator().manual_seed(0)
    tail = len(marker) + 1
    for _ in range(300):
        seq: list[int] = []
        while len(seq) < 40:
            seq += pieces[int(torch.randint(len(pieces), (1,), generator=g))]
        cut = int(torch.randint(1, 39, (1,), generator=g))
        end = int(torch.randint(cut + 1, len(seq) + 1, (1,), generator=g))
        before, fresh = seq[:cut], seq[cut:end]
        want = next((j for j in range(1, len(fresh) + 1)
                     if marker in tok.decode((before + fresh)[max(0, cut + j - tail) : cut + j])), None)
        assert D._stop_text_at(tok, before, fresh, marker, tail) == want
