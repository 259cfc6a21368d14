"""`srcflow`: run, sweep, compare, status, verify, inspect, plan, score, invert, interpolate, make-tiny-imagenet."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import contextmanager, suppress
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from pipeline.progress import human_bytes

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="SRC-Flow pipeline: shard -> encode -> (fit_decoder) -> fit_src -> compress -> train_flow -> "
                       "sample -> evaluate")
console = Console(stderr=True)

DEFAULT_CONFIG = "configs/smoke.yaml"
ConfigOpt = typer.Option(DEFAULT_CONFIG, "--config", "-c", help="YAML config")
SetOpt = typer.Option(None, "--set", "-s", help="override: section.key=value (repeatable)")


def stage_names() -> str:
    """The stage table's names, for the help of --stage, --until and --force. The table imports numpy and pydantic
    (~0.35 s of CPU), which no other command's start pays for: it is read only when help is asked for."""
    if "--help" not in sys.argv[1:]:
        return "see --help"
    from stages import STAGE_NAMES

    return ", ".join(STAGE_NAMES)


STAGES = stage_names()


def flag(name: str, help: str):
    """A switch that takes no value (`--json`, not `--json true`); typer 0.29 would show it as `<bool>`."""
    return typer.Option(False, name, help=help, metavar="")


def start_prefect() -> None:
    """Before a Prefect flow runs here: guard the children (Prefect's server, Dask, torchrun, pool processes: none
    outlives this process), the project-local Prefect settings, one-line failed-run logs."""
    from pipeline.watchdog import guard_children

    guard_children()
    prefect_env()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(drop_traceback)


def prefect_env() -> None:
    """Offline, project-local Prefect defaults (each can be overridden from the environment)."""
    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").absolute()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "srcflow")


def debug() -> bool:
    """Tracebacks instead of one-line errors: `srcflow --debug ...` or SRCFLOW_DEBUG=1."""
    return os.environ.get("SRCFLOW_DEBUG", "") not in ("", "0")


@app.callback()
def main_options(debug_: bool = flag("--debug", help="show tracebacks (also SRCFLOW_DEBUG=1)")):
    if debug_:
        os.environ["SRCFLOW_DEBUG"] = "1"


def drop_traceback(record: logging.LogRecord) -> bool:
    """Prefect logs a failed flow or task run with its traceback; its message already holds the exception's one
    line, so the traceback is shown only with --debug."""
    if not debug():
        record.exc_info, record.exc_text = None, None
    return True


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextmanager
def one_line_errors():
    """A bad key, value, file or layout (ValueError, FileNotFoundError), or a file that cannot be read or written
    (OSError: a full disk, a read-only store), ends the command with its one line; --debug shows the traceback."""
    try:
        yield
    except (ValueError, OSError) as e:
        if debug():
            raise
        fail(str(e) or type(e).__name__)  # an OSError's text names its file: "[Errno 28] No space left on device: 'x'"


def _load(config: str, overrides: list[str] | None):
    from pipeline.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        fail(str(e))


@app.command()
def run(config: str = ConfigOpt, set_: list[str] | None = SetOpt,
        stage: list[str] | None = typer.Option(None, "--stage", help=f"run only this stage (repeatable): {STAGES}"),
        until: str | None = typer.Option(None, "--until", help="run every stage up to this one"),
        force: list[str] | None = typer.Option(None, "--force", help="rebuild this stage even if done (repeatable)"),
        use_prefect: bool = flag("--prefect", help="run the Prefect flow even when every stage is done")):
    """Run what is stale, as the Prefect flow `srcflow` (ephemeral server unless PREFECT_API_URL is set). When every
    selected stage is done, nothing starts: each is reported done (--prefect runs the flow anyway)."""
    cfg = _load(config, set_)
    logging.getLogger("srcflow").setLevel(cfg.runtime.log_level)  # Prefect attaches its handlers (EXTRA_LOGGERS)
    from stages.runner import last_needed, plan, preflight, select_stages

    with one_line_errors():  # fail fast, before Prefect starts
        selected = select_stages(plan(cfg, last_needed(stage, until)), stage, until)
        todo = preflight(selected, cfg, force or [])
    if not todo and not use_prefect:
        for p in selected:
            print(f"{p.name}: done ({p.path})")
        print("nothing to run: every selected stage is done; Prefect was not started (--prefect runs the flow)")
        return
    start_prefect()
    with prefect_api():
        from flows.full import srcflow  # sets up Prefect's logging: its console handler, which SignalsReceived filters

        with SignalsReceived() as received:
            try:
                state = srcflow(config=config, overrides=set_ or [], stages=stage, until=until, force=force or [],
                                return_state=True)
            except (KeyboardInterrupt, SystemExit) as e:  # a stop between tasks, or in one that is no training loop
                state = e
    stopped(received, state)
    if not state.is_completed():
        fail(f"flow run {state.name}: {state.message}")


