"""Tile shapes of the GPU recompute schedule (``rowchunk``: cuBLAS tiles and from-logits kernels),
side by side at one case: time, peak memory beyond the gradients, and full-size gradient error.

    python benchmarks/tile_sweep.py --out benchmarks/results/tile_sweep_h100.json \
        --md benchmarks/results/tile_sweep_h100.md

Each (token rows x vocab columns) shape is forced for its run by standing in for
``rowchunk.tile_shape`` (a tuning aid: the package picks its shape from ``config.tile_budget``).
Taller tiles mean fewer token chunks: fewer passes over the weight and fewer bf16 roundings of dW
(``benchmarks/accumulation.py``), at more memory per token row (its gathered hidden row, a float32
dH accumulator row and, unless the matmul adds into float32 unrounded, a dH product row). The
issue-3 memory target is 64 MiB beyond the inputs and their gradients. Each row also carries a
roofline model of its shape (:func:`model_ms`, at the three matmuls' rate measured in the run): a
time above its serial bound is overhead of the implementation, not of the shape. The default run
times the headline case on CUDA; ``--device cpu`` under ``TRITON_INTERPRET=1`` with a tiny
``--case`` only exercises the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
from unittest import mock

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import peers, run
from nca_kernels import config
from nca_kernels.backends import rowchunk, unavailable_reason
from nca_kernels.backends.torch_chunked import accum_dtype, wide_addmm

MiB = 1 << 20


def tile_bytes(rows: int, cols: int, case: peers.Case, device: torch.device) -> int:
    """Scratch of one tile as ``rowchunk.tile_shape`` counts it: logits (rows padded to 16 bytes on
    a GPU) plus the per-row operands."""
    dtype = peers.DTYPES[case.dtype]
    logits = rowchunk.row_stride(cols, dtype, device) * dtype.itemsize
    return rows * (logits + rowchunk.tile_row_bytes(case.H, dtype, device))


def model_ms(rows: int, cols: int, case: peers.Case, device, matmul_flops: float, bandwidth: float):
    """Roofline bounds, in ms, of one forward + backward of the recompute schedule with ``(rows x
    cols)`` tiles. Per tile: the logits matmul and its from-logits pass, the recomputing matmul, the
    in-place gradient pass, and the dH and dW matmuls, which read-modify-write their accumulators.
    Each op costs its FLOPs at ``matmul_flops`` per second and its memory bytes at ``bandwidth``
    bytes per second: ``(overlapped, serial)`` sums the longer of the two per op (compute and memory
    fully overlapped), and both (not at all). Caches and launch gaps are left out."""
    dtype = peers.DTYPES[case.dtype]
    e, acc, h = dtype.itemsize, accum_dtype(dtype).itemsize, case.H
    product = 0 if acc == e or wide_addmm(torch.device(device), dtype) else 2 * e  # a rounded dH product
    dw = 4 if config.weight_grad_accum == "float32" and e < 4 else e
    overlapped = serial = 0.0
    for r in [rows] * (case.tokens // rows) + [case.tokens % rows] * (case.tokens % rows > 0):
        for k in [cols] * (case.V // cols) + [case.V % cols] * (case.V % cols > 0):
            flops = 2 * r * k * h
            logits = (flops, (r * h + k * h + r * k) * e)  # a tile from r hidden rows and k weight rows
            for f, b in [logits, (0, r * k * e),  # forward: the tile, read once by the from-logits pass
                         logits, (0, 2 * r * k * e),  # backward: recomputed, turned into its gradient in place
                         (flops, (r * k + k * h) * e + r * h * (2 * acc + product)),  # dH += grad @ W
                         (flops, (r * k + r * h) * e + 2 * k * h * dw)]:  # dW += grad.T @ h
                overlapped += max(f / matmul_flops, b / bandwidth)
                serial += f / matmul_flops + b / bandwidth
    return 1e3 * overlapped, 1e3 * serial


def shapes(case: peers.Case, device, rows_list, cols_list, max_bytes: int) -> list[tuple[int, int]]:
    out = [(r, min(c, case.V)) for r in rows_list for c in cols_list
           if r <= case.tokens and tile_bytes(r, min(c, case.V), case, device) <= max_bytes]
    return sorted(set(out))


def measure(backend: str, shape, problem, case, device, args, ref) -> dict:
    """One backend with one forced tile shape: peak beyond the gradients, median ms, errors."""
    row = {"backend": backend, "rows": shape[0], "cols": shape[1], "chunks": -(-case.tokens // shape[0]),
           "tile_mib": tile_bytes(*shape, case, device) / MiB}
    with mock.patch.object(rowchunk, "tile_shape", lambda n, weight: (min(n, shape[0]), shape[1])):
        prepared = peers.ours(backend, True)(problem, device, peers.Options())
        grads = sum(x.numel() * x.element_size() for x in prepared.leaves)
        row["extra_mib"] = (run.measure_peak(prepared, device) - grads) / MiB
        row["median_ms"] = (run.time_do_bench(prepared.step, args.rep_ms) if device.type == "cuda"
                            else run.time_interleaved({backend: prepared.step}, device, 1, 0)[0][backend][0])
        got = prepared.step()
        row.update(run.grad_error(got, ref))
        run.clear(prepared)
    return row


def profile(backend: str, problem, device, rows: int = 40) -> str:
    """torch.profiler's table (kernels by total device time, else CPU time) of one recompute step
    with the package's own tile shape, after a warm-up step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    prepared = peers.ours(backend, True)(problem, device, peers.Options())
    prepared.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profiler(activities=activities) as prof:
        prepared.step()
        run.sync(device)
    run.clear(prepared)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--case", default=None, help="B,K,T,H,V (default: the headline case)")
    ap.add_argument("--rows", type=int, nargs="*", default=[512, 768, 1024, 1536, 2048])
    ap.add_argument("--cols", type=int, nargs="*", default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--max-mib", type=float, default=96, help="leave out shapes whose tile scratch exceeds this")
    ap.add_argument("--backends", nargs="*", default=["cuda", "triton"])
    ap.add_argument("--rep-ms", type=int, default=300)
    ap.add_argument("--bandwidth", type=float, default=3.0e12,
                    help="memory bytes/s of the roofline model (default: the H100's measured copy bandwidth)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one step per backend with the package's own tile shape (printed, and "
                         "saved next to --md as *.profile.txt)")
    ap.add_argument("--out")
    ap.add_argument("--md")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    device = torch.device(args.device)
    case = run.HEADLINE
    if args.case:
        b, k, t, h, v = (int(x) for x in args.case.split(","))
        case = dataclasses.replace(case, name="custom", B=b, K=k, T=t, H=h, V=v)
    problem = peers.make_problem(case, device)
    ref = run.References(device).get(problem)
    floor = peers.three_matmuls(problem, device, peers.Options())
    floor_ms = (run.time_do_bench(floor.step, args.rep_ms) if device.type == "cuda"
                else run.time_interleaved({"floor": floor.step}, device, 1, 0)[0]["floor"][0])
    rate = 6 * case.tokens * case.H * case.V / (floor_ms / 1e3)  # the three matmuls' FLOP/s, measured here
    rows, skipped = [], {}
    for backend in args.backends:
        reason = unavailable_reason(backend, device)
        if reason is not None:
            skipped[backend] = reason
            continue
        for shape in shapes(case, device, args.rows, args.cols, int(args.max_mib * MiB)):
            try:
                row = measure(backend, shape, problem, case, device, args, ref)
            except Exception as exc:  # an OOM or a failing shape is reported, not fatal
                row = {"backend": backend, "rows": shape[0], "cols": shape[1],
                       "error": f"{type(exc).__name__}: {exc}"[:300]}
                run.free(device)
            row["time_vs_matmuls"] = row["median_ms"] / floor_ms if "median_ms" in row else None
            row["model_ms"] = model_ms(*shape, case, device, rate, args.bandwidth)
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.profile:
            table = profile(backend, problem, device)
            print(table)
            if args.md:
                shape = rowchunk.tile_shape(case.tokens, problem.weight)
                with open(f"{os.path.splitext(args.md)[0]}.{backend}.profile.txt", "w") as f:
                    f.write(f"{run.device_name(device)}: {case.label()}, tiles of {shape[0]} x {shape[1]}\n{table}")
    result = {"device": run.device_name(device), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "versions": peers.versions(), "source": run.source_state(), "case": case.label(),
              "three_matmuls_ms": floor_ms, "model": {"matmul_flops": rate, "bandwidth": args.bandwidth},
              "skipped": skipped, "rows": rows}
    lines = [f"{result['device']}, {result['date'][:10]}: {case.label()}; the three matmuls {floor_ms:.1f} ms "
             f"({rate / 1e12:.0f} TFLOP/s). Model: each op at that rate and {args.bandwidth / 1e12:.2f} TB/s, "
             "compute and memory overlapped - serial (`model_ms`).", "",
             "| backend | tile rows x cols | token chunks | tile MiB | extra MiB | ms | model ms | / 3 matmuls "
             "| dH err | dW err |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        model = "-".join(f"{x:.1f}" for x in r["model_ms"])
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['rows']} x {r['cols']} | | | | | {model} | | | {r['error'][:60]} |")
            continue
        lines.append(f"| {r['backend']} | {r['rows']} x {r['cols']} | {r['chunks']} | {r['tile_mib']:.0f} | "
                     f"{r['extra_mib']:.0f} | {r['median_ms']:.1f} | {model} | {r['time_vs_matmuls']:.2f} | "
                     f"{r['dh_err']:.1e} | {r['dw_err']:.1e} |")
    print("\n".join(lines))
    for path, text in ((args.out, json.dumps(result, indent=1)), (args.md, "\n".join(lines) + "\n")):
        if path:
            with open(path, "w") as f:
                f.write(text)
    return result


if __name__ == "__main__":
    main()
