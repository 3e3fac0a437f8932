"""`quantdream batch`: many personalization jobs (subjects x methods) as Ray tasks, one report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """examples:
  quantdream batch jobs.toml --out batch/                      # a local Ray with every core, no set-up
  quantdream batch jobs.toml --out batch/ --num-cpus 2         # at most 2 single-thread jobs at once
  quantdream batch jobs.toml --out batch/ --address ray://head:10001   # an existing cluster
  quantdream batch jobs.toml --out batch/                      # again after a crash: finished jobs are kept

jobs.toml: a [defaults] table and [[job]] entries with subject, method and optionally name, token, init_word,
steps, seed, weights, model, device, checkpoint_every, threads (= the job's CPU request), memory_mib (its memory
request; default: the memory benchmark's figure for the method), set = ["zoodip.n=4", ...]. See docs/batch.md.

Outputs: OUT/runs/<job>/ (what `quantdream personalize` writes), OUT/batch.json, OUT/batch.md.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "batch", help="run many personalization jobs (subjects x methods) on Ray and write one report",
        description="Run every job of a TOML file as a Ray task that requests the CPUs and memory the job needs, "
                    "so jobs never oversubscribe a machine; a killed worker's job is retried from its checkpoint.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("jobs", help="TOML file of jobs ([defaults] and [[job]] entries)")
    a("--out", required=True, help="output folder (OUT/runs/<job>/ per job; run again to continue a batch)")
    a("--address", help="address of an existing Ray cluster (default: start a local one)")
    a("--num-cpus", dest="num_cpus", type=int, default=0,
      help="CPUs of the local Ray (default: every core); 1 runs the jobs one after the other")
    a("--retries", type=int, default=2, help="times a job whose worker died is started again (default 2)")
    return p


def run(args) -> int:
    from ..batch import BatchSettings, read_jobs, run_batch
    if args.retries < 0 or args.num_cpus < 0:
        raise ValueError("--retries and --num-cpus must be >= 0")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {args.out!r} is a file; give a folder")
    jobs = read_jobs(args.jobs, out)

    def show(row: dict) -> None:
        extra = f", {row['steps']} steps, {row['seconds']:.1f} s" if row.get("steps") is not None else ""
        note = f" ({row['note']})" if row.get("note") else ""
        print(f"batch: {row['job']}: {row['status']}{extra}, {row['attempts']} attempt(s){note}",
              file=sys.stderr, flush=True)

    print(f"batch: {len(jobs)} jobs -> {out}", file=sys.stderr, flush=True)
    report = run_batch(jobs, out, BatchSettings(address=args.address, num_cpus=args.num_cpus,
                                                retries=args.retries, callback=show))
    failed = [r["job"] for r in report["rows"] if r["status"] != "ok"]
    print(f"wrote {out / 'batch.md'} ({len(jobs) - len(failed)} of {len(jobs)} jobs ok"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f", {report['wall_seconds']:.0f} s)")
    return 1 if failed else 0
