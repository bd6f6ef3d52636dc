"""Extrapolating a dry run from shorter steps: fewer decoder layers, shorter chains.

A stage of many alike decoder layers holds, per layer, the same weights, gradients, optimizer
state, saved activations and KV state, and runs the same ops: every byte and FLOP of its step
is a + b x layers as long as the step's peak falls at the same point. A chain of n chunks holds
a KV state linear in n and runs attention over prefixes whose FLOPs, bytes and time are
quadratic in n. :func:`extrapolate` fits each value through the last probes and checks the fit
on the others; :mod:`chunkflow.dryrun.layout` decides where to probe and falls back to
running the whole step where a check fails.
"""

from __future__ import annotations

import dataclasses

from chunkflow.dryrun.tracker import CATEGORIES, OpCost

PROBE_LAYERS = (2, 3, 4)
"""Decoder layers per stage of the shorter steps a longer stage is extrapolated from."""
PROBE_CHUNKS = (3, 4, 5, 6)
"""Chunks of the longest chains in the shorter steps a long chain is extrapolated from."""


def _values(r) -> dict:
    """Everything a role's step measures, as numbers by name (``(kind, key)``)."""
    out = {("peak", ""): r.peak_device_bytes, ("step_peak", ""): r.step_memory_peak_bytes,
           ("host", ""): r.host_requested_bytes, ("host_copy", ""): r.host_copy_bytes}
    out.update({("breakdown", c): r.breakdown[c] for c in CATEGORIES})
    out.update({("most", c): r.most.get(c, 0) for c in CATEGORIES})
    out.update({("cost", f): getattr(r.cost, f) for f in ("flops", "bytes", "roofline_s", "ops")})
    out.update({("by_op", k): v for k, v in r.cost.by_op.items()})
    out.update({("action", k): v for k, v in r.action_s.items()})
    return out


_CHECKED = ("peak", "step_peak", "host", "breakdown", "cost")
_BYTES = ("peak", "step_peak", "host", "breakdown", "most")


def _name(key: tuple) -> str:
    return " ".join(str(k) for k in key if k != "")


def _interpolate(xs, vs, x) -> float:
    """The polynomial through the points (xs, vs), at x (Lagrange)."""
    total = 0.0
    for i, (xi, vi) in enumerate(zip(xs, vs)):
        term = vi
        for j, xj in enumerate(xs):
            if j != i:
                term *= (x - xj) / (xi - xj)
        total += term
    return total


def extrapolate(probes: list, xs: tuple, x: int, *, quadratic=()
                ) -> tuple[dict | None, str]:
    """Every value the ``probes`` (steps at ``xs`` layers or chunks) measure, at ``x``: a
    polynomial in x, of degree 1 (degree 2 for the kinds in ``quadratic``: an attention's
    FLOPs grow with its prefix), through the last probes; the earlier ones check it (within 1%,
    and 2 MiB of allocator rounding for bytes). None where a check fails: the step is not
    polynomial in x (its peak moves). Returns (the values, or None; what did not fit)."""
    series = [_values(r) for r in probes]
    out = {}
    for key in set().union(*series):
        if key[0] == "action" and quadratic:  # chunk ids differ between chains' lengths
            continue
        vs = [v.get(key, 0) for v in series]
        points = 3 if key[0] in quadratic else 2
        fit_x, fit_v = xs[-points:], vs[-points:]
        if key[0] in _CHECKED:
            slack = 2 * 2**20 if key[0] in _BYTES else 0.0
            for xi, vi in zip(xs[:-points], vs[:-points]):
                if abs(_interpolate(fit_x, fit_v, xi) - vi) > 0.01 * abs(vs[-1]) + slack:
                    return None, f"{_name(key)} {vs} at {xs}"
        value = _interpolate(fit_x, fit_v, x)
        if value < 0 and key[0] in _CHECKED:  # a part that shrinks as the step grows
            return None, f"{_name(key)} {vs} at {xs} falls below 0"
        out[key] = round(value) if isinstance(vs[-1], int) else value
    return out, ""


def fitted(probes: list, out: dict, **extra):
    """The role's result with the extrapolated values ``out``; ``extra``: more fields."""
    last = probes[-1]
    pick = lambda kind: {k: v for (kk, k), v in out.items() if kk == kind}  # noqa: E731
    cost = OpCost(**{f: out[("cost", f)] for f in ("flops", "bytes", "roofline_s", "ops")},
                  by_op=pick("by_op"))
    # the pinned allocator rounds each piece up to a power of two, which no polynomial
    # follows: the extrapolated request, plus what the rounding added to the largest probe
    rounding = last.host_pinned_bytes - last.host_requested_bytes
    fields = dict(name=last.name, rank=last.rank, peak_device_bytes=out[("peak", "")],
                  breakdown=pick("breakdown"), host_pinned_bytes=out[("host", "")] + rounding,
                  host_requested_bytes=out[("host", "")], cost=cost,
                  host_copy_bytes=out[("host_copy", "")], action_s=pick("action"),
                  wall_s=sum(r.wall_s for r in probes), most=pick("most"),
                  step_memory_peak_bytes=out[("step_peak", "")],
                  layers_run=last.layers_run, chunks_run=last.chunks_run)
    return dataclasses.replace(last, **{**fields, **extra})


def host_at(probes: list, xs: tuple, x: int, *, pinned: bool) -> int | None:
    """Host memory of the step at ``x`` chunks, where its one offloaded state is the long
    chain's: each of its buffers' bytes (linear in the chain's positions) extrapolated, laid
    out in pieces and rounded as the runtime and the pinned allocator do; None otherwise (the
    fitted figure then carries the largest probe's rounding)."""
    calls = [r.host_calls for r in probes]
    if any(r.layers_run for r in probes) or any(
            len(call) != 1 or len(call[0]) != len(calls[-1][0]) for call in calls):
        return None  # not one offloaded chain, alike in every whole probe: left as fitted

    (x0, x1), last = xs[-2:], probes[-1]
    total = last.host_pinned_bytes
    for before, now in zip(calls[-2], calls[-1]):
        grown = [round(b + (n - b) * (x - x0) / (x1 - x0)) for b, n in zip(before, now)]
        total += held(grown, pinned) - held(now, pinned)
    return total


def held(sizes: list[int], pinned: bool) -> int:
    """Bytes the host allocator holds for buffers of ``sizes``, laid out as the runtime lays
    them out (:func:`chunkflow.runtime.kv_state.host_buffers`)."""
    from chunkflow.plan.memory import host_pieces, pinned_block_bytes

    return sum(pinned_block_bytes(n) if pinned else n for _, n in host_pieces(sizes))
