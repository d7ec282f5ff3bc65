"""`fttool export run=RUN output=DIR`: a standalone model folder anyone can load with
`AutoModelForCausalLM.from_pretrained(DIR)`.

LoRA and QLoRA adapters are merged into a full-precision reload of the base model: the quantized base is never
saved (on CPU a 4-bit base saved after any forward is corrupt, and a merged 4-bit model loses the adapter's
precision). The folder gets safetensors weights, the tokenizer with the training chat template, a generation
config that stops at the end-of-turn token, a model card (README.md) and the run's record under fttool/.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from fttool import gguf_read
from fttool.after import public
from fttool.config import methods
from fttool.data.tokenizer import with_pad
from fttool.errors import UserError
from fttool.runfolder import folder
from fttool.runfolder.checkpoint import write_failure

log = logging.getLogger("fttool")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def export_dtype(spec, requested: str) -> str:
    """auto: the dtype the base model was published in (its config), float32 when it names none."""
    if requested != "auto":
        return requested
    from transformers import AutoConfig

    from fttool import assets

    try:
        cfg = AutoConfig.from_pretrained(
            assets.resolve(spec.model.name_or_path),
            revision=spec.model.revision,
            trust_remote_code=spec.model.trust_remote_code,
            **gguf_read.load_kwargs(spec.model),
        )
        found = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "").replace("torch.", "")
    except (OSError, ValueError):
        found = ""
    return found if found in DTYPES[1:] else "float32"


def merged_model(spec, weights: Path, dtype: str):
    """The fine-tuned model in plain transformers form, full precision, adapter merged into the weights."""
    from transformers import AutoModelForCausalLM

    from fttool.config.methods import torch_dtype
    from fttool.models import check_finite_weights

    method = methods.of(spec)
    source = method.export_source(spec, weights)
    extra = {}
    if method.adapter and spec.model.gguf_file:  # the base is the GGUF, dequantized
        from fttool.models import gguf_dequantized

        extra = {**gguf_read.load_kwargs(spec.model), "quantization_config": gguf_dequantized(spec, dtype)}
    try:  # never with the run's quantization_config: the base is reloaded at full precision
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=spec.model.revision if method.adapter else None,
            dtype=torch_dtype(dtype),
            trust_remote_code=spec.model.trust_remote_code,
            **extra,
        )
    except (OSError, ValueError, NotImplementedError) as e:
        raise UserError(f"could not load {source} to export: {str(e).splitlines()[0]}")
    if not method.adapter:
        check_finite_weights(model, str(weights))
        return model
    from peft import PeftModel

    from fttool.models import with_parent

    model = PeftModel.from_pretrained(with_parent(spec, model), str(weights))
    check_finite_weights(model, str(weights))  # named here, not as peft's "NaNs detected in the merged weights"
    return model.merge_and_unload(safe_merge=True)


def _write_gguf(spec, model, tok, out_dir: Path, name: str, gguf_type: str) -> dict:
    """The model as one GGUF file in `out_dir` (plus an Ollama Modelfile); the tokenizer files are read from a
    scratch copy, not left beside it."""
    from fttool.after import gguf_export

    gguf_export.check_exportable(model.config)
    out_dir.mkdir(parents=True)
    scratch = out_dir / ".tokenizer"
    tok.save_pretrained(str(scratch))
    file = out_dir / f"{name}-{gguf_type}.gguf"
    try:
        written = gguf_export.write(model, tok, scratch, file, gguf_type, name, gguf_export.source_pre(spec))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    (out_dir / "Modelfile").write_text(gguf_export.modelfile(file.name, tok))
    return written


def generation_config(model, tokenizer):
    """The model's generation config, stopping at the end-of-turn token as well as EOS, padding with the pad token."""
    from fttool.after.evaluate import stop_ids

    gen = model.generation_config
    gen.eos_token_id = stop_ids(tokenizer, model)
    gen.pad_token_id = tokenizer.pad_token_id
    return gen


FORMATS = ("safetensors", "gguf")


