"""The regime map in one picture: every sweep of ``opd experiment regimes`` side by side, from the summaries its
reports keep (``bench/results/regimes/<sweep>/summary.json``).

    .venv/bin/python bench/regime_map.py [--results bench/results/regimes] [--target 0.5] [--out PNG ...]

Top row: the compute an off-policy method needs to reach the target over what on-policy distillation needs
(FLOPs, teacher at the student's size; geometric mean over the seeds where both reach it, the bar their range;
above 1: on-policy distillation is cheaper), with the blog's 9x and this issue's 5x marked. Bottom row: each
method's final held-out accuracy (mean ± standard error over seeds) and the warm start's, without which a ratio
cannot be read: where no method moves far from the warm start, the ratios compare noise. Not a test.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SWEEPS = ("horizon", "noise", "entropy", "capacity", "reuse")
OTHERS = ("sft-fresh", "sft-fixed", "dart")
COLOURS = {"opd": "black", "sft-fresh": "tab:blue", "sft-fixed": "tab:orange", "dart": "tab:green", "rl": "tab:red"}


def load(results: Path) -> dict[str, dict]:
    return {s: json.loads((results / s / "summary.json").read_text()) for s in SWEEPS
            if (results / s / "summary.json").is_file()}


def draw(summaries: dict[str, dict], target: float, paths: list[Path]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(summaries), figsize=(4.2 * len(summaries), 7.5), squeeze=False,
                                sharey="row")
    for column, (sweep, summary) in enumerate(summaries.items()):
        points = summary["points"]
        names = [p["point"] for p in points]
        xs = range(len(names))
        top, bottom = axes[0][column], axes[1][column]
        for offset, method in enumerate(m for m in OTHERS if any(m in p["final"] for p in points)):
            key, labelled = f"{method}/opd flops x1 @{target:g}", False
            for x, p in zip(xs, points, strict=True):
                entry = p["ratios"].get(key)
                if not entry or entry["geomean"] is None:
                    continue
                mean, low, high = entry["geomean"], min(entry["values"]), max(entry["values"])
                top.errorbar(x + 0.1 * (offset - 1), mean, yerr=[[max(mean - low, 0.0)], [max(high - mean, 0.0)]],
                             fmt="o", color=COLOURS[method], capsize=3, label=None if labelled else method)
                labelled = True
        for level, style, label in ((1, "-", "1x"), (5, ":", "5x"), (9, "--", "blog's 9x")):
            top.axhline(level, color="grey" if level == 1 else "tab:red", linestyle=style, linewidth=0.8,
                        label=label if column == 0 else None)
        top.set_yscale("log")
        top.set_title(f"{sweep}: other / opd FLOPs to {target:g}")
        top.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        for offset, method in enumerate(m for m in ("opd", *OTHERS, "rl") if any(m in p["final"] for p in points)):
            values = [p["final"].get(method) for p in points]
            shown = [(x + 0.08 * (offset - 2), 100 * v[0], 100 * v[1]) for x, v in zip(xs, values, strict=True) if v]
            bottom.errorbar([s[0] for s in shown], [s[1] for s in shown], yerr=[s[2] for s in shown], fmt="o-",
                            color=COLOURS[method], capsize=2, markersize=4, label=method)
        bottom.plot(list(xs), [100 * p["start"] for p in points], "x--", color="grey", label="warm start")
        bottom.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        bottom.set_title(f"{sweep}: final accuracy (%)")
        for ax in (top, bottom):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    axes[0][0].set_ylabel("FLOPs ratio (> 1: on-policy distillation cheaper)")
    axes[1][0].set_ylabel("held-out greedy accuracy (%)")
    figure.tight_layout()
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("bench/results/regimes"))
    parser.add_argument("--target", type=float, default=0.5, help="the target fraction of the way to the best "
                        "final accuracy at a point (one of the reports' 0.5, 0.7, 0.9)")
    parser.add_argument("--out", type=Path, nargs="+",
                        default=[Path("bench/results/regimes/map.png"), Path("docs/img/regime-map.png")])
    args = parser.parse_args()
    summaries = load(args.results)
    if not summaries:
        raise SystemExit(f"no sweep's summary.json under {args.results}: run opd experiment regimes first")
    draw(summaries, args.target, args.out)
    print(f"{', '.join(summaries)} -> {', '.join(map(str, args.out))}")


if __name__ == "__main__":
    main()
