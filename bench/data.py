"""Data benchmark: preprocessing speed, cache hits, and trained tokens per second with and without packing.

    python bench/data.py [--rows N] [--train-samples N]

Reads ../shared/data (GSM8K in alpaca form, 7,473 rows, and the phi-3-mini tokenizer); nothing is downloaded.
Every figure is measured in this run, and the packing figures are ratios against padded batches trained in
the same run on the same model and samples. Runs through fttool's own code: compose + validate the spec, build
the data (format, template, masks, cache), train with the Trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fttool.config import objectives

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
GSM8K = SHARED / "alpaca" / "alpacadatacleaned_gsm_8k_train.json"
PHI3 = SHARED / "tokenizers" / "phi-3-mini"


def spec_for(overrides, out: Path):
    from fttool.config import compose, registry, validation

    registry.register()
    ovs = [f"output_dir={out}"] + list(overrides)
    return validation.build_spec(compose.compose(ovs), compose.user_keys(ovs), None)


def small_model(folder: Path) -> Path:
    """A 2-layer Llama with phi-3-mini's real tokenizer (random weights: speed only)."""
    from fttool.testing import random_llama

    random_llama(folder, PHI3, hidden_size=128, intermediate_size=256, max_position_embeddings=2048)
    return folder


def preprocessing(model_dir: Path, work: Path, rows: int):
    from fttool import data
    from fttool.data.tokenizer import load_tokenizer

    base = [
        f"model.name_or_path={model_dir}",
        "data=alpaca",
        f"data.path={GSM8K}",
        "data.max_length=1024",
        f"data.max_samples={rows}",
    ]
    results = {}
    for nproc in (1, 2):
        spec = spec_for(base + [f"data.num_proc={nproc}", f"data.cache_dir={work / f'cache{nproc}'}"], work)
        tok = load_tokenizer(spec)
        cold = data.prepare_datasets(spec, tok, objectives.of(spec).features)
        hit = data.prepare_datasets(spec, tok, objectives.of(spec).features)
        assert not cold.from_cache and hit.from_cache
        results[nproc] = (cold.seconds, hit.seconds, cold.stats)
    return results


def training(model_dir: Path, work: Path, samples: int, batch: int):
    from fttool.launch import rundir
    from fttool.worker.train import train

    out = {}
    for packing in ("none", "padding_free", "bins"):
        spec = spec_for(
            [
                f"model.name_or_path={model_dir}",
                "data=alpaca",
                f"data.path={GSM8K}",
                "data.max_length=512",
                f"data.max_samples={samples}",
                f"data.packing={packing}",
                "method=full",
                "train.epochs=1",
                f"train.batch_size={batch}",
                "train.grad_accum=1",
                "train.logging_steps=1000",
                "train.save_steps=100000",
                "eval.samples=0",
                f"data.cache_dir={work / 'cache-train'}",
                f"run_name=bench-{packing}",
            ],
            work / "runs",
        )
        run_dir, _ = rundir.prepare(spec, ["bench/data.py"], {})
        summary = train(run_dir)
        out[packing] = (summary["runtime_s"], summary["data"]["trained_tokens"], summary["steps"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=7473, help="rows of GSM8K to preprocess (all: 7473)")
    ap.add_argument("--train-samples", type=int, default=512, help="samples trained for one epoch per packing mode")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch (samples, or rows of max_length for bins)")
    args = ap.parse_args()
    if not GSM8K.is_file() or not PHI3.is_dir():
        sys.exit(f"bench/data.py needs {GSM8K} and {PHI3} (the shared data folder beside the repository).")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.path.insert(0, str(ROOT))
    work = Path(tempfile.mkdtemp(prefix="fttool-bench-"))
    try:
        import logging

        from fttool.logs import quiet_libraries

        quiet_libraries()
        model_dir = small_model(work / "model")
        pre = preprocessing(model_dir, work, args.rows)
        logging.getLogger("fttool").disabled = True  # the training runs print one line each below instead
        t0 = time.perf_counter()
        tr = training(model_dir, work, args.train_samples, args.batch)
        train_wall = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)

    st = pre[1][2]
    print(f"\n== preprocessing: {st.rows:,} GSM8K rows (alpaca), phi-3-mini tokenizer, {os.cpu_count()} cores ==")
    print(
        f"samples {st.samples:,}, tokens {st.tokens:,}, trained {100 * st.trained_tokens / st.tokens:.1f}%, "
        f"truncated {st.truncated}, dropped {st.dropped()}"
    )
    for nproc, (cold, hit, _) in pre.items():
        print(
            f"num_proc={nproc}: tokenize + cache {cold:6.2f} s ({st.rows / cold:8,.0f} rows/s); cache hit {hit * 1000:6.1f} ms "
            f"({cold / hit:,.0f}x faster)"
        )
    print(
        f"\n== training: {args.train_samples} samples, 1 epoch, batch {args.batch}, 2-layer Llama (hidden 128, vocab 32k), "
        f"full fine-tune, {train_wall:.0f} s in all =="
    )
    base_time, trained, _ = tr["none"]
    for packing, (secs, tokens, steps) in tr.items():
        rate = tokens / secs
        print(
            f"packing={packing:<13} {steps:4d} steps {secs:7.2f} s  {rate:9,.0f} trained tokens/s  "
            f"ratio vs padded {base_time / secs:5.2f}x"
        )
    print(
        json.dumps(
            {
                "preprocess": {str(k): {"cold_s": v[0], "hit_s": v[1]} for k, v in pre.items()},
                "train": {k: {"seconds": v[0], "trained_tokens": v[1], "steps": v[2]} for k, v in tr.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