STARTUP_TIMEOUT_S = 300  # Prefect's own 20 s is too short on a loaded machine (starts of 17-39 s were measured)
STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


class SignalsReceived:
    """`with SignalsReceived() as received:` collects the numbers of the signals this process receives inside,
    whoever handles them (a training stage's StopSignal, Prefect's SIGTERM bridge, Python's KeyboardInterrupt): Python
    writes one byte per signal to the wakeup fd. Inside, a SIGTERM that no stage handles raises SystemExit as SIGINT
    raises KeyboardInterrupt (by default it would end the process without a word, Prefect's bridge passing it on). As a
    logging filter on the console, it drops Prefect's run-state lines once a signal arrived (each repeated the
    stopped stage's line; the API keeps them)."""

    RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")

    def __enter__(self):
        import signal
        import socket

        self.numbers: list[int] = []
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.previous = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        self.previous_term = signal.signal(signal.SIGTERM, self.terminate)
        self.consoles = [h for h in logging.getLogger().handlers if type(h).__name__ == "PrefectConsoleHandler"]
        for handler in self.consoles:
            handler.addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        signal.set_wakeup_fd(self.previous)
        signal.signal(signal.SIGTERM, self.previous_term)
        for handler in self.consoles:
            handler.removeFilter(self)
        with suppress(BlockingIOError):
            self.numbers += list(self.reader.recv(64))
        self.reader.close()
        self.writer.close()

    @staticmethod
    def terminate(signum: int, frame) -> None:
        raise SystemExit(128 + signum)

    def arrived(self) -> bool:
        import socket

        try:
            return bool(self.reader.recv(1, socket.MSG_PEEK))
        except (BlockingIOError, OSError):
            return False

    def filter(self, record: logging.LogRecord) -> bool:
        return debug() or not record.name.startswith(self.RUN_LOGGERS) or not self.arrived()


def stopped(received: SignalsReceived, outcome) -> None:
    """A run stopped by SIGINT or SIGTERM ends with one line, the stopped stage's own where it gave one, and exit
    code 128 + the signal (130, 143), as a shell reports a process its signal ended."""
    import signal

    if not received.numbers:
        if isinstance(outcome, BaseException):
            raise outcome
        return
    from stages.runner import STOPPED_NOTE

    signum = received.numbers[0]
    cause = outcome if isinstance(outcome, BaseException) else outcome.result(raise_on_failure=False)
    notes, link = [], cause
    while link is not None:  # the note may sit on an exception that a later one's handling replaced
        notes += getattr(link, "__notes__", [])
        link = link.__context__
    stage = [n.removeprefix(STOPPED_NOTE) for n in notes if n.startswith(STOPPED_NOTE)]
    line = str(cause) if "stopped by" in str(cause) else \
        f"{stage[0] + ': ' if stage else ''}stopped by {signal.Signals(signum).name}"
    resumes = "" if "run again to resume" in line else "; `srcflow run` resumes from what is done"
    console.print(f"[red]error:[/red] {line}{resumes}", highlight=False, soft_wrap=True)
    raise typer.Exit(128 + signum)


