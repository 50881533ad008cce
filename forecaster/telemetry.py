"""The service's own metrics, on an injected registry (never prometheus_client's global one).

Counters and the fit-duration histogram are updated as work finishes (the engine's listener
hooks and the interfaces' request hooks). Everything per target is read from the engine's
published snapshots at scrape time by `TargetCollector`, so the hot path pays nothing for it.

>>> registry = CollectorRegistry()
>>> telemetry = Telemetry(registry)
>>> engine = Engine(settings.engine, listener=telemetry)        # doctest: +SKIP
>>> telemetry.track(engine)                                     # doctest: +SKIP
>>> generate_latest(registry)                                   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from forecaster.engine import Engine
from forecaster.policy import planned_replicas
from forecaster.sources.prometheus import REFUSED_POINT_REASONS
from forecaster.state import REFUSAL_REASONS
from forecaster.target import Target, freshness_limit, target_labels

log = logging.getLogger(__name__)

FIT_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
TARGET_LABELS = ("namespace", "name", "metric")
HTTP_VERBS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
GRPC_METHODS = ("GetMetricSpec", "GetMetrics", "IsActive", "StreamIsActive")
UNMATCHED_ROUTE = "unmatched"
COVERAGE_INTERVAL = "0.8"  # Target.accuracy() scores the 10%..90% band


class Telemetry:
    """The counters and histograms; an `EngineListener`, and the gRPC call counts.

    One per service, on the registry it is given; `track(engine)` adds the per-target gauges.
    """

    def __init__(self, registry: CollectorRegistry, *, process_metrics: bool = True) -> None:
        self.registry = registry
        if process_metrics:  # the standard process_* (memory, CPU, fds) and python_info
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.fit_duration = Histogram(
            "forecaster_fit_duration_seconds",
            "Wall time of a model fit, from submission to result (includes queueing).",
            buckets=FIT_DURATION_BUCKETS,
            registry=registry,
        )
        self.fits = Counter(
            "forecaster_fits", "Model fits finished, by outcome.", ["outcome"], registry=registry
        )
        self.fallbacks = Counter(
            "forecaster_fit_fallbacks",
            "Fits that failed with the requested model and fell back to a baseline.",
            registry=registry,
        )
        self.spec_conflicts = Counter(
            "forecaster_spec_conflicts",
            "Scaler triggers that differ from the config file's target of the same id (the "
            "config's is served); each differing spec is counted once.",
            registry=registry,
        )
        # No per-target labels: a counter's label sets live as long as the process, while
        # targets come and go, so they would grow with every id ever replaced. The WARNING
        # log line names the target and both queries.
        self.spec_changes = Counter(
            "forecaster_spec_changes",
            "Targets whose trigger a scaler request changed, replacing their history and "
            "model (an edited ScaledObject, or two triggers sharing one id).",
            registry=registry,
        )
        self.worker_deaths = Counter(
            "forecaster_fit_worker_deaths",
            "Fit worker processes found dead (killed by a signal, such as the OOM killer's, or "
            "exited); each is replaced and its fits tried once more.",
            registry=registry,
        )
        self.refreshes = Counter(
            "forecaster_refreshes",
            "Refreshes of a target's data from its source, by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.requests = Counter(
            "forecaster_requests",
            "Requests answered, by interface (grpc, http), method (gRPC method, or HTTP verb "
            "and route) and code (gRPC status name, or HTTP status).",
            ["interface", "method", "code"],
            registry=registry,
        )
        self.unexpected_errors = Counter(
            "forecaster_scaler_unexpected_errors",
            "gRPC scaler calls ended by an unexpected error in forecaster (a bug, logged at "
            "ERROR with its traceback), by method. They answer UNAVAILABLE, as an outage does, "
            "and are also counted in forecaster_requests.",
            ["method"],
            registry=registry,
        )
        self.state_saves = Counter(
            "forecaster_state_saves",
            "Writes of a target's saved state (after a refit, and at shutdown), by outcome; "
            "a failed one (disk full, read-only) leaves the last good files.",
            ["outcome"],
            registry=registry,
        )
        self.refusals = Counter(
            "forecaster_state_refused",
            "Saved targets not restored at start, by reason: version (another forecaster "
            "version's files), corrupt (unreadable, truncated, or a mismatched pair), server "
            "(its Prometheus is no longer configured), limit (past maxTargets), memory (its "
            "trigger is over targetMemoryBytes, lowered since it was saved). Each fits "
            "again as a new target.",
            ["reason"],
            registry=registry,
        )
        self.refused_points = Counter(
            "forecaster_points_refused",
            "Points read from Prometheus and refused, by reason: negative, or not_finite "
            "(NaN or Inf). In history each is left out as a gap; a refused current value "
            "makes the refresh fail. Counted at each read, so one re-read is counted again.",
            ["reason"],
            registry=registry,
        )
        for outcome in ("ok", "failed"):  # present from the start, so rate() sees the first one
            self.fits.labels(outcome)
            self.refreshes.labels(outcome)
            self.state_saves.labels(outcome)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)
        for reason in REFUSED_POINT_REASONS:
            self.refused_points.labels(reason)
        for method in GRPC_METHODS:
            self.requests.labels("grpc", method, "OK")
            self.unexpected_errors.labels(method)

    def track(self, engine: Engine) -> None:
        """Export the per-target gauges of `engine`, read at each scrape."""
        self.registry.register(TargetCollector(engine))

    # -- EngineListener ----------------------------------------------------------------------

    def fit_finished(self, target_id: str, seconds: float, ok: bool, fell_back: bool) -> None:
        self.fit_duration.observe(seconds)
        self.fits.labels("ok" if ok else "failed").inc()
        if fell_back:
            self.fallbacks.inc()

    def refresh_finished(self, target_id: str, ok: bool) -> None:
        self.refreshes.labels("ok" if ok else "failed").inc()

    def fit_worker_died(self, cause: str) -> None:
        self.worker_deaths.inc()

    def spec_conflict(self, target_id: str) -> None:
        self.spec_conflicts.inc()

    def spec_changed(self, target_id: str) -> None:
        self.spec_changes.inc()

    def points_refused(self, reason: str, count: int) -> None:
        """Count points a Prometheus read refused (`reason` in REFUSED_POINT_REASONS)."""
        self.refused_points.labels(reason).inc(count)

    # -- StateListener -----------------------------------------------------------------------

    def state_saved(self, ok: bool) -> None:
        self.state_saves.labels("ok" if ok else "failed").inc()

    def state_refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    # -- interfaces --------------------------------------------------------------------------

    def grpc_request(self, method: str, code: str, calls: int = 1) -> None:
        """Count gRPC calls (the scaler front reports them in batches)."""
        self.requests.labels("grpc", method, code).inc(calls)

    def grpc_unexpected(self, method: str, calls: int = 1) -> None:
        """Count gRPC calls that an unexpected error ended (already counted by grpc_request)."""
        self.unexpected_errors.labels(method).inc(calls)

    def http_request(self, verb: str, route: str | None, status: int) -> None:
        """Count one HTTP request by verb, route *rule* (not the path: bounded label values)
        and status; `route` is None when no rule matched."""
        verb = verb if verb in HTTP_VERBS else "OTHER"
        self.requests.labels("http", f"{verb} {route or UNMATCHED_ROUTE}", str(status)).inc()


class TargetCollector(Collector):
    """Per-target gauges, computed from each target's current snapshot when scraped."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> Iterable[Metric]:
        info, gauges = self._families()
        return [info, *gauges.values()]

    def collect(self) -> Iterator[Metric]:
        info, gauges = self._families()
        targets = list(self.engine.targets())
        gauges["targets"].add_metric([], len(targets))
        dry_run = bool(getattr(self.engine.settings, "dry_run", False))
        gauges["dry_run"].add_metric([], float(dry_run))
        for target in targets:
            try:
                self._add_target(info, gauges, target)
            except Exception:  # one odd target must not cost the whole scrape
                log.exception("metrics for target %s failed", target.target_id)
        yield info
        yield from gauges.values()

    @staticmethod
    def _families() -> tuple[InfoMetricFamily, dict[str, GaugeMetricFamily]]:
        labels = list(TARGET_LABELS)

        def gauge(name: str, documentation: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, documentation, labels=[*labels, *extra])

        info = InfoMetricFamily(
            "forecaster_target",
            "A target's fitted model (none before the first fit), the model asked for and the "
            "quantile it plans at.",
            labels=[*labels, "model", "requested_model", "planning_quantile"],
        )
        return info, {
            "targets": GaugeMetricFamily("forecaster_targets", "Targets the engine tracks."),
            "dry_run": GaugeMetricFamily(
                "forecaster_dry_run",
                "1 when the service serves KEDA the current load instead of its decisions.",
            ),
            "predicted": gauge(
                "forecaster_predicted_load",
                "The forecast for the interval new pods will serve (the decision horizon), "
                "per quantile.",
                ("quantile",),
            ),
            "horizon": gauge(
                "forecaster_forecast_horizon_seconds",
                "How far ahead forecaster_predicted_load looks: offset it by this to compare "
                "with forecaster_actual_load.",
            ),
            "planned": gauge(
                "forecaster_planned_load",
                "The load to plan for: the planning quantile at the horizon, at least the "
                "current load (what GetMetrics serves, unless dry run).",
            ),
            "actual": gauge("forecaster_actual_load", "The current value of the target's query."),
            "target_value": gauge(
                "forecaster_target_value", "The trigger's targetValue: load per replica."
            ),
            "replicas": gauge(
                "forecaster_planned_replicas",
                "Replicas the planned load implies: ceil(planned load / targetValue).",
            ),
            "abs_error": gauge(
                "forecaster_forecast_abs_error",
                "Absolute error of the latest scored decision-horizon mean forecast.",
            ),
            "mae": gauge(
                "forecaster_forecast_mae",
                "Mean absolute error of the decision-horizon mean forecasts over the recent "
                "scoring window.",
            ),
            "coverage": gauge(
                "forecaster_forecast_interval_coverage_ratio",
                "Share of recent actuals inside the forecast's central interval of this width.",
                ("interval",),
            ),
            "scored": gauge(
                "forecaster_forecast_scored_intervals",
                "Decision-horizon forecasts scored in the recent window (the MAE's sample size).",
            ),
            "age": gauge(
                "forecaster_data_age_seconds", "Seconds since the current value was read."
            ),
            "fresh": gauge(
                "forecaster_target_fresh",
                "1 while the target's data is within its freshness limit and a decision exists.",
            ),
            "reactive": gauge(
                "forecaster_reactive_fallback",
                "1 while the decision is the current load because there is no forecast yet.",
            ),
            "outage": gauge(
                "forecaster_serving_outage_forecast",
                "1 while Prometheus cannot be reached and the decision is planned from the "
                "model's forecast made when the outage began (outageHorizon); see "
                "forecaster_data_age_seconds for how long ago data last came.",
            ),
            "fitted_at": gauge(
                "forecaster_last_fit_timestamp_seconds",
                "When the target's model was last fitted (Unix time).",
            ),
            "asked_share": gauge(
                "forecaster_max_under_provisioned_ratio",
                "The trigger's maxUnderProvisioned: the share of intervals allowed short of "
                "capacity.",
            ),
            "achieved_share": gauge(
                "forecaster_under_provisioned_ratio",
                "The share of judged intervals whose demand exceeded the capacity the plans "
                "had ready (HPA arithmetic replayed from the plans), over the window.",
                ("window",),
            ),
            "plan_level": gauge(
                "forecaster_plan_level",
                "The log of the factor the maxUnderProvisioned controller puts on the plan.",
            ),
        }

    def _add_target(
        self, info: InfoMetricFamily, families: dict[str, GaugeMetricFamily], target: Target
    ) -> None:
        snapshot, spec = target.snapshot, target.spec  # one snapshot: a consistent view
        labels = list(target_labels(target.target_id))
        info.add_metric(
            labels,
            {
                "model": snapshot.model or "none",
                "requested_model": spec.model,
                "planning_quantile": f"{spec.quantile:g}",
            },
        )
        families["target_value"].add_metric(labels, spec.target_value)
        if snapshot.current_value is not None:
            families["actual"].add_metric(labels, snapshot.current_value)
        age = self.engine.age(snapshot)
        if math.isfinite(age):
            families["age"].add_metric(labels, age)
        planned = snapshot.planned
        fresh = planned is not None and age <= freshness_limit(self.engine.settings, spec)
        families["fresh"].add_metric(labels, float(fresh))
        outage = self.engine.serving_outage(target.target_id)
        families["outage"].add_metric(labels, float(outage is not None))
        planned = outage or planned  # what GetMetrics serves
        if planned is not None:
            families["planned"].add_metric(labels, planned.value)
            families["replicas"].add_metric(
                labels, planned_replicas(planned.value, spec.target_value)
            )
            families["reactive"].add_metric(labels, float(planned.mode == "reactive"))
            families["horizon"].add_metric(labels, planned.horizon_steps * spec.step_seconds)
        forecast = snapshot.forecast
        if forecast is not None:
            # The snapshot's forecast ends at the decision horizon: its last step.
            for quantile, values in sorted(forecast.quantiles.items()):
                families["predicted"].add_metric([*labels, f"{quantile:g}"], float(values[-1]))
        if snapshot.fitted_at is not None:
            families["fitted_at"].add_metric(labels, snapshot.fitted_at)
        share = snapshot.share
        if share is not None:
            families["asked_share"].add_metric(labels, share.asked)
            families["plan_level"].add_metric(labels, share.level)
            for window, achieved in share.achieved.items():  # NaN until an interval is judged
                families["achieved_share"].add_metric(
                    [*labels, window], math.nan if achieved is None else achieved
                )
        accuracy = target.accuracy()
        families["scored"].add_metric(labels, accuracy.scored)
        if accuracy.last_abs_error is not None:
            families["abs_error"].add_metric(labels, accuracy.last_abs_error)
        if accuracy.mae is not None:
            families["mae"].add_metric(labels, accuracy.mae)
        if accuracy.coverage_80 is not None:
            families["coverage"].add_metric([*labels, COVERAGE_INTERVAL], accuracy.coverage_80)
