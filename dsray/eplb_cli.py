"""``dsray eplb plan``: plan an expert placement from a load file and print how well it balances it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    eplb = sub.add_parser("eplb", help="expert placement (EPLB) from expert-load statistics")
    verbs = eplb.add_subparsers(dest="eplb_command", required=True)
    plan = verbs.add_parser(
        "plan",
        help="plan a placement from LOAD.json and print its imbalance beside the contiguous baseline",
        description="LOAD.json: {'logical_count': [[tokens per expert] per layer]} (SGLang's expert-distribution "
        "format; layers without tokens are skipped), or a plain nested list [layers][experts] or a history "
        "[windows][layers][experts]. Imbalance: hottest rank ÷ mean rank per layer, averaged over layers.",
    )
    plan.add_argument("load", type=Path, help="expert-load JSON file")
    plan.add_argument("--ranks", type=int, required=True, help="expert ranks (EP size)")
    plan.add_argument("--redundant", type=int, default=0, help="redundant expert slots in all (default 0)")
    plan.add_argument("--nodes", type=int, default=1, help="nodes the ranks are split over (default 1)")
    plan.add_argument("--groups", type=int, default=None, help="expert groups, DeepSeek-V3: 8 (default: one per node)")
    plan.add_argument("--json", action="store_true", help="print JSON, with the placement's slots")


def read_load(path: Path) -> list:
    """``[layers][experts]`` or ``[windows][layers][experts]`` from a load file, without layers that saw no tokens."""
    data = json.loads(path.read_text())
    counts = data["logical_count"] if isinstance(data, dict) and "logical_count" in data else data
    if not isinstance(counts, list) or not counts or not isinstance(counts[0], list):
        raise ValueError(f"{path}: expected {{'logical_count': [[...], ...]}} or a nested list of token counts")
    if counts[0] and isinstance(counts[0][0], list):  # a history: keep layers with tokens in any window
        keep = [i for i in range(len(counts[0])) if any(sum(w[i]) > 0 for w in counts)]
        return [[w[i] for i in keep] for w in counts]
    return [row for row in counts if sum(row) > 0]


def run(args: argparse.Namespace) -> int:
    from router.eplb import Placement, as_history, plan_placement

    try:
        load = read_load(args.load)
        placement = plan_placement(load, args.ranks, args.redundant, args.nodes, num_groups=args.groups)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"dsray eplb plan: error: {exc}", file=sys.stderr)
        return 2
    _, num_layers, num_experts = as_history(load).shape
    per_layer = placement.imbalance(load)
    contiguous = None
    if num_experts % args.ranks == 0:
        contiguous = Placement.contiguous(num_layers, num_experts, args.ranks).mean_imbalance(load)
    cross = placement.cross_node_rows(load)
    report = {
        "layers": num_layers,
        "experts": num_experts,
        "ranks": args.ranks,
        "nodes": args.nodes,
        "redundant": args.redundant,
        "slots_per_rank": placement.slots_per_rank,
        "imbalance": placement.mean_imbalance(load),
        "worst_layer_imbalance": max(per_layer),
        "contiguous_imbalance": contiguous,
        "cross_node_rows": sum(cross) / len(cross),
        "per_layer_imbalance": per_layer,
    }
    if args.json:
        print(json.dumps({**report, "placement": placement.to_dict()}))
        return 0
    print(
        f"{num_layers} layers × {num_experts} experts on {args.ranks} ranks × {placement.slots_per_rank} slots "
        f"({args.redundant} redundant, {args.nodes} node{'s' if args.nodes > 1 else ''})"
    )
    print(
        f"imbalance (hottest rank ÷ mean): {report['imbalance']:.3f}, worst layer {report['worst_layer_imbalance']:.3f}"
    )
    if contiguous is not None:
        print(f"contiguous, no redundancy:       {contiguous:.3f}")
    if args.nodes > 1:
        print(f"cross-node rows: {report['cross_node_rows']:.2%}")
    return 0
