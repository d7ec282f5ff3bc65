"""How the weights are trained: one object per method, answering everything the rest of fttool asks of it.

Validation, plan, model loading, the run folder, export, evaluation and the model card read these answers; none of
them switches on a method's name. A new method is one row of METHODS (reusing or extending an object below) and one
file in conf/method/ (see README, "Adding a method / a strategy"). Light: nothing here imports torch at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from fttool.config.spec import FullSpec, LoraSpec, QloraSpec
from fttool.errors import UserError

ADAPTER_FILE = "adapter_config.json"


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


@dataclass(frozen=True)
class Method:
    """Full fine-tune: every weight trained, in fp32 master weights."""

    name: str
    schema: type  # the dataclass of its keys (spec.py)
    about: str  # one line for `fttool check`, the README table and the model card
    adapter: bool = False  # trains an adapter over a frozen base; final/ holds the adapter, not a model
    quantized: bool = False  # the frozen base is loaded quantized (bitsandbytes)
    shardable_base: bool = True  # the base weights can be sharded (FSDP2, ZeRO-3)
    utilisation: float = 0.40  # share of a GPU's bf16 peak a training step reaches (`fttool plan`'s time)

    # -- what final/ and checkpoints hold ------------------------------------------------------------------------
    @property
    def holds(self) -> str:
        return "adapter" if self.adapter else "model"

    def weights_problem(self, path: Path) -> Optional[str]:
        """Why `path` does not hold this method's weights, or None."""
        if self.adapter:
            return None if (path / ADAPTER_FILE).is_file() else f"{ADAPTER_FILE} missing"
        if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
            return None
        return "config.json and *.safetensors expected"

    # -- loading -------------------------------------------------------------------------------------------------
    def weight_dtype(self, precision: str) -> str:
        """The dtype the weights are loaded in when model.dtype=auto: fp32 master weights for a full fine-tune, the
        compute dtype for a frozen base."""
        if not self.adapter:
            return "float32"
        return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")

    def quantization_config(self, m, compute_dtype: str):
        return None

    def prepare(self, spec, model):
        """The loaded base made trainable: adapters added, k-bit preparation. Full: the model as it is."""
        return model

    def export_source(self, spec, weights: Path) -> str:
        """Where export loads full-precision weights from: the trained model itself, or the base for an adapter."""
        return str(weights)

    # -- planning and describing ---------------------------------------------------------------------------------
    def trainable(self, m, total: int, layers: int, shapes: Dict[str, tuple]) -> int:
        return total

    def bytes_per_weight(self, m, weight_bytes: int) -> float:
        """Memory per base parameter as loaded (quantized bases take less)."""
        return weight_bytes

    def describe(self, m) -> str:
        return "full fine-tune"

    def card_lines(self, m) -> List[str]:
        return []

    def check(self, m) -> None:
        """Rules among this method's own keys."""


