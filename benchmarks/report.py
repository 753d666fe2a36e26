"""Reporting of a benchmark result: the console table, Markdown tables and the PNG plot.

``result`` is the dict that ``benchmarks/run.py`` writes as JSON: ``rows`` (one per case and
implementation), ``fits`` (the GPU largest-fit search), ``device``, ``date`` and ``versions``.
"""

from __future__ import annotations

MiB = 1 << 20


def fmt(x, spec):
    """``x`` formatted, or a dash as wide as ``spec`` asks."""
    return format("-", f">{spec.split('.')[0]}") if x is None else format(x, spec)


def print_table(rows: list[dict]) -> None:
    head = f"{'implementation':<24} {'N':>6} {'H':>5} {'V':>6} {'peak MiB':>9} {'/naive':>7} {'ms':>9} " \
           f"{'/naive':>7} {'/3mm':>6} {'grad err':>9}  note"
    case = None
    for r in rows:
        if r["config"] != case:
            case = r["config"]
            print(f"\n== {case}\n{head}")
        pk = r.get("peak_bytes")
        note = r.get("reason") or "; ".join(x for x in (r.get("note"), r.get("err_on") and "err on reduced")
                                            if x)
        status = "" if r.get("status") == "ok" else f"[{r.get('status')}] "
        print(f"{r['impl']:<24} {r['tokens']:>6} {r['H']:>5} {r['V']:>6} {fmt(pk and pk / MiB, '9.1f')} "
              f"{fmt(r.get('peak_vs_naive'), '7.3f')} {fmt(r.get('median_ms'), '9.1f')} "
              f"{fmt(r.get('time_vs_naive'), '7.2f')} {fmt(r.get('time_vs_matmuls'), '6.2f')} "
              f"{fmt(r.get('grad_err'), '9.1e')}  {status}{note[:120]}")


def markdown(result: dict) -> str:
    """The result as Markdown tables, one per case (for docs/benchmarks.md and the README)."""
    out = [f"Device: {result['device']}; {result['date'][:10]}; torch {result['versions'].get('torch')}, "
           f"triton {result['versions'].get('triton')}, liger-kernel {result['versions'].get('liger-kernel')}, "
           f"cut-cross-entropy {result['versions'].get('cut-cross-entropy')}, trl {result['versions'].get('trl')}."]
    case = None
    for r in result["rows"]:
        if r["config"] != case:
            case = r["config"]
            out += ["", f"**{case}**", "",
                    "| implementation | peak MiB | peak / naive | median ms | time / naive | time / 3 matmuls "
                    "| grad err | note |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        if r.get("status") != "ok":
            out.append(f"| {r['impl']} | | | | | | | {r.get('status')}: {(r.get('reason') or '')[:90]} |")
            continue
        pk = r.get("peak_bytes")
        note = "; ".join(x for x in (r.get("note"), r.get("err_on") and "error on a reduced instance") if x)
        out.append(f"| {r['impl']} | {fmt(pk and pk / MiB, '.1f')} | {fmt(r.get('peak_vs_naive'), '.3f')} | "
                   f"{fmt(r.get('median_ms'), '.1f')} | {fmt(r.get('time_vs_naive'), '.2f')} | "
                   f"{fmt(r.get('time_vs_matmuls'), '.2f')} | {fmt(r.get('grad_err'), '.1e')} | {note} |")
    if result.get("fits"):
        out += ["", "**Largest response-token count that fits** (V=128256, H=4096, bf16, doubling)", "",
                "| implementation | fits | first OOM | note |", "|---|---:|---:|---|"]
        for f in result["fits"]:
            out.append(f"| {f['impl']} | {f.get('fits_tokens') or '-'} | {f.get('first_oom_tokens') or '-'} | "
                       f"{(f.get('reason') or f.get('note') or '')[:90]} |")
    return "\n".join(out) + "\n"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["name"] == "tokens" and r.get("status") == "ok"]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r["tokens"], r.get("peak_bytes"), r.get("median_ms")) for r in rows if r["impl"] == name)
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1] / MiB for p in pts], marker="o", label=name)
        axes[1].plot(xs, [p[2] for p in pts], marker="o", label=name)
    r0 = rows[0]
    for ax, ylabel in zip(axes, ("peak extra memory (MiB)", "forward+backward median (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("response tokens")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"NCA loss fwd+bwd, H={r0['H']} V={r0['V']} {r0['dtype']}: {result['device']} ({result['date'][:10]})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