@contextmanager
def prefect_api():
    """PREFECT_API_URL for the flow: the configured one, after a quick check that it answers, else a temporary server
    started here, whose URL the flow's other processes inherit (each would otherwise start its own). A server that
    does not answer is one line naming what to set. The temporary server is started with SIGINT and SIGTERM blocked:
    a Ctrl-C (or a SIGTERM to the whole process group) stops the run, whose stage then reports its one line to a
    server that is still there; without it Prefect retried its log and state calls for minutes. It is stopped when
    this process exits, after Prefect's log and event workers have drained."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        check_api(url)
        yield
        return
    import atexit
    import signal

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class ShieldedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self):
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            try:  # a child inherits its parent's signal mask, and uvicorn never unblocks these
                return super()._run_uvicorn_command()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    server, timeout = ShieldedServer(), startup_timeout()
    try:
        server.start(timeout=timeout)
    except RuntimeError as e:
        if "Timed out" not in str(e):
            raise
        fail(f"Prefect's temporary server did not answer within {timeout} s; set {STARTUP_SETTING} higher (a "
             "loaded machine), or PREFECT_API_URL to a running server (`prefect server start`)")
    # atexit runs this before Prefect's own stop, which would wait 5 s for a SIGTERM the server blocks
    atexit.register(lambda process=server.server_process: process.kill() or process.wait())
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield
    finally:
        os.environ.pop("PREFECT_API_URL", None)


def startup_timeout() -> int:
    """Seconds the temporary server may take to start: PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (environment
    or Prefect profile) where the user set it, else STARTUP_TIMEOUT_S."""
    from prefect.settings import get_current_settings
    from prefect.settings.models.server.ephemeral import ServerEphemeralSettings

    configured = get_current_settings().server.ephemeral.startup_timeout_seconds
    prefect_default = ServerEphemeralSettings.model_fields["startup_timeout_seconds"].default
    return configured if STARTUP_SETTING in os.environ or configured != prefect_default else STARTUP_TIMEOUT_S


def check_api(url: str) -> None:
    """One line, before any work, when PREFECT_API_URL names a server that does not answer."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except OSError as e:  # refused, unknown host, timeout, an HTTP error status
        problem = str(getattr(e, "reason", None) or e)
    fail(f"PREFECT_API_URL={url}: no Prefect server answers ({problem}); start one (`prefect server start`) or unset "
         "PREFECT_API_URL to run on a temporary server")


@app.command()
def sweep(config: str = ConfigOpt, set_: list[str] | None = SetOpt,
          grid: list[str] | None = typer.Option(None, "--grid", help="KEY=V1,V2[,...]; K1,K2=V1,V2 ties keys that "
                                                   "move together; repeatable: the points are the Cartesian product"),
          seeds: int = typer.Option(1, "--seeds", help="every point runs for seeds 0..N-1"),
          seed_keys: str = typer.Option("train.seed,sample.seed", "--seed-keys",
                                        help="the config keys a point's seed is applied to (comma-separated)"),
          until: str | None = typer.Option(None, "--until", help="run every point up to this stage"),
          parallel: int = typer.Option(1, "--parallel", help="points at once, each in its own process, through the "
                                                             "Prefect flow"),
          use_prefect: bool = flag("--prefect", help="run the Prefect flow even with --parallel 1 or when every "
                                                     "point is done"),
          as_json: bool = flag("--json", help="print the summary as JSON")):
    """A grid of overrides x seeds over one artifact store (README "Ablations"): every point planned and checked
    before any work, each output several points share built once, then the points; writes
    <storage.root>/sweeps/<id>/ (summary.json/.csv/.md, plots). Exit 1 when a point failed (the others ran)."""
    from stages.sweep import PointsFailed, execute, expand, in_process, stopped, write_results
    from storage_schemas.sweep import read_summary

    with one_line_errors():
        sw = expand(config, set_ or [], grid or [], seeds, seed_keys, until, parallel)
    logging.getLogger("srcflow").setLevel(sw.base.runtime.log_level)
    if as_json:
        sw.base.runtime.progress = False  # stdout holds the JSON: no bar
    out = sys.stderr if as_json else sys.stdout
    if (parallel == 1 or not sw.todo) and not use_prefect:
        from pipeline.progress import set_mode

        set_mode(sw.base.runtime.progress)
        with one_line_errors():
            try:
                run = execute(sw, *in_process(sw), report=lambda line: print(line, file=out, flush=True))
            except RuntimeError as e:
                if stopped(e):
                    fail(f"{e}; run the sweep again to resume")
                raise
            summary = write_results(sw, run)
        if not sw.todo:
            print("nothing to run: every point is done; Prefect was not started (--prefect runs the flow)", file=out)
    else:
        start_prefect()
        from flows.sweep import srcflow_sweep

        with prefect_api():
            overrides = (set_ or []) + ["runtime.progress=false"] * as_json  # operational: the same sweep id
            state = srcflow_sweep(config=config, overrides=overrides, grid=grid or [], seeds=seeds,
                                  seed_keys=list(sw.seed_keys), until=until, parallel=parallel, return_state=True)
        if not state.is_completed() and not isinstance(state.result(raise_on_failure=False), PointsFailed):
            fail(f"flow run {state.name}: {state.message}")
        with one_line_errors():
            summary = read_summary(sw.dir)
    if as_json:
        print(json.dumps(summary.model_dump(), indent=2))
    else:
        print_sweep(summary, sw)
    failed = [p for p in summary.points if p.state == "failed"]
    if failed:
        print(f"{len(failed)} of {len(summary.points)} points failed; the others are in {sw.dir}", file=sys.stderr)
        raise typer.Exit(1)


