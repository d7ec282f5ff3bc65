"""`fttool generate` (one prompt, or a JSONL file of prompts) and `fttool chat` (interactive), on a run folder or an
exported model. Prompts are rendered with the training chat template; replies stop at its end-of-turn token."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Tuple

from fttool.after.args import flag
from fttool.config import devices
from fttool.data.tokenizer import load_tokenizer, with_pad
from fttool.errors import UserError
from fttool.runfolder import runfiles

log = logging.getLogger("fttool")


def load(own: Dict[str, str]) -> Tuple[object, object, str, Dict]:
    """(model, tokenizer, what was loaded, the run's data.template_kwargs) from run= (with checkpoint=) or model=."""
    from fttool import models as model_lib
    from fttool.logs import quiet_libraries

    quiet_libraries()
    device = own.get("device")
    if device is not None and device not in devices.DEVICES:
        raise UserError(f"device={device}: expected {' or '.join(devices.DEVICES)}.")
    if "run" in own:
        from dataclasses import replace

        from fttool import data
        from fttool.runfolder import folder

        run_dir = folder.open_run(own["run"])
        spec = folder.load_spec_to_use(run_dir, flag(own, "trust_remote_code"))
        if device:
            spec = replace(spec, hardware=replace(spec.hardware, device=device))
        model_lib.check_inference_device(spec, "device")
        weights = folder.weights_dir(run_dir, spec, own.get("checkpoint", folder.FINAL))
        tok = load_tokenizer(spec)
        data.training_template(spec, tok)
        model = model_lib.place(model_lib.load_trained(spec, model_lib.resolve_precision(spec), weights), spec)
        return model, tok, str(weights), dict(spec.data.template_kwargs)
    if "checkpoint" in own:
        raise UserError("checkpoint= applies to run=; an exported model folder has one set of weights.")
    return (*_load_folder(Path(own["model"]), device, flag(own, "trust_remote_code")), {})


def _load_folder(path: Path, device, trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path.expanduser().resolve()
    if not (path / "config.json").is_file():
        hint = " It is a run folder: use run=PATH." if (path / runfiles.SPEC).is_file() else ""
        raise UserError(f"model={path}: no config.json there; give a model folder (fttool export output).{hint}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if devices.of(device).gpu and not torch.cuda.is_available():
        raise UserError("device=cuda: torch sees no CUDA GPU here; use device=cpu.")
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if not tok.chat_template:
        raise UserError(f"model={path}: its tokenizer has no chat template; export it from a run with fttool export.")
    with_pad(tok)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto", trust_remote_code=trust_remote_code)
    model = model.to(device)
    return model, tok, str(path)


def _options(own: Dict[str, str]) -> Dict:
    from fttool.after.args import number

    temperature = number(own, "temperature", 0.0, low=0)
    top_p = number(own, "top_p", 1.0, low=0)
    if not 0 < top_p <= 1:
        raise UserError(f"top_p={own['top_p']}: expected a number in (0, 1].")
    return {
        "max_new_tokens": number(own, "max_new_tokens", 256, int, low=1),
        "temperature": temperature,
        "top_p": top_p,
    }


def _start(own: Dict[str, str]) -> List[Dict]:
    return [{"role": "system", "content": own["system"]}] if own.get("system") else []


def read_prompts(path: str, system: List[Dict]) -> List[Tuple[str, List[Dict]]]:
    """(file:line, conversation) for every line of a JSONL file of {"prompt": str} or {"messages": [...]} rows."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"input={path}: file not found.")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        loc = f"{p}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{loc}: not valid JSON ({e.msg}).")
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            out.append((loc, system + [{"role": "user", "content": row["prompt"]}]))
        elif (
            isinstance(row, dict)
            and isinstance(row.get("messages"), list)
            and row["messages"]
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in row["messages"]
            )
        ):
            msgs = row["messages"]
            if msgs[-1]["role"] == "assistant":
                raise UserError(
                    f"{loc}: the conversation already ends with an assistant reply; end it with the user's turn."
                )
            out.append((loc, (system if msgs[0]["role"] != "system" else []) + msgs))
        else:
            raise UserError(
                f'{loc}: expected {{"prompt": "..."}} or {{"messages": [{{"role": ..., "content": ...}}, ...]}}.'
            )
    if not out:
        raise UserError(f"input={path}: no prompts in the file.")
    return out


def main(verb: str, own: Dict[str, str], overrides: List[str] = ()) -> None:
    """`generate` and `chat` (their own keys only: `overrides` is empty, the verbs allow no run settings)."""
    from fttool.after.evaluate import generate

    opts = _options(own)
    prompts = read_prompts(own["input"], _start(own)) if "input" in own else None
    out_path = Path(own["output"]).expanduser() if own.get("output") else None
    if out_path is not None and prompts is None:
        raise UserError("output= is for the replies to input=FILE; with prompt= the reply is printed.")
    model, tok, source, template_kwargs = load(own)
    opts["template_kwargs"] = template_kwargs
    if verb == "chat":
        return chat(model, tok, _start(own), opts, source)
    if prompts is None:
        ((reply, _),) = generate(model, tok, [_start(own) + [{"role": "user", "content": own["prompt"]}]], **opts)
        print(reply)
        return
    replies = generate(model, tok, [c for _, c in prompts], **opts)
    lines = [
        json.dumps({"loc": loc, "messages": conv, "reply": r, "stopped": stopped}, ensure_ascii=False)
        for (loc, conv), (r, stopped) in zip(prompts, replies)
    ]
    if out_path is None:
        print("\n".join(lines))
        return
    tmp = out_path.with_name(out_path.name + ".partial")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out_path)
    print(f"fttool: {len(lines)} replies written to {out_path}", file=sys.stderr)


def chat(model, tok, start: List[Dict], opts: Dict, source: str) -> None:
    from fttool.after.evaluate import generate

    tty = sys.stdin.isatty()
    print(f"fttool chat with {source}. /reset starts over, /exit or Ctrl-D leaves.", file=sys.stderr)
    history = list(start)
    while True:
        try:
            line = input("you> " if tty else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        try:
            ((reply, stopped),) = generate(model, tok, [history], **opts)
        except KeyboardInterrupt:  # stop this reply, keep the session
            history.pop()
            print("(reply interrupted)", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})
        print(("model> " if tty else "") + reply + ("" if stopped else "  [cut at max_new_tokens]"), flush=True)


def reward_samples(spec, tokenizer, rows: List[Dict], per_prompt: int = 2) -> List[List[Tuple[str, Dict[str, float]]]]:
    """`fttool preview objective=grpo --samples N`: for each shown prompt, `per_prompt` completions sampled from the
    starting model as training samples them (objective.temperature, top_p, max_completion_length), each with the
    value of every reward. A broken reward stops here, before any training (RewardFailed, exit 4)."""
    from fttool import models as model_lib
    from fttool import rewards
    from fttool.after.evaluate import generate_ids

    o = spec.objective
    functions = rewards.functions(o, spec.data, rewards.load_code(o.reward_code) if o.reward_code else None)
    model, _ = model_lib.load_model(spec)
    prompts = [list(r["input_ids"]) for r in rows for _ in range(per_prompt)]
    replies = generate_ids(model, tokenizer, prompts, o.max_completion_length, 8, o.temperature, o.top_p)
    out = []
    for i, row in enumerate(rows):
        completions = [text for text, _ in replies[i * per_prompt : (i + 1) * per_prompt]]
        given = dict(prompts=[row["prompt"]] * per_prompt, completions=completions)
        scores = {f.__name__: f(**given, reference=[row["reference"]] * per_prompt) for f in functions}
        out.append([(c, {name: v[k] for name, v in scores.items()}) for k, c in enumerate(completions)])
    return out
