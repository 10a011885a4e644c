"""Draws the chart of `benches/scale.rs`'s table: load rate, reopen time, close time and memory
after open against the number of images (docs/benchmarks.md, "A million images").

    cargo bench --bench scale -- ... | tee scale.log
    python3 benches/support/scale_chart.py scale.log docs/img/scale.svg   # needs matplotlib
"""
import sys

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.fonttype"] = "none"  # text as text: a small SVG
import matplotlib.pyplot as plt  # noqa: E402

rows, sessions = [], []
for line in open(sys.argv[1]):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 12 and cells[0].replace(",", "").isdigit():
        rows.append(cells)
    if len(cells) == 5 and cells[0].isdigit():
        sessions.append(cells)  # session, images, open s, insert 1,000 s, close s
if not rows:
    sys.exit("no table rows in " + sys.argv[1])

size = [int(r[0].replace(",", "")) for r in rows]
load = [float(r[4]) for r in rows]
close = [float(r[6]) for r in rows]
reopen = [float(r[7].split()[0]) for r in rows]
rss = [float(r[8].split()[0]) for r in rows]

panels = [
    ("load, images/s (overall)", load, 3000, "target 3,000/s", None),
    ("reopen, s (after loading)", reopen, 1.0, "target 1 s", 2),
    ("close, s (after loading)", close, 1.0, "about 1 s", 4),
    ("memory after open, MiB", rss, 3 * 1024, "target 3 GiB", None),
]
fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
for ax, (title, ys, target, label, column) in zip(axes, panels):
    ax.plot(size, ys, marker="o")
    if column is not None and sessions:
        # The sessions that follow at the largest size: open, insert 1,000, close.
        xs = [int(r[1].replace(",", "")) for r in sessions]
        ax.plot(xs, [float(r[column]) for r in sessions], "s", color="tab:orange",
                label="later sessions (+1,000 each)")
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("images stored")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="best")
    for x, y in zip(size, ys):
        ax.annotate(f"{y:g}", (x, y), textcoords="offset points", xytext=(0, 5), fontsize=7, ha="center")
fig.suptitle("lookalike at 10k-1M images (benches/scale.rs, 2 cores)", fontsize=11)
fig.tight_layout()
fig.savefig(sys.argv[2], metadata={"Date": None} if sys.argv[2].endswith(".svg") else None)
print("wrote", sys.argv[2])
