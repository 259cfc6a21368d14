"""The tables `srcflow plan` prints (rich)."""

from __future__ import annotations

import sys

from pipeline.progress import human_bytes, human_hours


def print_plan(report: dict, title: str = "srcflow plan") -> None:
    from rich.console import Console  # rich imports in ~0.1 s: only when a table is printed
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)  # a pipe or a log keeps the full table
    d = report["dataset"]
    console.print(f"[bold]{title}[/bold]  storage: {report['storage_root']}")
    console.print(f"images: {d['train']:,} train + {d['val']:,} val, {d['classes']} classes, "
                  f"mean JPEG {d['mean_jpeg'] / 1e3:.1f} KB  ({d['source']})")
    if report["states_note"]:
        console.print(f"[yellow]{report['states_note']}[/yellow]", highlight=False)
    table = Table(title="per stage (memory: estimates per process)")
    for col, justify in (("stage", "left"), ("state", "left"), ("work", "right"), ("bytes", "right"),
                         ("files", "right"), ("max/dir", "right"), ("device-hours (measured)", "left"),
                         ("procs", "right"), ("host mem", "right"), ("device mem", "right")):
        table.add_column(col, justify=justify)
    for s in report["stages"]:
        approx = "" if all(o["exact"] for o in s["outputs"]) else "~"
        hours = f"{human_hours(s['hours']['hours'])} on {s['hours']['device']}" if s["hours"] else s["hours_note"]
        table.add_row(s["stage"], s["state"], f"{s['work']:,} {s['unit']}", approx + human_bytes(s["bytes"]),
                      f"{sum(o['files'] for o in s['outputs']):,}", f"{max(o['per_dir'] for o in s['outputs']):,}",
                      hours, str(s["processes"]), "~" + human_bytes(s["memory"]["host_bytes"]),
                      "~" + human_bytes(s["memory"]["device_bytes"]))
    table.add_row("total", "", "", "~" + human_bytes(report["total_bytes"]), "", "", "", "", "", "")
    console.print(table)
    outputs = Table(title="outputs (exact: from the on-disk layout; ~: estimate)")
    for col in ("stage", "path", "bytes", "files", "basis"):
        outputs.add_column(col)
    for s in report["stages"]:
        for o in s["outputs"]:
            outputs.add_row(s["stage"], o["path"], ("" if o["exact"] else "~") + human_bytes(o["bytes"]),
                            f"{o['files']:,}", o["basis"])
    console.print(outputs)
