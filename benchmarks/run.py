"""Forward+backward of the NCA loss from hidden states: every implementation, one run, one method.

    python benchmarks/run.py --device cpu --quick --out cpu_quick.json --plot cpu_quick.png --md cpu_quick.md
    python benchmarks/run.py --foundation --out cpu_foundation.json --md cpu_foundation.md
    python benchmarks/run.py --device cuda --time-budget 300 --skip "ours[torch" --out h100.json --plot h100.png

(committed results live in ``benchmarks/results/``; docs/benchmarks.md has the exact commands)

Per case and implementation: peak bytes (benchmarks/memory.py), median milliseconds (CPU:
repetitions interleaved across implementations after warm-up; GPU: ``triton.testing.do_bench``
median), ratios to naive, and the largest gradient error against a float64 reference. On GPU also
the largest response-token count each implementation fits at V=128256, H=4096 (doubling).
Methods: DESIGN.md section 5; write-up and latest tables: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import peers
from benchmarks.memory import peak_bytes
from benchmarks.peers import Case
from benchmarks.report import fmt, markdown, plot, print_table
from nca_kernels import reference

# float64 reference: sequences in chunks of at most this many logits; a case whose float64 work
# (6*S*T*H*V flops) is over the error budget (--err-flops) is checked on a reduced instance instead
ERR_LOGITS = 1 << 27
ERR_FLOPS = {"cpu": 5e11, "cuda": 5e14}

FOUNDATION = Case("foundation", B=2, K=4, T=512, H=512, V=32000, dtype="fp32", floor=True)
HEADLINE = Case("headline", B=4, K=4, T=1024, H=4096, V=128256, dtype="bf16", floor=True)
TARGETS = {  # issue 2, at the foundation case: (peak / naive, time / three matmuls)
    "ours[torch,recompute]": (0.05, 1.45),
    "ours[torch,group]": (0.15, 1.10),
}


def pair_case(name, n_tokens, T, H, V, dtype):
    """K=2 pairs (so Liger runs the same loss), NCA with alpha=0 (== nca_pair), half prompt."""
    per_seq = T - int(T * 0.5)
    return Case(name, B=max(1, n_tokens // (2 * per_seq)), K=2, T=T, H=H, V=V, dtype=dtype, alpha=0.0)


def sweep(device: str, quick: bool, smoke: bool) -> list[Case]:
    if smoke:
        return [Case("smoke-k4", B=1, K=4, T=32, H=32, V=500, floor=True), pair_case("tokens", 64, 32, 32, 700, "fp32")]
    if device == "cpu":
        if quick:
            return [FOUNDATION] + [pair_case("tokens", n, 256, 256, 32000, "fp32") for n in (256, 512, 1024)]
        return ([FOUNDATION]
                + [pair_case("tokens", n, 512, 512, 32000, "fp32") for n in (512, 2048, 8192)]
                + [pair_case("vocab", 1024, 512, 512, v, "fp32") for v in (128256, 256000)]
                + [pair_case("hidden", 1024, 512, h, 32000, "fp32") for h in (1024, 2048)])
    tokens = (2048, 8192, 32768) if quick else (2048, 8192, 32768, 65536)
    cases = [HEADLINE] + [pair_case("tokens", n, 1024, 4096, 128256, "bf16") for n in tokens]
    if not quick:
        cases += [pair_case("vocab", 8192, 1024, 4096, v, "bf16") for v in (32000, 256000)]
        cases += [pair_case("hidden", 8192, 1024, h, 128256, "bf16") for h in (2048, 8192)]
    return cases


# ---------------------------------------------------------------------------------------------
# shared measurement code (also used by benchmarks/test_bench.py)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def failure(exc: BaseException) -> dict:
    """The status and reason of a row whose implementation raised."""
    return {"status": "oom" if is_oom(exc) else "error", "reason": f"{type(exc).__name__}: {exc}"[:300]}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def clear(prepared: peers.Prepared) -> None:
    for x in prepared.leaves:
        x.grad = None


def measure_peak(prepared: peers.Prepared, device: torch.device) -> int:
    """Peak bytes of one step (on GPU after one warm-up step, so that a Triton autotuner's
    benchmarking buffers are not counted). On CPU the storage tracker is a dispatch mode, under
    which torch.compile does not run: compiled peers are metered eagerly (flagged in the row)."""
    eager = device.type == "cpu" and prepared.compiled
    if device.type == "cuda":  # autotuning and compilation (and their scratch) happen once, not here
        prepared.step()
        clear(prepared)
    with peers._eager_if(eager):
        peak = peak_bytes(prepared.step, device)
    clear(prepared)
    return peak


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps: dict, device: torch.device, reps: int, warmup: int, failed: dict | None = None):
    """Milliseconds per step: ``warmup`` untimed rounds, then ``reps`` rounds, each round running
    every implementation once in turn, so machine noise hits all of them alike. Also returns each
    step's last output (checked against float64 afterwards, so no extra run is needed).
    With ``failed`` (a dict), a step that raises (a peer's first compilation, say) is recorded there
    by name and left out of the later rounds; without it, the error propagates."""
    steps = dict(steps)
    times, last = {name: [] for name in steps}, {}
    for rep in range(-warmup, reps):
        for name, step in list(steps.items()):
            sync(device)
            t0 = time.perf_counter()
            try:
                out = step()
                sync(device)
            except Exception as exc:
                if failed is None:
                    raise
                failed[name] = exc
                del steps[name], times[name]
                continue
            if rep >= 0:
                times[name].append((time.perf_counter() - t0) * 1e3)
            if rep == reps - 1:
                last[name] = out
    return times, last


def time_do_bench(step, rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(step, warmup=max(1, rep_ms // 4), rep=rep_ms, return_mode="median"))


def reference_grads(problem: peers.Problem, device: torch.device, chunk_logits: int = ERR_LOGITS):
    """float64 naive loss and gradients for ``problem`` (on ``device``: CPU here, or the GPU), at full
    size: sequences go through the naive formula a chunk at a time (at most ``chunk_logits`` logits,
    or one sequence), first for the log-probs, then, with the loss gradient on them, for the
    backward; dW sums over the chunks in float64."""
    def f64(x):
        return x.detach().to(device=device, dtype=torch.float64)

    h, w, labels = f64(problem.hidden), f64(problem.weight).requires_grad_(), problem.labels.to(device)
    (s, t), v = labels.shape, w.shape[0]
    step = max(1, chunk_logits // (t * v))
    chunks = [slice(i, min(s, i + step)) for i in range(0, s, step)]
    with torch.no_grad():
        logps = torch.cat([reference.sequence_logprobs(h[c], w, labels[c]) for c in chunks]).requires_grad_()
    loss = reference.nca_loss(logps.view(problem.rewards.shape), f64(problem.ref_logps), f64(problem.rewards),
                              **problem.loss_kwargs)
    (g,) = torch.autograd.grad(loss, logps)
    dh = torch.empty_like(h)
    for c in chunks:
        hc = h[c].requires_grad_()
        reference.sequence_logprobs(hc, w, labels[c]).backward(g[c])
        dh[c] = hc.grad
    return loss.detach(), dh, w.grad


def grad_error(got, ref) -> dict:
    """Largest absolute error of dH and dW, each relative to the largest reference entry."""
    loss, dh, dw = got
    rloss, rdh, rdw = ref

    def rel(x, r):
        if x is None:
            return float("inf")
        x = x.to(device=r.device, dtype=torch.float64)
        return float((x - r).abs().max() / r.abs().max().clamp_min(1e-300))

    return {"grad_err": max(rel(dh, rdh), rel(dw, rdw)), "dh_err": rel(dh, rdh), "dw_err": rel(dw, rdw),
            "loss_err": abs(float(loss) - float(rloss))}


class References:
    """float64 references, one per (problem, solved variant), computed on first use; and the reduced
    instances' problems, one per case, so that every implementation checked on one shares its references."""

    def __init__(self, device: torch.device):
        self.device, self.cache, self.problems = device, {}, {}

    def problem(self, case: Case, device: torch.device) -> peers.Problem:
        if case not in self.problems:
            self.problems[case] = peers.make_problem(case, device)
        return self.problems[case]

    def get(self, problem: peers.Problem):
        key = (id(problem.hidden), problem.loss_type, problem.alpha, problem.beta,
               float(problem.ref_logps.abs().sum()))
        if key not in self.cache:
            # kept in host memory: several full-size float64 gradients would crowd a GPU; the hidden
            # states are kept too, so that their id is not reused by another problem's
            self.cache[key] = problem.hidden, tuple(x.cpu() for x in reference_grads(problem, self.device))
        return self.cache[key][1]


def check_error(adapter, prepared, problem, case, device, opts, refs, got=None,
                err_flops=ERR_FLOPS["cpu"]) -> dict:
    """Error of a step's output (``got``, else one more step) against float64; on a reduced
    instance when the float64 reference of the case would cost more than ``err_flops``."""
    if not prepared.has_grads:
        return {}
    small = case.reduced(err_flops)
    if small is case:
        got = prepared.step() if got is None else got
        solved = prepared.solves or problem
        out = grad_error((got[0], *prepared.to_canonical(got[1], got[2])), refs.get(solved))
        clear(prepared)
        return out
    sp = refs.problem(small, device)
    sprep = adapter(sp, device, opts)
    if isinstance(sprep, str):
        return {"err_note": sprep}
    got = sprep.step()
    out = grad_error((got[0], *sprep.to_canonical(got[1], got[2])), refs.get(sprep.solves or sp))
    out["err_on"] = small.label()
    clear(sprep)
    del sprep, got
    free(device)
    return out


# ---------------------------------------------------------------------------------------------


def base_row(name: str, case: Case) -> dict:
    return {"impl": name, **dataclasses.asdict(case), "tokens": case.tokens, "config": case.label()}


def run_case(case: Case, device: torch.device, opts, args) -> list[dict]:
    impls = select(peers.implementations(device), args.only, args.skip)
    if case.floor:
        impls["three_matmuls"] = peers.three_matmuls
    problem = peers.make_problem(case, device)
    refs = References(device)
    rows, prepared = {}, {}
    for name, adapter in impls.items():
        row = rows[name] = base_row(name, case)
        try:
            prep = adapter(problem, device, opts)
        except Exception as exc:  # a peer that breaks is reported, not fatal
            row.update(failure(exc))
            continue
        if isinstance(prep, str):
            row.update(status="skip", reason=prep)
            continue
        row.update(status="ok", note=prep.note)
        try:
            row["peak_bytes"] = measure_peak(prep, device)
            if device.type == "cpu" and prep.compiled:
                row["note"] = "; ".join(x for x in (row["note"], "peak metered eagerly") if x)
            prepared[name] = prep
        except Exception as exc:
            row.update(failure(exc))
            clear(prep)
            free(device)
    # time
    last = {}
    if device.type == "cpu":
        failed = {}
        times, last = time_interleaved({n: p.step for n, p in prepared.items()}, device, args.reps, args.warmup,
                                       failed)
        for n, exc in failed.items():
            rows[n].update(failure(exc))
            clear(prepared.pop(n))
        free(device)
        for n, p in prepared.items():
            rows[n]["times_ms"] = [round(t, 3) for t in times[n]]
            rows[n]["median_ms"] = statistics.median(times[n])
            clear(p)
    else:
        for n, p in list(prepared.items()):
            try:
                probe = time_interleaved({n: p.step}, device, 1, 0)[0][n][0]  # after the metered run
                if probe > args.rep_ms:  # slow: a few plain timed runs, not do_bench's many
                    times, _ = time_interleaved({n: p.step}, device, args.reps, 0)
                    rows[n].update(times_ms=times[n], median_ms=statistics.median(times[n]),
                                   timing=f"median of {args.reps} timed runs (step slower than --rep-ms)")
                else:
                    rows[n]["median_ms"] = time_do_bench(p.step, args.rep_ms)
            except Exception as exc:
                rows[n].update(failure(exc))
                prepared.pop(n)
            clear(p)
            free(device)
    # errors
    for n, p in prepared.items():
        try:
            rows[n].update(check_error(impls[n], p, problem, case, device, opts, refs, last.pop(n, None),
                                       args.err_flops))
        except Exception as exc:
            rows[n]["err_note"] = f"{type(exc).__name__}: {exc}"[:300]
        clear(p)
        free(device)
    ratios(rows)
    del problem, prepared, refs
    free(device)
    return list(rows.values())


def ratios(rows: dict) -> None:
    base = rows.get("naive", {})
    floor = rows.get("three_matmuls", {})
    for row in rows.values():
        for key, ref, out in (("peak_bytes", base, "peak_vs_naive"), ("median_ms", base, "time_vs_naive"),
                              ("median_ms", floor, "time_vs_matmuls")):
            if row.get(key) is not None and ref.get(key):
                row[out] = row[key] / ref[key]


def select(impls: dict, only, skip=None) -> dict:
    return {k: v for k, v in impls.items()
            if (not only or any(o in k for o in only)) and not any(o in k for o in skip or ())}


def fits_search(device: torch.device, opts, args, deadline) -> list[dict]:
    """Largest response-token count per implementation at V=128256, H=4096, bf16 (doubling)."""
    impls = select(peers.implementations(device), args.only, args.skip)
    alive = {n: None for n in impls}  # name -> largest fit so far
    out = {n: {"impl": n, "fits_tokens": None, "first_oom_tokens": None, "status": "ok"} for n in impls}
    n_tok = args.fit_start
    while alive and n_tok <= args.fit_max:
        if time.monotonic() > deadline:
            for n in alive:
                out[n]["note"] = f"time budget reached before {n_tok} tokens"
            break
        case = pair_case("fit", n_tok, 2048, 4096, 128256, "bf16")
        try:
            problem = peers.make_problem(case, device)
        except Exception as exc:
            if not is_oom(exc):
                raise
            for n in alive:
                out[n]["note"] = f"inputs alone do not fit at {n_tok} tokens"
            break
        for name in list(alive):
            try:
                prep = impls[name](problem, device, opts)
                if isinstance(prep, str):
                    out[name].update(status="skip", reason=prep)
                    alive.pop(name)
                    continue
                prep.step()
                clear(prep)
                out[name]["fits_tokens"] = n_tok
            except Exception as exc:
                if not is_oom(exc):
                    out[name].update(failure(exc))
                out[name]["first_oom_tokens"] = n_tok if is_oom(exc) else None
                alive.pop(name)
            prep = None
            free(device)
        del problem
        free(device)
        n_tok *= 2
    for n in alive:
        out[n].setdefault("note", f"fits the largest tried ({args.fit_max} tokens)")
    return list(out.values())


# ---------------------------------------------------------------------------------------------
# output


def source_state() -> str | None:
    """The commit the package was measured at, "+dirty" when the package or the harness had local changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "nca_kernels", "benchmarks/*.py"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None  # None outside a git checkout


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"


def foundation_summary(rows: list[dict]) -> dict:
    """Issue 2's targets at the foundation case (its own vocabulary), with pass/fail: None where a
    ratio is missing (naive or the matmuls left out of the run)."""
    found = {r["impl"]: r for r in rows if r["name"] == FOUNDATION.name and r.get("V") == FOUNDATION.V}
    out = {}
    for name, (peak_t, time_t) in TARGETS.items():
        r = found.get(name)
        if not r or r.get("status") != "ok":
            continue
        peak, ratio = r.get("peak_vs_naive"), r.get("time_vs_matmuls")
        judged = peak is not None and ratio is not None
        out[name] = {"peak_vs_naive": peak, "peak_target": peak_t, "time_vs_matmuls": ratio, "time_target": time_t,
                     "pass": peak <= peak_t and ratio <= time_t if judged else None}
    if out:
        print("\nissue-2 targets at the foundation case (peak/naive, time/three matmuls):")
        for name, s in out.items():
            verdict = {True: "PASS", False: "FAIL", None: "not judged (naive or the matmuls not run)"}[s["pass"]]
            print(f"  {name:<24} peak {fmt(s['peak_vs_naive'], '.3f')} (<= {s['peak_target']}), "
                  f"time {fmt(s['time_vs_matmuls'], '.2f')}x (<= {s['time_target']}x): {verdict}")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="a short sweep (CPU: under 5 minutes)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one repetition: checks the harness")
    ap.add_argument("--headline", action="store_true",
                    help="only the headline case (H=4096, V=128256, 4x4x1024, bf16) and the fit search")
    ap.add_argument("--foundation", action="store_true",
                    help="only the foundation case (H=512, V=32000, 2x4x512, fp32) with its targets")
    ap.add_argument("--cases", nargs="*", help="sweep cases whose names contain one of these (tokens, vocab, ...)")
    ap.add_argument("--vocab", type=int, nargs="*",
                    help="run each chosen case once per vocabulary size given, e.g. an aligned one beside an odd "
                         "one (a vocabulary resized for added tokens)")
    ap.add_argument("--only", nargs="*", help="implementations whose names contain one of these")
    ap.add_argument("--skip", nargs="*", help="leave out implementations whose names contain one of these")
    ap.add_argument("--no-fit", action="store_true", help="skip the GPU largest-fit search")
    ap.add_argument("--fit-start", type=int, default=4096)
    ap.add_argument("--fit-max", type=int, default=1 << 19)
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds; cases not started by then are recorded as skipped (CPU --quick: 240)")
    ap.add_argument("--reps", type=int, default=None, help="CPU timed rounds (default 5, quick 3, smoke 1)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="CPU untimed rounds after the (untimed) memory run (default 1, quick/smoke 0)")
    ap.add_argument("--rep-ms", type=int, default=300, help="GPU do_bench time per implementation")
    ap.add_argument("--no-compile", action="store_true",
                    help="run Liger/CCE without torch.compile (default on CPU with --quick/--smoke)")
    ap.add_argument("--err-flops", type=float, default=None,
                    help="largest float64 reference (6*S*T*H*V flops) checked at full size; larger cases are "
                         f"checked on a reduced instance (default {ERR_FLOPS}, CPU --quick 1.2e11)")
    ap.add_argument("--logits", choices=("random", "peaked"), default="random",
                    help="inputs: random weights (flat softmax), or trained-looking peaked logits (peers.peaked), "
                         "the only inputs on which the gradient-filtering rows run")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's); 1 is steadier on a shared machine")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--md", default=None, help="also write the tables as Markdown to this file")
    return ap


def main(argv=None) -> dict:
    ap = parser()
    args = ap.parse_args(argv)
    if args.warmup is None:
        args.warmup = 0 if (args.quick or args.smoke) else 1
    if args.err_flops is None:
        args.err_flops = 1.2e11 if (args.quick and args.device == "cpu") else ERR_FLOPS[args.device]
    if args.time_budget is None and args.quick and args.device == "cpu":
        args.time_budget = 240.0
    if args.reps is None:
        args.reps = 1 if args.smoke else 3 if (args.quick or args.device == "cuda") else 5
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    compile_off = args.no_compile or (device.type == "cpu" and (args.quick or args.smoke))
    opts = peers.Options(compile_peers=not compile_off)
    start = time.monotonic()
    deadline = start + args.time_budget if args.time_budget else float("inf")
    if args.headline or args.foundation:
        cases = [HEADLINE] if args.headline else [FOUNDATION]
    else:
        cases = sweep(args.device, args.quick, args.smoke)
    if args.cases:
        cases = [c for c in cases if any(name in c.name for name in args.cases)]
    if args.vocab:
        cases = [dataclasses.replace(c, V=v) for c in cases for v in args.vocab]
    cases = [dataclasses.replace(c, logits=args.logits) for c in cases]

    result = {
        "device": device_name(device), "device_type": device.type,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": peers.versions(), "source": source_state(), "python": platform.python_version(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "peers_compiled": opts.compile_peers,
        "settings": {k: getattr(args, k) for k in ("reps", "warmup", "err_flops", "rep_ms", "time_budget", "logits")},
        "torch_threads": torch.get_num_threads(),
        "method": {"peak": "benchmarks/memory.py peak_bytes",
                   "time": f"median of {args.reps} interleaved rounds after {args.warmup} warm-up rounds"
                   if device.type == "cpu" else "triton.testing.do_bench median",
                   "grad_err": "max |g - g64| / max |g64| over dhidden and dweight, float64 naive reference"},
        "rows": [], "fits": [],
    }
    def save():  # after every case, so a run cut short still leaves its results
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1, default=str)

    for case in cases:
        if time.monotonic() > deadline:
            result["rows"].append({**base_row("*", case), "status": "skip", "reason": "time budget"})
            continue
        t0 = time.monotonic()
        rows = run_case(case, device, opts, args)
        print_table(rows)
        print(f"   ({time.monotonic() - t0:.0f} s)", flush=True)
        result["rows"].extend(rows)
        save()
        if case.name == HEADLINE.name and device.type == "cuda" and not (args.no_fit or result["fits"]):
            result["fits"] = fits_search(device, opts, args, deadline)
            save()
    result["foundation"] = foundation_summary(result["rows"])
    if result["fits"]:
        print("\nlargest response-token count that fits (V=128256, H=4096, bf16, T=2048 half prompt):")
        for f in result["fits"]:
            print(f"  {f['impl']:<24} fits {f.get('fits_tokens')}  first OOM {f.get('first_oom_tokens')}  "
                  f"{f.get('reason') or f.get('note') or ''}")
    result["elapsed_s"] = round(time.monotonic() - start, 1)
    if hasattr(os, "getloadavg"):  # a busy machine makes absolute times noisy (ratios are side by side)
        result["load_avg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\n{result['device']}; total {result['elapsed_s']} s")
    save()
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(result))
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
