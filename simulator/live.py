"""Progress while a run goes on: a rich live panel, JSON lines for scripts, or nothing."""

from __future__ import annotations

import json
import math
import sys
import time
from typing import IO, Any

from simulator.progress import RoundRow
from simulator.runner import Snapshot


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


class RichSink:
    """A live panel (rich): round and epoch, loss and accuracy, environments, failures."""

    def __init__(self, title: str, console: Any = None) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = console or Console(stderr=False)
        self.title = title
        self._live = Live(self._render(Snapshot()), console=self.console, refresh_per_second=4)
        self._live.start()
        self._closed = False

    def _render(self, snap: Snapshot) -> Any:
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_column(style="bold")
        grid.add_column()
        planned = snap.rounds_planned
        rounds = f"{snap.rounds_done}" + (f" / {planned}" if planned else "")
        if snap.round is not None and snap.phase == "training":
            rounds += f"  (running round {snap.round}, epoch {snap.epoch})"
        grid.add_row("rounds", rounds, "elapsed", f"{snap.elapsed_s:.1f} s")
        grid.add_row("epochs", f"{snap.epochs_done:.2f}", "Lambda time", f"{snap.lambda_s:.1f} s")
        grid.add_row(
            "held-out loss", _num(snap.loss, ".4f"), "accuracy", _num(snap.accuracy, ".2%")
        )
        grid.add_row(
            "environments",
            f"{snap.active_envs} active / {snap.environments}",
            "invocations",
            f"{snap.invocations} ({snap.cold} cold)",
        )
        failures = f"{snap.failed} ({snap.timeouts} timeouts, {snap.ooms} OOM)"
        grid.add_row("failed", failures, "retries", str(snap.retries))
        grid.add_row("throttled", str(snap.throttled), "rescues", str(snap.rescues))
        if planned:
            bar = ProgressBar(total=planned, completed=min(snap.rounds_done, planned), width=40)
            grid.add_row("progress", bar, "", "")
        return Panel(grid, title=self.title, subtitle=snap.phase)

    def update(self, snap: Snapshot) -> None:
        """Redraw."""
        self._live.update(self._render(snap))

    def round_done(self, row: RoundRow, snap: Snapshot) -> None:
        """Nothing extra: the panel shows it."""

    def note(self, text: str) -> None:
        """Print above the panel."""
        self._live.console.print(f"[yellow]{text}[/yellow]")

    def close(self) -> None:
        """Stop the live display (its last frame stays)."""
        if not self._closed:
            self._closed = True
            self._live.stop()


class JsonLinesSink:
    """One JSON object per line: ``progress`` (at most every `every_s`), ``round``, ``note``."""

    def __init__(self, stream: IO[str] | None = None, every_s: float = 1.0) -> None:
        self.stream = stream or sys.stdout
        self.every_s = every_s
        self._last = 0.0
        self._last_state: tuple[Any, ...] | None = None

    def _emit(self, obj: dict[str, Any]) -> None:
        self.stream.write(json.dumps(obj, sort_keys=True, default=str) + "\n")
        self.stream.flush()

    def update(self, snap: Snapshot) -> None:
        """A progress line when something changed, rate-limited."""
        state = (snap.rounds_done, snap.invocations, snap.active_envs, snap.phase, snap.rescues)
        now = time.monotonic()
        if state == self._last_state or now - self._last < self.every_s:
            return
        self._last, self._last_state = now, state
        self._emit({"event": "progress", **snap.to_json()})

    def round_done(self, row: RoundRow, snap: Snapshot) -> None:
        """A line per combined round."""
        self._emit(
            {
                "event": "round",
                "round": row.round,
                "epoch": row.epoch,
                "epochs_done": row.epochs_done,
                "samples": row.samples,
                "train_loss": row.train_loss,
                "loss": row.loss,
                "accuracy": row.accuracy,
                "elapsed_s": snap.elapsed_s,
            }
        )

    def note(self, text: str) -> None:
        """A note line."""
        self._emit({"event": "note", "text": text})

    def close(self) -> None:
        """Nothing to release."""


__all__ = ["JsonLinesSink", "RichSink"]
