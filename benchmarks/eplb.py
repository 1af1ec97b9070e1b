"""Expert placement on real DeepSeek-V3 load: how close the planner gets the busiest rank to the mean.

Figures are hottest rank ÷ mean rank per MoE layer, averaged over layers (a logical expert's tokens
split evenly over its replicas), on the measured expert-load files in ``../shared/data/expert-load``:

* leave-one-out: plan from the other files as a history, evaluate on the held-out one, for each
  number of redundant experts; beside it the plan from the file itself and the contiguous baseline;
* incremental: plan on one workload, re-plan with ``current`` on another; the fraction of slots
  moved, and the imbalance against a from-scratch plan on the new workload.

    python benchmarks/eplb.py --ranks 32 --redundant 0 16 32 64 > eplb.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from router.eplb import Placement, plan_placement

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "expert-load"


def load_counts(path: Path) -> list[list[float]]:
    """A ``{"logical_count": [[...], ...]}`` file as ``[layers][experts]``, without layers that saw no tokens."""
    return [row for row in json.loads(path.read_text())["logical_count"] if sum(row) > 0]


def _timed_plan(*args, **kwargs) -> tuple[Placement, dict]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = plan_placement(*args, **kwargs)
    return out, {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}


def leave_one_out(loads: dict[str, list], ranks: int, redundant: int, nodes: int, groups: int | None) -> dict:
    try:  # sizes that do not give every rank the same number of slots are refused, and reported as such
        plan_placement(next(iter(loads.values())), ranks, redundant, nodes, num_groups=groups)
    except ValueError as exc:
        return {"refused": str(exc)}
    rows = {}
    for name, held_out in loads.items():
        history = [load for other, load in loads.items() if other != name]
        plan, took = _timed_plan(history, ranks, redundant, nodes, num_groups=groups)
        own = plan_placement(held_out, ranks, redundant, nodes, num_groups=groups)
        rows[name] = {
            "history": round(plan.mean_imbalance(held_out), 4),
            "history_worst_layer": round(max(plan.imbalance(held_out)), 4),
            "itself": round(own.mean_imbalance(held_out), 4),
            "plan_time": took,
        }
        if nodes > 1:
            cross = plan.cross_node_rows(held_out)
            rows[name]["history_cross_node_rows"] = round(sum(cross) / len(cross), 4)
    return {
        "held_out": rows,
        "worst_history": max(r["history"] for r in rows.values()),
        "mean_history": round(sum(r["history"] for r in rows.values()) / len(rows), 4),
        "worst_itself": max(r["itself"] for r in rows.values()),
    }


def incremental(
    loads: dict[str, list], ranks: int, redundant: int, nodes: int, groups: int | None, all_pairs: bool
) -> dict:
    """Plan on one workload, re-plan on another from that placement: each file to the next, or every pair."""
    names = list(loads)
    pairs = [(a, b) for a in names for b in names if a != b] if all_pairs else list(zip(names, names[1:] + names[:1]))
    rows = []
    for old in dict.fromkeys(a for a, _ in pairs):
        before = plan_placement(loads[old], ranks, redundant, nodes, num_groups=groups)
        for new in (b for a, b in pairs if a == old):
            scratch = plan_placement(loads[new], ranks, redundant, nodes, num_groups=groups)
            after, took = _timed_plan(loads[new], ranks, redundant, nodes, before, num_groups=groups)
            rows.append(
                {
                    "from": old,
                    "to": new,
                    "stale": round(before.mean_imbalance(loads[new]), 4),
                    "incremental": round(after.mean_imbalance(loads[new]), 4),
                    "scratch": round(scratch.mean_imbalance(loads[new]), 4),
                    "moved_fraction": round(after.moved(before) / before.num_slots, 4),
                    "scratch_moved_fraction": round(scratch.moved(before) / before.num_slots, 4),
                    "plan_time": took,
                }
            )
    return {
        "pairs": rows,
        "worst_moved_fraction": max(r["moved_fraction"] for r in rows),
        "worst_gap": round(max(r["incremental"] - r["scratch"] for r in rows), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of expert-load JSON files")
    parser.add_argument("--ranks", type=int, default=32, help="expert ranks (EP size)")
    parser.add_argument("--redundant", type=int, nargs="+", default=[0, 16, 32, 64], help="redundant experts")
    parser.add_argument("--nodes", type=int, default=1, help="nodes the ranks are split over")
    parser.add_argument("--groups", type=int, default=None, help="expert groups (DeepSeek-V3: 8); default one per node")
    parser.add_argument("--incremental-redundant", type=int, default=32, help="redundancy of the incremental check")
    parser.add_argument("--no-incremental", action="store_true", help="skip the incremental re-plan check")
    parser.add_argument("--all-pairs", action="store_true", help="incremental: every ordered pair, not file to next")
    args = parser.parse_args(argv)
    files = sorted(args.data.glob("*.json"))
    if len(files) < 2:
        print(f"eplb bench: need at least two expert-load JSON files in {args.data} (--data)", file=sys.stderr)
        return 2
    loads = {f.stem.removeprefix("deepseek-v3-"): load_counts(f) for f in files}
    num_layers, num_experts = len(next(iter(loads.values()))), len(next(iter(loads.values()))[0])
    baseline = Placement.contiguous(num_layers, num_experts, args.ranks)
    result = {
        "ranks": args.ranks,
        "nodes": args.nodes,
        "layers": num_layers,
        "experts": num_experts,
        "contiguous": {name: round(baseline.mean_imbalance(load), 4) for name, load in loads.items()},
        "redundant": {str(r): leave_one_out(loads, args.ranks, r, args.nodes, args.groups) for r in args.redundant},
    }
    if not args.no_incremental:
        result["incremental"] = incremental(
            loads, args.ranks, args.incremental_redundant, args.nodes, args.groups, args.all_pairs
        )
        result["incremental"]["redundant"] = args.incremental_redundant
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
