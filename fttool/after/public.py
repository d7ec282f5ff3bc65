"""What of a run may leave the machine in an export: the spec, the lineage, the data record and the results, with
local paths cut to their last part; never the host name, the working directory, the environment or git remotes
(env.json and command.txt stay in the run folder)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any, List, Optional

from fttool.runfolder import runfiles

# an absolute or home-relative local path inside a string (not a URL's path, not a hub id like org/name)
LOCAL_PATH = re.compile(r"(?<![\w:/.~-])(?:~|/)[^\s'\"`,;()\[\]{}]*")
LOCAL = "<local>"
# the record copied into an export's fttool/ folder: JSON files scrubbed of local paths, the rest as they are
JSON_RECORD = (runfiles.DATA, runfiles.RESULT, "eval.json")
AS_IS_RECORD = ("eval.md", "loss.png")
MARKER = "EXPORT.json"  # in the export's fttool/ folder: an fttool export made this folder (overwrite may replace it)


def scrub_text(text: str) -> str:
    """Local paths in a text cut to their last part: /home/alice/data/train.jsonl -> <local>/train.jsonl."""

    def cut(m: "re.Match") -> str:
        path = m.group(0).rstrip("/.:")
        tail = m.group(0)[len(path) :]
        name = path.rsplit("/", 1)[-1]
        return (f"{LOCAL}/{name}" if name and name != "~" else LOCAL) + tail

    return LOCAL_PATH.sub(cut, text)


def scrub(value: Any) -> Any:
    """scrub_text over every string (and key) of a JSON-like value."""
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def commands(run_dir: Path) -> List[str]:
    """The fttool command lines of the run, without the working directory they ran in, local paths cut."""
    path = run_dir / runfiles.COMMAND
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.split(" && ", 1)[-1] if line.startswith("cd ") else line
        try:
            out.append(shlex.join(scrub_text(a) for a in shlex.split(line)))
        except ValueError:
            out.append(scrub_text(line))
    return [c for c in out if c]


def write_record(run_dir: Path, folder: Path, spec_yaml: str, about: dict) -> None:
    """The run's public record into folder/ (an export's fttool/), and the marker that says fttool made it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / runfiles.SPEC).write_text(scrub_text(spec_yaml))
    for name in JSON_RECORD:
        data: Optional[Any] = runfiles.read_json(run_dir / name)
        if data is not None:
            runfiles.write_json(folder / name, scrub(data))
    for name in AS_IS_RECORD:
        if (run_dir / name).is_file():
            (folder / name).write_bytes((run_dir / name).read_bytes())
    runfiles.write_json(folder / MARKER, {"made_by": "fttool export", **scrub(about)})


def is_export(folder: Path) -> bool:
    return (folder / "fttool" / MARKER).is_file()


def protected(output: Path, run_dir: Path) -> Optional[str]:
    """Why `output` may never be replaced by an export (or None): the run folder, anything holding it, the working
    directory or the home folder or anything holding them, the filesystem root."""
    output = output.resolve()
    for what, p in (
        ("the run folder", run_dir.resolve()),
        ("the working directory", Path.cwd().resolve()),
        ("the home folder", Path(os.path.expanduser("~")).resolve()),
    ):
        if output == p or output in p.parents:
            return f"it is {what}" if output == p else f"it holds {what} ({p})"
    if output == Path(output.anchor):
        return "it is the filesystem root"
    return None
