"""The training loop: two phases (MSA paper §3.3.1), AdamW, cosine decay, bf16 autocast on GPU.

Phase 1 (warm-up): loss = 0.1·L_LM + L_aux at `lr_warmup`, nothing forced, on `warmup_span` (the question's
own tokens by default) and `warmup_kinds` (single-hop + needle). It ends when the first router layer's
in-batch round-1 recall@1 (a running mean) reaches `warmup_until`, or at `warmup_frac` of the run at the
latest (TRAINING_NOTES: the question span and single-hop questions let routing leave the plateau; two-hop
from the start kept every tiny run on it for ≥ 250 steps).
Phase 2: loss = L_LM + 0.1·L_aux at `lr`, cosine-decayed to `lr * min_lr_frac`, the official routing span,
the full question mix, the positive forced on every `force_every`-th step.
The learning rate ramps up linearly over the first `lr_ramp_steps` steps of each phase (Adam's moments
are cold at the start and after the loss changes).
Progress is measured in time when `time_budget_s` is set (GPU runs have a fixed lease), else in steps.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from msabank.config import ModelConfig
from msabank.model import MSAModel
from msabank.prompt import Tokenizer
from msabank.train.core import forward
from msabank.train.data import KINDS

log = logging.getLogger(__name__)


def default_model_config(vocab_size: int, *, layers: int = 8, hidden: int = 256, heads: int = 8, kv_heads: int = 2,
                         head_dim: int = 32, intermediate: int = 768, router_layers: tuple[int, ...] = (4, 5, 6, 7),
                         chunk_size: int = 16, top_k: int = 1, eos: tuple[int, ...] = (2, 0)) -> dict[str, Any]:
    """config.json of a small MSA model (the prototype's geometry, TRAINING_NOTES). Cosine routing at
    inference too (aux_loss_method exactly "INFONCE", MSA_SPEC §4.2), so training and serving agree."""
    return {
        "model_type": "msa", "architectures": ["MSAForCausalLM"], "vocab_size": vocab_size,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None, "max_position_embeddings": 4096,
        "tie_word_embeddings": True, "hidden_act": "silu", "attention_bias": False, "torch_dtype": "bfloat16",
        "bos_token_id": eos[-1], "eos_token_id": list(eos),
        "msa_config": {
            "router_layer_idx": ",".join(str(i) for i in router_layers), "pooling_kernel_size": chunk_size,
            "top_k_docs": top_k, "decouple_router": True, "aux_loss_method": "INFONCE", "infonce_loss_temp": 0.1,
            "head_reduce_method": "mean", "query_reduce_method": "max", "chunk_reduce_method": "max",
            "decouple_pooling_mode": "mean", "rewrite_position": True, "aux_loss": True,
            "lmloss_weigth": 1.0, "auxloss_weight": 0.1, "recloss_weight": 0.0, "ansloss_weight": 1.0,
        },
    }  # fmt: skip


def init_weights(model: MSAModel, std: float = 0.02) -> None:
    """GPT-2 style: N(0, std) everywhere, residual outputs scaled by 1/sqrt(2·layers); norms at 1."""
    n = model.config.num_layers
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, 0.0, std / math.sqrt(2 * n))
        else:
            torch.nn.init.normal_(p, 0.0, std)


def new_model(config: dict[str, Any], tokenizer: Tokenizer, seed: int = 0) -> MSAModel:
    torch.manual_seed(seed)
    model = MSAModel(ModelConfig.from_dict(config), tokenizer)
    init_weights(model)
    model.generation_config = {"eos_token_id": list(config["eos_token_id"]), "do_sample": False}
    return model


@dataclass
class TrainConfig:
    out_dir: str
    steps: int = 1000
    time_budget_s: float | None = None
    """Stop after this many seconds of training (progress and the LR schedule follow time)."""
    questions: int = 64
    memory: int = 256
    world_docs: int = 200_000
    seed: int = 1
    lr: float = 1.5e-3
    lr_warmup: float = 2e-3
    min_lr_frac: float = 0.05
    warmup_frac: float = 0.3
    weight_decay: float = 0.01
    tau: float = 0.1
    workers: int = 0
    log_every: int = 25
    save_every_s: float = 0.0
    device: str = "cpu"
    kinds: tuple[str, ...] = ("single", "single", "twohop", "twohop", "needle")
    warmup_kinds: tuple[str, ...] = ("single", "single", "needle")
    warmup_span: str = "question"
    """Routing span of phase 1 (msabank.train.data.SPANS)."""
    span: str = "official"
    """Routing span of phase 2. "question" trains routing on the question's tokens only; with the positive
    forced on every step the span changes only the aux loss (the selection is the positive either way)."""
    aux_weight: float = 0.1
    """Weight of L_aux in phase 2 (paper: 0.1)."""
    warmup_until: float | None = 0.8
    """Phase 1 ends once the running first-router-layer round-1 recall@1 reaches this (None: at warmup_frac)."""
    recall_window: int = 50
    lr_ramp_steps: int = 100
    world_every: int = 50
    """Draw a fresh training world every this many steps (per loader worker)."""
    force_every: int = 2
    """Phase 2 forces the positive into the selection on every `force_every`-th step (1 = always, 0 = never).
    Phase 1 never forces: with k=1 a forced document leaks the label into later router layers (they see its
    K/V), so only unforced steps make every router layer find the document from the question itself."""
    lm_only_routed: bool = True
    """On unforced steps, no LM loss on `[n]` targets whose document no router layer selected (core.forward):
    the number is not in the input there, so the loss only taught guessing (run 2 lost copying that way)."""
    aux_layer_weights: tuple[float, ...] | None = None
    """Per-router-layer weights of the InfoNCE terms (None: 1 each); see core.forward."""
    reading_distractors: int = -1
    """≥ 0: phase 2's final-round appended document is cut to the answer sentence plus up to this many of
    its other sentences (msabank.train.data.reading_excerpt); -1: the whole document, as served."""
    answer_weight: float = 1.0
    """LM-loss weight of the answer's own tokens (core.forward's answer_weight), on top of final_weight."""
    final_weight: float = 1.0
    """LM-loss weight of final-round targets (the answer read from the appended text) against `[n]` targets."""
    token_tau: float = 0.0
    """> 0: the InfoNCE scores take a smooth max (temperature token_tau) over routing tokens, so tokens that
    never win the max still learn (core._route_scores); selection keeps the max. 0: the official loss."""


def _lr(tc: TrainConfig, progress: float, switched_at: float | None, steps_in_phase: int) -> float:
    """LR at `progress` (0..1); `switched_at`: the progress at which phase 2 began (None: still phase 1)."""
    ramp = min(1.0, (steps_in_phase + 1) / max(1, tc.lr_ramp_steps))
    if switched_at is None:
        return tc.lr_warmup * ramp
    x = (progress - switched_at) / max(1e-9, 1 - switched_at)
    lo = tc.lr * tc.min_lr_frac
    return ramp * (lo + 0.5 * (tc.lr - lo) * (1 + math.cos(math.pi * min(1.0, x))))


class _Phase:
    """Which phase the run is in, and the measured switch (first router layer's round-1 recall@1)."""

    def __init__(self, tc: TrainConfig) -> None:
        self.tc = tc
        self.switched_at: float | None = 0.0 if tc.warmup_frac <= 0 else None
        self.step0 = 0
        self.recent: list[float] = []

    @property
    def warm(self) -> bool:
        return self.switched_at is None

    def observe(self, step: int, progress: float, recall_l0: float | None) -> bool:
        """Record one step's recall; True when phase 2 starts now."""
        if not self.warm:
            return False
        if recall_l0 is not None:
            self.recent = (self.recent + [recall_l0])[-self.tc.recall_window :]
        full = len(self.recent) == self.tc.recall_window
        reached = (self.tc.warmup_until is not None and full
                   and sum(self.recent) / len(self.recent) >= self.tc.warmup_until)
        if reached or progress >= self.tc.warmup_frac:
            self.switched_at, self.step0 = progress, step + 1
            return True
        return False


def train(model: MSAModel, tokenizer: Tokenizer, tc: TrainConfig,
          on_log: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train in place; save the checkpoint (bf16) to tc.out_dir at the end. Returns the log rows."""
    from msabank.train.data import StepStream

    dev = torch.device(tc.device)
    model.to(dev).train()

    def batches(phase: int) -> Iterator[Any]:
        stream = StepStream(tokenizer.json_bytes, seed=tc.seed + 7919 * phase, world_docs=tc.world_docs,
                            questions=tc.questions, memory=tc.memory, world_every=tc.world_every,
                            kinds=tc.warmup_kinds if phase == 1 else tc.kinds,
                            span=tc.warmup_span if phase == 1 else tc.span,
                            reading_distractors=tc.reading_distractors if phase == 2 else -1)
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=tc.workers,
                                                pin_memory=dev.type == "cuda",
                                                prefetch_factor=4 if tc.workers else None))

    phase = _Phase(tc)
    loader = batches(1 if phase.warm else 2)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0}],
                            lr=tc.lr_warmup, betas=(0.9, 0.95), fused=dev.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    acc: dict[str, float] = {}
    last_save = t0
    step = 0
    while True:
        elapsed = time.time() - t0
        progress = elapsed / tc.time_budget_s if tc.time_budget_s else step / tc.steps
        if progress >= 1.0 or step >= tc.steps:
            break
        warm = phase.warm
        lr = _lr(tc, progress, phase.switched_at, step - phase.step0)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = next(loader).to(dev)
        force = not warm and tc.force_every > 0 and step % tc.force_every == 0
        with amp:
            out = forward(model, batch, tau=tc.tau, force_positive=force, lm_only_routed=tc.lm_only_routed,
                          aux_layer_weights=tc.aux_layer_weights, token_tau=tc.token_tau,
                          final_weight=tc.final_weight, answer_weight=tc.answer_weight)
        lm = out.lm_loss if out.lm_loss is not None else torch.zeros((), device=dev)
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=dev)
        loss = 0.1 * lm + aux if warm else lm + tc.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            metrics = _metrics(out, batch)
            for key, val in metrics.items():
                acc[key] = acc.get(key, 0.0) + val
            acc["lm"] = acc.get("lm", 0.0) + float(lm)
            acc["aux"] = acc.get("aux", 0.0) + float(aux)
            acc["n"] = acc.get("n", 0.0) + 1
        if phase.observe(step, progress, metrics.get("round1_recall1_L0")):
            log.info("phase 2 from step %d (%.0f%% of the run)", step + 1, 100 * progress)
            loader = batches(2)
        if (step + 1) % tc.log_every == 0:
            n = acc.pop("n")
            row = {"step": step + 1, "time_s": round(time.time() - t0, 1), "lr": lr, "phase": 1 if warm else 2,
                   **{k: round(v / n, 4) for k, v in acc.items()}}
            rows.append(row)
            acc = {}
            log.info("train %s", json.dumps(row))
            if on_log is not None:
                on_log(row)
        if tc.save_every_s and time.time() - last_save >= tc.save_every_s:
            save(model, tokenizer, tc.out_dir, extra={"train_config": asdict(tc), "log_tail": rows[-5:]})
            last_save = time.time()
        step += 1
    save(model, tokenizer, tc.out_dir, extra={"train_config": asdict(tc), "log_tail": rows[-5:]})
    return rows


def _metrics(out: Any, batch: Any) -> dict[str, float]:
    """In-batch routing recall@1 (per router layer, before forcing) and teacher-forced target exactness,
    each also per question kind (`<name>_<kind>`: needles read digits, the other kinds read names)."""
    m: dict[str, float] = {}
    has = batch.positive >= 0
    if out.scores and bool(has.any()):
        r1 = has & (batch.stage == 0) if batch.stage is not None else has
        for r, sc in enumerate(out.scores):
            hit = sc.argmax(1) == batch.positive
            m[f"recall1_L{r}"] = float(hit[has].float().mean())
            if bool(r1.any()):
                m[f"round1_recall1_L{r}"] = float(hit[r1].float().mean())
                if r == 0:
                    _by_kind(m, "round1_recall1_L0", hit, r1, batch.kind)
    if out.correct is not None:
        s = batch.seq_ids.shape[0]
        wrong = torch.zeros(s, device=out.correct.device).index_add_(0, out.correct_row, (~out.correct).float())
        exact = wrong == 0
        m["target_exact"] = float(exact.float().mean())
        if batch.stage is not None:  # round-1 `[n]` copying and the final round (reading the appended text)
            for name, st in (("target_exact_r1", 0), ("target_exact_final", 2)):
                rows = batch.stage == st
                if bool(rows.any()):
                    m[name] = float(exact[rows].float().mean())
                    _by_kind(m, name, exact, rows, batch.kind)
    return m


def _by_kind(m: dict[str, float], name: str, hit: torch.Tensor, rows: torch.Tensor, kind: torch.Tensor | None) -> None:
    """m[f"{name}_{kind}"] = mean of `hit` over `rows` of each question kind present (none without kinds)."""
    if kind is None:
        return
    for ki, k in enumerate(KINDS):
        kr = rows & (kind == ki)
        if bool(kr.any()):
            m[f"{name}_{k}"] = float(hit[kr].float().mean())


def save(model: MSAModel, tokenizer: Tokenizer, out_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16,
         extra: dict[str, Any] | None = None) -> Path:
    """Checkpoint directory msabank loads (msabank.checkpoint.save_checkpoint), weights cast to `dtype`."""
    import copy

    from msabank.checkpoint import save_checkpoint

    m = copy.deepcopy(model).to("cpu", dtype)
    path = save_checkpoint(m, tokenizer, out_dir)
    if extra:
        (Path(out_dir) / "training.json").write_text(json.dumps(extra, indent=1, default=str))
    return path
