"""PNG plots from a results folder's results.csv (nothing is re-measured here).

    python -m benchmarks.plots benchmarks/results/<device>

* ``speedup_<op>.png``: per shape (columns) and mode (rows), each provider's speedup over
  bitsandbytes + PEFT (on a CPU the faster of its two paths per case) against M.
* ``roofline.png``: achieved TFLOP/s against arithmetic intensity (FLOPs / Marlin-counted bytes)
  under the copy-bandwidth and GEMM ceilings measured in the same run.
* ``e2e.png``: end-to-end training and decoding tokens/s per arm.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .providers import BNB_PEFT
from .results import CSV_NAME

STYLE = {
    "ours": dict(color="#d62728", linewidth=2.6, marker="o", zorder=5),
    "ours_bf16_fused_down": dict(color="#ff9896", linewidth=1.5, marker="o", linestyle="--"),
    "ours_bf16_split_down": dict(color="#ff7f0e", linewidth=1.5, marker="o", linestyle=":"),
    "reference": dict(color="#7f7f7f", marker="s", linestyle=":"),
    "reference_compiled": dict(color="#9467bd", marker="s"),
    "unsloth_style": dict(color="#2ca02c", marker="^"),
    "dense_bf16": dict(color="#1f77b4", marker="v"),
    "dense_bf16_gemm": dict(color="#17becf", marker="v", linestyle="--"),
    "bnb_gemm_4bit": dict(color="#8c564b", marker="x"),
    "bnb_peft": dict(color="#555555", marker="x"),
    "bnb_peft_cpu_packed": dict(color="#e377c2", marker="x"),
}
BASELINE = "bitsandbytes + PEFT"


def figure_legend(fig, axes, max_columns: int) -> None:
    """One legend under the whole figure, each label once, in the order the panels first show it."""
    handles, labels = [], []
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(max_columns, len(labels)), fontsize=8)

def load(out: Path):
    import pandas as pd

    df = pd.read_csv(out / CSV_NAME, dtype={"r": str, "M": str})
    for col in ("p50", "p20", "p80"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def _pick_rank(sub) -> str | None:
    ranks = sorted({r for r in sub["r"].dropna().unique() if r and r != "nan"}, key=int)
    if not ranks:
        return None
    return "16" if "16" in ranks else ranks[0]


def op_times(df):
    """time_ms medians of the op rows: one row per (op, mode, shape, r, M, provider), M as int."""
    t = df[(df["metric"] == "time_ms") & ~df["op"].isin(["roofline", "e2e_train", "e2e_decode"])].copy()
    t["M"] = t["M"].astype(int)
    # A resumed run may hold a cell twice: keep the latest.
    return t.drop_duplicates(subset=["op", "mode", "shape", "r", "M", "provider"], keep="last")


def speedups(df):
    """Per case: the best bitsandbytes + PEFT time and every other provider's speedup over it."""
    t = op_times(df)
    keys = ["op", "mode", "shape", "r", "M"]
    base = t[t["provider"].isin(BNB_PEFT)].groupby(keys)["p50"].min().rename("bnb_best_ms")
    merged = t[~t["provider"].isin(BNB_PEFT)].join(base, on=keys)
    merged["speedup"] = merged["bnb_best_ms"] / merged["p50"]
    return merged.dropna(subset=["speedup"])


