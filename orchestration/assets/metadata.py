"""Markdown views for the Dagster UI's metadata panels (the UI renders them; nothing else reads them)."""

import base64
from pathlib import Path


def curve_markdown(history: list[dict]) -> str:
    if not history:
        return "(no epochs recorded)"
    cols = list(history[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in history:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_markdown(metrics: dict[str, float], baselines: dict[str, dict[str, float]]) -> str:
    names = [k for k, v in metrics.items() if isinstance(v, (int, float))]
    header = "| metric | model | " + " | ".join(baselines) + " |"
    lines = [header, "|" + "---|" * (2 + len(baselines))]
    for name in names:
        cells = [f"{metrics[name]:.4f}"] + [
            f"{b.get(name, float('nan')):.4f}" if isinstance(b.get(name), (int, float)) else "–"
            for b in baselines.values()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart_markdown(png: Path) -> str:
    """The PNG inlined as a data URI: Dagster's Markdown renderer allows ``data:`` images, so the
    chart shows in the UI (behind "[Show Markdown]") without a file server."""
    encoded = base64.b64encode(png.read_bytes()).decode("ascii")
    return f"![leaderboard chart: main metric per task, baselines hatched](data:image/png;base64,{encoded})"
