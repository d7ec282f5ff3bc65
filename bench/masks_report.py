"""Per real chat template (and per template in tests/templates/, written in the shapes of families outside the
shared set): which conversation classes fttool masks exactly right, and which it refuses and why.

    python bench/masks_report.py            # needs ../shared/data (templates and the phi-2 tokenizer)

Runs the cases of tests/test_templates_real.py (reference in tests/template_cases.py) and prints one line per
template: "ok" per class trained exactly right, "refused: why" where the template cannot render the conversation
(fttool then refuses the row with that reason), "WRONG: what" where the mask differs from the reference.
"""

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import template_cases as tc
    from conftest import make_spec

    if not tc.template_names():
        print(f"no templates at {tc.TEMPLATES}: put ../shared/data beside the repository")
        return 1
    data_spec = make_spec([], Path(tempfile.mkdtemp())).data
    cases = list(tc.conversations("<END>"))
    wrong = 0
    totals = {"ok": 0, "refused": 0}
    print(f"{'template':<48} " + " ".join(f"{c[:18]:<18}" for c in cases))
    for name in tc.template_names() + tc.own_template_names():  # the shared set, then tests/templates/
        cells, notes = [], []
        for case in cases:
            try:
                verdict = tc.check(name, case, data_spec)
            except AssertionError as e:
                verdict = f"WRONG: {str(e).splitlines()[0][:100]}"
                wrong += 1
            if not verdict:
                cells.append("ok")
                totals["ok"] += 1
            else:
                cells.append(verdict.split(":")[0])
                notes.append(f"    {case}: {verdict}")
                totals["refused"] += verdict.startswith("refused")
        print(f"{name:<48} " + " ".join(f"{c:<18}" for c in cells))
        for n in notes:
            print(n)
    print(f"\n{totals['ok']} trained exactly right, {totals['refused']} refused by the template itself, {wrong} wrong")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
