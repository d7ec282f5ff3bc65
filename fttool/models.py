"""Tokenizer and model from the spec: load (hub id or folder), quantize and prepare as the method says (methods.py)."""

from __future__ import annotations

import logging
import os
from typing import Tuple

from fttool import assets, gguf_read
from fttool.config import devices, methods
from fttool.config.methods import torch_dtype
from fttool.config.spec import resolved_precision
from fttool.errors import UserError

log = logging.getLogger("fttool")


def resolve_precision(spec) -> str:
    """fp32, bf16 or fp16 for this machine."""
    hw = spec.hardware
    if hw.precision != "auto" or not devices.of(hw).gpu:
        return resolved_precision(hw)
    import torch

    return resolved_precision(hw, torch.cuda.is_bf16_supported())


def check_device(spec) -> None:
    """The machine can give the run what the hardware group asks for (checked before anything is written)."""
    hw = spec.hardware
    if not devices.of(hw).gpu:
        return
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found == 0:
        raise UserError(
            f"hardware={hw.name} needs a CUDA GPU, but torch sees none (torch {torch.__version__}); "
            "use hardware=cpu here (or hardware.device=cpu to run the same strategy on CPU processes)."
        )
    if hw.num_processes > found:
        raise UserError(
            f"hardware.num_processes={hw.num_processes} needs {hw.num_processes} GPUs on this machine, but "
            f"torch sees {found}; set hardware.num_processes={found} (or fewer)."
        )


def weight_dtype(spec, precision: str) -> str:
    """Weights in fp32 for full fine-tunes (fp32 master weights); in the compute dtype for frozen bases."""
    if spec.model.dtype != "auto":
        return spec.model.dtype
    return methods.of(spec).weight_dtype(precision)


def quantization_config(spec, precision: str):
    m = spec.method
    compute = getattr(m, "compute_dtype", "auto")
    return methods.of(spec).quantization_config(m, compute if compute != "auto" else weight_dtype(spec, precision))


def load_base(spec, precision: str):
    from transformers import AutoModelForCausalLM

    path = assets.resolve(spec.model.name_or_path)
    quant = quantization_config(spec, precision)
    extra = {}
    if quant is not None and devices.of(spec.hardware).gpu:
        extra["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}  # each process its own GPU (DDP, ZeRO-2)
    if spec.model.gguf_file:
        quant = gguf_dequantized(spec, weight_dtype(spec, precision))
        extra.update(gguf_read.load_kwargs(spec.model))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=spec.model.revision,
            dtype=torch_dtype(weight_dtype(spec, precision)),
            attn_implementation=spec.model.attn_implementation,
            trust_remote_code=spec.model.trust_remote_code,
            quantization_config=quant,
            **extra,
        )
    except (OSError, ValueError, ImportError, NotImplementedError) as e:
        raise UserError(
            f"model.name_or_path={spec.model.name_or_path}: could not load the model: {str(e).splitlines()[0]}"
        )
    model.config.use_cache = False  # the KV cache is never wanted in training (and corrupts packed batches)
    return with_parent(spec, model)


def gguf_dequantized(spec, dtype: str):
    """transformers' GGUF loader asked to unpack every weight into a plain dense model (trainable and saveable, where
    a model kept in GGUF blocks is neither); the file's architecture and tensor types checked first, by name."""
    from transformers import GgufConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-tensor bars would fill the run's log; the line below says it instead
    info = gguf_read.check_loadable(spec.model)
    if info is not None:
        log.info(
            f"model: {spec.model.gguf_file} holds {', '.join(info['tensor_types'])} tensors; transformers dequantizes "
            f"them to {dtype} as it loads (the weights keep the file's quantization error)"
        )
    return GgufConfig(dequantize=True)


def load_trained(spec, precision: str, final):
    """The trained model as saved in final/: the base with its adapter, or the fine-tuned model (full)."""
    from pathlib import Path

    if not methods.of(spec).adapter:
        from dataclasses import replace

        trained = replace(spec.model, name_or_path=str(Path(final)), parent_adapter=None, gguf_file=None)
        model = load_base(replace(spec, model=trained), precision)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base(spec, precision), str(final))
    check_finite_weights(model, str(final))
    return model