def print_sweep(summary, sw) -> None:
    from stages.sweep import group_label, mean_std

    table = Table(title=f"srcflow sweep {summary.sweep[:16]}: mean ± std over seeds")
    table.add_column("metric")
    for g in summary.groups:
        table.add_column(f"{group_label(g.overrides, sw.grids)} (n={g.n})")
    for m in dict.fromkeys(k for g in summary.groups for k in g.count):
        table.add_row(m, *[mean_std(g, m) for g in summary.groups])
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    print(f"summary: {sw.dir / 'summary.md'} ({len(summary.plots)} plots)")


@app.command()
def compare(outputs: list[Path] | None = typer.Argument(None, help="two stage output directories (instead of "
                                                                      "--a/--b)"),
            config: str = ConfigOpt, set_: list[str] | None = SetOpt,
            a: str | None = typer.Option(None, "--a", help='side a: overrides on --config/--set, "k=v k2=v2"'),
            b: str | None = typer.Option(None, "--b", help='side b: overrides on --config/--set, "k=v k2=v2"'),
            as_json: bool = flag("--json", help="print the comparison as JSON")):
    """Two configs (--a/--b) or two stage outputs side by side: the semantic fields that differ, the stages they
    share (the same fingerprint: one output), and their headline metrics where done. Runs nothing."""
    import shlex

    from stages.sweep import compare_configs, compare_outputs

    if outputs:
        if len(outputs) != 2 or a is not None or b is not None:
            fail("compare: give two stage output paths, or --a \"k=v ...\" and --b \"k=v ...\", not both")
        with one_line_errors():
            report = compare_outputs(*outputs)
    else:
        if a is None or b is None:
            fail("compare: give --a \"k=v ...\" and --b \"k=v ...\" (or two stage output paths)")
        cfg_a, cfg_b = _load(config, (set_ or []) + shlex.split(a)), _load(config, (set_ or []) + shlex.split(b))
        with one_line_errors():
            report = compare_configs(cfg_a, cfg_b)
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    console = Console(width=None if sys.stdout.isatty() else 160)
    show = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    table = Table(title="semantic fields that differ")
    for col in ("field", "a", "b"):
        table.add_column(col)
    for d in report["differ"]:
        table.add_row(d["key"], show(d["a"]), show(d["b"]))
    console.print(table if report["differ"] else "no semantic field differs")
    table = Table(title="stages (shared: the same output)")
    for col in ("stage", "a", "b", "shared"):
        table.add_column(col)
    for st in report["stages"]:
        table.add_row(st["stage"], f"{(st['a'] or '')[:16]} {st['a_state']}", f"{(st['b'] or '')[:16]} {st['b_state']}",
                      "yes" if st["shared"] else "")
    console.print(table)
    if report["metrics"]:
        table = Table(title="headline metrics (where done)")
        for col in ("metric", "a", "b"):
            table.add_column(col)
        for m in report["metrics"]:
            table.add_row(m["metric"], show(m["a"]), show(m["b"]))
        console.print(table)


