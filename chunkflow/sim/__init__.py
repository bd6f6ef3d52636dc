"""Discrete-event simulation of pipeline schedules (stdlib only; imports :mod:`chunkflow.plan`)."""

from chunkflow.sim.simulator import Event, SimResult, chrome_trace, simulate

__all__ = ["Event", "SimResult", "chrome_trace", "simulate"]