def check_inference_device(spec, key: str) -> None:
    """A run trained on GPUs, evaluated or queried where there is none: say which key moves it to the CPU."""
    if not devices.of(spec.hardware).gpu:
        return
    import torch

    if not torch.cuda.is_available():
        raise UserError(
            f"run {spec.run_name} was trained on cuda, but torch sees no CUDA GPU here; add {key}=cpu "
            "to run it on the CPU (slow for large models)."
        )


def place(model, spec):
    """The model on the spec's device for inference (quantized models were placed when loaded)."""
    if (
        devices.of(spec.hardware).gpu
        and not getattr(model, "is_loaded_in_4bit", False)
        and not getattr(model, "is_loaded_in_8bit", False)
    ):
        model = model.to(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    return model


def load_model(spec) -> Tuple[object, str]:
    """(model ready to train, precision)."""
    check_device(spec)
    precision = resolve_precision(spec)
    method, base = methods.of(spec), load_base(spec, precision)
    if continues_parent(spec):
        log.info(f"model: continuing the adapter of {spec.model.from_run} on {spec.model.name_or_path}")
        return method.continue_adapter(spec, base, spec.model.parent_adapter), precision
    return method.prepare(spec, base), precision


def continues_parent(spec) -> bool:
    """model.from_run's adapter is trained further (model.from_run_adapter=continue)."""
    return bool(spec.model.parent_adapter) and spec.model.from_run_adapter == "continue"


def with_parent(spec, model):
    """The base as this run starts from it: with model.from_run's adapter merged in (from_run_adapter=merge)."""
    if not spec.model.parent_adapter or continues_parent(spec):
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, spec.model.parent_adapter).merge_and_unload()
    log.info(f"model: {spec.model.from_run}'s adapter merged into {spec.model.name_or_path}")
    return model


CPU_4BIT_OUT, CPU_4BIT_IN = 32, 64  # bitsandbytes' CPU 4-bit kernel: output rows in blocks of 32, input in blocks of 64


def check_cpu_4bit_shapes(spec, model) -> None:
    """4-bit QLoRA on the CPU: bitsandbytes repacks each 4-bit weight for its CPU kernel the first time the layer runs
    without gradients (validation, evaluation, generation, on CPUs with AVX512-BF16), and asserts that the layer's
    output size divides by 32 and its input size by 64. Say so before training, not as an assertion at the first
    validation (or only on some machines)."""
    if devices.of(spec.hardware).gpu or not methods.of(spec).quantized or spec.method.bits != 4:
        return
    bad = sorted(
        {
            (type(m).__name__, m.in_features, m.out_features)
            for m in model.modules()
            if type(m).__name__ == "Linear4bit" and (m.out_features % CPU_4BIT_OUT or m.in_features % CPU_4BIT_IN)
        }
    )
    if bad:
        shapes = ", ".join(f"{i}->{o}" for _, i, o in bad)
        raise UserError(
            f"method=qlora on the CPU: bitsandbytes' 4-bit CPU kernel needs every quantized layer's input size "
            f"to be a multiple of {CPU_4BIT_IN} and its output size a multiple of {CPU_4BIT_OUT}, and "
            f"{spec.model.name_or_path} has layers of {shapes} (in->out features). Use method=lora on the CPU, "
            "method.bits=8, or train on a GPU (hardware=single_gpu)."
        )


def check_finite_weights(model, where: str) -> None:
    """Weights with NaN or inf (a run that diverged before the non-finite guard existed, a damaged file) fail here
    with the reason, not later as a perplexity of n/a or an error deep inside a merge."""
    import torch

    bad = [n for n, p in model.named_parameters() if p.dtype.is_floating_point and not torch.isfinite(p).all()]
    if bad:
        raise UserError(
            f"{where}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {bad[0]}): the run diverged or the "
            "file is damaged. Use an earlier checkpoint (checkpoint=N), or train again (a lower train.lr)."
        )


def count_parameters(model) -> Tuple[int, int]:
    """(trainable, total); peft counts 4-bit weights at their real size (two values per stored byte)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()

    def numel(p):  # ZeRO-3 partitions parameters: the local tensor is empty, ds_numel is the real size
        return getattr(p, "ds_numel", None) or p.numel()

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
    return trainable, total
