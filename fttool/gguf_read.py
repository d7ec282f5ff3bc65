"""A GGUF file's metadata, read with llama.cpp's own `gguf` package (no torch, no weights): where the file is, its
architecture, its tensor types, and the decoder's shape as a config.json would give it (for `plan` and `check`).

transformers loads the weights itself (`from_pretrained(folder, gguf_file=NAME)`) and dequantizes them; this module
only answers what can be known before that, so that a wrong file is named before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from fttool import assets
from fttool.errors import UserError

# general.architecture -> transformers' model_type (the ones whose layout fttool's planner and GGUF writer know)
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
               "gemma3": "gemma3_text", "phi3": "phi3", "mistral": "mistral"}  # fmt: skip


def need_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError(
            "model.gguf_file needs llama.cpp's `gguf` package to read the file: pip install gguf "
            "(it is one of fttool's dependencies; reinstall fttool)."
        ) from None
    return gguf


def file_of(model) -> Optional[Path]:
    """The GGUF file a model spec names: model.gguf_file inside the local folder model.name_or_path (or the hub
    cache's copy); None when the spec loads no GGUF, or when the file is on the hub and not fetched yet."""
    if not getattr(model, "gguf_file", None):
        return None
    folder = Path(assets.resolve(model.name_or_path)).expanduser()
    if folder.is_dir():
        return folder / model.gguf_file
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model.name_or_path, model.gguf_file, revision=model.revision)
    return Path(cached) if isinstance(cached, str) else None


def load_kwargs(model) -> Dict[str, Any]:
    """What every transformers `from_pretrained` of this model (config, tokenizer, weights) adds."""
    return {"gguf_file": model.gguf_file} if getattr(model, "gguf_file", None) else {}


def check_file(model) -> None:
    """model.gguf_file names a file that exists (locally) and ends in .gguf."""
    name = model.gguf_file
    if not str(name).endswith(".gguf"):
        raise UserError(f"model.gguf_file={name}: expected the name of a .gguf file inside model.name_or_path.")
    folder = Path(assets.resolve(model.name_or_path)).expanduser()
    if folder.is_dir() and not (folder / name).is_file():
        found = sorted(p.name for p in folder.glob("*.gguf"))
        raise UserError(
            f"model.gguf_file={name}: no such file in {folder}"
            + (f"; it holds {', '.join(found)}." if found else " (it holds no .gguf file).")
        )


def reader(path: Path):
    gguf = need_gguf()
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:  # a truncated file, or not a GGUF at all
        raise UserError(f"{path}: not a readable GGUF file ({str(e).splitlines()[0]}).") from None


def value(r, key: str, default: Any = None) -> Any:
    field = r.fields.get(key)
    return default if field is None else field.contents()


def describe(path: Path) -> Dict[str, Any]:
    """{architecture, name, tensor_types, config}: config as a config.json would hold it (shapes.from_config)."""
    r = reader(path)
    arch = value(r, "general.architecture", "")
    name = value(r, "general.name", "") or ""
    kind = "mistral" if arch == "llama" and "mistral" in name.lower() else MODEL_TYPES.get(arch, arch)

    def a(key, default=None):
        return value(r, f"{arch}.{key}", default)

    tokens = r.fields.get("tokenizer.ggml.tokens")
    config = {
        "model_type": kind,
        "hidden_size": a("embedding_length"),
        "num_hidden_layers": a("block_count"),
        "intermediate_size": a("feed_forward_length"),
        "num_attention_heads": a("attention.head_count"),
        "num_key_value_heads": a("attention.head_count_kv"),
        "head_dim": a("attention.key_length"),
        "vocab_size": a("vocab_size") or (len(tokens.data) if tokens is not None else None),
        "max_position_embeddings": a("context_length"),
        "tie_word_embeddings": all(t.name != "output.weight" for t in r.tensors),
    }
    types = sorted({t.tensor_type.name for t in r.tensors})
    return {"architecture": arch, "name": name, "tensor_types": types, "config": config}


def check_loadable(model) -> Optional[Dict[str, Any]]:
    """The GGUF a spec names is one transformers' loader reads (its architecture) and the `gguf` package dequantizes
    (its tensor types): UserError naming the file otherwise; its description, or None when it is not on this machine
    yet (transformers fetches it). Imports transformers: for the worker and the run verbs, not for `check`."""
    path = file_of(model)
    if path is None or not path.is_file():
        return None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    info = describe(path)
    if info["architecture"] not in GGUF_SUPPORTED_ARCHITECTURES and info["config"]["model_type"] not in (
        GGUF_SUPPORTED_ARCHITECTURES
    ):
        raise UserError(
            f"{path}: a GGUF of architecture '{info['architecture']}', which transformers' GGUF loader cannot read "
            f"(it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); use the model's safetensors folder instead."
        )
    check_dequantizable(path, info)
    return info


def check_dequantizable(path: Path, info: Dict[str, Any]) -> None:
    """Every tensor type of the file is one the `gguf` package can dequantize (else transformers fails mid-load)."""
    gguf = need_gguf()
    from gguf.quants import _type_traits  # the types it has block (de)quantizers for

    plain = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}
    bad = [t for t in info["tensor_types"] if t not in plain and gguf.GGMLQuantizationType[t] not in _type_traits]
    if bad:
        raise UserError(
            f"{path}: tensor type(s) {', '.join(bad)} cannot be dequantized by the installed gguf package "
            f"({gguf.__name__} {_version()}); use a GGUF of another quantization (Q8_0, Q4_K_M, F16) or upgrade: "
            "pip install -U gguf."
        )


def _version() -> str:
    from importlib.metadata import version

    return version("gguf")
