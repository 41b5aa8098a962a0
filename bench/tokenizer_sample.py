"""The tokenizer stage's BPE sample with one huge document: time and peak RSS.

    python bench/tokenizer_sample.py [--mb 100] [--smoke]

Writes a jsonl source holding one --mb document (the sample corpus's text repeated), runs
`pipeline run --only tokenizer` with it as the `web` source (code and math are the shipped samples)
and prints the wall time and the peak RSS of the process tree (bench/measure.py), against a baseline
measured in the same run: the same stage on the shipped web sample. The per-source sample cap
(tokenizer.sample_bytes_per_source, 8 MiB) bounds what is read of that document, so the ratios do not
grow with --mb (measured: 20 MB and 100 MB both ~2x the time and ~3x the memory of the baseline, whose
web sample is under the cap; 100 MB took 83 s and 10 GB before the cap applied while reading).
--smoke: a 2 MB document (make test runs it, to keep the bench working).
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.measure import parse_args, ratio, run_measured  # noqa: E402

SAMPLE = REPO / "data" / "sample"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100, help="size of the single document")
    args = parse_args(ap, {"mb": 2})
    work = Path(tempfile.mkdtemp(prefix="bench_tokenizer_sample_"))
    try:
        corpus = work / "corpus"
        corpus.mkdir()
        text = "\n".join(json.loads(line)["text"] for s in ("web", "code", "math")
                         for line in gzip.open(SAMPLE / f"{s}.jsonl.gz"))
        size = args.mb * 1_000_000
        with open(corpus / "huge.jsonl", "w") as f:
            f.write(json.dumps({"text": (text * (size // len(text) + 1))[:size]}) + "\n")
        for s in ("web", "code", "math"):
            with gzip.open(SAMPLE / f"{s}.jsonl.gz", "rb") as src, open(corpus / f"{s}.jsonl", "wb") as dst:
                shutil.copyfileobj(src, dst)

        def tokenizer_stage(web: Path, run: str) -> tuple:
            return run_measured([
                sys.executable, "-m", "pipeline.cli", "run", "--only", "tokenizer", f"run_dir={work / run}",
                f"data.sources.web.path={web}", f"data.sources.code.path={corpus / 'code.jsonl'}",
                f"data.sources.math.path={corpus / 'math.jsonl'}"])[1:]  # (seconds, peak RSS MB)

        base_s, base_rss = tokenizer_stage(corpus / "web.jsonl", "baseline")
        seconds, rss = tokenizer_stage(corpus / "huge.jsonl", "huge")
        print(f"tokenizer stage, shipped web sample (baseline): {base_s:.1f} s, peak RSS {base_rss:,.0f} MB")
        print(f"tokenizer stage, one {args.mb} MB document: {seconds:.1f} s, peak RSS {rss:,.0f} MB "
              f"({seconds / base_s:.2f}x the time, {rss / base_rss:.2f}x the memory of the baseline)")
        ratio(f"tokenizer stage time, one {args.mb} MB document", seconds / base_s, "the shipped web sample's")
        ratio(f"tokenizer stage peak RSS, one {args.mb} MB document", rss / base_rss, "the shipped web sample's")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
