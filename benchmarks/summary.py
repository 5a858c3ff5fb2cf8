"""Regenerate the README's benchmark table from the results folders (nothing is re-measured).

    python -m benchmarks.summary            # rewrite README.md between the bench markers
    python -m benchmarks.summary --print    # print the table instead

Every figure names its source: the device folder's results.csv, the metric, the filters (shape,
r) and the commit and command of the run that measured it. GPU folders come first. The static
cost report's folders (``static-sm<arch>-triton<version>``, ``python -m benchmarks.static``) get
their own block after the measured ones, labelled as predicted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .env import REPO, RESULTS
from .results import CSV_NAME, ENV_NAME, read

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
STATIC_PREFIX = "static-"
README = REPO / "README.md"


def result_dirs(root: Path = RESULTS, static: bool = False) -> list[Path]:
    """Folders holding a results.csv of this suite's schema (GPU devices first); ``static``: the
    static cost report's folders instead of the measured ones."""
    found = []
    for csv_path in sorted(root.glob(f"*/{CSV_NAME}")):
        if csv_path.parent.name.startswith(STATIC_PREFIX) != static:
            continue
        try:
            read(csv_path)
        except (ValueError, OSError):
            continue  # another tool's results (e.g. benchmarks/results/cpu/)
        found.append(csv_path.parent)
    return sorted(found, key=lambda d: (d.name.startswith("cpu"), d.name))


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows), ""]


def _by_m(frame, ms, value: str, fmt) -> list[list[str]]:
    rows = []
    for (op, mode), cell in frame.groupby(["op", "mode"], sort=False):
        got = dict(zip(cell["M"], cell[value]))
        rows.append([op, mode, *(fmt(got[m]) if m in got else "" for m in ms)])
    return rows


def _source_line(d: Path, env: dict) -> str:
    runs = env.get("runs") or [{}]
    commits = sorted({str(r.get("commit")) for r in runs if r.get("commit")}) or [str(env.get("commit", "?"))]
    loads = [r.get("load_average_start") for r in runs if r.get("load_average_start")]
    command = env.get("command", "python -m benchmarks.run")
    line = f"Source: `{_rel(d / CSV_NAME)}` (commit {', '.join(commits)}; `{command}`"
    if loads:
        line += f"; load average at start {loads[-1]}"
    if env.get("torch_threads"):
        line += f"; {env['torch_threads']} torch thread(s)"
    return line + f"; `ours` ran the `{env.get('ours_backend', '?')}` backend)."


def _op_tables(df) -> list[str]:
    from .plots import speedups

    ours = speedups(df)
    ours = ours[ours["provider"] == "ours"]
    if ours.empty:
        return []
    shapes = list(dict.fromkeys(ours["shape"]))
    shape = next((x for x in shapes if x.startswith("llama3.1-8b.q")), shapes[0])
    sub = ours[ours["shape"] == shape]
    r = "16" if "16" in set(sub["r"]) else sorted(set(sub["r"]), key=int)[0]
    sub = sub[sub["r"] == r]
    ms = sorted(set(sub["M"]))
    head = ["op", "mode", *(f"M={m}" for m in ms)]
    lines = [f"Speedup of `ours` over bitsandbytes + PEFT (> 1: ours is faster), {shape}, r={r}: time_ms p50 of the "
             "faster `bnb_peft*` provider of each cell / time_ms p50 of `ours`.", ""]  # fmt: skip
    lines += _table(head, _by_m(sub, ms, "speedup", _fmt_ratio))
    lines += _down_table(df, shape, r, ms, head)
    fr = df[(df["metric"] == "roofline_frac") & (df["provider"] == "ours") & (df["shape"] == shape) & (df["r"] == r)]
    if not fr.empty:
        fr = fr.assign(M=fr["M"].astype(int)).drop_duplicates(subset=["op", "mode", "M"], keep="last")
        lines += [f"Fraction of the measured roofline reached by `ours` (metric `roofline_frac`), {shape}, r={r}:", ""]
        lines += _table(head, _by_m(fr, ms, "p50", lambda x: f"{x:.3g}"))
    return lines


