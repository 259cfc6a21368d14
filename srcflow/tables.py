"""The tables `srcflow plan` and `srcflow rehearse` print (rich)."""

from __future__ import annotations

import sys

from pipeline.progress import human_bytes, human_hours


def console():
    from rich.console import Console  # rich imports in ~0.1 s: only when a table is printed

    return Console(width=None if sys.stdout.isatty() else 200)  # a pipe or a log keeps the full table


def print_plan(report: dict, title: str = "srcflow plan") -> None:
    from rich.table import Table

    out = console()
    d, sc, dev, total = report["dataset"], report["scale"], report["device"], report["total"]
    out.print(f"[bold]{title}[/bold]  storage: {report['storage_root']}")
    out.print(f"images: {d['train']:,} train + {d['val']:,} val, {d['classes']} classes, "
              f"mean JPEG {d['mean_jpeg'] / 1e3:.1f} KB  ({d['source']})")
    out.print(f"scale: {sc['gpus']} processes = {sc['nodes']} node(s) x {sc['processes_per_node']} ({sc['source']}); "
              f"device: {dev['name']} ({dev['source']})", highlight=False)
    if report["states_note"]:
        out.print(f"[yellow]{report['states_note']}[/yellow]", highlight=False)
    table = Table(title="per stage (memory: estimates per process; host per node: x processes per node)")
    for col, justify in (("stage", "left"), ("state", "left"), ("work", "right"), ("bytes", "right"),
                         ("files", "right"), ("max/dir", "right"), ("device-hours", "right"), ("wall-clock", "right"),
                         ("source", "left"), ("procs/node", "right"), ("host mem", "right"), ("host/node", "right"),
                         ("device mem", "right")):
        table.add_column(col, justify=justify)
    for s in report["stages"]:
        approx = "" if all(o["exact"] for o in s["outputs"]) else "~"
        h = s["hours"]
        kinds = sorted({t["kind"] for t in h["terms"]})
        batch = f", {h['per_process_batch']}/process" if "per_process_batch" in h else ""
        table.add_row(s["stage"], s["state"], f"{s['work']:,} {s['unit']}", approx + human_bytes(s["bytes"]),
                      f"{sum(o['files'] for o in s['outputs']):,}", f"{max(o['per_dir'] for o in s['outputs']):,}",
                      ("~" if h["estimate"] else "") + human_hours(h["device_hours"]),
                      ("~" if h["estimate"] else "") + human_hours(h["wall_hours"]),
                      f"{' + '.join(kinds)} on {h['device']} x {h['processes']}{batch}", str(s["processes"]),
                      "~" + human_bytes(s["memory"]["host_bytes"]), "~" + human_bytes(s["memory"]["node_host_bytes"]),
                      "~" + human_bytes(s["memory"]["device_bytes"]))
    table.add_row("total", "", "", "~" + human_bytes(report["total_bytes"]), "", "",
                  ("~" if total["estimate"] else "") + human_hours(total["device_hours"]),
                  ("~" if total["estimate"] else "") + human_hours(total["wall_hours"]),
                  f"GPU stages hold {sc['gpus']} GPUs for {human_hours(total['allocated_device_hours'])} of GPU time",
                  "", "", "", "")
    out.print(table)
    terms = Table(title="hours, term by term (device-hours of the stage's whole work; ~: estimate)")
    for col in ("stage", "term", "hours", "kind", "source"):
        terms.add_column(col)
    for s in report["stages"]:
        for t in s["hours"]["terms"]:
            terms.add_row(s["stage"], t["term"], human_hours(t["hours"]), t["kind"], t["source"])
    out.print(terms)
    outputs = Table(title="outputs (exact: from the on-disk layout; ~: estimate)")
    for col in ("stage", "path", "bytes", "files", "basis"):
        outputs.add_column(col)
    for s in report["stages"]:
        for o in s["outputs"]:
            outputs.add_row(s["stage"], o["path"], ("" if o["exact"] else "~") + human_bytes(o["bytes"]),
                            f"{o['files']:,}", o["basis"])
    out.print(outputs)
