"""The per-round chart of a run, as inline SVG rendered on the server (no chart library, no
script: the page works offline and in any browser)."""

from __future__ import annotations

from markupsafe import Markup, escape

from federimed.webapp.runs import Run

WIDTH, HEIGHT = 560, 240
LEFT, RIGHT, TOP, BOTTOM = 48, 32, 16, 36  # room for the last round's labels


def round_chart(run: Run) -> Markup:
    """The headline test score per round (0-100%); under each round, how many hospitals
    took part."""
    key, name = run.measure
    points = [(rnd, value) for rnd, value in run.headline() if value is not None]
    planned = max([run.config.num_server_rounds, *(r for r, _ in points), 1])
    width, height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(rnd: float) -> float:
        return LEFT + width * (rnd / planned)

    def y(value: float) -> float:
        return TOP + height * (1 - value)

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(name)} per round" data-measure="{escape(key)}">',
        f"<title>{escape(name)} per round</title>",
    ]
    for tick in (0, 0.25, 0.5, 0.75, 1):
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(tick):.1f}" '
            f'y2="{y(tick):.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{LEFT - 6}" y="{y(tick) + 4:.1f}" '
            f'text-anchor="end">{100 * tick:.0f}%</text>'
        )
    for record in run.rounds:
        parts.append(
            f'<text class="tick" x="{x(record.round):.1f}" y="{HEIGHT - 18}" '
            f'text-anchor="middle">{record.round}</text>'
        )
        parts.append(
            f'<text class="who" x="{x(record.round):.1f}" y="{HEIGHT - 4}" '
            f'text-anchor="middle">{len(record.participants)} sites</text>'
        )
    if points:
        path = " ".join(f"{x(r):.1f},{y(v):.1f}" for r, v in points)
        parts.append(f'<polyline class="line" points="{path}"/>')
        for rnd, value in points:
            parts.append(
                f'<circle class="point" data-round="{rnd}" data-value="{value:.4f}" '
                f'cx="{x(rnd):.1f}" cy="{y(value):.1f}" r="4">'
                f"<title>round {rnd}: {100 * value:.1f}%</title></circle>"
            )
    parts.append("</svg>")
    return Markup("".join(parts))
