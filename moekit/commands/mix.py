"""``moekit mix``: Branch-Train-MiX. Branch a seed dense model per domain, mix the FFNs into an MoE,
train the routers, optionally fine-tune everything; one command runs all stages or each alone.
"""

from __future__ import annotations

import argparse

from moekit.config import parse_overrides
from moekit.errors import ConfigError
from moekit.recipes.btx import STAGES, branch_train_mix


def add_parser(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser("mix", help="Branch-Train-MiX: domain experts from a dense seed", description=__doc__)
    p.add_argument("--seed-model", help="the dense model (moekit or HF folder) the branch stage starts from")
    p.add_argument("--domain", action="append", default=[], metavar="NAME=PATH", help="a domain corpus (repeat)")
    p.add_argument("--experts", nargs="+", default=None, help="already fine-tuned dense models to mix")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    p.add_argument("--branch-steps", type=int, default=200)
    p.add_argument("--router-steps", type=int, default=100)
    p.add_argument("--finetune-steps", type=int, default=0)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--out", required=True)
    p.set_defaults(func=run, free_options=True)


def run(args: argparse.Namespace) -> int:
    domains = {}
    for item in args.domain:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--domain takes NAME=PATH, got {item!r}")
        domains[name] = path
    options = parse_overrides(args.extra)
    if not isinstance(options.get("seed", 0), int):
        raise ConfigError(
            f"--seed takes an integer (the training seed), got {options['seed']!r}; the model to branch "
            "from is --seed-model"
        )
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    if args.experts and "branch" in stages:
        stages = tuple(s for s in stages if s != "branch")
    results = branch_train_mix(
        args.out,
        seed=args.seed_model,
        domains=domains,
        experts=args.experts,
        stages=stages,
        branch_steps=args.branch_steps,
        router_steps=args.router_steps,
        finetune_steps=args.finetune_steps,
        top_k=args.top_k,
        **{"progress": True, **options},
    )
    for stage, path in results.items():
        print(f"{stage}: {path}")
    return 0
