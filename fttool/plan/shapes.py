"""A model's shapes from its config.json alone (a local folder, a bundled model or the hub cache): layer sizes, the
linear layers by name and the parameter counts that `fttool plan` and `fttool check` work from. No torch, no
weights.

Decoders modelled: Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 1/2/3 (text), Phi-3 (fused qkv and gate_up) and Phi-2.
Another model_type (a mixture of experts, an encoder) answers with a clear message rather than a wrong estimate.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from fttool.errors import UserError

# model_type -> the family whose layer layout it shares
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "granite")
FAMILIES = {**{t: "llama" for t in LLAMA_LIKE}, "phi3": "phi3", "phi": "phi"}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "dbrx", "olmoe", "jamba")


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # the output layer shares the embedding matrix
    gated_mlp: bool  # SwiGLU/GeGLU (three matrices) rather than two
    linears: Dict[str, Tuple[int, int]]  # per decoder layer: module name -> (in features, out features)
    layer_extra: int  # per-layer parameters outside the linears: norms, biases
    source: str  # where the config.json was read

    @property
    def attn_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder layers' linear layers (what QLoRA quantizes)."""
        return self.layers * sum(i * o for i, o in self.linears.values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def total(self) -> int:
        return self.linear_params + self.layers * self.layer_extra + self.embedding_params + self.hidden

    @property
    def matmul_params(self) -> int:
        """Parameters a token multiplies through: the decoder's linears and the output layer (not the lookup)."""
        return self.linear_params + self.vocab * self.hidden

    def describe(self) -> str:
        return (
            f"{self.model_type}: {self.layers} layers, hidden {self.hidden}, mlp {self.intermediate}, "
            f"{self.heads} heads ({self.kv_heads} kv, dim {self.head_dim}), vocab {self.vocab:,}"
            + (", tied embeddings" if self.tied else "")
        )


def from_config(c: Dict, source: str = "config.json") -> ModelShape:
    """The shape of a decoder from its config.json contents; UserError for a layout fttool does not model."""
    if "text_config" in c and isinstance(c["text_config"], dict):  # multimodal wrappers (gemma3): the text decoder
        c = {**c["text_config"], "tie_word_embeddings": c.get("tie_word_embeddings", True)}
    kind = c.get("model_type", "")
    if kind in MOE or c.get("num_local_experts") or c.get("num_experts"):
        raise UserError(
            f"{source}: model_type {kind} is a mixture of experts, which fttool plan does not model yet (expert "
            "routing changes both memory and FLOPs); plan a dense model of the same size, or train and read the "
            "measured peak memory in the run folder's result.json."
        )
    family = FAMILIES.get(kind)
    if family is None:
        raise UserError(
            f"{source}: model_type '{kind}' is not one fttool plan models (it knows "
            f"{', '.join(sorted(FAMILIES))}). Training does not need the plan; for an estimate, plan a supported "
            "model of the same shape."
        )
    try:
        h, n, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    except KeyError as e:
        raise UserError(f"{source}: {e.args[0]} missing; is this a decoder's config.json?") from None
    heads = c.get("num_attention_heads", 1)
    kv = c.get("num_key_value_heads") or heads
    hd = c.get("head_dim") or h // heads
    q, k = heads * hd, kv * hd
    default_tied = kind.startswith("gemma")
    tied = bool(c.get("tie_word_embeddings", default_tied))
    if family == "phi3":
        linears = {
            "qkv_proj": (h, q + 2 * k),
            "o_proj": (q, h),
            "gate_up_proj": (h, 2 * inter),
            "down_proj": (inter, h),
        }
        extra, gated = 2 * h, True
    elif family == "phi":
        linears = {
            "q_proj": (h, q),
            "k_proj": (h, k),
            "v_proj": (h, k),
            "dense": (q, h),
            "fc1": (h, inter),
            "fc2": (inter, h),
        }
        extra, gated = 2 * h + q + 2 * k + h + inter + h, False  # one LayerNorm (weight, bias) and every bias
    else:
        linears = {
            "q_proj": (h, q),
            "k_proj": (h, k),
            "v_proj": (h, k),
            "o_proj": (q, h),
            "gate_proj": (h, inter),
            "up_proj": (h, inter),
            "down_proj": (inter, h),
        }
        norms = 4 if kind in ("gemma2", "gemma3_text") else 2  # gemma2/3: norms before and after each block
        extra = norms * h + (q + 2 * k if kind == "qwen2" or c.get("attention_bias") else 0)
        extra += 2 * hd if kind in ("qwen3", "gemma3_text") else 0  # q_norm, k_norm
        gated = True
    return ModelShape(kind, n, h, inter, heads, kv, hd, vocab, tied, gated, linears, extra, source)


def config_file(name_or_path: str, revision: Optional[str] = None) -> Path:
    """The config.json of a model: a local or bundled folder's, or the hub cache's (fetched, that file only, when the
    hub may be reached)."""
    from fttool import assets

    local = Path(assets.resolve(name_or_path)).expanduser()
    if local.is_dir():
        f = local / "config.json"
        if not f.is_file():
            raise UserError(f"{local} has no config.json; is it a model folder?")
        return f
    if local.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model.name_or_path={name_or_path}: no such model folder.")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise UserError(
            f"config.json of {name_or_path} is not in the hub cache and HF_HUB_OFFLINE is set: fetch that one file "
            f"(`hf download {name_or_path} config.json`) or point model.name_or_path at a local folder."
        )
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(name_or_path, "config.json", revision=revision, etag_timeout=5))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise UserError(
            f"could not fetch config.json of {name_or_path} ({str(e).splitlines()[0]}): check the name and access "
            "(gated models need `hf auth login`), or point model.name_or_path at a local folder."
        ) from None


def of_model(model) -> ModelShape:
    """The shape of a spec's model (its `model` section): from config.json, or from a GGUF file's metadata."""
    if getattr(model, "gguf_file", None):
        return of_gguf(model)
    f = config_file(model.name_or_path, model.revision)
    try:
        c = json.loads(f.read_text())
    except ValueError as e:
        raise UserError(f"{f}: not valid JSON ({e}).") from None
    return from_config(c, str(f))


def of_gguf(model) -> ModelShape:
    from fttool import gguf_read

    path = gguf_read.file_of(model)
    if path is None:
        raise UserError(
            f"model.gguf_file={model.gguf_file} of {model.name_or_path} is not on this machine; the plan reads its "
            f"metadata: `hf download {model.name_or_path} {model.gguf_file}` first (or give a local folder)."
        )
    return from_config(gguf_read.describe(path)["config"], str(path))
