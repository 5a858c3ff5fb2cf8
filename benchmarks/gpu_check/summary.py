"""summary.md: what ran, what passed, what was cut by the budget and why, from a run's record."""

from __future__ import annotations

from pathlib import Path


def render_summary(record: dict, folder: Path, compare_rows: list[dict], limit: int = 40) -> str:
    env = record.get("environment", {})
    dry = record.get("dry_run")
    lines = [f"# GPU check: {env.get('device', '?')} (`{folder.name}`)", ""]
    if dry:
        lines += ["**Dry run**: planned on this machine, nothing was compiled, tested or timed on a GPU. "
                  "Each phase below lists what a real run does.", ""]  # fmt: skip
    versions = env.get("versions") or env.get("versions_here") or {}
    lines += [f"Commit {env.get('commit', '?')}; triton {env.get('triton', '?')}; "
              + "; ".join(f"{k} {v}" for k, v in versions.items() if k in ("python", "torch", "bitsandbytes")),
              f"Started {record.get('started')}, {record.get('wall_s')} s of a {record.get('budget_s'):.0f} s budget"
              + (f" (planning; the planned phases end by {record.get('planned_end_s')} s)" if dry else "")
              + f"; command `{record.get('command')}`.", ""]  # fmt: skip
    lines += ["| phase | status | wall s | budget s | note |", "|---|---|---|---|---|"]
    for p in record.get("phases", []):
        lines.append(f"| {p['name']} | {p['status']} | {p['wall_s'] if p['wall_s'] is not None else ''} | "
                     f"{p['budget_s'] if p['budget_s'] is not None else ''} | {p['reason']} |")  # fmt: skip
    lines.append("")
    phases = {p["name"]: p for p in record.get("phases", [])}
    comp = phases.get("compile", {}).get("details", {})
    if comp:
        lines += [f"Compile: {comp.get('kernels')} kernel specializations ({comp.get('by_kernel')}) over "
                  f"{comp.get('launches')} launches; warmed: {comp.get('compiled', 'n/a')}; "
                  f"errors: {comp.get('error_count', len(comp.get('errors', [])))}.", ""]  # fmt: skip
    t = phases.get("tests", {}).get("details", {})
    if t:
        if dry:
            lines += [f"Tests: {t.get('collected')} gpu tests collected from {', '.join(t.get('files', []))} "
                      "(list in tests.txt).", ""]  # fmt: skip
        else:
            lines += [f"Tests (`pytest -m gpu {' '.join(t.get('files', []))}`): {t.get('passed')} passed, "
                      f"{t.get('failed')} failed, {t.get('errors')} errors, {t.get('skipped')} skipped, "
                      f"{t.get('skipped_budget')} not started (budget).", ""]  # fmt: skip
            lines += [f"- FAILED {f}" for f in t.get("failures", [])[:30]]
            lines += [""] if t.get("failures") else []
    b = phases.get("bench", {}).get("details", {})
    if b:
        plan = b.get("plan", {})
        ops = b.get("ops") or {}
        lines.append(f"Benchmark preset `{plan.get('preset')}`: {plan.get('cases')} cases, "
                     f"{plan.get('measurements')} planned measurements"
                     + ("." if dry else f"; {b.get('cells_in_results', 0)} provider-cells timed in results.csv "
                        f"(this call: {ops.get('measured')} measured, {ops.get('resumed')} resumed, "
                        f"{len(ops.get('failures') or [])} failed; see environment.json)."))  # fmt: skip
        lines.append("")
    pr = phases.get("predicted", {}).get("details", {})
    lines += [f"Predicted vs measured: {pr.get('note', 'no predictions')}.", ""]
    if compare_rows:
        lines += ["| op | mode | shape | r | M | predicted us | measured us | measured / predicted | status |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in compare_rows[:limit]:
            lines.append(f"| {c['op']} | {c['mode']} | {c['shape']} | {c['r']} | {c['M']} | {c['predicted_us']} | "
                         f"{c['measured_us']} | {c['measured_over_predicted']} | {c['status']} |")  # fmt: skip
        if len(compare_rows) > limit:
            lines.append(f"\n{len(compare_rows) - limit} more rows in predicted_vs_measured.csv.")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