@dataclass(frozen=True)
class Lora(Method):
    """LoRA: low-rank adapters on chosen projections (peft), base frozen. dora: weight-decomposed LoRA (DoRA, Liu et
    al. 2024: a learned magnitude per output feature beside the low-rank direction update; peft's use_dora)."""

    dora: bool = False

    def prepare(self, spec, model):
        from peft import LoraConfig, get_peft_model

        m = spec.method
        model = self._ready(spec, model)
        names = {n.split(".")[-1] for n, mod in model.named_modules() if type(mod).__name__.startswith("Linear")}
        missing = [t for t in m.target_modules if t not in names]
        if missing:
            raise UserError(
                f"method.target_modules: {', '.join(missing)} not found in {spec.model.name_or_path}; "
                f"its linear layers are: {', '.join(sorted(names))}."
            )
        cfg = LoraConfig(
            r=m.rank,
            lora_alpha=m.alpha,
            lora_dropout=m.dropout,
            target_modules=list(m.target_modules),
            use_rslora=m.use_rslora,
            use_dora=self.dora,
            bias="none",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, cfg)

    def continue_adapter(self, spec, model, adapter: str):
        """The loaded base with an earlier run's adapter, trainable (model.from_run_adapter=continue): its rank and
        targets are the adapter's own."""
        from peft import PeftModel

        return PeftModel.from_pretrained(self._ready(spec, model), adapter, is_trainable=True)

    def _ready(self, spec, model):
        if spec.train.gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input with grad
        return model

    def export_source(self, spec, weights: Path) -> str:
        from fttool import assets

        return assets.resolve(spec.model.name_or_path)

    def trainable(self, m, total: int, layers: int, shapes: Dict[str, tuple]) -> int:
        per = m.rank + (1 if self.dora else 0)  # DoRA: one magnitude per output feature
        return layers * sum(m.rank * shapes[t][0] + per * shapes[t][1] for t in m.target_modules if t in shapes)

    def describe(self, m) -> str:
        return (
            f"{m.name}: rank {m.rank}, alpha {m.alpha:g}, dropout {m.dropout:g} on {', '.join(m.target_modules)}"
            + self._quant(m)
        )

    def _quant(self, m) -> str:
        return ""

    def card_lines(self, m) -> List[str]:
        return ["- the adapter is merged into the base weights: this folder needs no peft to load."]


@dataclass(frozen=True)
class QLora(Lora):
    """QLoRA: LoRA over a base quantized to 4 or 8 bits (bitsandbytes)."""

    def quantization_config(self, m, compute_dtype: str):
        from transformers import BitsAndBytesConfig

        if m.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=m.quant_type,
            bnb_4bit_use_double_quant=m.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
        )

    def _ready(self, spec, model):
        from peft import prepare_model_for_kbit_training

        # the Trainer then sets the kind of checkpointing (worker/checkpointing.py)
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(spec.train.gradient_checkpointing),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )

    def bytes_per_weight(self, m, weight_bytes: int) -> float:
        """4-bit: half a byte, plus one fp32 absmax per block of 64 (double quantization: 8-bit absmax, and one fp32
        per 256 of those); 8-bit: one byte (plus a per-row scale, negligible)."""
        if m.bits == 8:
            return 1.0
        return 0.5 + (1 / 64 + 4 / (64 * 256) if m.double_quant else 4 / 64)

    def _quant(self, m) -> str:
        return f", base quantized to {m.bits}-bit {m.quant_type if m.bits == 4 else 'int8'}"

    def card_lines(self, m) -> List[str]:
        return [
            "- the adapter was trained against the quantized base and merged here into a full-precision reload "
            "of the base (the quantized base is never saved); expect small differences from the 4-bit model."
        ]

    def check(self, m) -> None:
        if m.bits == 8 and m.quant_type != "nf4":
            raise UserError("method.quant_type applies to 4-bit only; with method.bits=8 leave it at nf4.")


METHODS: Dict[str, Method] = {
    m.name: m
    for m in (
        Method("full", FullSpec, "every weight trained (fp32 master weights, AdamW states for all)"),
        Lora(
            "lora",
            LoraSpec,
            "low-rank adapters on chosen projections; the base stays frozen",
            adapter=True,
            utilisation=0.35,
        ),
        Lora(
            "dora",
            LoraSpec,
            "DoRA: LoRA with a learned magnitude per output feature (peft use_dora); slower steps, "
            "often better at low rank",
            adapter=True,
            utilisation=0.25,
            dora=True,
        ),
        QLora(
            "qlora",
            QloraSpec,
            "LoRA over a 4-bit (nf4) or 8-bit quantized base (bitsandbytes)",
            adapter=True,
            quantized=True,
            shardable_base=False,
            utilisation=0.25,  # dequantizing every weight each step
        ),
    )
}
NAMES = tuple(METHODS)
SCHEMAS: Dict[str, type] = {n: m.schema for n, m in METHODS.items()}


def of(spec_or_method) -> Method:
    """The method object of a spec (or of its `method` section)."""
    m = getattr(spec_or_method, "method", spec_or_method)
    return METHODS[m.name]


def schema(name: str) -> type:
    return METHODS[name].schema
