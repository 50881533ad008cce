"""The backtest's picture and printed table."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forecaster.backtest import BacktestResult

POLICIES = ("predictive", "reactive", "oracle")


def plot_report(result: BacktestResult, path: Path) -> None:
    """Demand with the forecast band, then ready replicas of the three policies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = result.simulation.decisions
    s = result.summary
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(13, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    horizon = s["horizon_steps"]
    top.fill_between(
        d["timestamp"], d["lower"], d["upper"], step="post", color="tab:blue", alpha=0.2,
        label=f"80% interval, {horizon} steps ahead",
    )
    top.step(d["timestamp"], d["demand"], where="post", color="black", lw=0.8, label="demand")
    top.step(
        d["timestamp"], d["forecast"], where="post", color="tab:blue", lw=0.9,
        label=_plan_label(s),
    )
    top.set_ylabel("load")
    top.set_title(
        f"{s['trace']}: model {s['model']}, target {s['target']:g}/replica, "
        f"start-up {s['startup_seconds'] // 60} min, step {s['step_seconds'] // 60} min"
    )
    top.legend(loc="upper left", fontsize=8)
    colors = {"replicas": "tab:blue", "reactive_replicas": "tab:red", "oracle_replicas": "black"}
    series = (
        ("replicas", "predictive"),
        ("reactive_replicas", "reactive HPA"),
        ("oracle_replicas", "oracle"),
    )
    for column, label in series:
        score = s["policies"][label.split()[0]]
        bottom.step(
            d["timestamp"], d[column], where="post", color=colors[column], lw=0.9,
            label=f"{label}: under-provisioned {score['under_provisioned_share']:.1%}"
            + (f" (asked {s['max_under_provisioned']:.0%})"
               if column == "replicas" and s.get("max_under_provisioned") else "")
            + ", "
            f"replica-hours x{score['replica_hours_vs_oracle']:.2f}",
        )
    bottom.set_ylabel("ready replicas")
    bottom.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _cost(value: Any) -> str:
    return "unreachable" if value is None else f"{value:.2f}"


def format_table(summaries: list[dict[str, Any]]) -> str:
    """One row per trace and policy, aligned for a terminal."""
    header = (
        f"{'trace':<34} {'policy':<10} {'asked%':>6} {'under%':>7} {'unserved%':>9} "
        f"{'rh/oracle':>9} "
        f"{'cost@5%':>11} {'cost@1%':>11} {'MASE':>6} {'cov80':>6}"
    )
    lines = [header, "-" * len(header)]
    for s in summaries:
        fc = s["forecast"]
        for policy in POLICIES:
            p = s["policies"][policy]
            cost = p["cost_to_hold_slo"]
            accuracy = (
                f"{fc['mase']:>6.2f} {fc['coverage_80']:>6.1%}"
                if policy == "predictive" and fc["mase"] is not None
                else f"{'':>6} {'':>6}"
            )
            asked = s.get("max_under_provisioned")
            asked_text = f"{asked:.0%}" if policy == "predictive" and asked else ""
            lines.append(
                f"{s['trace'][:34]:<34} {policy:<10} {asked_text:>6} "
                f"{p['under_provisioned_share']:>7.1%} "
                f"{p['unserved_share']:>9.2%} {p['replica_hours_vs_oracle']:>9.2f} "
                f"{_cost(cost['5%']):>11} {_cost(cost['1%']):>11} "
                f"{accuracy}"
            )
    return "\n".join(lines)


def _plan_label(s: dict[str, Any]) -> str:
    parts = [f"q{s['quantile']:g}"]
    if s.get("max_under_provisioned"):
        parts.append(f"x level for <={s['max_under_provisioned']:.0%} short")
    half_life = s.get("plan_half_life_seconds", 0)
    if half_life:
        parts.append(f"half-life {half_life // 60:g} min" if half_life % 60 == 0
                     else f"half-life {half_life} s")
    if s["reactive_floor"]:
        parts.append("floored")
    return f"planned load ({', '.join(parts)})"
