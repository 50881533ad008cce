"""PNG plots of a target: recent history, the forecast with its bands, the current value and
the replicas the plan implies; and, for a target holding a maxUnderProvisioned, the share of
its intervals that ran short of capacity against the share asked.

Drawn on a bare `matplotlib.figure.Figure` with the Agg canvas: no pyplot, no global figure
state, so request threads may render at once. `PlotCache` keeps one PNG per target until the
target publishes a new snapshot.

>>> png = plot_target(engine.get("shop/web/fc-1"))     # doctest: +SKIP
>>> png[:8] == PNG_MAGIC                                # doctest: +SKIP
True
"""

from __future__ import annotations

import io
import math
import threading
import time
import zoneinfo
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from forecaster.models import Forecast
from forecaster.policy import planned_replicas
from forecaster.target import Snapshot, Target

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HISTORY_WINDOW = pd.Timedelta(days=2)
ZOOM_WINDOW = pd.Timedelta(hours=6)
SIZE_INCHES = (9.0, 5.6)
SHARE_SIZE_INCHES = (9.0, 2.8)
SHARE_WINDOW = pd.Timedelta(days=1)  # the running share is taken over the last day
DPI = 100
CACHE_SIZE = 256

HISTORY_COLOR = "#1f4e79"
FORECAST_COLOR = "#d9731a"
PLANNED_COLOR = "#2e7d32"
ASKED_COLOR = "#b71c1c"


@dataclass(frozen=True)
class PlotData:
    """What one plot shows; built from a target by `plot_data`, or directly in tests."""

    title: str
    history: pd.Series  # a regular grid with a UTC index; NaN for gaps
    forecast: Forecast | None
    current: tuple[float, float] | None  # (Unix time, value)
    planned: float | None
    quantile: float
    target_value: float
    time_zone: str = "UTC"
    note: str | None = None


def plot_data(target: Target, snapshot: Snapshot | None = None) -> PlotData:
    """The data for one target's plot, from one snapshot (its latest if not given)."""
    snapshot = snapshot or target.snapshot
    spec = target.spec
    history = target.buffer.series()
    if not history.empty:
        history = history[history.index > history.index[-1] - HISTORY_WINDOW]
    current = (
        (snapshot.current_time, snapshot.current_value)
        if snapshot.current_time is not None and snapshot.current_value is not None
        else None
    )
    mode = snapshot.planned.mode if snapshot.planned is not None else None
    note = None
    if mode == "reactive":
        note = "no model yet: planning for the current load"
    if snapshot.last_error:
        note = f"last error: {snapshot.last_error}"
    return PlotData(
        title=f"{target.target_id}  ·  model {snapshot.model or 'none'}",
        history=history,
        forecast=snapshot.forecast,
        current=current,
        planned=snapshot.planned.value if snapshot.planned is not None else None,
        quantile=spec.quantile,
        target_value=spec.target_value,
        time_zone=spec.time_zone,
        note=note,
    )


def plot_target(target: Target, snapshot: Snapshot | None = None) -> bytes:
    """One target's PNG (see `render`)."""
    return render(plot_data(target, snapshot))


def _days(index: pd.DatetimeIndex) -> np.ndarray:
    """Matplotlib date numbers (days since the epoch) for a UTC index."""
    return np.asarray(mdates.date2num(index.tz_convert("UTC").tz_localize(None).to_numpy()))


def _epoch_days(seconds: float) -> float:
    return seconds / 86_400.0