def _down_table(df, shape: str, r: str, ms, head) -> list[str]:
    """Both placements of the down-projection (bf16 adapters), where measured (CUDA)."""
    from .plots import op_times

    t = op_times(df)
    t = t[(t["shape"] == shape) & (t["r"] == r)]
    fused = t[t["provider"] == "ours_bf16_fused_down"].set_index(["op", "mode", "M"])["p50"]
    split = t[t["provider"] == "ours_bf16_split_down"].set_index(["op", "mode", "M"])["p50"]
    both = (split / fused).dropna()
    if both.empty:
        return []
    frame = both.rename("ratio").reset_index()
    lines = [f"Down-projection placement (bf16 adapters), {shape}, r={r}: time_ms p50 of `ours_bf16_split_down` / "
             "`ours_bf16_fused_down` (> 1: computing it inside the base K loop is faster).", ""]  # fmt: skip
    return lines + _table(head, _by_m(frame, ms, "ratio", _fmt_ratio))


def _e2e_table(df) -> list[str]:
    import pandas as pd

    e = df[df["op"].isin(["e2e_train", "e2e_decode"])]
    e = e.drop_duplicates(subset=["op", "provider", "M", "metric"], keep="last")
    if e.empty:
        return []
    dec = sorted(set(e[e["op"] == "e2e_decode"]["M"]), key=int)

    def val(op, arm, metric, m=None):
        x = e[(e["op"] == op) & (e["provider"] == arm) & (e["metric"] == metric)]
        x = x if m is None else x[x["M"] == m]
        return None if x.empty or pd.isna(x["p50"].iloc[0]) else float(x["p50"].iloc[0])

    rows = []
    for arm in dict.fromkeys(e["provider"]):
        tr, mem = val("e2e_train", arm, "tokens_per_s"), val("e2e_train", arm, "peak_mem_mib")
        cells = [arm, f"{tr:.1f}" if tr else "", f"{mem:.0f}" if mem else ""]
        cells += [f"{v:.2f}" if (v := val("e2e_decode", arm, "tokens_per_s", b)) else "" for b in dec]
        rows.append(cells)
    lines = [f"End to end ({e['shape'].iloc[0]}, r={e['r'].iloc[0]}; rows `e2e_train` / `e2e_decode`, "
             "metrics `tokens_per_s` p50 and `peak_mem_mib`):", ""]  # fmt: skip
    head = ["arm", "train tokens/s", "train peak MiB", *(f"decode tokens/s, batch {b}" for b in dec)]
    return lines + _table(head, rows)


def device_section(d: Path) -> list[str]:
    from .plots import load

    df = load(d)
    env = json.loads((d / ENV_NAME).read_text()) if (d / ENV_NAME).exists() else {}
    lines = [f"#### {env.get('device', d.name)} (`{d.name}`)", "", _source_line(d, env), ""]
    roof = df[df["op"] == "roofline"].drop_duplicates(subset=["metric"], keep="last").set_index("metric")["p50"]
    if "copy_gbps" in roof and "gemm_tflops" in roof:
        lines += [f"Measured ceilings (rows `roofline`): copy {roof['copy_gbps']:.1f} GB/s, "
                  f"bf16 GEMM {roof['gemm_tflops']:.2f} TFLOP/s.", ""]  # fmt: skip
    lines += _op_tables(df)
    lines += _e2e_table(df)
    skipped = (env.get("e2e") or {}).get("skipped") or {}
    lines += [f"End to end: `{arm}` not measured: {why}." for arm, why in skipped.items()]
    if skipped:
        lines.append("")
    plots = sorted(p.name for p in d.glob("*.png"))
    if plots:
        lines += ["Plots: " + ", ".join(f"[{p}]({_rel(d / p)})" for p in plots) + ".", ""]
    return lines


