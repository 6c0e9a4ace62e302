"""SVG bar chart of bench/run's ratios: one bar per figure that has a
peer, the ratio to the peer, the goal drawn as a tick. Rows come on stdin
as bench/run keeps them: figure|ploop|peer|unit|ratio|goal|met."""

import re
import sys
from xml.sax.saxutils import escape

rows = []
for line in sys.stdin:
    parts = line.rstrip("\n").split("|")
    if len(parts) != 7:
        continue
    fig, _ours, _peer, _unit, ratio, goal, met = parts
    try:
        r = float(ratio)
    except ValueError:
        continue
    m = re.search(r"[0-9.]+", goal)
    g = float(m.group(0)) if m else None
    rows.append((fig, r, g, met))

bar_h, gap, left, width = 22, 8, 330, 360
scale = max([1.5] + [r for _, r, _, _ in rows] + [g or 0 for _, _, g, _ in rows])
height = 40 + len(rows) * (bar_h + gap)
out = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" height="{height}" '
    'font-family="sans-serif" font-size="12">',
    f'<text x="10" y="20" font-weight="bold">ratio to the peer measured in the same run '
    "(tick: goal)</text>",
]
for i, (fig, r, g, met) in enumerate(rows):
    y = 34 + i * (bar_h + gap)
    w = width * r / scale
    color = "#3a7d44" if met == "yes" else ("#b03a2e" if met == "NO" else "#777777")
    out.append(f'<text x="10" y="{y + 15}">{escape(fig)}</text>')
    out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>')
    out.append(f'<text x="{left + w + 6:.1f}" y="{y + 15}">{r:.2f}</text>')
    if g is not None:
        gx = left + width * g / scale
        out.append(
            f'<line x1="{gx:.1f}" y1="{y - 3}" x2="{gx:.1f}" y2="{y + bar_h + 3}" '
            'stroke="black" stroke-width="2"/>'
        )
out.append("</svg>")
print("\n".join(out))
