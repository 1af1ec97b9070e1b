"""``dsray eplb plan``: plan an expert placement from a load file and print how well it balances it;
``dsray eplb plot``: the load as a PNG heatmap, with per-rank load before and after planning."""

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
    plot = verbs.add_parser(
        "plot",
        help="write a PNG: expert load (layers × experts) and per-rank load, contiguous vs planned",
        description="The load comes from a file (as for 'plan') or from a running server's /metrics "
        "(--url; serve with expert_metrics 'full' for every expert, else only each layer's hottest).",
    )
    source = plot.add_mutually_exclusive_group(required=True)
    source.add_argument("load", type=Path, nargs="?", help="expert-load JSON file")
    source.add_argument("--url", help="a dsray server, e.g. http://127.0.0.1:8000 (reads its /metrics)")
    plot.add_argument("--api-key", default=None, help="the server's API key (default DSRAY_API_KEY)")
    plot.add_argument("--ranks", type=int, required=True, help="expert ranks (EP size)")
    plot.add_argument("--redundant", type=int, default=0, help="redundant expert slots in all (default 0)")
    plot.add_argument("-o", "--out", type=Path, default=Path("expert-load.png"), help="PNG to write")


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


def load_from_metrics(url: str, api_key: str | None) -> list[list[int]]:
    """``[layers][experts]`` from a server's ``dsray:expert_tokens_total`` series (missing experts count 0)."""
    import httpx2 as httpx
    from prometheus_client.parser import text_string_to_metric_families

    from dsray import envs

    key = api_key or envs.api_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(url.rstrip("/") + "/metrics", headers=headers, timeout=30)
    response.raise_for_status()
    counts: dict[int, dict[int, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "dsray:expert_tokens_total":
                counts.setdefault(int(sample.labels["layer"]), {})[int(sample.labels["expert"])] = sample.value
    if not counts:
        raise ValueError(f"{url}/metrics has no dsray:expert_tokens_total series (no expert load yet?)")
    width = 1 + max(e for layer in counts.values() for e in layer)
    return [[int(counts[layer].get(e, 0)) for e in range(width)] for layer in sorted(counts)]


def plot(args: argparse.Namespace) -> int:
    from router.eplb import Placement, plan_placement

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("dsray eplb plot: error: needs matplotlib: pip install 'dsray[plot]'", file=sys.stderr)
        return 2
    try:
        load = load_from_metrics(args.url, args.api_key) if args.url else read_load(args.load)
        if load and isinstance(load[0][0], list):
            load = [[sum(w[i][e] for w in load) for e in range(len(load[0][0]))] for i in range(len(load[0]))]
        planned = plan_placement(load, args.ranks, args.redundant)
    except (ValueError, FileNotFoundError, json.JSONDecodeError, OSError) as exc:
        print(f"dsray eplb plot: error: {exc}", file=sys.stderr)
        return 2
    num_layers, num_experts = len(load), len(load[0])
    fig, (heat, bars) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    image = heat.imshow(load, aspect="auto", cmap="viridis", interpolation="nearest")
    heat.set(title="tokens per expert", xlabel="expert", ylabel="MoE layer")
    fig.colorbar(image, ax=heat)
    after = [sum(col) for col in zip(*planned.rank_loads(load))]
    width = 0.4
    ranks = range(args.ranks)
    if num_experts % args.ranks == 0:
        contiguous = Placement.contiguous(num_layers, num_experts, args.ranks)
        before = [sum(col) for col in zip(*contiguous.rank_loads(load))]
        bars.bar(
            [r - width / 2 for r in ranks], before, width, label=f"contiguous ({contiguous.mean_imbalance(load):.2f})"
        )
    bars.bar([r + width / 2 for r in ranks], after, width, label=f"planned ({planned.mean_imbalance(load):.2f})")
    bars.set(title="tokens per expert rank (hottest ÷ mean)", xlabel="expert rank", ylabel="tokens")
    bars.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from router.eplb import Placement, as_history, plan_placement

    if args.eplb_command == "plot":
        return plot(args)

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