def render(data: PlotData) -> bytes:
    """Two panels sharing a load axis scale: the last two days, and a close-up of the last
    hours and the forecast with the replicas the plan implies on the right-hand axis."""
    # Fixed margins: a layout engine would measure every label first, doubling the time.
    figure = Figure(figsize=SIZE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)
    overview, zoom = figure.subplots(
        2, 1, height_ratios=[1, 1.25],
        gridspec_kw={"left": 0.075, "right": 0.915, "top": 0.885, "bottom": 0.085, "hspace": 0.42},
    )
    # parse_math=False: names and error messages are text, never mathtext ("$...$").
    figure.suptitle(data.title, fontsize=11, x=0.01, ha="left", parse_math=False)
    tz = zoneinfo.ZoneInfo(data.time_zone)

    if data.history.empty and data.current is None:
        for axes in (overview, zoom):
            axes.set_axis_off()
        overview.text(0.5, 0.3, "waiting for the first data", ha="center", va="center",
                      fontsize=14, color="#555555", transform=overview.transAxes)
        if data.note:
            zoom.text(0.5, 0.8, data.note[:120], ha="center", va="center", fontsize=9,
                      color="#b71c1c", transform=zoom.transAxes, parse_math=False)
        return _png(figure)

    end = _end(data)
    for axes, window in ((overview, HISTORY_WINDOW), (zoom, ZOOM_WINDOW)):
        _draw(axes, data, start=end - window)
        locator = mdates.AutoDateLocator(tz=tz, minticks=4, maxticks=8)
        axes.xaxis.set_major_locator(locator)
        axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=tz))
        axes.set_ylabel("load")
        axes.grid(True, color="#e0e0e0", linewidth=0.6)
        axes.set_ylim(bottom=0)
        axes.yaxis.set_major_locator(MaxNLocator(5))
    overview.set_title(f"last {_span(HISTORY_WINDOW)} ({data.time_zone})", fontsize=9,
                       loc="left")
    zoom.set_title(f"last {_span(ZOOM_WINDOW)} and the forecast", fontsize=9, loc="left")
    overview.legend(loc="upper left", fontsize=8, ncols=4, frameon=False)
    _replicas_axis(zoom, data)
    if data.note:
        zoom.text(0.01, 0.02, data.note[:140], fontsize=8, color="#b71c1c",
                  transform=zoom.transAxes, parse_math=False)
    return _png(figure)


def _end(data: PlotData) -> pd.Timestamp:
    ends = []
    if not data.history.empty:
        ends.append(pd.Timestamp(data.history.index[-1]) + (
            data.history.index[-1] - data.history.index[-2] if len(data.history) > 1
            else pd.Timedelta(0)))
    if data.forecast is not None:
        ends.append(pd.Timestamp(data.forecast.timestamps[-1]) + data.forecast.step)
    if data.current is not None:
        ends.append(pd.Timestamp(data.current[0], unit="s", tz="UTC"))
    return max(ends)


def _draw(axes: Axes, data: PlotData, start: pd.Timestamp) -> None:
    history = data.history[data.history.index >= start]
    if not history.empty:
        axes.plot(_days(pd.DatetimeIndex(history.index)), history.to_numpy(),
                  color=HISTORY_COLOR, linewidth=1.2, label="actual")
    forecast = data.forecast
    planned_at = _epoch_days(data.current[0]) if data.current is not None else None
    if forecast is not None:
        # Join the forecast to the last observed bin so the band reads as a continuation.
        times = _days(forecast.timestamps)
        planned_at = float(times[-1])  # the plan is for the interval new pods will serve
        anchor = None
        if not history.empty and np.isfinite(history.iloc[-1]):
            anchor = (float(_days(pd.DatetimeIndex(history.index[-1:]))[0]),
                      float(history.iloc[-1]))
        for (low, high), alpha, label in (
            ((0.05, 0.95), 0.18, "90% band"),
            ((0.1, 0.9), 0.32, "80% band"),
        ):
            if low in forecast.quantiles and high in forecast.quantiles:
                x, lo, hi = times, forecast.quantiles[low], forecast.quantiles[high]
                if anchor is not None:
                    x = np.r_[anchor[0], x]
                    lo, hi = np.r_[anchor[1], lo], np.r_[anchor[1], hi]
                axes.fill_between(x, lo, hi, color=FORECAST_COLOR, alpha=alpha, linewidth=0,
                                  label=label)
        if data.quantile in forecast.quantiles:
            values = forecast.quantiles[data.quantile]
            x = times if anchor is None else np.r_[anchor[0], times]
            y = values if anchor is None else np.r_[anchor[1], values]
            axes.plot(x, y, color=FORECAST_COLOR, linewidth=1.4, linestyle="--",
                      label=f"forecast q{data.quantile:g}")
    if data.current is not None:
        axes.plot([_epoch_days(data.current[0])], [data.current[1]], "o", color=HISTORY_COLOR,
                  markersize=6, markeredgecolor="white", label="current", zorder=5)
    if data.planned is not None and planned_at is not None:
        axes.plot([planned_at], [data.planned], "D", color=PLANNED_COLOR, markersize=7,
                      markeredgecolor="white", label="planned", zorder=6)
    axes.set_xlim(float(_days(pd.DatetimeIndex([start]))[0]), None)