@app.command()
def status(config: str = ConfigOpt, set_: list[str] | None = SetOpt,
           as_json: bool = flag("--json", help="print a JSON list")):
    """Per stage: state (done, damaged, partial, stale, missing), fingerprint, path and size. Runs nothing and
    writes nothing (no data, weights or caches either): it works on a read-only store."""
    from pipeline.artifacts import ArtifactStore, dir_bytes, read_only
    from stages.inputs import PENDING
    from stages.runner import plan
    from storage_schemas.success import read_manifest

    cfg = _load(config, set_)
    with one_line_errors(), read_only():
        planned = plan(cfg)
    store = ArtifactStore(cfg.storage.root)
    rows, waits = [], {}  # stage -> the input `srcflow run` creates first, that it reads (or its upstream does)
    for p in planned:
        row = {"stage": p.name, "state": p.state, "fingerprint": p.fingerprint, "path": str(p.path),
               "bytes": dir_bytes(p.path) if p.path.exists() else 0}
        if p.state == "partial":
            row["progress"] = store.progress(p.name, p.fingerprint)
        if p.state == "done":  # plan has just checked it
            row["metrics"] = read_manifest(p.path).metrics
        if p.problem:
            row["problem"] = p.problem
        pending = [v.removeprefix(PENDING) for v in p.external.values() if v.startswith(PENDING)]
        pending += [waits[u] for u in p.upstream if u in waits]
        if pending:
            waits[p.name] = row["waits_for"] = pending[0]
        rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"srcflow status ({config})")
    for col in ("stage", "state", "fingerprint", "size", "detail", "path"):
        table.add_column(col)
    colours = {"done": "green", "damaged": "bold red", "partial": "yellow", "stale": "magenta", "missing": "red"}
    for r in rows:
        detail = r.get("problem", "") or (f"waits for {r['waits_for']}" if r.get("waits_for") else "")
        if r.get("progress"):
            detail = "{done}/{total} {unit}".format(**r["progress"])
        elif r.get("metrics"):
            detail = headline(r["metrics"])
        table.add_row(r["stage"], f"[{colours[r['state']]}]{r['state']}", r["fingerprint"][:16],
                      human_bytes(r["bytes"]), detail, r["path"])
    Console(width=None if sys.stdout.isatty() else 160).print(table)


@app.command("config")
def config_cmd(config: str = ConfigOpt, set_: list[str] | None = SetOpt,
               as_json: bool = flag("--json", help="print [{key, value, source, operational}]")):
    """The resolved config, each value followed by where it came from: the config file, a --set, a default, or
    derived (a null the config fills in). The output is YAML that `--config` reads. Runs nothing."""
    from pipeline.config import ConfigError, config_sources

    try:
        rows = config_sources(config, set_ or [])
    except ConfigError as e:
        fail(str(e))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"# srcflow config --config {config}" + "".join(f" --set {s}" for s in set_ or []))
    print(config_yaml(rows))


def config_yaml(rows: list[dict]) -> str:
    """Nested YAML of dotted keys, each leaf with its source as a comment."""
    import yaml

    lines, open_sections = [], []
    for r in rows:
        *sections, leaf = r["key"].split(".")
        same = 0
        while same < min(len(sections), len(open_sections)) and sections[same] == open_sections[same]:
            same += 1
        lines += [f"{'  ' * depth}{sections[depth]}:" for depth in range(same, len(sections))]
        open_sections = sections
        value = yaml.safe_dump(r["value"], default_flow_style=True, width=1 << 30).removesuffix("...\n").strip()
        text = f"{'  ' * len(sections)}{leaf}: {value}"
        lines.append(f"{text:<44} # {r['source']}{' (operational)' if r['operational'] else ''}")
    return "\n".join(lines)


@app.command()
def verify(config: str = ConfigOpt, set_: list[str] | None = SetOpt,
           stage: list[str] | None = typer.Option(None, "--stage", help="verify only this stage (repeatable)"),
           deep: bool = flag("--deep", help="also compare every file's CRC-32C (reads every byte)")):
    """Check every complete output against its `_SUCCESS.json`: each listed file exists with its size (and, --deep,
    its checksum). Prints the first bad file of each damaged output; exit 1 if any. A deep check records what it
    finds in `_DAMAGED.json`, so the next `srcflow run` rebuilds it (row stores: only the bad shards)."""
    import time

    from pipeline.artifacts import ArtifactStore, read_only
    from stages.runner import check_stage_names, plan
    from storage_schemas.success import write_damage

    cfg = _load(config, set_)
    with one_line_errors(), read_only():
        check_stage_names(stage or [], "--stage")
        planned = [p for p in plan(cfg) if not stage or p.name in stage]  # whatever the state of their upstream
    store = ArtifactStore(cfg.storage.root)
    damaged = 0
    for p in planned:
        started = time.perf_counter()
        health = store.check(p.name, p.fingerprint, deep=deep)
        seconds = time.perf_counter() - started
        if health.state == "damaged":
            damaged += 1
            repair = "srcflow run" if store.repairable(p.name, p.fingerprint) else f"srcflow run --force {p.name}"
            print(f"{p.name}: damaged: {health.first(p.path)} (repair: {repair})")
            if deep:
                try:
                    write_damage(p.path, [{"path": f, "reason": why} for f, why in health.problems])
                except OSError as e:
                    print(f"{p.name}: could not record the damage ({e.strerror}: {e.filename})")
        elif health.state == "done":
            print(f"{p.name}: ok ({health.files} files, {human_bytes(health.bytes)}, "
                  f"{'checksums' if deep else 'sizes'} checked in {seconds:.2f} s)")
        else:
            print(f"{p.name}: {health.state}")
    if damaged:
        raise typer.Exit(1)


