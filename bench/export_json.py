"""Memory and time of the JSON export layouts (pf1m, llava) on a large synthetic selection.

Writes N selection rows shaped like the export flow's selection file (instruction, raw answer, a rewrite of about
2 KB, scores, one stored image path each) to a parquet file, then in a fresh process per run writes the layout
with ``tasks.export.write_json_layout`` (streamed, ``JSON_BATCH_ROWS`` rows at a time) and, for comparison, the
way the layouts were written before session 13 (every record in memory, one ``json.dumps`` per file). Prints the
peak RSS and seconds of each, and checks the two wrote the same bytes.

    .venv/bin/python bench/export_json.py                 # N = 200,000
    .venv/bin/python bench/export_json.py --rows 20000    # quicker
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
selection, fmt, how, out = sys.argv[2:6]
import pyarrow.parquet as pq
import tasks.export as texport

started = time.perf_counter()
if how == "streamed":
    texport.write_json_layout(selection, fmt, out, "none")
else:  # before session 13: every record in memory, one json.dumps per file
    rows = pq.read_table(selection).to_pylist()
    for row in rows:
        row["image_refs"] = row["stored_paths"]
    if fmt == "llava":
        files = {"llava.json": [texport.llava_record(r) for r in rows]}
    else:
        files = {}
        for row in rows:
            files.setdefault(f"{row['source']}.json", []).append(texport.pf1m_record(row))
    for name, records in files.items():
        Path(out, name).write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
seconds = time.perf_counter() - started
# VmHWM: this process's own peak; getrusage's ru_maxrss would include the forking parent's RSS (Linux keeps it
# across exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": round(hwm / 1024)}))
"""


def make_selection(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sentence = "The picture shows a red bus parked beside a café, its doors open and a driver waiting. "
    sources = ("vqav2", "gqa", "coco", "textvqa")
    writer = None
    for start in range(0, n, 10_000):
        rows = [
            {
                "sample_id": f"s_{i:09d}", "rewrite_id": f"r_{i:09d}", "source": sources[i % len(sources)],
                "split": "train", "task_type": "vqa",
                "instruction": f"<image>Question {i}: what is happening in this picture?",
                "raw_response": "a bus", "output": f"Answer {i}. " + sentence * 24, "rewrite": sentence * 24,
                "reward": i / n, "rouge": 0.4, "nli": None, "semantic": 0.6, "clipscore": None,
                "clip_details": None, "image_paths": [f"/ws/images/ab/i_{i}.jpg"],
                "stored_paths": [f"images/ab/i_{i}.jpg"],
            }
            for i in range(start, min(n, start + 10_000))
        ]  # fmt: skip
        table = pa.Table.from_pylist(rows)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def run(selection: Path, fmt: str, how: str, out: Path) -> dict:
    out.mkdir(parents=True)
    done = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(selection), fmt, how, str(out)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        selection = Path(tmp) / "selection.parquet"
        make_selection(selection, args.rows)
        print(f"{args.rows:,} rows, selection file {selection.stat().st_size / 1e6:.0f} MB")
        print("| format | how | seconds | peak RSS MB | output MB |")
        print("|---|---|---|---|---|")
        for fmt in ("pf1m", "llava"):
            written = {}
            for how in ("before", "streamed"):
                out = Path(tmp) / f"{fmt}-{how}"
                figures = run(selection, fmt, how, out)
                files = sorted(p for p in out.iterdir() if p.is_file())
                written[how] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
                size = sum(p.stat().st_size for p in files) / 1e6
                print(f"| {fmt} | {how} | {figures['seconds']} | {figures['peak_rss_mb']:,} | {size:.0f} |")
            assert written["before"] == written["streamed"], f"{fmt}: the streamed files differ"
        print("same bytes: yes")


if __name__ == "__main__":
    main()