def check_output(output: Path, run_dir: Path, overwrite: bool) -> Path:
    """The export's folder, once it is sure that writing there destroys nothing fttool did not make: a new or empty
    folder, or with overwrite=true one an earlier fttool export made (its fttool/EXPORT.json); never the run folder,
    a folder inside it or holding it, the working directory, the home folder or one holding them."""
    if output == run_dir or run_dir in output.parents:
        raise UserError(f"output={output} is inside the run folder; export to a folder of its own.")
    why = public.protected(output, run_dir)
    if why:
        raise UserError(f"output={output}: {why}, so an export never writes there; export to a folder of its own.")
    if output.exists() and not output.is_dir():
        raise UserError(f"output={output} is a file; export to a folder (a new one, or an earlier export).")
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise UserError(
                f"output={output} already exists; choose another folder, or add overwrite=true to replace it."
            )
        if not public.is_export(output):
            raise UserError(
                f"output={output} is not a folder an fttool export made (no fttool/{public.MARKER} in it), so "
                "overwrite=true does not replace it; export to a new folder, or remove it yourself if it may go."
            )
    return output


def swap_in(tmp: Path, output: Path) -> None:
    """Put the finished export at `output`: an earlier export there is moved aside, the new one renamed in, and only
    then the old one removed; if the rename fails the old one is put back, whole."""
    if not output.exists():
        tmp.rename(output)
        return
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    output.rename(old)
    try:
        tmp.rename(output)
    except BaseException:
        old.rename(output)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export(
    run_dir: Path,
    spec,
    output: Path,
    checkpoint: str = folder.FINAL,
    dtype: str = "auto",
    overwrite: bool = False,
    fmt: str = "safetensors",
    gguf_type: str = "f16",
) -> Path:
    from fttool.after import card, gguf_export
    from fttool.logs import setup_logging

    if dtype not in DTYPES:
        raise UserError(f"dtype={dtype}: expected one of {', '.join(DTYPES)}.")
    if fmt not in FORMATS:
        raise UserError(f"format={fmt}: expected one of {', '.join(FORMATS)}.")
    if gguf_type not in gguf_export.GGUF_TYPES:
        raise UserError(f"gguf_type={gguf_type}: expected one of {', '.join(gguf_export.GGUF_TYPES)}.")
    output = check_output(output.expanduser().resolve(), run_dir, overwrite)
    weights = folder.weights_dir(run_dir, spec, checkpoint)
    setup_logging(run_dir, log_file="export.log")
    dtype = export_dtype(spec, dtype)
    t0 = time.time()
    log.info(f"export: {weights} ({spec.method.name}) onto {spec.model.name_or_path} in {dtype}")
    model = merged_model(spec, weights, dtype)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(weights))  # saved with the training chat template
    with_pad(tok)
    model.generation_config = generation_config(model, tok)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if fmt == "gguf":
            written = _write_gguf(spec, model, tok, tmp, output.name, gguf_type)
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
        about = {"run": spec.run_name, "checkpoint": checkpoint, "format": fmt, "dtype": dtype}
        public.write_record(run_dir, tmp / "fttool", folder.spec_to_yaml(spec), about)
        n_params = sum(p.numel() for p in model.parameters())
        (tmp / "README.md").write_text(card.model_card(run_dir, spec, weights, dtype, n_params, output.name))
        swap_in(tmp, output)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = write_failure(e)
        if why is None:
            raise
        free = shutil.disk_usage(output.parent).free / 2**30
        raise UserError(
            f"could not write the export to {output}: {why}. {free:.2f} GiB free in {output.parent}; nothing was "
            "replaced (an earlier export there is as it was). Free space, or export to another disk."
        ) from None
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    if fmt == "gguf":
        log.info(
            f"export: {output / written['file']} ({size / 2**20:.1f} MiB, {n_params:,} parameters, "
            f"{', '.join(f'{n} {t}' for t, n in sorted(written['tensor_types'].items()))} tensors, "
            f"{time.time() - t0:.1f} s); run it with llama.cpp (llama-cli -m FILE), Ollama (`ollama create NAME -f "
            f"{output / 'Modelfile'}`) or transformers (from_pretrained({str(output)!r}, gguf_file={written['file']!r}))"
        )
        return output
    log.info(
        f"export: {output} ({size / 2**20:.1f} MiB, {n_params:,} parameters, {time.time() - t0:.1f} s); load it with "
        f"AutoModelForCausalLM.from_pretrained({str(output)!r}), or try it: fttool chat model={output}"
    )
    return output