# ------------------------------------------------------------------------------------ static report
STATIC_CASES = (("flare_add_relu", "fwd", 1), ("flare_add_relu", "fwd", 16), ("flare_add_relu", "fwd", 4096),
                ("flare_add_relu", "bwd", 4096), ("lora", "fwd", 1), ("lora", "fwd", 16), ("lora", "fwd", 4096),
                ("lora", "bwd", 4096))  # fmt: skip
STATIC_ANCHORS = (("w4a16_gemm", "gemlite", 1), ("w4a16_gemm", "gemlite", 16), ("w4a16_gemm", "gemlite", 4096),
                  ("nf4_dequant", "bnb_dequant", 0), ("nf4_dequant", "bnb_dequant_code", 0))  # fmt: skip


def _num(x, fmt: str = "{:.0f}") -> str:
    import math

    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _bound(get) -> str:
    shares = {k: get(f"bound_{k}_h200") for k in ("hbm", "tensor", "issue")}
    shares = {k: v for k, v in shares.items() if v is not None}
    if not shares:
        return ""
    top = max(shares, key=shares.get)
    return top if shares[top] > 0.995 else f"{top} ({shares[top]:.0%})"


def static_section(d: Path) -> list[str]:
    """The static report of one folder: ours beside the anchors, predicted times (not measured)."""
    from .plots import load

    df = load(d)
    env = json.loads((d / ENV_NAME).read_text()) if (d / ENV_NAME).exists() else {}
    shapes = list(dict.fromkeys(df["shape"]))
    shape = next((x for x in shapes if x.startswith("llama3.1-8b.q")), shapes[0] if shapes else "")
    sub = df[df["shape"] == shape].drop_duplicates(subset=["op", "provider", "mode", "M", "metric"], keep="last")
    values = {(r.op, r.provider, r.mode, str(r.M), r.metric): r.p50 for r in sub.itertuples()}

    def getter(op, prov, mode, m):
        return lambda metric: values.get((op, prov, mode, str(m), metric))

    head = ["op", "mode", "M", "provider", "registers", "spill B", "warp-inst / weight", "programs", "waves",
            "H100 us", "H200 us", "bound (H200)", "roofline H200 us", "dense bf16 H200 us"]  # fmt: skip
    rows = []
    for op, mode, m in STATIC_CASES:
        ref = getter(op, "roofline", mode, m)("floor_us_h200")
        dense = getter(op, "dense_bf16_gemm", mode, m)("predicted_us_h200")
        for prov in ("ours", "ours_bf16_fused_down"):
            g = getter(op, prov, mode, m)
            if g("launches") is None:
                continue
            rows.append([op, mode, str(m), prov, _num(g("registers")), _num(g("spill_bytes")),
                         _num(g("warp_inst_per_weight"), "{:.2f}"), _num(g("programs")), _num(g("waves")),
                         _num(g("predicted_us_h100"), "{:.1f}"), _num(g("predicted_us_h200"), "{:.1f}"), _bound(g),
                         _num(ref, "{:.1f}"), _num(dense, "{:.1f}")])  # fmt: skip
    for op, prov, m in STATIC_ANCHORS:
        g = getter(op, prov, "fwd", m)
        if g("predicted_us_h200") is None:
            continue
        rows.append([op, "fwd", str(m) if m else "any", prov, _num(g("registers")), _num(g("spill_bytes")),
                     _num(g("warp_inst_per_weight"), "{:.2f}"), _num(g("programs")), _num(g("waves")),
                     _num(g("predicted_us_h100"), "{:.1f}"), _num(g("predicted_us_h200"), "{:.1f}"), _bound(g), "",
                     ""])  # fmt: skip
    arch, version, commit = env.get("arch", "?"), env.get("triton", "?"), env.get("commit", "?")
    title = f"#### Static cost report, sm_{arch}, triton {version} (`{d.name}`): predicted"
    lines = [title, "",
             f"Predicted from the compiled code, not measured: `{_rel(d / CSV_NAME)}` (commit {commit}; "
             f"`{env.get('command', 'python -m benchmarks.static')}`). {shape}, r=16, bf16 activations, NF4 "
             "blocksize 64 with double quantization. `ours` = fp32 LoRA factors (as the GPU benchmark), "
             "`ours_bf16_fused_down` = bf16 factors; registers / spills / warp-inst per weight / programs / waves "
             "are the weight kernel's "
             "(`flare_fwd_kernel` in fwd, `flare_dx_kernel` in bwd; from 128 rows in fwd and 512 in bwd, "
             "`nf4_dequant_kernel`, whose dense weight torch's GEMM multiplies), H100 / H200 us the sum over every "
             "launch of the op, the GEMMs priced as dense bf16 ones. Anchors: `gemlite` = GemLite's 4-bit GEMM alone on M rows (one stream, no LoRA), `bnb_dequant*` = "
             "bitsandbytes' Triton NF4 dequantization (independent of M). How the prediction is made: "
             "[benchmarks/README.md](benchmarks/README.md#static-cost-report).", ""]  # fmt: skip
    lines += _table(head, rows)
    launches = sub[sub["provider"].str.startswith("ours:") & (sub["op"] == "flare_add_relu") & (sub["M"] == "4096")]
    lrows = []
    for (prov, mode), _ in launches.groupby(["provider", "mode"], sort=False):
        g = getter("flare_add_relu", prov, mode, 4096)
        per = g("warp_inst_per_weight")
        per_elem = g("warp_inst_per_elem")
        if per is not None:
            per_txt = _num(per, "{:.2f}")
        elif per_elem is not None:
            per_txt = _num(per_elem, "{:.3f}") + " per elem"
        else:
            per_txt = "library GEMM, priced as dense"
        lrows.append([mode, prov.split(":", 1)[1], _num(g("registers")), _num(g("spill_bytes")), per_txt,
                      _num(g("programs")), _num(g("waves")), _num(g("predicted_launch_us_h200"), "{:.1f}"),
                      _bound(g)])  # fmt: skip
    if lrows:
        lines += ["Every launch of `ours` (fp32 factors), flare_add_relu, M=4096 (provider `ours:<kernel>`; "
                  "`lora_down` / `lora_reduce` stream activations, not weights: warp-instructions per element):", ""]
        lines += _table(["mode", "kernel", "registers", "spill B", "warp-inst / weight", "programs", "waves",
                         "H200 us", "bound (H200)"], lrows)  # fmt: skip
    fails = env.get("compile_failures") or {}
    if fails:
        lines += [f"Compile failures: {len(fails)} (listed in `environment.json`).", ""]
    plots = sorted(p.name for p in d.glob("*.png"))
    if plots:
        lines += ["Plots: " + ", ".join(f"[{p}]({_rel(d / p)})" for p in plots) + ".", ""]
    return lines


def render(root: Path = RESULTS) -> str:
    dirs = result_dirs(root)
    lines = ["## Benchmarks", "",
             "Generated by `python -m benchmarks.summary` from the committed results under `benchmarks/results/` "
             "(rerun: `python -m benchmarks.run`; how to read them: [benchmarks/README.md](benchmarks/README.md)). "
             "CPU times are indicative only; only GPU times count as absolute figures.", ""]  # fmt: skip
    if not dirs:
        lines += ["No results committed yet.", ""]
    for d in dirs:
        lines += device_section(d)
    for d in result_dirs(root, static=True):
        lines += static_section(d)
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path = README, root: Path = RESULTS) -> bool:
    """Replace the text between the bench markers; False when the markers are missing."""
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        print(f"{readme}: markers {BEGIN} / {END} not found; README left unchanged", file=sys.stderr)
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + BEGIN + "\n" + render(root) + END + tail, encoding="utf-8")
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--print", action="store_true", help="print the table, leave README.md alone")
    p.add_argument("--results", type=Path, default=RESULTS, help="results root (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.print:
        print(render(args.results))
        return 0
    return 0 if update_readme(root=args.results) else 1


if __name__ == "__main__":
    sys.exit(main())
