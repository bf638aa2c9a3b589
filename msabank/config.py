"""The model configuration: a frozen `ModelConfig` parsed from an MSA checkpoint's config.json.

Scope: parse and validate what the plain-PyTorch model (msabank.model) and the stages need. A config
msabank cannot serve raises `ConfigError` naming the field. It does not read weights or tokenizers
(msabank.checkpoint does) and holds no bank or engine settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from msabank.errors import ConfigError
from msabank.prompt import ROUTING_SPANS

RoutingRule = Literal["dot", "cosine"]

# The official engine falls back to 16 when its (absent) `doc_top_k` key is missing (spec §1.2, F3);
# the released config's `top_k_docs` is also 16.
DEFAULT_TOP_K = 16


def _require(raw: Mapping[str, Any], key: str, where: str = "config.json") -> Any:
    if key not in raw or raw[key] is None:
        raise ConfigError(f"{where}: missing field {key!r}", hint="is this an MSA checkpoint (model_type 'msa')?")
    return raw[key]


def _int(raw: Mapping[str, Any], key: str, where: str = "config.json", *, minimum: int = 1) -> int:
    value = _require(raw, key, where)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where}: field {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def parse_router_layers(value: Any, num_layers: int) -> tuple[int, ...]:
    """msa_config.router_layer_idx: "18,19,…" (official form), "all", or a list of ints."""
    if isinstance(value, str):
        if value.strip() == "all":
            return tuple(range(num_layers))
        try:
            layers = [int(p) for p in value.split(",") if p.strip()]
        except ValueError:
            raise ConfigError(f"msa_config: field 'router_layer_idx' is not a comma-separated list: {value!r}") from None
    elif isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        layers = list(value)
    else:
        raise ConfigError(f"msa_config: field 'router_layer_idx' must be a string or a list of ints, got {value!r}")
    if not layers or any(not 0 <= i < num_layers for i in layers) or len(set(layers)) != len(layers):
        raise ConfigError(
            f"msa_config: field 'router_layer_idx' = {value!r} must name distinct layers in 0..{num_layers - 1}"
        )
    return tuple(sorted(layers))


def _routing_span(msa: Mapping[str, Any], where: str) -> str:
    span = msa.get("routing_span", "official")
    if span not in ROUTING_SPANS:
        raise ConfigError(f"{where}: field 'routing_span' must be one of {', '.join(ROUTING_SPANS)}, got {span!r}")
    return str(span)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Everything msabank needs from config.json, resolved once."""

    vocab_size: int
    """Rows of the embedding and of lm_head."""
    hidden_size: int
    """Residual width."""
    intermediate_size: int
    """SwiGLU inner width."""
    num_layers: int
    """Decoder layers (`num_hidden_layers`)."""
    num_heads: int
    """Query heads H."""
    num_kv_heads: int
    """Key/value heads Hkv (GQA: query head h uses kv head h // (H / Hkv))."""
    head_dim: int
    """D."""
    rms_norm_eps: float
    """Epsilon of every RMSNorm (incl. q_norm/k_norm)."""
    rope_theta: float
    """RoPE base; the released MSA-4B uses 5e6."""
    max_position_embeddings: int
    """Longest position the checkpoint was configured for."""
    tie_word_embeddings: bool
    """lm_head shares the embedding matrix."""
    router_layers: tuple[int, ...]
    """Layers with memory sparse attention (ascending). Index r into this tuple is the 'layer_index'."""
    chunk_size: int
    """msa_config.pooling_kernel_size: tokens per pooled chunk (P = 64 in MSA-4B)."""
    top_k: int
    """Documents selected per router layer; also the query position offset T0 + top_k (spec §2.4)."""
    routing_rule: RoutingRule
    """"cosine" iff aux_loss_method == "INFONCE" exactly (official inference), else "dot" (spec §4.1)."""
    routing_scale: float
    """Scale on routing queries: head_dim**-0.5 for "dot", 1.0 for "cosine"."""
    routing_span: str = "official"
    """Which question tokens route (msa_config "routing_span", a msabank extension; absent = "official"):
    "official" = the whole question block (spec §2.2), "question" = the question's own tokens only, for
    models trained that way (msabank.prompt.question_prompt; docs/eval.md)."""
    torch_dtype: str = "bfloat16"
    """The checkpoint's own dtype (informational; load_model picks the compute dtype)."""
    eos_token_id: tuple[int, ...] = ()
    """config.json eos id(s)."""
    bos_token_id: int | None = None
    """config.json bos id."""
    msa_config_json: str = "{}"
    """msa_config as canonical JSON (kept for fingerprints and for saving checkpoints)."""
    extra_json: str = field(default="{}", compare=False)
    """Other config.json fields msabank does not use, kept so save_checkpoint round-trips them."""

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def msa_config(self) -> dict[str, Any]:
        return dict(json.loads(self.msa_config_json))

    def is_router_layer(self, layer: int) -> bool:
        return layer in self.router_layers

    def fingerprint_dict(self) -> dict[str, Any]:
        """Every field that changes stored bytes or routing (for model fingerprints)."""
        d = asdict(self)
        d.pop("extra_json")
        d["router_layers"] = list(self.router_layers)
        d["eos_token_id"] = list(self.eos_token_id)
        d["msa_config"] = self.msa_config
        d.pop("msa_config_json")
        d.pop("routing_span")  # already in msa_config when set; keeps existing fingerprints unchanged
        return d

    def to_json_dict(self) -> dict[str, Any]:
        """A config.json dict that `ModelConfig.from_dict` parses back to an equal config."""
        d: dict[str, Any] = dict(json.loads(self.extra_json))
        d.update(
            model_type="msa",
            architectures=["MSAForCausalLM"],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=None,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
            attention_bias=False,
            torch_dtype=self.torch_dtype,
            msa_config=self.msa_config,
        )
        if self.eos_token_id:
            d["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        return d

    @classmethod
    def from_dict(
        cls,
        raw: Mapping[str, Any],
        *,
        routing_rule: RoutingRule | None = None,
        top_k: int | None = None,
    ) -> ModelConfig:
        """Parse a config.json dict. `routing_rule` / `top_k` override what the checkpoint implies."""
        if raw.get("model_type") != "msa":
            raise ConfigError(
                f"config.json: field 'model_type' is {raw.get('model_type')!r}, expected 'msa'",
                hint="msabank serves MSA checkpoints (Qwen3 + router projections + msa_config)",
            )
        num_layers = _int(raw, "num_hidden_layers")
        num_heads = _int(raw, "num_attention_heads")
        num_kv_heads = _int(raw, "num_key_value_heads")
        hidden = _int(raw, "hidden_size")
        if num_heads % num_kv_heads:
            raise ConfigError("config.json: field 'num_attention_heads' must be a multiple of 'num_key_value_heads'")
        head_dim = raw.get("head_dim") or hidden // num_heads
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: field 'hidden_act' = {raw['hidden_act']!r} is not supported (only 'silu')")
        if raw.get("rope_scaling") not in (None, {}):
            raise ConfigError("config.json: field 'rope_scaling' is set; msabank implements plain RoPE only")
        if raw.get("attention_bias", False):
            raise ConfigError("config.json: field 'attention_bias' = true is not supported (Qwen3 has no biases)")
        if raw.get("use_sliding_window", False):
            raise ConfigError("config.json: field 'use_sliding_window' = true is not supported")

        msa = raw.get("msa_config")
        if not isinstance(msa, Mapping):
            raise ConfigError("config.json: missing field 'msa_config'", hint="a plain Qwen3 checkpoint has no router")
        where = "config.json msa_config"
        router_layers = parse_router_layers(_require(msa, "router_layer_idx", where), num_layers)
        chunk_size = _int(msa, "pooling_kernel_size", where)
        method = _require(msa, "aux_loss_method", where)
        if not isinstance(method, str):
            raise ConfigError(f"{where}: field 'aux_loss_method' must be a string, got {method!r}")
        if not msa.get("decouple_router", False):
            raise ConfigError(
                f"{where}: field 'decouple_router' is not true; routing through the attention query is not supported"
            )
        for key in ("head_reduce_method", "query_reduce_method", "chunk_reduce_method"):
            want = "mean" if key == "head_reduce_method" else "max"
            got = msa.get(key, want)
            if got != want:
                raise ConfigError(f"{where}: field {key!r} = {got!r} is not supported (only {want!r}, as MSA-4B ships)")
        rule: RoutingRule = "cosine" if method == "INFONCE" else "dot"
        if routing_rule is not None:
            if routing_rule not in ("dot", "cosine"):
                raise ConfigError(f"routing_rule must be 'dot' or 'cosine', got {routing_rule!r}")
            rule = routing_rule
        if top_k is None:
            top_k = msa.get("doc_top_k") or msa.get("top_k_docs") or DEFAULT_TOP_K
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"{where}: field 'top_k_docs' must be an integer >= 1, got {top_k!r}")

        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        used = {
            "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
            "max_position_embeddings", "tie_word_embeddings", "hidden_act", "attention_bias", "torch_dtype",
            "msa_config", "eos_token_id", "bos_token_id",
        }  # fmt: skip
        return cls(
            vocab_size=_int(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(raw, "intermediate_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 40960)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            router_layers=router_layers,
            chunk_size=chunk_size,
            top_k=top_k,
            routing_rule=rule,
            routing_span=_routing_span(msa, where),
            routing_scale=1.0 if rule == "cosine" else float(head_dim) ** -0.5,
            torch_dtype=str(raw.get("torch_dtype") or "bfloat16"),
            eos_token_id=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
            msa_config_json=json.dumps(dict(msa), sort_keys=True),
            extra_json=json.dumps({k: v for k, v in raw.items() if k not in used}, sort_keys=True),
        )

    @classmethod
    def from_file(
        cls, path: str | Path, *, routing_rule: RoutingRule | None = None, top_k: int | None = None
    ) -> ModelConfig:
        """Parse `path` (a config.json file or a checkpoint directory holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: no config.json", hint="point at a checkpoint directory") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a JSON object")
        return cls.from_dict(raw, routing_rule=routing_rule, top_k=top_k)
