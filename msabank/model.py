"""The MSA model in plain PyTorch: Qwen3 decoder blocks plus per-layer router projections.

Scope: modules whose attribute names mirror the Hugging Face state-dict keys exactly (so `state_dict()`
equals a checkpoint's keys and msabank.train can reuse the blocks), the building blocks as importable
functions (rms_norm, rope, attention, chunk pooling), and `load_model`. The MSA stages (stage 1 encoding,
routing, compacted-context generation) live in msabank.stages; this module does not route.
One code path for CPU float32 and GPU bfloat16: precision pins are explicit below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msabank.config import ModelConfig
from msabank.kernels import attention
from msabank.prompt import Tokenizer

__all__ = [
    "MSAModel", "RMSNorm", "Attention", "MLP", "DecoderLayer", "rms_norm", "rope_cos_sin", "apply_rope",
    "attention", "load_model",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3 RMSNorm: statistics in float32 (bf16 variance underflows), cast back, then scale."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for rotate-half RoPE. positions: (B, T) int -> cos, sin (B, 1, T, D).

    Angles are computed in float32 (bf16 positions above 256 are not even representable), then cast.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin broadcastable to it (from rope_cos_sin)."""
    return x * cos + _rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------------
# Modules (attribute names = HF state-dict keys)
# ---------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Qwen3 attention projections (+ router_q_proj/router_k_proj in router layers). Does not attend."""

    def __init__(self, cfg: ModelConfig, is_router: bool) -> None:
        super().__init__()
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, d
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)  # per head, over D
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.is_router = is_router
        if is_router:
            # nn.Sequential of one Linear: the official checkpoint's keys end in ".router_q_proj.0.weight".
            self.router_q_proj = nn.Sequential(nn.Linear(cfg.hidden_size, h * d, bias=False))
            self.router_k_proj = nn.Sequential(nn.Linear(cfg.hidden_size, hkv * d, bias=False))

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n, self.head_dim).transpose(1, 2)  # (B, n, T, D)

    def qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, hidden) normed input -> q (B, H, T, D), k, v (B, Hkv, T, D); q, k after norm + RoPE."""
        q = self.q_norm(self._heads(self.q_proj(x), self.num_heads))
        k = self.k_norm(self._heads(self.k_proj(x), self.num_kv_heads))
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def router_q(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden) -> (B, H, T, D): no norm, no RoPE (spec §4.1)."""
        return self._heads(self.router_q_proj(x), self.num_heads)

    def router_k(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden) -> (B, Hkv, T, D): no norm, no RoPE (spec §3.1)."""
        return self._heads(self.router_k_proj(x), self.num_kv_heads)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) attention output -> (B, T, hidden)."""
        b, _, t, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, cfg.is_router_layer(layer))
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def finish(self, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Residual adds around an attention output o (B, H, T, D): h + o_proj(o), then the MLP block."""
        h = h + self.self_attn.out(o)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    """`model.*` in the state dict."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MSAModel(nn.Module):
    """Qwen3 + MSA router projections. `.config` (ModelConfig), `.tokenizer` (prompt.Tokenizer or None),
    `.stop_ids` (generation EOS ids). Routing, pooling and the compacted context are in msabank.stages.
    """

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.stop_ids: tuple[int, ...] = config.eos_token_id
        self.generation_config: dict[str, Any] = {}
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, D) in the model dtype."""
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, self.dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Plain causal Qwen3 forward (no memory): (B, T) ids -> (B, T, V) logits.

        This is also exactly stage 1 of MSA for one document (spec §3.1). `mask`: optional bool
        (B, 1, T, T) replacing the causal mask (e.g. block-diagonal packing).
        """
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        if mask is None:
            mask = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        cos, sin = self.rope(positions)
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin)
            h = layer.finish(h, attention(q, k, v, mask))
        return self.lm_head(self.model.norm(h))


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    routing_rule: str | None = None,
    top_k: int | None = None,
) -> MSAModel:
    """Load an MSA checkpoint directory (config.json, safetensors, tokenizer.json, generation_config.json).

    dtype None: float32 on CPU, bfloat16 elsewhere. `routing_rule` ("dot"/"cosine") and `top_k` override
    what the checkpoint's msa_config implies. Never unpickles.
    """
    from msabank import checkpoint

    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    config = checkpoint.load_config(path, routing_rule=routing_rule, top_k=top_k)  # type: ignore[arg-type]
    tokenizer = checkpoint.load_tokenizer(path)
    with torch.device("meta"):
        model = MSAModel(config, tokenizer)
    state = checkpoint.load_state_dict(path, config, expected=model.state_dict())
    state = {k: t.to(device=device, dtype=dtype) for k, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    gen = checkpoint.load_generation_config(path)
    model.generation_config = gen
    eos = gen.get("eos_token_id", config.eos_token_id)
    model.stop_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    return model.eval()