def _replicas_axis(axes: Axes, data: PlotData) -> None:
    """A right-hand scale in replicas (load / targetValue) and the capacity the plan buys.

    Drawn as plain tick marks and labels: a secondary axis would be a third Axes, which
    costs about as much to draw as everything else in the figure.
    """
    target = data.target_value
    if data.planned is not None:
        replicas = planned_replicas(data.planned, target)
        capacity = replicas * target
        axes.axhline(capacity, color=PLANNED_COLOR, linewidth=1.0, linestyle=":")
        low, high = axes.get_ylim()
        axes.set_ylim(low, max(high, capacity * 1.08))
        axes.annotate(
            f"planned {data.planned:,.4g} → {replicas} replicas",
            xy=(0.01, capacity), xycoords=("axes fraction", "data"), xytext=(0, 3),
            textcoords="offset points", fontsize=9, color=PLANNED_COLOR, fontweight="bold",
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none",
                  "alpha": 0.85},
        )
    low, high = axes.get_ylim()
    levels = MaxNLocator(nbins=6, integer=True).tick_values(low / target, high / target)
    edge = axes.get_yaxis_transform()  # x in axes fraction, y in data
    for level in levels:
        if low <= level * target <= high:
            axes.plot([1.0, 1.012], [level * target] * 2, color="black", linewidth=0.8,
                      transform=edge, clip_on=False)
            axes.text(1.018, level * target, f"{level:g}", transform=edge, va="center",
                      fontsize=10)
    axes.text(1.07, 0.5, f"replicas (at {target:g} per replica)", transform=axes.transAxes,
              rotation=90, va="center", ha="left", fontsize=10, parse_math=False)


@dataclass(frozen=True)
class SharePlotData:
    """What a share plot shows: the judged intervals' starts (epoch seconds, oldest first),
    1.0 for each that ran short of capacity and 0.0 for each served, and the share asked."""

    title: str
    starts: np.ndarray
    shortfalls: np.ndarray
    asked: float
    step_seconds: int
    time_zone: str = "UTC"


def share_data(target: Target) -> SharePlotData | None:
    """The data for a target's share plot; None when it holds no maxUnderProvisioned."""
    keeper = target.share_keeper
    if keeper is None:
        return None
    with target.lock:  # the two windows grow together, under the lock
        starts, shortfalls = keeper.history()
    return SharePlotData(
        title=f"{target.target_id}  ·  short of capacity",
        starts=starts,
        shortfalls=shortfalls,
        asked=keeper.controller.share,
        step_seconds=target.spec.step_seconds,
        time_zone=target.spec.time_zone,
    )


def running_share(shortfalls: np.ndarray, window: int) -> np.ndarray:
    """At each interval, the share of the last `window` judged intervals (fewer at first)
    that ran short."""
    totals = np.cumsum(np.r_[0.0, shortfalls])
    counts = np.minimum(np.arange(1, shortfalls.size + 1), window)
    ends = np.arange(1, shortfalls.size + 1)
    return np.asarray((totals[ends] - totals[ends - counts]) / counts)


def render_share(data: SharePlotData) -> bytes:
    """The share of intervals short of capacity over the last day, at every judged interval
    of the last week, with the share over the whole week and the share asked as lines."""
    figure = Figure(figsize=SHARE_SIZE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(
        gridspec_kw={"left": 0.075, "right": 0.915, "top": 0.8, "bottom": 0.17},
    )
    figure.suptitle(data.title, fontsize=11, x=0.01, ha="left", parse_math=False)
    if not data.starts.size:
        axes.set_axis_off()
        axes.text(0.5, 0.5, "no interval judged yet: the first is judged once the interval "
                  "its first plan was for has passed", ha="center", va="center", fontsize=10,
                  color="#555555", transform=axes.transAxes)
        return _png(figure)
    tz = zoneinfo.ZoneInfo(data.time_zone)
    window = max(1, int(SHARE_WINDOW.total_seconds()) // data.step_seconds)
    # Once a whole window has been judged, the points before it (a share of fewer
    # intervals) would only show noise: draw from the first full window on.
    first = window - 1 if data.starts.size > window else 0
    days = data.starts[first:] / 86_400.0
    percent = 100.0 * running_share(data.shortfalls, window)[first:]
    week = 100.0 * float(data.shortfalls.mean())
    axes.plot(days, percent, color=HISTORY_COLOR, linewidth=1.2,
              label=f"short over the last {_span(SHARE_WINDOW)}")
    axes.axhline(week, color=HISTORY_COLOR, linewidth=0.9, linestyle=":",
                 label=f"over these {data.starts.size:,} intervals: {week:.1f}%")
    axes.axhline(100.0 * data.asked, color=ASKED_COLOR, linewidth=1.2, linestyle="--",
                 label=f"asked: at most {100.0 * data.asked:g}%")
    locator = mdates.AutoDateLocator(tz=tz, minticks=4, maxticks=8)
    axes.xaxis.set_major_locator(locator)
    axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=tz))
    axes.set_ylabel("% of intervals")
    axes.set_ylim(0, max(2.5 * 100.0 * data.asked, float(percent.max()) * 1.1))
    axes.grid(True, color="#e0e0e0", linewidth=0.6)
    axes.legend(loc="upper left", fontsize=8, ncols=3, frameon=False)
    return _png(figure)


