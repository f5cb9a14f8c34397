"""`python -m bench [--quick|--smoke] [--json] [--plot PNG]`: every measure of bench/README.md
as a ratio against a baseline measured in the same run, with its goal."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

from bench import (
    app,
    connections,
    http,
    ingest,
    launcher,
    library,
    memory,
    messages,
    otlp,
    probe,
    relay,
    relay_scale,
    scrape,
)
from bench.common import BenchEngine, process_cpu, raise_fd_limit, wait_quiet, wait_until
from exporter.monitor.engine import COALESCE_SECONDS


@dataclass(frozen=True)
class Profile:
    name: str
    connections: int  # per storm
    repeats: int  # storms per pipeline (medians are reported)
    scale_sockets: int  # the "4,000" of scale_4000_vs_10 and idle_cpu_4000
    idle_seconds: float
    app_pairs: int  # monitored/plain window pairs
    app_window: float  # seconds
    app_rate: float  # connections/s of churn during the app runs
    scrape_sockets: int
    scrape_repeats: int
    memory_sockets: int
    overload_connections: int
    curve: tuple[int, ...] = ()  # socket counts of the ingest-cost plot


PROFILES = {
    "smoke": Profile(
        "smoke",
        connections=300,
        repeats=1,
        scale_sockets=40,
        idle_seconds=0.5,
        app_pairs=2,
        app_window=0.2,
        app_rate=200,
        scrape_sockets=200,
        scrape_repeats=1,
        memory_sockets=50,
        overload_connections=300,
        curve=(10, 40),
    ),
    "quick": Profile(
        "quick",
        connections=5000,
        repeats=3,
        scale_sockets=4000,
        idle_seconds=3.0,
        app_pairs=10,
        app_window=0.3,
        app_rate=1000,
        scrape_sockets=10_000,
        scrape_repeats=2,
        memory_sockets=1000,
        overload_connections=5000,
    ),
    "full": Profile(
        "full",
        connections=20_000,
        repeats=7,
        scale_sockets=4000,
        idle_seconds=10.0,
        app_pairs=40,
        app_window=0.3,
        app_rate=1000,
        scrape_sockets=10_000,
        scrape_repeats=5,
        memory_sockets=4000,
        overload_connections=20_000,
        curve=(10, 100, 1000, 4000),
    ),
}


@dataclass
class Measure:
    value: float
    goal: float
    op: str  # "<=", ">=" or "=="
    unit: str
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        if self.op == "<=":
            return self.value <= self.goal
        if self.op == ">=":
            return self.value >= self.goal
        return self.value == self.goal

    def as_json(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "goal": self.goal,
            "op": self.op,
            "unit": self.unit,
            "ok": self.ok,
            **self.detail,
        }


def _median_us(runs: list[ingest.Run]) -> float:
    return statistics.median(r.us_per_event for r in runs)


def measure_pipeline(p: Profile, out: dict[str, Measure]) -> None:
    raw: list[ingest.Run] = []
    raw_coalesced: list[ingest.Run] = []
    ours: list[ingest.Run] = []
    diy: list[ingest.Run] = []
    with BenchEngine() as bench:
        for _ in range(p.repeats):  # interleaved, so drifts of the machine hit all alike
            raw.append(ingest.run_raw(p.connections))
            ours.append(ingest.run_ours(p.connections, bench))
            diy.append(ingest.run_diy(p.connections))
            raw_coalesced.append(ingest.run_raw(p.connections, COALESCE_SECONDS))
    us = {
        name: _median_us(runs)
        for name, runs in (
            ("raw", raw),
            ("raw_coalesced", raw_coalesced),
            ("ours", ours),
            ("diy", diy),
        )
    }
    detail = {f"{k}_us_per_event": round(v, 3) for k, v in us.items()}
    out["pipeline_vs_raw"] = Measure(us["ours"] / us["raw"], 1.3, "<=", "ratio", detail)
    out["pipeline_vs_raw_coalesced"] = Measure(
        us["ours"] / us["raw_coalesced"], 1.3, "<=", "ratio", {"informational": True}
    )
    out["pipeline_vs_diy"] = Measure(us["diy"] / us["ours"], 2.0, ">=", "ratio", {})


def measure_scale(p: Profile, out: dict[str, Measure], curve: dict[str, list[Any]]) -> None:
    few: list[ingest.Run] = []
    many: list[ingest.Run] = []
    with BenchEngine(idle=9) as small, BenchEngine(idle=p.scale_sockets - 1) as big:
        # Idle: every socket's LISTENING read and both engine threads quiet, then nothing
        # happens for idle_seconds.
        wait_until(lambda: big.events() >= p.scale_sockets, 60)
        wait_quiet(big.cpu, 30)
        wait_quiet(small.cpu, 30)
        cpu0, t0 = process_cpu(), time.monotonic()
        time.sleep(p.idle_seconds)
        share = (process_cpu() - cpu0) / (time.monotonic() - t0)
        out[f"idle_cpu_{p.scale_sockets}"] = Measure(
            share,
            0.01,
            "<=",
            "share of a core",
            {"seconds": p.idle_seconds, "sockets": p.scale_sockets, "whole_process": True},
        )
        for _ in range(p.repeats):
            few.append(ingest.run_ours(p.connections, small))
            many.append(ingest.run_ours(p.connections, big))
    # After the engines are closed: both sets of sockets at once would exceed the fd limit.
    out[f"idle_cpu_{p.scale_sockets}_poller"] = Measure(
        ingest.poller_idle_share(p.scale_sockets, p.idle_seconds),
        0.01,
        "<=",
        "share of a core",
        {"informational": True, "reader_thread_only": True},
    )
    out[f"scale_{p.scale_sockets}_vs_10"] = Measure(
        _median_us(many) / _median_us(few),
        1.1,
        "<=",
        "ratio",
        {
            "us_per_event_10": round(_median_us(few), 3),
            f"us_per_event_{p.scale_sockets}": round(_median_us(many), 3),
        },
    )
    for n in p.curve:
        with BenchEngine(idle=n - 1) as bench:
            ours = [ingest.run_ours(p.connections, bench) for _ in range(p.repeats)]
        poller = [ingest.run_poller(p.connections, n) for _ in range(p.repeats)]
        curve["sockets"].append(n)
        curve["ours"].append(_median_us(ours))
        curve["poller"].append(_median_us(poller))


def measure_app(p: Profile, out: dict[str, Measure]) -> None:
    result = app.run(p.app_pairs, p.app_window, p.app_rate)
    out["app_throughput"] = Measure(
        result.ratio,
        0.97,
        ">=",
        "ratio",
        {
            "churn_ratio": round(result.churn_ratio, 4),
            "churn_per_second": p.app_rate,
            "window_pairs": p.app_pairs,
            "round_trips_per_second": {
                k: round(v) for k, v in result.round_trips_per_second.items()
            },
        },
    )


def measure_library(p: Profile, out: dict[str, Measure]) -> None:
    result = library.run(p.app_pairs, p.app_window, p.app_rate)
    out["library_app_throughput"] = Measure(
        result.ratio,
        0.98,
        ">=",
        "ratio",
        {
            "churn_ratio": round(result.churn_ratio, 4),
            "churn_per_second": p.app_rate,
            "window_pairs": p.app_pairs,
            "round_trips_per_second": {
                k: round(v) for k, v in result.round_trips_per_second.items()
            },
            "reader_us_per_event": round(result.reader_us_per_event, 2),
            "daemon_engine_us_per_event": round(result.daemon_us_per_event, 2),
        },
    )


# (window pairs, window seconds, startup runs) of the launcher's measures, per profile.
LAUNCHER_RUNS = {"smoke": (2, 0.2, 4), "quick": (10, 0.3, 15), "full": (20, 0.5, 40)}


def measure_launcher(p: Profile, out: dict[str, Measure]) -> None:
    pairs, window, runs = LAUNCHER_RUNS[p.name]
    got = launcher.throughput(pairs, window)
    out["launcher_app_throughput"] = Measure(
        round(got.ratio, 4),
        0.98,
        ">=",
        "ratio",
        {
            "round_trips_per_second": {"plain": round(got.plain), "launched": round(got.launched)},
            "instrumented_sockets": got.instrumented_sockets,
            "window_pairs": got.windows,
        },
    )
    start = launcher.startup(runs)
    out["launcher_startup_overhead_ms"] = Measure(
        round(start.overhead_ms, 1),
        50.0,
        "<=",
        "ms",
        {
            "plain_ms": round(start.plain_ms, 1),
            "launched_ms": round(start.launched_ms, 1),
            "runs": start.runs,
        },
    )


def measure_scrape(p: Profile, out: dict[str, Measure]) -> None:
    t = scrape.run(p.scrape_sockets, p.scrape_repeats)
    out["scrape_vs_generate_latest"] = Measure(
        t.generate_latest / t.ours_warm,
        3.0,
        ">=",
        "ratio",
        {
            "sockets": p.scrape_sockets,
            "series": t.series,
            "generate_latest_s": round(t.generate_latest, 4),
            "generate_latest_with_created_s": round(t.generate_latest_created, 4),
            "ours_warm_s": round(t.ours_warm, 4),
            "ours_all_changed_s": round(t.ours_all_changed, 4),
            "ours_first_s": round(t.ours_first, 4),
        },
    )
    for name, seconds in (("all_changed", t.ours_all_changed), ("first", t.ours_first)):
        out[f"scrape_vs_generate_latest_{name}"] = Measure(
            t.generate_latest / seconds, 3.0, ">=", "ratio", {"informational": True}
        )


def measure_otlp(p: Profile, out: dict[str, Measure]) -> None:
    t = otlp.run(p.scrape_sockets, p.scrape_repeats)
    out["otlp_export_vs_generate_latest"] = Measure(
        t.warm / t.generate_latest,
        0.25,
        "<=",
        "ratio",
        {
            "sockets": p.scrape_sockets,
            "series": t.series,
            "points": t.points,
            "payload_bytes": t.payload_bytes,
            "requests": t.requests,
            "largest_request_bytes": t.largest_request,
            "generate_latest_s": round(t.generate_latest, 4),
            "ours_warm_s": round(t.warm, 4),
            "ours_all_changed_s": round(t.all_changed, 4),
            "ours_first_s": round(t.first, 4),
        },
    )
    # Every socket changed since the previous export: every data point written again.
    out["otlp_export_vs_generate_latest_all_changed"] = Measure(
        t.all_changed / t.generate_latest, 1.0, "<=", "ratio", {"sockets": p.scrape_sockets}
    )
    out["otlp_export_vs_generate_latest_first"] = Measure(
        t.first / t.generate_latest, 0.25, "<=", "ratio", {"informational": True}
    )


def measure_memory(p: Profile, out: dict[str, Measure]) -> None:
    bare = memory.measure("bare", p.memory_sockets)
    ours = memory.measure("ours", p.memory_sockets)
    out["rss_per_socket_vs_libzmq"] = Measure(
        ours / bare,
        1.5,
        "<=",
        "ratio",
        {"sockets": p.memory_sockets, "ours_bytes": round(ours), "libzmq_bytes": round(bare)},
    )


def measure_overload(p: Profile, out: dict[str, Measure]) -> None:
    with BenchEngine() as bench:
        o = ingest.run_overload(p.overload_connections, bench)
    out["storm_loss"] = Measure(
        o.lost,
        0,
        "==",
        "events",
        {
            "generated": o.generated,
            "counted": o.counted,
            "dropped_reported": 0,
            "stalled_s": round(o.stalled_seconds, 3),
            "catch_up_s": round(o.catch_up_seconds, 3),
            "backlog_max": o.backlog_max,
        },
    )


def measure_probe(p: Profile, out: dict[str, Measure]) -> None:
    """/probe (issue 17): bench/probe.py."""
    rounds, seconds = {"smoke": (50, 0.5), "quick": (300, 3.0)}.get(p.name, (1000, 10.0))
    r = probe.run(rounds=rounds, concurrent=100, seconds=seconds)
    out["probe_latency_overhead"] = Measure(
        r.ratio,
        1.5,
        "<=",
        "ratio",
        {"probe_us": round(r.probe_s * 1e6, 1), "bare_us": round(r.bare_s * 1e6, 1),
         "rounds": r.rounds},
    )  # fmt: skip
    out["probe_latency_overhead_curve"] = Measure(
        r.curve_ratio,
        1.5,
        "<=",
        "ratio",
        {"informational": True, "connections_per_probe": 2,
         "probe_us": round(r.curve_probe_s * 1e6, 1),
         "bare_us": round(r.curve_bare_s * 1e6, 1)},
    )  # fmt: skip
    out["probe_concurrent_100_failures"] = Measure(
        sum(r.concurrent_failures.values()),
        0,
        "==",
        "probes",
        {"concurrent": r.concurrent, "probes": r.concurrent_probes,
         "probes_per_second": round(r.concurrent_probes / r.concurrent_seconds),
         "p99_s": round(r.concurrent_p99_s, 4), "failures": r.concurrent_failures},
    )  # fmt: skip


def measure_relay(p: Profile, out: dict[str, Measure]) -> None:
    """relay_fanin (issue 16): bench/relay.py (senders are threads, see its docstring)."""
    size = {"smoke": (5, 4, 100.0, 0.5, 4, 0.5, 1), "quick": (50, 20, 1000.0, 2.0, 20, 2.0, 1)}
    r = relay.run(*size.get(p.name, (50, 20, 1000.0, 10.0, 20, 5.0, 3)))
    out["relay_fanin"] = Measure(
        r.staleness_p99_s,
        1.0,
        "<=",
        "s (staleness p99, event to /metrics)",
        {"senders": r.senders, "sockets_per_sender": r.sockets_per_sender,
         "churn_per_second": r.rate, "staleness_p50_s": round(r.staleness_p50_s, 3),
         "staleness_max_s": round(r.staleness_max_s, 3), "samples": r.staleness_samples,
         "sidecar_us_per_message": round(r.daemon_us_per_message, 1),
         "sidecar_us_per_connection": round(r.daemon_us_per_connection, 1),
         "messages": r.messages, "connections": r.connections,
         "sidecar_rss_per_socket_bytes": round(r.rss_per_socket_bytes),
         "sidecar_rss_per_socket_before_churn_bytes": round(r.rss_per_socket_before_churn_bytes)},
    )  # fmt: skip
    out["relay_fanin_sender_cost"] = Measure(
        r.sender_ratio,
        1.2,
        "<=",
        "ratio",
        {f"{k}_us_per_event": round(v, 2) for k, v in r.sender.items()},
    )


def measure_relay_scale(p: Profile, out: dict[str, Measure]) -> None:
    """relay_scale: bench/relay_scale.py (sender processes simulated, see its docstring)."""
    # (processes, sockets each, daemon-owned sockets, churn rounds, warm scrape rounds)
    size = {"smoke": (10, 20, 20, 1, 6), "quick": (200, 20, 500, 2, 9)}
    r = relay_scale.run(*size.get(p.name, (1000, 20, 2000, 2, 15)))
    detail = {
        "processes": r.processes, "sockets_per_process": r.sockets_per_process,
        "relayed_sockets": r.relayed, "owned_sockets": r.owned, "churn_rounds": r.rounds,
        "seconds": round(r.seconds, 1),
    }  # fmt: skip
    out["relay_scale_rss_per_socket"] = Measure(
        r.rss_per_socket_bytes,
        16384,
        "<=",
        "bytes (sidecar RSS per relayed socket, after churn)",
        {**detail, "before_churn_bytes": round(r.rss_per_socket_before_churn_bytes),
         "messages": r.messages, "sidecar_us_per_message": round(r.sidecar_us_per_message, 1)},
    )  # fmt: skip
    out["relay_scale_scrape_cost"] = Measure(
        r.scrape_ratio,
        1.2,
        "<=",
        "ratio (warm scrape per relayed socket / per daemon-owned socket)",
        {**detail, "relayed_us_per_socket": round(r.relayed_scrape_us_per_socket, 3),
         "owned_us_per_socket": round(r.owned_scrape_us_per_socket, 3),
         "scrape_s": {k: round(v, 5) for k, v in r.scrape_s.items()},
         "bytes_per_socket": {k: round(v) for k, v in r.bytes_per_socket.items()},
         "scrape_rounds": r.scrape_rounds},
    )  # fmt: skip


def measure_connections(p: Profile, out: dict[str, Measure]) -> None:
    """connections_scrape_cost (issue 18): bench/connections.py (two real daemons)."""
    size = {"smoke": (2, 20, 10, 0.5, 0.5), "quick": (4, 1000, 100, 5.0, 5.0)}
    r = connections.run(*size.get(p.name, (4, 1000, 400, 20.0, 10.0)))

    def rounded(x: float | None, digits: int) -> float | None:
        return None if x is None else round(x, digits)

    out["connections_scrape_cost"] = Measure(
        r.ratio,
        1.5,
        "<=",
        "ratio",
        {"connections": r.connections, "rounds": r.rounds,
         "scrape_on_s": round(r.scrape_on_s, 5), "scrape_off_s": round(r.scrape_off_s, 5),
         "scrape_on_p95_s": round(r.detail["scrape_on_p95_s"], 5),
         "scrape_off_p95_s": round(r.detail["scrape_off_p95_s"], 5),
         "tcp_info_us": round(r.tcp_info_us, 2), "first_read_us": round(r.first_read_us, 2),
         "pinned_read_us": round(r.pinned_read_us, 2),
         "sample_duration_s": rounded(r.sample_duration_s, 4),
         "first_sample_duration_s": rounded(r.first_sample_duration_s, 4),
         "sample_interval_s": r.sample_interval_s,
         "sampler_cpu_share": round(r.sampler_cpu_share, 4),
         "connection_series": r.series_on,
         "metrics_bytes_on": r.detail["metrics_bytes_on"],
         "metrics_bytes_off": r.detail["metrics_bytes_off"]},
    )  # fmt: skip


def measure_http(p: Profile, out: dict[str, Measure]) -> None:
    """http_parse_cost: bench/http.py (h11 against the previous parser, in process)."""
    rounds, batch = {"smoke": (4, 50), "quick": (20, 200)}.get(p.name, (40, 400))
    r = http.run(rounds=rounds, batch=batch)
    out["http_parse_cost"] = Measure(
        r.ratio,
        1.5,
        "<=",
        "ratio",
        {"h11_us_per_head": round(r.new_us, 1), "previous_us_per_head": round(r.old_us, 1),
         "rounds": r.rounds, "heads": r.heads},
    )  # fmt: skip
    trip = http.run_round_trip(batches=rounds, batch=batch)
    if trip is not None:  # the baseline server's source comes from git
        new_s, old_s, ratio = trip
        out["http_round_trip"] = Measure(
            ratio,
            1.5,
            "<=",
            "ratio",
            {"informational": True, "us_cpu_per_request": round(new_s * 1e6, 1),
             "baseline_us_cpu_per_request": round(old_s * 1e6, 1),
             "baseline": http.BASELINE_COMMIT},
        )  # fmt: skip


STEPS = (
    "pipeline", "scale", "app", "library", "scrape", "otlp", "memory", "overload", "probe",
    "relay", "relay_scale", "connections", "http", "messages", "launcher",
)  # fmt: skip


# (windows per mode, messages per window) of message_counting_overhead, per profile.
MESSAGE_WINDOWS = {"smoke": (4, 2_000), "quick": (10, 10_000), "full": (30, 20_000)}


def measure_messages(p: Profile, out: dict[str, Measure]) -> None:
    windows, per_window = MESSAGE_WINDOWS[p.name]
    result = messages.run(windows, per_window)
    out["message_counting_overhead"] = Measure(
        round(result.batched_ratio, 3),
        1.10,
        "<=",
        "ratio",
        {
            "us_per_message": result.batched_us,
            "round_trip_ratio": round(result.round_trip_ratio, 3),
            "round_trip_us_per_message": result.round_trip_us,
            "windows": result.windows,
            "messages_per_window": per_window,
            "counted": result.counted,
            "implementation": result.implementation,
            "counting_cost_us_per_message": result.counting_cost_us,
        },
    )


def run(
    profile: Profile, only: tuple[str, ...] = STEPS
) -> tuple[dict[str, Measure], dict[str, list[Any]]]:
    raise_fd_limit()
    out: dict[str, Measure] = {}
    curve: dict[str, list[Any]] = {"sockets": [], "ours": [], "poller": []}
    steps: dict[str, Callable[[], None]] = {
        "pipeline": lambda: measure_pipeline(profile, out),
        "scale": lambda: measure_scale(profile, out, curve),
        "app": lambda: measure_app(profile, out),
        "library": lambda: measure_library(profile, out),
        "scrape": lambda: measure_scrape(profile, out),
        "otlp": lambda: measure_otlp(profile, out),
        "memory": lambda: measure_memory(profile, out),
        "overload": lambda: measure_overload(profile, out),
        "probe": lambda: measure_probe(profile, out),
        "relay": lambda: measure_relay(profile, out),
        "relay_scale": lambda: measure_relay_scale(profile, out),
        "connections": lambda: measure_connections(profile, out),
        "http": lambda: measure_http(profile, out),
        "messages": lambda: measure_messages(profile, out),
        "launcher": lambda: measure_launcher(profile, out),
    }
    assert tuple(steps) == STEPS
    for name, step in steps.items():
        if name in only:
            step()
    return out, curve


def machine() -> dict[str, str]:
    import zmq

    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{cpu}, {os.cpu_count()} cpus, Linux {platform.release()}",
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "prometheus_client": version("prometheus-client"),
    }


def markdown(results: dict[str, Measure], run: dict[str, Any], plot: str | None) -> str:
    lines = [
        f"# bench results: {run['profile']} run",
        "",
        f"- date: {run['date']}",
        f"- machine: {run['machine']}",
        f"- Python {run['python']}, pyzmq {run['pyzmq']}, libzmq {run['libzmq']}, "
        f"prometheus_client {run['prometheus_client']}",
        f"- command: `python -m bench --json --plot ... --markdown ...` ({run['seconds']} s)",
        "",
        "| measure | value | goal | met | details |",
        "|---|---|---|---|---|",
    ]
    for name, m in results.items():
        met = "(informational)" if m.detail.get("informational") else "yes" if m.ok else "**no**"
        details = ", ".join(f"{k}={v}" for k, v in m.detail.items() if k != "informational")
        lines.append(f"| `{name}` | {m.value:.4g} | {m.op} {m.goal:g} | {met} | {details} |")
    if run["curve"]["sockets"]:
        c = run["curve"]
        lines += [
            "",
            "Reader CPU per event (µs) against monitored sockets:",
            "",
            "| sockets | ours (epoll) | raw drain behind zmq.Poller |",
            "|---|---|---|",
        ]
        for n, ours, poller in zip(c["sockets"], c["ours"], c["poller"], strict=True):
            lines.append(f"| {n} | {ours:.2f} | {poller:.2f} |")
    if plot:
        lines += ["", f"![ingest cost against sockets]({os.path.basename(plot)})"]
    return "\n".join(lines) + "\n"


def table(results: dict[str, Measure]) -> str:
    rows = [f"{'measure':<34} {'value':>10} {'goal':>10} {'ok':>4}"]
    for name, m in results.items():
        mark = "-" if m.detail.get("informational") else ("yes" if m.ok else "NO")
        rows.append(f"{name:<34} {m.value:>10.4g} {m.op + ' ' + format(m.goal, 'g'):>10} {mark:>4}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        epilog="The soak (a real daemon under minutes of churn) is a separate mode: "
        "python -m bench.soak [--minutes N] [--quick]",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="under 60 s on 2 cores")
    size.add_argument("--smoke", action="store_true", help="the smallest case (for the tests)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--plot", metavar="PNG", help="plot ingest cost against sockets")
    parser.add_argument("--markdown", metavar="MD", help="also write the results as Markdown")
    parser.add_argument(
        "--only",
        metavar="STEP,...",
        help=f"run only these groups of measures (of: {','.join(STEPS)})",
    )
    args = parser.parse_args(argv)
    only = STEPS
    if args.only:
        only = tuple(name.strip() for name in args.only.split(",") if name.strip())
        unknown = sorted(set(only) - set(STEPS))
        if unknown:
            parser.error(f"--only: unknown step(s) {', '.join(unknown)} (of: {','.join(STEPS)})")
    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    started = time.monotonic()
    results, curve = run(profile, only)
    seconds = time.monotonic() - started
    if args.plot and curve["sockets"]:
        from bench.plot import plot_ingest

        plot_ingest(curve, args.plot)
    doc: dict[str, Any] = {name: m.as_json() for name, m in results.items()}
    doc["_run"] = {"profile": profile.name, "seconds": round(seconds, 1), **machine()}
    doc["_run"]["curve"] = curve
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown(results, doc["_run"], args.plot))
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        print(table(results))
        print(f"({profile.name} run, {seconds:.1f} s)")
    return 0
