"""Beyond the paper: choose the forward order of a plan's chunks to cut pipeline bubbles.

The state-aware 1F1B schedule takes any order in which each chain's chunks stay ascending. The
order matters: a chain's backward waits for all its forwards on a stage, so where chains sit
between standalone chunks changes how well stages overlap. ``best_order`` simulates a few
structured candidates plus seeded random ones and returns the fastest that holds no more
graphs than plan order.
"""

from __future__ import annotations

import random
from typing import Callable

from chunkflow.plan.chunks import ChunkPlan
from chunkflow.plan.pipeline import state_aware_1f1b, structured_orders
from chunkflow.plan.scheduling import Action
from chunkflow.sim.simulator import simulate


def candidate_orders(plan: ChunkPlan, *, num_random: int = 16, seed: int = 0) -> dict[str, list[int]]:
    """Named forward orders (:func:`~chunkflow.plan.pipeline.structured_orders` and seeded
    random ones); every one keeps each chain's chunks ascending."""
    chains = [list(c.chunk_ids) for c in plan.chains]
    alone = [c.chunk_id for c in plan.chunks if c.chain_id is None]
    orders = structured_orders(plan)
    rng = random.Random(seed)
    units = [[c] for c in alone] + chains
    for i in range(num_random):
        rng.shuffle(units)
        orders[f"random {i}"] = [c for unit in units for c in unit]
    return orders


def best_order(plan: ChunkPlan, num_stages: int, *, k: int,
               duration: Callable[[int, Action], float], p2p: float = 0,
               num_random: int = 16, seed: int = 0) -> tuple[str, list[int], dict[str, float]]:
    """(name, order) of the fastest candidate among those that keep no more graphs alive on any
    stage than plan order, and every candidate's makespan."""
    makespans, live, orders = {}, {}, candidate_orders(plan, num_random=num_random, seed=seed)
    for name, order in orders.items():
        stages = state_aware_1f1b(plan, num_stages, k=k, order=order)
        # graph_bytes=1 counts graphs: the peak number alive per stage
        result = simulate(stages, duration=duration, p2p=p2p, graph_bytes=lambda s, c: 1)
        makespans[name], live[name] = result.makespan, result.peak_memory
    # An order that interleaves a chain with standalone chunks can pile their graphs up while
    # the chain's backward waits: only orders that keep no more graphs alive than plan order
    # (on every stage) compete.
    allowed = [n for n in orders if all(a <= b for a, b in zip(live[n], live["plan"]))]
    best = min(allowed, key=lambda n: (makespans[n], n != "plan"))
    return best, orders[best], makespans
