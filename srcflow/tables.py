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


def print_rehearsal(report: dict) -> None:
    from rich.table import Table

    out = console()
    low, high = report["ratio_bounds"]
    a, dev = report["amounts"], report["device"]

    def ratio(r) -> str:
        if r is None:
            return ""
        text = f"{r:.2f}"
        return text if low <= r <= high else f"[red]{text}[/red]"

    out.print(f"[bold]srcflow rehearse[/bold] ({report['config']}) on {dev['name']}  ({dev['source']})",
              highlight=False)
    if dev["note"]:
        out.print(f"[yellow]{dev['note']}[/yellow]", highlight=False)
    out.print(f"data: {report['data']['source']}; {report['data'].get('classes_read')} of "
              f"{report['data'].get('classes')} classes read, {a['images_per_class']} train + {a['val_per_class']} val "
              f"images each; {a['steps']} steps per training stage; {a['samples_per_class']} sample(s) of each of "
              f"{a['sample_classes']} classes per CFG scale; {a['reference_images']} reference images", highlight=False)
    for key, w in report["weights"].items():
        out.print(f"{key}: {'[yellow]RANDOM[/yellow] ' if w['random'] else ''}{w['form']} ({w['path']})",
                  highlight=False)
    table = Table(title=f"per stage, measured vs planned for the same work (ratio = measured / planned; "
                        f"outside {low}-{high} in red; * rests on random weights)")
    cols = ["stage", "seconds", "cpu s", "planned", "ratio", "rate", "planned rate", "peak RSS", "planned", "ratio"]
    if dev["kind"] == "gpu":
        cols += ["peak device", "planned", "ratio"]
    cols += ["bytes", "planned", "ratio", "batch (config's per process)"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("stage", "batch (config's per process)") else "right")
    for name, s in report["stages"].items():
        b = s["batch"]
        batch = f"{b['key']}={b['used']} ({b['config']}: {b['why']})" if b else ""
        row = [name + ("*" if s["random_weights"] else ""), f"{s['seconds']:.1f}", f"{s['cpu_seconds'] or 0:.0f}",
               f"{s['planned_seconds']:.1f}",
               ratio(s["seconds_ratio"]), f"{s['rate']:.3g} {s['unit']}/s",
               f"{s['planned_rate']:.3g}" if s["planned_rate"] else "", human_bytes(s["peak_rss_bytes"]),
               human_bytes(s["planned_peak_rss_bytes"]), ratio(s["peak_rss_ratio"])]
        if dev["kind"] == "gpu":
            row += [human_bytes(s["peak_device_bytes"] or 0), human_bytes(s["planned_peak_device_bytes"]),
                    ratio(s["peak_device_ratio"])]
        row += [human_bytes(s["bytes_written"]), human_bytes(s["planned_bytes"]), ratio(s["bytes_ratio"]), batch]
        table.add_row(*row)
    out.print(table)
    for name, s in report.get("not_run", {}).items():
        out.print(f"[red]not run[/red]: {name}: planned {human_bytes(s['planned_peak_rss_bytes'])} peak, "
                  f"{s['planned_seconds']:.0f} s ({s['memory_basis']})", highlight=False)
    w = report["whole_run"]
    whole = Table(title=f"the whole run of the config on {w['device']} ({w['scale']['source']}): the plan, and the "
                        f"plan recomputed from the rates measured here")
    for col in ("stage", "work", "planned device-hours", "recomputed", "planned wall-clock", "recomputed wall-clock"):
        whole.add_column(col, justify="left" if col == "stage" else "right")
    for name, s in w["stages"].items():
        rec = s["recomputed_device_hours"]
        whole.add_row(name, f"{s['work']:,} {s['unit']}", human_hours(s["planned_device_hours"]),
                      human_hours(rec) if rec is not None else "not rehearsed", human_hours(s["planned_wall_hours"]),
                      human_hours(s["recomputed_wall_hours"]) if rec is not None else "")
    whole.add_row("total", "", "", "", human_hours(w["planned_wall_hours"]), human_hours(w["recomputed_wall_hours"]))
    out.print(whole)
    verdict = ", ".join(f"{k.replace('_', ' ')} {'within' if v else '[red]outside[/red]'}"
                        for k, v in report["within_bounds"].items())
    out.print(f"ratios: {verdict} {low}-{high}; rehearsal wall {report['wall_seconds']:.0f} s; scratch "
              f"{report['scratch']}", highlight=False)
