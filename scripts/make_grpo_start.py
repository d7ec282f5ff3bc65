"""Write the GRPO demo's starting point (fttool/assets/tiny-chat-reverse): the bundled tiny model after a short
supervised run on the demo's reverse-the-words task, merged into a standalone model. It reverses most word lists
(about 75% exact on the held-out prompts) but not all, so sampled completions differ in reward and the GRPO demo
(+recipe=tiny_grpo_cpu) has something to raise. About 2 minutes on 2 cores.

    python scripts/make_grpo_start.py
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET = Path(__file__).resolve().parents[1] / "fttool" / "assets" / "tiny-chat-reverse"
KEEP = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
STEPS = 1500


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fttool = [sys.executable, "-m", "fttool"]
        subprocess.run(
            [
                *fttool,
                f"train.max_steps={STEPS}",
                f"train.save_steps={STEPS}",
                "seed=0",
                f"output_dir={tmp}",
                "run_name=sft",
                "eval.samples=200",
            ],
            check=True,
        )
        subprocess.run([*fttool, "export", f"run={tmp}/sft", f"output={tmp}/merged"], check=True)
        TARGET.mkdir(exist_ok=True)
        for name in KEEP:
            shutil.copy(Path(tmp) / "merged" / name, TARGET / name)
        template = Path(tmp) / "merged" / "chat_template.jinja"
        if template.is_file():
            shutil.copy(template, TARGET / "chat_template.jinja")
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
