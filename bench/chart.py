"""Draws a results file of bench/run.py as a PNG beside it.

Usage: chart.py bench/results/<time>.json  ->  bench/results/<time>.png

Left: requests/s per scenario (median, whiskers min-max); middle: server CPU
per webhook; right, when the run had a scale scenario: queued deliveries and
RSS over time.
"""

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    path = pathlib.Path(sys.argv[1])
    data = json.loads(path.read_text())
    summary = {k: v for k, v in data["summary"].items() if k != "sink alone"}
    scale = data.get("scale")
    names = list(summary)
    colors = ["#4c72b0" if n.startswith("hookgate") else "#999999" for n in names]

    fig, axes = plt.subplots(1, 3 if scale else 2, figsize=(16 if scale else 11, 4.5))
    rps = [summary[n]["rps"] for n in names]
    low = [summary[n]["rps"] - summary[n]["rps_min"] for n in names]
    high = [summary[n]["rps_max"] - summary[n]["rps"] for n in names]
    axes[0].barh(names, rps, xerr=[low, high], color=colors)
    axes[0].set_xlabel("requests/s (median, min-max)")
    axes[0].invert_yaxis()

    cpu = [summary[n]["cpu_ms_per_1k"] for n in names]
    axes[1].barh(names, cpu, color=colors)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("server CPU ms per 1,000 webhooks (log)")
    axes[1].invert_yaxis()
    axes[1].set_yticklabels([])

    if scale:
        t = [s[0] for s in scale["samples"]]
        queued = [s[1] for s in scale["samples"]]
        rss = [s[2] for s in scale["samples"]]
        ax = axes[2]
        ax.plot(t, queued, color="#999999", label="queued")
        ax.set_xlabel("seconds")
        ax.set_ylabel("deliveries queued")
        right = ax.twinx()
        right.plot(t, rss, color="#4c72b0", label="RSS")
        right.set_ylabel("RSS MiB")
        right.set_ylim(0, max(100, max(rss) * 1.2))
        ax.set_title(f"scale: {scale['queued']:,} queued, destination down, then back")

    args = data["args"]
    fig.suptitle(f"hookgate bench: wrk -c{args['connections']}, {args['duration']:g} s x {args['repeat']}")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=100)
    print(f"chart: {out}")


if __name__ == "__main__":
    main()