def headline(metrics: dict) -> str:
    """The number a user wants to see per stage in `status`; for evaluate, the FID and beside it the flow's
    Bayes-rule accuracy on val (a property of the model, needing no Inception)."""
    standin = " (stand-in Inception)" if metrics.get("inception_weights") == "stand-in" else ""
    bayes = metrics.get("bayes_accuracy")
    bayes = f", bayes_accuracy={bayes:.3f} ({metrics.get('bayes_images')} val)" if bayes is not None else ""
    for key in ("fid", "val_bits_per_dim", "psnr_val", "src/feature_mse", "num_samples", "samples", "rows",
                "reference_images"):
        for k, v in metrics.items():
            if k.startswith(key) and isinstance(v, (int, float)):
                head = f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                return head + (standin + bayes if key == "fid" else "")
    return ""


@app.command()
def inspect(path: Path = typer.Argument(..., help="a shard set, a .parquet manifest, a .zarr store, or a stage "
                                                  "output")):
    """Summarise a shard set, a Parquet manifest or a Zarr store."""
    from srcflow.inspect import summarize

    with one_line_errors():
        print(json.dumps(summarize(path), indent=2, default=str))


@app.command("plan")
def plan_cmd(config: str = ConfigOpt, set_: list[str] | None = SetOpt,
             gpus: int | None = typer.Option(None, "--gpus", help="GPUs in all (one process each); default: "
                                                                  "runtime.nproc x --nodes"),
             nodes: int | None = typer.Option(None, "--nodes", help="nodes the GPUs are spread over; default: "
                                                                    "train.torchrun_args' --nnodes, else 1"),
             as_json: bool = flag("--json", help="print the plan as JSON")):
    """Per stage: bytes written, files per directory, device-hours and wall-clock at the scale (each term measured or
    estimated, with its source), peak memory per process and per node. Runs nothing."""
    from pipeline.artifacts import read_only
    from srcflow.tables import print_plan
    from stages.plan import capacity_plan
    from stages.plan.scale import scale_of

    cfg = _load(config, set_)
    with one_line_errors(), read_only():
        report = capacity_plan(cfg, scale=scale_of(cfg, gpus, nodes))
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print_plan(report, title=f"srcflow plan ({config})")


