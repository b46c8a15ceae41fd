"""The round report's timeline: HTTP requests in flight over time, stacked by stage, as inline SVG text.

Drawn by hand (rectangles, lines, text) rather than with matplotlib so that a round of thousands of requests
stays a small, exact picture: one rectangle per stage and step of the in-flight count.
"""

import html
import math
from collections.abc import Sequence

from tasks.round.server_load import RequestSpan

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 48, 130, 16, 36
STAGE_COLOURS = {"instruction": "#3182bd", "classify": "#31a354", "instance": "#e6550d", "dedup": "#756bb1"}
OTHER_COLOUR = "#969696"


def stacked_steps(spans: Sequence[RequestSpan]) -> list[tuple[float, float, dict[str, int]]]:
    """Requests in flight per stage between consecutive send/receive times.

    Args:
        spans: The requests, any order.

    Returns:
        (start, end, {stage: requests in flight}) for each stretch of time over which no count changes,
        relative to the first send, in time order; stretches with nothing in flight included.
    """
    if not spans:
        return []
    origin = min(s.sent_at for s in spans)
    events = sorted(
        [(s.received_at - origin, -1, s.stage) for s in spans]
        + [(s.sent_at - origin, 1, s.stage) for s in spans]
    )
    counts: dict[str, int] = {}
    steps: list[tuple[float, float, dict[str, int]]] = []
    for i, (t, delta, stage) in enumerate(events):
        counts[stage] = counts.get(stage, 0) + delta
        following = events[i + 1][0] if i + 1 < len(events) else t
        if following > t:
            steps.append((t, following, {k: v for k, v in counts.items() if v}))
    return steps


def _ticks(high: float, target: int = 6) -> list[float]:
    """Round ticks (steps of 1, 2 or 5 times a power of ten) from 0 to `high`, about `target` of them."""
    if high <= 0:
        return [0.0]
    power = 10.0 ** math.floor(math.log10(high / target))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= high / target)
    return [round(i * step, 10) for i in range(int(high / step + 1e-9) + 1)]


def timeline_svg(spans: Sequence[RequestSpan], concurrency: int, busy_fraction: float) -> str:
    """An SVG element: requests in flight over the round's generation, stacked by stage, with the concurrency.

    Args:
        spans: The round's HTTP requests.
        concurrency: Requests the client kept in flight at most (a dashed line).
        busy_fraction: Share of the time at that concurrency (in the title).

    Returns:
        `<svg ...>...</svg>` text with no script, style sheet or external reference; empty for no spans.
    """
    steps = stacked_steps(spans)
    if not steps:
        return ""
    wall = steps[-1][1]
    peak = max(concurrency, *(sum(c.values()) for _, _, c in steps))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + plot_w * t / wall

    def y(n: float) -> float:
        return TOP + plot_h * (1 - n / peak)

    stages = list(dict.fromkeys(s.stage for s in sorted(spans, key=lambda s: s.sent_at)))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" font-family="sans-serif" font-size="11">',
        f"<title>requests in flight; server busy {busy_fraction:.0%} of {wall:.1f} s</title>",
    ]
    for start, end, counts in steps:
        base = 0
        for stage in stages:
            n = counts.get(stage, 0)
            if n:
                colour = STAGE_COLOURS.get(stage, OTHER_COLOUR)
                parts.append(
                    f'<rect x="{x(start):.2f}" y="{y(base + n):.2f}" '
                    f'width="{max(x(end) - x(start), 0.01):.2f}" height="{y(base) - y(base + n):.2f}" '
                    f'fill="{colour}"/>'
                )
                base += n
    line_y = y(concurrency)
    parts.append(
        f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{line_y:.2f}" y2="{line_y:.2f}" stroke="black" '
        'stroke-dasharray="4 3"/>'
    )
    parts.append(f'<text x="{LEFT + 4}" y="{line_y - 3:.2f}">concurrency {concurrency}</text>')
    axis = (
        f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{TOP + plot_h}" y2="{TOP + plot_h}" stroke="#444"/>'
        f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#444"/>'
    )
    parts.append(axis)
    for t in _ticks(wall):
        parts.append(f'<text x="{x(t):.2f}" y="{TOP + plot_h + 14}" text-anchor="middle">{t:g}</text>')
    parts.append(
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 4}" text-anchor="middle">'
        "seconds since the first request; "
        f"server busy {busy_fraction:.0%}</text>"
    )
    for tick in _ticks(peak, 4):
        if tick == int(tick):
            parts.append(f'<text x="{LEFT - 6}" y="{y(tick) + 4:.2f}" text-anchor="end">{int(tick)}</text>')
    parts.append(
        f'<text x="12" y="{TOP + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 12 {TOP + plot_h / 2})">requests in flight</text>'
    )
    for i, stage in enumerate(stages):
        legend_y = TOP + 10 + 16 * i
        colour = STAGE_COLOURS.get(stage, OTHER_COLOUR)
        parts.append(
            f'<rect x="{LEFT + plot_w + 4}" y="{legend_y - 9}" width="10" height="10" fill="{colour}"/>'
        )
        parts.append(f'<text x="{LEFT + plot_w + 18}" y="{legend_y}">{html.escape(stage)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
