"""Validation cost against the floor: the validate stage vs merely parsing the same file, in one run.

    python -m benchmarks.validate_cost                        # 200,000 chat rows
    python -m benchmarks.validate_cost --source preferences   # 200,000 preference rows
    python -m benchmarks.validate_cost --rows 50000 --repeat 5

The file is a demo source (chat `messages` rows, or prompt/chosen/rejected rows; planted defects
included) repeated to --rows lines, each copy made unique by a reference number. These timings,
interleaved, median of --repeat:
  floor        read the file and `json.loads` every line (try/except for the malformed ones)
  validate     stages.validate.run: read + normalise to the internal schema + content-hash ids,
               rendered sizes and token lengths, the Great Expectations suite, quarantine, PII
               masking, writing the outputs (Data Docs HTML excluded: a one-off render)
  validate, pairs read as row objects   (preferences only) the same with the string-form pairs read as
                                        a Row per line, not as columns (run(..., use_columns=False):
                                        tunegate.pair_columns); its outputs are compared with validate's
  validate, template rendered per row   the same with the probed template layout off
                                        (run(..., use_layouts=False): RenderedSize)
  validate, every row rendered and tokenised   also without the byte bounds
                                        (run(..., use_bounds=False): TokenCounter)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from tunegate.config import Source, load_config

ROOT = Path(__file__).resolve().parents[1]


def make_file(path: Path, n: int, source: str = "domain") -> None:
    lines = (ROOT / f"data/raw/{source}.jsonl").read_text().splitlines()
    with path.open("w") as fh:
        for i in range(n):
            line = lines[i % len(lines)]
            try:
                row = json.loads(line)
                if "messages" in row:
                    row["messages"][0]["content"] = f"{row['messages'][0]['content']} (ref {i})"
                else:
                    row["prompt"] = f"{row['prompt']} (ref {i})"
                line = json.dumps(row)
            except (ValueError, KeyError, IndexError, TypeError):
                pass  # a planted defect: keep it as it is
            fh.write(line + "\n")


def floor(path: Path) -> int:
    n = 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                json.loads(line)
                n += 1
            except ValueError:
                pass
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--source", choices=["domain", "preferences"], default="domain")
    args = parser.parse_args()
    from demo.model import train_tokenizer
    from stages import validate
    from tunegate.io import read_jsonl
    from tunegate.runtime import configure

    configure()
    cfg = load_config(ROOT / "params.yaml").validate_.model_copy(update={"max_invalid_share": 1.0})
    pretrain = read_jsonl(ROOT / "data/pretrain/general.jsonl")[:3000]
    tokenizer = train_tokenizer([r["prompt"] for r in pretrain] + [r["completion"] for r in pretrain], 1024)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "rows.jsonl"
        make_file(data, args.rows, args.source)
        sources = {args.source: Source(path=str(data), role="preference" if args.source == "preferences" else "domain")}

        def run_validate(out: Path) -> None:
            validate.run(cfg, sources, tokenizer, out)

        def run_rows(out: Path) -> None:
            validate.run(cfg, sources, tokenizer, out, use_columns=False)

        def run_rendered(out: Path) -> None:
            validate.run(cfg, sources, tokenizer, out, use_layouts=False)

        def run_exact(out: Path) -> None:
            validate.run(cfg, sources, tokenizer, out, use_layouts=False, use_bounds=False)

        runs = {
            "floor: json.loads per line": lambda out: floor(data),
            "validate": run_validate,
            **({"validate, pairs read as row objects": run_rows} if args.source == "preferences" else {}),
            "validate, template rendered per row": run_rendered,
            "validate, every row rendered and tokenised": run_exact,
        }
        run_validate(Path(tmp) / "warm")  # imports (Great Expectations ~6 s) are paid once, outside the timings
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(args.repeat):
            for k, (name, fn) in enumerate(runs.items()):
                started = time.perf_counter()
                fn(Path(tmp) / f"out-{r}-{k}")
                times[name].append(time.perf_counter() - started)
        metrics = json.loads(json.dumps(validate.run(cfg, sources, tokenizer, Path(tmp) / "last")))
        same = ""
        if args.source == "preferences":
            run_rows(Path(tmp) / "rows")
            last, rows = Path(tmp) / "last", Path(tmp) / "rows"
            identical = all(f.read_bytes() == (rows / f.name).read_bytes() for f in last.iterdir())
            same = f"; outputs of the two ways of reading pairs {'identical' if identical else 'DIFFERENT'}"
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["floor: json.loads per line"]
    print(
        f"{args.rows:,} rows; in {metrics['in']:,} = kept {metrics['kept']:,} "
        f"+ quarantined {metrics['quarantined']:,}; median of {args.repeat} interleaved runs{same}"
    )
    print("| run | seconds | rows/s | × floor |\n|---|---|---|---|")
    for name, seconds in median.items():
        print(f"| {name} | {seconds:.2f} | {args.rows / seconds:,.0f} | {seconds / base:.1f} |")


if __name__ == "__main__":
    main()