def share_fingerprint(target: Target, snapshot: Snapshot) -> tuple[object, ...]:
    """What a share plot shows, as a key: it changes only when an interval is judged."""
    share = snapshot.share
    return (None,) if share is None else (share.judged["7d"], share.achieved["7d"],
                                          target.buffer.last)


def plot_share(target: Target, snapshot: Snapshot | None = None) -> bytes:
    """One target's share PNG (see `render_share`). The REST route answers 404 for a target
    that holds no maxUnderProvisioned; the plot then says so, should anything ask."""
    data = share_data(target)
    if data is None:
        data = SharePlotData(f"{target.target_id}  ·  a fixed quantile: no share is held",
                             np.empty(0), np.empty(0), math.nan, target.spec.step_seconds)
    return render_share(data)


def _span(window: pd.Timedelta) -> str:
    hours = window / pd.Timedelta(hours=1)
    return f"{hours / 24:g} days" if hours >= 48 else f"{hours:g} hours"


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None},
                   pil_kwargs={"compress_level": 1})
    return buffer.getvalue()


def fingerprint(target: Target, snapshot: Snapshot) -> tuple[object, ...]:
    """What a plot shows, as a key. The engine publishes a new snapshot on every refresh
    even when nothing changed, so snapshot identity alone would redraw every 30 s."""
    forecast = snapshot.forecast
    return (
        target.buffer.last,
        len(target.buffer),
        snapshot.current_value,
        snapshot.planned.value if snapshot.planned is not None else None,
        snapshot.model,
        snapshot.last_error,
        None if forecast is None else (
            forecast.origin,
            forecast.mean.tobytes(),
            tuple((q, values.tobytes()) for q, values in sorted(forecast.quantiles.items())),
        ),
    )


@dataclass(frozen=True)
class _Entry:
    target: Target
    snapshot: Snapshot
    key: tuple[object, ...]
    png: bytes


class PlotCache:
    """The PNG of each target (its plot, or what `draw` makes), redrawn only when what it
    shows (`key`) changes; thread-safe.

    Beyond `size` targets the least recently drawn is dropped. `last_render_seconds` and
    `last_render_cpu_seconds` (the rendering thread's CPU time, which other load on the
    machine does not inflate) say what the latest drawing cost.
    """

    def __init__(
        self,
        size: int = CACHE_SIZE,
        *,
        draw: Callable[[Target, Snapshot], bytes] = plot_target,
        key: Callable[[Target, Snapshot], tuple[object, ...]] = fingerprint,
    ) -> None:
        self.size = size
        self.draw = draw
        self.key = key
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.renders = 0
        self.last_render_seconds = math.nan
        self.last_render_cpu_seconds = math.nan

    def png(self, target: Target) -> bytes:
        snapshot = target.snapshot
        with self._lock:
            entry = self._entries.get(target.target_id)
        if (
            entry is not None
            and entry.target is target
            and (entry.snapshot is snapshot or entry.key == self.key(target, snapshot))
        ):
            with self._lock:
                if target.target_id in self._entries:
                    self._entries.move_to_end(target.target_id)
            return entry.png
        key = self.key(target, snapshot)
        began, began_cpu = time.perf_counter(), time.thread_time()
        png = self.draw(target, snapshot)  # outside the lock: renders may run side by side
        seconds, cpu = time.perf_counter() - began, time.thread_time() - began_cpu
        with self._lock:
            self._entries[target.target_id] = _Entry(target, snapshot, key, png)
            self._entries.move_to_end(target.target_id)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
            self.renders += 1
            self.last_render_seconds = seconds
            self.last_render_cpu_seconds = cpu
        return png