def plot_speedup(df, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import matplotlib.ticker as ticker

    s = speedups(df)
    paths = []
    for op in sorted(s["op"].unique()):
        sub = s[s["op"] == op]
        r = _pick_rank(sub)
        sub = sub[sub["r"] == r]
        shapes = list(dict.fromkeys(sub["shape"]))
        modes = [m for m in ("fwd", "bwd", "fwd+bwd") if m in set(sub["mode"])]
        if not shapes or not modes:
            continue
        fig, axes = plt.subplots(len(modes), len(shapes), figsize=(max(9.0, 4.2 * len(shapes)), 3.2 * len(modes)),
                                 squeeze=False, sharex=True)  # fmt: skip
        for i, mode in enumerate(modes):
            for j, shape in enumerate(shapes):
                ax = axes[i][j]
                cell = sub[(sub["mode"] == mode) & (sub["shape"] == shape)]
                for prov in dict.fromkeys(cell["provider"]):
                    line = cell[cell["provider"] == prov].sort_values("M")
                    ax.plot(line["M"], line["speedup"], label=prov, **STYLE.get(prov, {}))
                ax.axhline(1.0, color="black", linewidth=0.8)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ms = sorted(set(cell["M"]))
                ax.set_xticks(ms, [str(m) for m in ms])
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(ticker.NullFormatter())
                ax.set_title(f"{shape}  {mode}", fontsize=9)
                if j == 0:
                    ax.set_ylabel(f"speedup over {BASELINE}")
                if i == len(modes) - 1:
                    ax.set_xlabel("M (tokens per stream)")
                ax.grid(True, which="both", alpha=0.3)
        figure_legend(fig, axes, max_columns=4)
        device = df["device"].iloc[0]
        fig.suptitle(f"{op}: speedup over {BASELINE} (best mode per case), r={r}, {device}", fontsize=11)
        fig.tight_layout(rect=(0, 0.09, 1, 0.95))
        path = out / f"speedup_{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_roofline(df, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    roof = df[df["op"] == "roofline"].drop_duplicates(subset=["metric"], keep="last").set_index("metric")["p50"]
    if "copy_gbps" not in roof or "gemm_tflops" not in roof:
        return None
    bw, peak = float(roof["copy_gbps"]), float(roof["gemm_tflops"])
    ops = df[~df["op"].isin(["roofline", "e2e_train", "e2e_decode"])]
    wide = ops[ops["metric"].isin(["tflops", "gbps"])].pivot_table(
        index=["op", "provider", "mode", "shape", "r", "M"], columns="metric", values="p50", aggfunc="last"
    ).reset_index()
    if wide.empty:
        return None
    wide["ai"] = wide["tflops"] * 1e3 / wide["gbps"]  # FLOP per byte
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ai = np.logspace(np.log10(max(wide["ai"].min() / 2, 1e-2)), np.log10(wide["ai"].max() * 2), 200)
    ax.plot(ai, np.minimum(peak, ai * bw / 1e3), color="black", linewidth=1.5,
            label=f"roofline: {bw:.0f} GB/s copy, {peak:.2f} TFLOP/s bf16 GEMM (measured)")  # fmt: skip
    shown = [("ours", "fwd", "o"), ("ours", "fwd+bwd", "^"), ("dense_bf16_gemm", "fwd", "s")]
    shown += [(p, "fwd", "x") for p in BNB_PEFT]
    for prov, mode, marker in shown:
        pts = wide[(wide["provider"] == prov) & (wide["mode"] == mode)]
        if pts.empty:
            continue
        style = STYLE.get(prov, {"color": "#555555"})
        ax.scatter(pts["ai"], pts["tflops"], marker=marker, color=style.get("color"), alpha=0.8, s=30,
                   label=f"{prov} {mode}")  # fmt: skip
        if prov == "ours" and mode == "fwd":
            for _, p in pts.iterrows():
                ax.annotate(f"M={p['M']}", (p["ai"], p["tflops"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per Marlin-counted byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"roofline, {df['device'].iloc[0]}", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / "roofline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_e2e(df, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = df[df["op"].isin(["e2e_train", "e2e_decode"]) & (df["metric"] == "tokens_per_s")]
    e = e.drop_duplicates(subset=["op", "provider", "M"], keep="last")
    if e.empty:
        return None
    groups = [("e2e_train", None)] + [("e2e_decode", m) for m in sorted(set(e[e["op"] == "e2e_decode"]["M"]), key=int)]
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.6), squeeze=False)
    for ax, (op, m) in zip(axes[0], groups):
        sub = e[(e["op"] == op) & ((e["M"] == m) if m is not None else True)]
        colors = [STYLE["ours"]["color"] if p.startswith("ours") else "#1f77b4" for p in sub["provider"]]
        lower = (sub["p50"] - sub["p20"]).clip(lower=0)
        upper = (sub["p80"] - sub["p50"]).clip(lower=0)
        ax.bar(sub["provider"], sub["p50"], yerr=[lower, upper], color=colors, alpha=0.85, capsize=3)
        title = "training step" if op == "e2e_train" else f"decoding, batch {m}"
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("target tokens / s")
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.suptitle(f"end to end: {e['shape'].iloc[0]}, {df['device'].iloc[0]}", fontsize=10)
    fig.tight_layout()
    path = out / "e2e.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(out: Path) -> list[Path]:
    df = load(out)
    paths = plot_speedup(df, out)
    for extra in (plot_roofline(df, out), plot_e2e(df, out)):
        if extra is not None:
            paths.append(extra)
    return paths


if __name__ == "__main__":
    for target in sys.argv[1:] or []:
        for p in plot_all(Path(target)):
            print(p)