@app.command()
def rehearse(config: str = ConfigOpt, set_: list[str] | None = SetOpt,
             classes: int = typer.Option(2, "--classes", help="classes whose images are read (spread over all of the "
                                                              "config's, which the data keeps)"),
             images_per_class: int = typer.Option(2, "--images-per-class", help="train images read per class"),
             val_per_class: int = typer.Option(1, "--val-per-class", help="val images read per class"),
             steps: int = typer.Option(1, "--steps", help="steps of every training stage"),
             samples_per_class: int = typer.Option(1, "--samples-per-class", help="samples per class and CFG scale"),
             sample_classes: int = typer.Option(4, "--sample-classes", help="the flow's first classes sampled"),
             cfg_scales: int = typer.Option(1, "--cfg-scales", help="of sample.cfg_scale: the first (2: and the "
                                                                    "last; more: evenly between)"),
             reference_images: int = typer.Option(8, "--reference-images", help="reference images (or of the ADM "
                                                                                 "batch)"),
             eval_images: int = typer.Option(1, "--eval-images", help="held-out images of the fit reports and the "
                                                                      "flow's Bayes-rule classifier"),
             weights: str = typer.Option("auto", "--weights", help="auto (the config's files, random ones in the "
                                                                   "released forms where missing) | real | random"),
             scratch: Path | None = typer.Option(None, "--scratch", help="folder for the scratch store, data and "
                                                                        "weights (default: a temporary one, removed)"),
             keep: bool = typer.Option(False, "--keep", help="keep the temporary scratch folder"),
             memory_gb: float | None = typer.Option(None, "--memory-gb", help="memory one stage may plan to use "
                                                                              "(default: 80% of what is free)"),
             as_json: bool = typer.Option(False, "--json", help="print the report as JSON")):
    """Run every stage of the config once at its real model shapes, in a scratch store (never storage.root), with
    small amounts; per stage: seconds, unit rate, peak memory and bytes beside the planner's prediction for the same
    work, then the whole run re-estimated from the measured rates (README "Rehearsal")."""
    from stages.rehearse import Amounts
    from stages.rehearse import rehearse as run_rehearsal
    from stages.rehearse.measure import log_to_stderr

    _load(config, set_)  # a bad key or shapes that do not fit: one line, before anything runs
    amounts = Amounts(classes=classes, images_per_class=images_per_class, val_per_class=val_per_class, steps=steps,
                      samples_per_class=samples_per_class, sample_classes=sample_classes, cfg_scales=cfg_scales,
                      reference_images=reference_images, eval_images=eval_images)
    with one_line_errors(), log_to_stderr():  # a stage that fails or cannot fit: one line naming it
        report = run_rehearsal(config, set_ or [], amounts, weights=weights, scratch=scratch, keep=keep,
                               memory_gb=memory_gb)
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        from srcflow.tables import print_rehearsal

        print_rehearsal(report)
    if report.get("stopped"):  # the stages before it are reported above; the stop is the usual one line
        fail(report["stopped"]["error"])


@app.command()
def score(paths: list[Path] = typer.Argument(..., help="image files or folders (searched recursively)"),
          config: str = ConfigOpt, set_: list[str] | None = SetOpt,
          as_json: bool = flag("--json", help="print {rows, summary} as JSON"),
          csv_file: Path | None = typer.Option(None, "--csv", help="also write the rows to this CSV file"),
          max_images: int | None = typer.Option(None, "--max-images", help="score at most this many images"),
          noise_samples: int = typer.Option(0, "--noise-samples",
                                            help="average log p over this many draws c + sigma * eps (0: clean c)")):
    """The flow's exact log-density of each image's code: the Bayes-rule class, its posterior and bits/dim of the
    conditional, the marginal and the unconditional branch (README "Likelihood and inversion"). Reads the done
    artifacts of the config; runs no stage. `<synset>/` folders give labels, and the accuracy."""
    cfg = _load(config, set_)
    from stages.likelihood import FIELDS, open_chain, score_images

    with one_line_errors():
        rows, summary = score_images(open_chain(cfg, config), paths, max_images=max_images,
                                     noise_samples=noise_samples)
        if csv_file is not None:
            import csv

            with open(csv_file, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=FIELDS)
                writer.writeheader()
                writer.writerows(rows)
    if as_json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=2))
        return
    table = Table(title=f"srcflow score ({config}, {summary['noise']})")
    for col in ("path", "class", "posterior", "bits/dim", "marginal", "uncond", "error"):
        table.add_column(col)
    f = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
    for r in rows:
        predicted = "" if r["predicted_class"] is None else f"{r['predicted_class']} {r['predicted_synset']}"
        table.add_row(r["path"], predicted, f(r["posterior"]), f(r["bits_per_dim"]), f(r["bits_per_dim_marginal"]),
                      f(r["bits_per_dim_uncond"]), r["error"] or "")
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    print(f"{summary['count']} scored, {summary['errors']} errors; bits/dim {f(summary['bits_per_dim_mean'])} "
          f"(marginal {f(summary['bits_per_dim_marginal_mean'])}, unconditional "
          f"{f(summary['bits_per_dim_uncond_mean'])}); "
          + (f"accuracy {summary['accuracy']:.3f} on {summary['labelled']} labelled" if summary["labelled"]
             else "no <synset>/ folders: no accuracy"))


