"""The PNG of bench/results.md: reader CPU per event against the number of monitored
sockets, our epoll engine against a plain `zmq.Poller` drain."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display here; must precede pyplot
import matplotlib.pyplot as plt


def plot_ingest(curve: dict[str, list[Any]], path: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    ax.plot(curve["sockets"], curve["ours"], "o-", label="zmq-exporter engine (epoll)")
    ax.plot(curve["sockets"], curve["poller"], "s--", label="raw drain, zmq.Poller")
    ax.set_xscale("log")
    ax.set_xticks(curve["sockets"], [str(n) for n in curve["sockets"]])
    ax.minorticks_off()
    ax.set_xlabel("monitored sockets (one of them in a raw TCP churn storm)")
    ax.set_ylabel("reader CPU per event (µs)")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
