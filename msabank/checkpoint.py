"""Reading and writing MSA checkpoint directories (Hugging Face layout), and model fingerprints.

Scope: config.json, model.safetensors or a sharded model.safetensors.index.json, tokenizer.json,
generation_config.json. Tensors are read with safetensors only: nothing is ever unpickled. Missing,
unknown or mis-shaped tensors raise `CheckpointError` naming the key. Building the nn.Module is
msabank.model's job (`load_model`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from msabank.config import ModelConfig, RoutingRule
from msabank.errors import CheckpointError, ConfigError
from msabank.prompt import PROMPT_TEMPLATE_VERSION, Tokenizer, tokenizer_json_bytes

if TYPE_CHECKING:
    from msabank.model import MSAModel

# Scalars the official MSAForCausalLM saves for training only (InfoNCE temperature, BCE bias): ignored.
IGNORED_KEYS = frozenset({"temperature", "b"})
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_config(path: str | Path, *, routing_rule: RoutingRule | None = None, top_k: int | None = None) -> ModelConfig:
    return ModelConfig.from_file(path, routing_rule=routing_rule, top_k=top_k)


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(Path(path) / "tokenizer.json")


def load_generation_config(path: str | Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} when absent)."""
    p = Path(path) / "generation_config.json"
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    return dict(data) if isinstance(data, dict) else {}


def _weight_files(path: Path) -> dict[str, Path]:
    """Key -> safetensors file holding it."""
    if (path / INDEX_FILE).exists():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX_FILE}: malformed index ({e!r})") from None
        files = {k: path / v for k, v in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise CheckpointError(f"{f}: shard named in {INDEX_FILE} is missing")
        return files
    single = path / SINGLE_FILE
    if not single.exists():
        hint = "only safetensors weights are read (pytorch_model.bin is a pickle and is refused)"
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}", hint=hint)
    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def load_state_dict(
    path: str | Path, config: ModelConfig, *, expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Read and check all tensors against `expected` (a state_dict, e.g. of a meta-device model).

    Returns CPU tensors in the file's dtype keyed like `expected`. With tied embeddings, an absent
    lm_head.weight is filled from the embedding; present, it is ignored (HF ties after loading).
    """
    root = Path(path)
    files = _weight_files(root)
    tied = config.tie_word_embeddings
    unknown = sorted(k for k in files if k not in expected and k not in IGNORED_KEYS)
    if unknown:
        raise CheckpointError(
            f"{root}: unknown tensor {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
            hint="msa_config.router_layer_idx or num_hidden_layers may not match the weights",
        )
    missing = sorted(k for k in expected if k not in files and not (tied and k == "lm_head.weight"))
    if missing:
        raise CheckpointError(
            f"{root}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            hint="is the checkpoint complete? router layers need router_q_proj.0/router_k_proj.0 weights",
        )
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for k, f in files.items():
        if k in expected and not (tied and k == "lm_head.weight"):
            by_file.setdefault(f, []).append(k)
    for f, keys in by_file.items():
        with safe_open(f, framework="pt") as fh:
            for k in keys:
                t = fh.get_tensor(k)
                want = tuple(expected[k].shape)
                if tuple(t.shape) != want:
                    raise CheckpointError(f"{root}: tensor {k!r} has shape {list(t.shape)}, expected {list(want)}")
                out[k] = t
    if tied:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def save_checkpoint(
    model: MSAModel, tokenizer: str | Path | Tokenizer | bytes | Any, out_dir: str | Path
) -> Path:
    """Write `model` as a checkpoint directory `load_model` reads back (config.json, model.safetensors,
    tokenizer.json, generation_config.json). Weights are saved in the model's current dtype.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_json_dict()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    state = {k: t.detach().to("cpu").contiguous() for k, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with the embedding; HF omits it too
    save_file(state, str(out / SINGLE_FILE), metadata={"format": "pt"})
    (out / "tokenizer.json").write_bytes(tokenizer_json_bytes(tokenizer))
    gen = dict(getattr(model, "generation_config", {}) or {})
    gen.setdefault("eos_token_id", list(model.stop_ids))
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def fingerprint(model_dir: Path | None, model: MSAModel, storage_dtype: str, cache: dict[str, Any] | None = None) -> str:
    """The sha256 that binds a bank to its checkpoint (`Bank.create`/`Bank.open(fingerprint=)`): config
    (incl. msa_config), tokenizer.json, the prompt template version, the weight files' bytes and the
    storage dtype: everything that changes a bank's bytes or its routing.

    The compute dtype is deliberately left out: a bank is served by the same checkpoint on CPU (float32)
    and GPU (bf16). sha256 runs at ~1.4 GB/s on one core of the dev box (measured), so hashing MSA-4B's
    ~8.5 GB of weights costs ~6 s: `cache` (kept in the bank's engine.json) maps each weight file's
    name:size:mtime to its hash. `model_dir` None: a model built in memory, no weight files to hash.
    """
    cache = {} if cache is None else cache
    h = hashlib.sha256()
    h.update(json.dumps(model.config.fingerprint_dict(), sort_keys=True).encode())
    h.update(PROMPT_TEMPLATE_VERSION.encode())
    if model.tokenizer is None:
        raise ConfigError("the model has no tokenizer", hint="load it with msabank.model.load_model(path)")
    h.update(model.tokenizer.json_bytes)
    h.update(storage_dtype.encode())
    for f in sorted(Path(model_dir).glob("*.safetensors")) if model_dir is not None else []:
        st = f.stat()
        key = f"{f.name}:{st.st_size}:{st.st_mtime_ns}"
        if key not in cache:
            fh = hashlib.sha256()
            with open(f, "rb") as fp:
                for block in iter(lambda: fp.read(1 << 22), b""):
                    fh.update(block)
            cache[key] = fh.hexdigest()
        h.update(f"{f.name}={cache[key]}".encode())
    return h.hexdigest()