ClassOpt = typer.Option(None, "--class", help="the class y (a label or a synset); default: the Bayes-rule class")


@app.command()
def invert(images: list[Path] = typer.Argument(..., help="image files"),
           out: Path = typer.Option(..., "--out", help="folder for the z files and the grid"),
           config: str = ConfigOpt, set_: list[str] | None = SetOpt, class_: str | None = ClassOpt,
           as_json: bool = flag("--json", help="print the report as JSON")):
    """image -> code c -> z = f(c | y) -> c' = f^-1(z | y) -> pixels: writes each z (.npz with its class) and
    invert-grid.png (original | RAE reconstruction | SRC reconstruction | flow round trip); reports max |c - c'| and
    the PSNR of decode(c') against decode(c)."""
    cfg = _load(config, set_)
    from stages.likelihood import invert as invert_images
    from stages.likelihood import open_chain

    with one_line_errors():
        report = invert_images(open_chain(cfg, config, decoder=True), images, out, class_)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    for r in report["images"]:
        db = "identical pixels" if r["identical_pixels"] else f"PSNR {r['psnr_round_trip_db']:.1f} dB"
        print(f"{r['path']}: class {r['class']} {r['synset']} ({r['class_from']}), max |c - c'| "
              f"{r['max_abs_code_error']:.3g}, decode(c') vs decode(c): {db} -> {r['z_file']}")
    print(f"grid: {report['grid']} ({' | '.join(report['grid_columns'])})")


@app.command()
def interpolate(image_a: Path = typer.Argument(..., help="the first image"),
                image_b: Path = typer.Argument(..., help="the second image"),
                out: Path = typer.Option(..., "--out", help="folder for the frames and the grid"),
                steps: int = typer.Option(8, "--steps", help="frames, end points included"),
                config: str = ConfigOpt, set_: list[str] | None = SetOpt, class_: str | None = ClassOpt,
                as_json: bool = flag("--json", help="print the report as JSON")):
    """Invert both images under one class (--class, else image A's Bayes-rule class), slerp between their latents,
    and write the decoded frames and interpolation.png."""
    cfg = _load(config, set_)
    from stages.likelihood import interpolate as interpolate_images
    from stages.likelihood import open_chain

    with one_line_errors():
        report = interpolate_images(open_chain(cfg, config, decoder=True), image_a, image_b, out, steps, class_)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(f"class {report['class']} {report['synset']} ({report['class_from']}), latents {report['angle_degrees']:.1f}"
          f" degrees apart, {report['steps']} frames: {report['grid']}")


@app.command("make-tiny-imagenet")
def make_tiny_imagenet_cmd(out: Path, classes: int = 4, per_class: int = 32, val_per_class: int = 8, size: int = 64,
                           seed: int = 0,
                           layout: str = typer.Option("imagefolder", help="the form, as data.layout names it: "
                                                      "imagefolder | kaggle | hf-parquet | wds | ilsvrc-tar"),
                           kind: str = typer.Option("colours", help="colours (a shape and hue per class) | shapes "
                                                                    "(classes differ only by shape)"),
                           quirks: bool = typer.Option(False, help="add a CMYK, a grayscale and a PNG-named-.JPEG "
                                                                   "train file and a truncated val file")):
    """Write the deterministic procedural ImageNet used by the demo and CI, in any data.layout form."""
    from pipeline.data.tiny_imagenet import make_tiny_imagenet

    summary = make_tiny_imagenet(out, classes=classes, per_class=per_class, val_per_class=val_per_class, size=size,
                                 seed=seed, layout=layout, kind=kind, quirks=quirks)
    print(json.dumps(summary, indent=2, default=str))


def main() -> None:  # pragma: no cover
    """The `srcflow` command. Once a command is over (Prefect's log and event workers drained and its server stopped:
    threading's and atexit's hooks), the process exits without the interpreter's teardown of every module and object,
    which took 2-20 s on a loaded 2-core machine once torch and Prefect were imported, and kept a stopped run's
    prompt away for as long."""
    import atexit

    code = 1  # an uncaught exception, whose traceback the interpreter has printed

    def exit_now() -> None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    atexit.register(exit_now)  # registered first, so it runs after every other exit hook
    try:
        app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        raise
    except KeyboardInterrupt:
        code = 130
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
