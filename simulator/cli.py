"""``python -m simulator run | sweep | report``: the experiment runner's command line.

Exit status: 0 the run finished (a sweep: at least one setting finished); 1 training failed (the
reason on stderr); 2 a bad flag, config value or output directory (the message names the flag
and what is allowed), or a run this machine cannot hold; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

from simulator.settings import (
    FILE_ONLY,
    HELP,
    NAMES,
    SWEEPABLE,
    RunSettings,
    SettingsError,
    flag_of,
    load_config_file,
    merge,
    parse_list,
    parse_text,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Settings whose values may contain commas (paths, JSON): never split into sweep lists.
_TEXT_SETTINGS = ("dataset", "code_dir", "out", "model_kwargs", "run_id")


class UsageError(Exception):
    """argparse found a bad command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _add_setting_flags(p: argparse.ArgumentParser, sweep: bool) -> None:
    group = p.add_argument_group("settings (also accepted as keys of --config)")
    for name in NAMES:
        if name in FILE_ONLY:
            continue
        help_text = HELP[name]
        if sweep and name in SWEEPABLE:
            help_text += "; a comma-separated list to sweep"
        group.add_argument(flag_of(name), dest=name, metavar="V", default=None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommands run, sweep, report)."""
    parser = _Parser(
        prog="python -m simulator",
        description="Serverless training on a local AWS Lambda + EFS: run, sweep, report.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="train once and report time, cost and accuracy")
    run.add_argument("--config", metavar="FILE", help="settings from a JSON or YAML file")
    _add_output_mode(run)
    _add_setting_flags(run, sweep=False)
    sweep = sub.add_parser("sweep", help="run one job over lists of workers, memory, timeout, ...")
    sweep.add_argument("--config", metavar="FILE", help="settings from a JSON or YAML file")
    sweep.add_argument(
        "--objective",
        choices=("time", "cost", "loss"),
        default="time",
        help="what makes a setting best (default: predicted time on Lambda)",
    )
    _add_output_mode(sweep)
    _add_setting_flags(sweep, sweep=True)
    report = sub.add_parser("report", help="re-render the summary and plots of a finished run")
    report.add_argument("dir", metavar="DIR", help="the run's output directory")
    report.add_argument("--json", action="store_true", help="print report.json instead")
    return parser


def _add_output_mode(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quiet", "-q", action="store_true", help="no progress, no summary")
    mode.add_argument(
        "--json-lines", action="store_true", help="progress and summary as JSON lines on stdout"
    )


def _flag_values(
    ns: argparse.Namespace, sweep: bool
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    values: dict[str, Any] = {}
    lists: dict[str, list[Any]] = {}
    for name in NAMES:
        text = getattr(ns, name, None)
        if text is None:
            continue
        if sweep and "," in text and name not in _TEXT_SETTINGS:
            lists[name] = parse_list(name, text)  # names the sweepable ones if not one of them
        else:
            values[name] = parse_text(name, text)
    return values, lists


def _file_values(ns: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    if not ns.config:
        return {}, None
    return load_config_file(ns.config), str(ns.config)


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """Run the command line `argv` (default sys.argv[1:]); returns the exit status."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        ns = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_USAGE
    try:
        if ns.command == "run":
            return _cmd_run(ns, out, err)
        if ns.command == "sweep":
            return _cmd_sweep(ns, out, err)
        return _cmd_report(ns, out, err)
    except SettingsError as exc:
        err.write(f"error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return EXIT_INTERRUPTED


def resolve_settings(argv: Sequence[str]) -> RunSettings:
    """The settings a `run` command line (without the word 'run') would use; nothing runs."""
    ns = build_parser().parse_args(["run", *argv])
    file_values, source = _file_values(ns)
    flag_values, _ = _flag_values(ns, sweep=False)
    return merge(file_values, flag_values, source)


def _cmd_run(ns: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    from simulator.run_setup import HostCapacityError
    from simulator.runner import Runner

    file_values, source = _file_values(ns)
    flag_values, _ = _flag_values(ns, sweep=False)
    settings = merge(file_values, flag_values, source)
    sink: Any
    if ns.quiet:
        sink = None
    elif ns.json_lines:
        from simulator.live import JsonLinesSink

        sink = JsonLinesSink(out)
    else:
        from simulator.live import RichSink

        sink = None  # created once the settings are known to be runnable (below)
    try:
        runner = Runner(settings, sink)
    except HostCapacityError as exc:
        err.write(f"error: this machine cannot hold the run: {exc}\n")
        return EXIT_USAGE
    if not ns.quiet and not ns.json_lines:
        from rich.console import Console

        console = Console(file=out)
        runner.sink = RichSink(
            f"{settings.model} on {Path(settings.dataset).name}, {settings.workers} workers x "
            f"{settings.memory} MB",
            console=console,
        )
    if ns.json_lines:
        start = {"event": "start", "out_dir": str(runner.out), "settings": settings.to_json()}
        out.write(json.dumps(start, sort_keys=True, default=str) + "\n")
        out.flush()
    result = runner.run()
    if ns.json_lines:
        out.write(json.dumps(_summary_event(result.report), sort_keys=True, default=str) + "\n")
    elif not ns.quiet:
        from simulator.report import format_summary

        out.write("\n" + format_summary(result.report))
    if (
        result.report.get("run", {}).get("status") == "failed"
        and result.reason
        and "Ctrl-C" in result.reason
    ):
        err.write(f"training failed: {result.reason}\n")
        return EXIT_INTERRUPTED
    if not result.ok:
        err.write(f"training failed: {result.reason}\n")
        return EXIT_FAILED
    return EXIT_OK


def _summary_event(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "event": "summary",
        "status": report["run"]["status"],
        "reason": report["run"]["reason"],
        "out_dir": report["run"]["out_dir"],
        "time": report["time"],
        "training": {k: v for k, v in report["training"].items() if k != "curve"},
        "invocations": {k: v for k, v in report["invocations"].items() if k != "by_role"},
        "cost": report["cost"],
        "warnings": report["warnings"],
    }


def _cmd_sweep(ns: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    from simulator.sweep import SweepPoint, run_sweep, table_rows

    file_values, source = _file_values(ns)
    flag_values, lists = _flag_values(ns, sweep=True)
    # A config file may list values too ("workers: [1, 2, 4]").
    for name in SWEEPABLE:
        value = file_values.get(name)
        if isinstance(value, list) and name not in lists and name not in flag_values:
            lists[name] = value
            del file_values[name]
    out_dir = Path(flag_values.pop("out", None) or file_values.pop("out", None) or _sweep_dir())
    file_values.pop("out", None)

    def on_point(p: SweepPoint) -> None:
        if ns.quiet:
            return
        if ns.json_lines:
            out.write(json.dumps({"event": "sweep_point", **p.to_json()}, default=str) + "\n")
        else:
            extra = f" - {p.reason}" if p.reason else ""
            pred = "-" if p.predicted_s is None else f"{p.predicted_s:.2f} s"
            out.write(f"[{p.index + 1}] {p.label}: {p.outcome}, predicted {pred}{extra}\n")
        out.flush()

    result = run_sweep(
        file_values,
        flag_values,
        lists,
        out_dir,
        objective=ns.objective,
        source=source,
        on_point=on_point,
    )
    if ns.json_lines:
        out.write(
            json.dumps(
                {
                    "event": "sweep",
                    "out_dir": str(out_dir),
                    "best": result.best,
                    "files": result.files,
                },
                default=str,
            )
            + "\n"
        )
    elif not ns.quiet:
        from rich.console import Console
        from rich.table import Table

        from simulator.sweep import COLUMNS

        table = Table(title=f"sweep ({out_dir})")
        for _, name in COLUMNS:
            table.add_column(name, overflow="fold")
        for row in table_rows(result):
            table.add_row(*row)
        Console(file=out, width=160).print(table)
        if result.best is not None:
            out.write(f"best by {ns.objective}: {result.points[result.best].label}\n")
    if not result.any_ok:
        err.write("sweep: no setting finished\n")
        return EXIT_FAILED
    return EXIT_OK


def _sweep_dir() -> Path:
    import time

    return Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"


def _cmd_report(ns: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    from simulator.report import format_summary, write_report

    directory = Path(ns.dir)
    if not (directory / "run.json").is_file():
        err.write(f"error: DIR: {str(directory)!r} is not a run directory (no run.json)\n")
        return EXIT_USAGE
    report = write_report(directory)
    if ns.json:
        out.write(json.dumps(report, indent=1) + "\n")
    else:
        out.write(format_summary(report))
    return EXIT_OK if report["run"]["status"] == "finished" else EXIT_FAILED


__all__ = ["build_parser", "main", "resolve_settings"]
