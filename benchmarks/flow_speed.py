"""Speed of one VGF transport step (kernel + SVGD direction + update) against a naive loop implementation.

The scorer is excluded: ``grad_fn`` returns a fixed, precomputed gradient, so the time is the transport core
alone. The naive reference does the same maths with Python loops over groups and particle pairs; the benchmark
checks both give the same particles before timing. For scale, one *scorer* step (SmolLM2-135M forward + backward,
8 particles x 20 tokens) took ~0.5 s on 2 CPU cores when the transport was designed; the last column compares
against that.

    python benchmarks/flow_speed.py            # full table, writes benchmarks/results/flow_speed.json + docs
    python benchmarks/flow_speed.py --quick    # tiny smoke run, writes nothing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch

from vgf_llm.flow import transport

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Transport core speed (benchmarks/flow_speed.py)"
SCORER_STEP_MS = 500.0  # one SmolLM2 scorer step (8 x 20 tokens, 16 layers) on 2 cores, measured at design time
STEP_SIZE, ALPHA = 0.1, 1.0


def vectorised_step(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """One step of the library's transport with a free scorer (fixed gradient)."""
    moved, _ = transport(x, grad_fn=lambda _: (None, grad), steps=1, step_size=STEP_SIZE, alpha=ALPHA)
    return moved


def naive_step(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The same update written the obvious way: loops over groups and particle pairs, median by sorting."""
    shape, (g, n) = x.shape, x.shape[:2]
    x, grad = x.reshape(g, n, -1), grad.reshape(g, n, -1)
    out = x.clone()
    for b in range(g):
        d2 = [[float(((x[b, i] - x[b, j]) ** 2).sum()) for j in range(n)] for i in range(n)]
        s2 = statistics.median_low([d2[i][j] for i in range(n) for j in range(n) if i != j]) / (2 * math.log(n + 1))
        for i in range(n):
            phi = torch.zeros_like(x[b, i])
            for j in range(n):
                k = math.exp(-d2[i][j] / (2 * s2))
                phi += k * grad[b, j] / ALPHA + k * (x[b, i] - x[b, j]) / s2
            out[b, i] = x[b, i] + STEP_SIZE * phi / n
    return out.reshape(shape)


def time_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_case(shape: tuple[int, int], n: int, groups: int, repeats: int, naive_budget_s: float) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(groups, n, *shape, generator=gen)
    grad = torch.randn(groups, n, *shape, generator=gen)
    start = time.perf_counter()
    reference = naive_step(x, grad)  # doubles as the naive warm-up
    naive_once_s = time.perf_counter() - start
    torch.testing.assert_close(vectorised_step(x, grad), reference, rtol=1e-4, atol=1e-4)
    vec_ms = time_ms(lambda: vectorised_step(x, grad), repeats, warmup=2)
    naive_repeats = max(1, min(repeats, int(naive_budget_s / max(naive_once_s, 1e-9))))
    naive_ms = time_ms(lambda: naive_step(x, grad), naive_repeats, warmup=0)
    return {"shape": list(shape), "N": n, "groups": groups, "vectorised_ms": vec_ms, "naive_ms": naive_ms,
            "ratio": naive_ms / vec_ms, "repeats": repeats, "naive_repeats": naive_repeats}


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0]  # the machine is shared: a high load makes every number here slower and noisier
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} (threads={torch.get_num_threads()}), float32, "
            f"1-min load average {load:.1f} at the end of the run")


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        HEADING,
        "",
        f"Machine: {machine()}. Command: `{command}`.",
        "",
        "One transport step (pairwise kernel, median bandwidth, SVGD direction with repulsion, update, trace) with "
        "the scorer excluded (fixed gradient). Naive = Python loops over groups and particle pairs, same maths "
        f"(checked equal). Median of repeats. Last column: vectorised time as a share of one ~{SCORER_STEP_MS:.0f} ms "
        "SmolLM2 scorer step (8 particles x 20 tokens, 2 cores), whose cost grows with tokens. "
        "The loop does N^2 vector operations, the vectorised step a fixed number of passes over the particles plus "
        "three N x N x (T*d) matmuls, so the ratio grows with N.",
        "",
        "| particle shape | N | groups | vectorised ms | naive ms | naive / vectorised | vs scorer step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['N']} | {r['groups']} | {r['vectorised_ms']:.2f} | "
                     f"{r['naive_ms']:.1f} | {r['ratio']:.1f}x | {r['vectorised_ms'] / SCORER_STEP_MS:.1%} |")
    return "\n".join(lines) + "\n"


def write_docs(section: str, path: Path) -> None:
    """Replace only this benchmark's section of docs/benchmarks.md (other sections belong to other scripts)."""
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nMeasured numbers for vgf_llm; every section names the script and command that produced it.\n"
    )
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, smoke run only; implies --no_write")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per case (median reported)")
    p.add_argument("--naive_budget_s", type=float, default=10.0, help="caps naive repeats per case")
    p.add_argument("--no_write", action="store_true", help="print only; do not write JSON or docs")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 by default because on a shared machine 2 threads stall (OpenMP waits)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        cases = [((4, 16), n, g) for n in (4, 8) for g in (1, 2)]
    else:
        shapes = [(64, 576), (256, 896)]  # response tokens x hidden: SmolLM2-135M, Qwen2.5-0.5B
        cases = [(s, n, 1) for s in shapes for n in (8, 16, 64)] + [(s, 8, 4) for s in shapes]
    rows = []
    for shape, n, groups in cases:
        rows.append(bench_case(shape, n, groups, args.repeats, args.naive_budget_s))
        print(f"done {shape} N={n} G={groups}: {rows[-1]['vectorised_ms']:.2f} ms", flush=True)
    command = "python benchmarks/flow_speed.py" + (" --quick" if args.quick else "")
    command += f" --repeats {args.repeats}" if args.repeats != 5 else ""
    command += f" --threads {args.threads}" if args.threads != 1 else ""
    table = markdown(rows, command)
    print(table)
    if not (args.no_write or args.quick):
        out = ROOT / "benchmarks" / "results" / "flow_speed.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine(), "command": command, "rows": rows}, indent=2) + "\n")
        write_docs(table, ROOT / "docs" / "benchmarks.md")
        print(f"wrote {out.relative_to(ROOT)} and docs/benchmarks.md")
    return rows


if __name__ == "__main__":
    main()
