"""`herald-operator`: run the operator, or print its CRD.

    herald-operator run [--namespace NS ...|--all-namespaces] [--redis-url URL]
                        [--interval S] [--peering NAME|--standalone] [--priority N]
                        [--peering-lifetime S]
                        [--metrics-port P] [--health-port P] [--watch-timeout S]
    herald-operator crd        # the CustomResourceDefinition as YAML

Every flag has an environment variable (shown in `--help`) so the chart can
set them without a long command line. With `--peering`, several replicas
share a kopf peering object: each takes a random priority unless given one,
and only the highest-priority live replica acts; the others wait. A replica
that dies without leaving (SIGKILL, a lost node) is replaced once its
keep-alive, renewed every second, is `--peering-lifetime` seconds old.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys

from herald_operator.crd import crd_yaml


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        sys.exit(f"herald-operator: {name}={raw!r}: expected a number")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herald-operator",
                                     description="Run and scale Herald gateway fleets.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("crd", help="print the RealtimeGateway CRD as YAML")
    run = sub.add_parser("run", help="run the operator")
    env = os.environ
    run.add_argument("-n", "--namespace", action="append", dest="namespaces", default=[],
                     help="namespace to serve (repeatable; env HERALD_OPERATOR_NAMESPACES, "
                          "comma-separated, else POD_NAMESPACE)")
    run.add_argument("-A", "--all-namespaces", action="store_true",
                     default=env.get("HERALD_OPERATOR_ALL_NAMESPACES", "") in ("1", "true"),
                     help="serve every namespace (env HERALD_OPERATOR_ALL_NAMESPACES=true)")
    run.add_argument("--redis-url", default=env.get("HERALD_REDIS_URL", ""),
                     help="Redis for resources whose URL is a secretRef (env HERALD_REDIS_URL)")
    run.add_argument("--interval", type=float,
                     default=_env_float("HERALD_OPERATOR_INTERVAL", 10.0),
                     help="seconds between reconcile passes (env HERALD_OPERATOR_INTERVAL)")
    run.add_argument("--peering", default=env.get("HERALD_OPERATOR_PEERING", ""),
                     help="kopf peering name shared by replicas (env HERALD_OPERATOR_PEERING)")
    run.add_argument("--standalone", action="store_true",
                     help="no peering: this is the only replica")
    run.add_argument("--priority", type=int, default=None,
                     help="peering priority (default: random, so exactly one replica acts)")
    run.add_argument("--peering-lifetime", type=int,
                     default=int(_env_float("HERALD_OPERATOR_PEERING_LIFETIME", 6)),
                     help="seconds a replica's peering keep-alive is valid: a killed active "
                          "replica is replaced this long after its last keep-alive "
                          "(env HERALD_OPERATOR_PEERING_LIFETIME)")
    run.add_argument("--metrics-port", type=int,
                     default=int(_env_float("HERALD_OPERATOR_METRICS_PORT", 9090)),
                     help="Prometheus metrics port, 0 = off (env HERALD_OPERATOR_METRICS_PORT)")
    run.add_argument("--health-port", type=int,
                     default=int(_env_float("HERALD_OPERATOR_HEALTH_PORT", 0)),
                     help="kopf liveness endpoint /healthz port, 0 = off")
    run.add_argument("--watch-timeout", type=float,
                     default=_env_float("HERALD_OPERATOR_WATCH_TIMEOUT", 300.0),
                     help="server-side timeout of each watch request, seconds")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _namespaces(args: argparse.Namespace) -> list[str]:
    if args.namespaces:
        return args.namespaces
    raw = os.environ.get("HERALD_OPERATOR_NAMESPACES") or os.environ.get("POD_NAMESPACE", "")
    return [ns.strip() for ns in raw.split(",") if ns.strip()]


def cmd_run(args: argparse.Namespace) -> None:
    import kopf

    from herald_operator import handlers, metrics
    from herald_operator.kube import Kube
    from herald_operator.reconcile import Context
    from herald_operator.registry import RegistryPool

    namespaces = _namespaces(args)
    if args.all_namespaces and namespaces:
        sys.exit("herald-operator: give --namespace or --all-namespaces, not both")
    if not args.all_namespaces and not namespaces:
        sys.exit("herald-operator: give --namespace NS (or set POD_NAMESPACE) "
                 "or --all-namespaces")
    if args.interval < 1:
        sys.exit("herald-operator: --interval must be at least 1 second")
    if not 2 <= args.peering_lifetime <= 600:
        sys.exit("herald-operator: --peering-lifetime must be 2..600 seconds")
    standalone = args.standalone or not args.peering
    priority = args.priority
    if not standalone and priority is None:
        priority = random.SystemRandom().randint(1, 2**31 - 1)

    kopf.configure(verbose=args.verbose)  # kopf's log format for our loggers too
    logging.getLogger("herald").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.metrics_port:
        metrics.serve(args.metrics_port)

    ctx = Context(kube=Kube(), registries=RegistryPool(), redis_url=args.redis_url,
                  interval=args.interval)
    registry = kopf.OperatorRegistry()
    handlers.register(registry, ctx)
    liveness = f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None
    logging.getLogger("herald.operator").info(
        "serving %s; %s; interval %.0fs",
        "all namespaces" if args.all_namespaces else ", ".join(namespaces),
        "standalone" if standalone else f"peering {args.peering!r} priority {priority}",
        args.interval)

    async def operate() -> None:
        try:
            await kopf.operator(
                registry=registry,
                settings=handlers.settings(args.watch_timeout, priority, args.all_namespaces,
                                           args.peering_lifetime),
                standalone=standalone,
                peering_name=None if standalone else args.peering,
                priority=priority,
                clusterwide=args.all_namespaces,
                namespaces=[] if args.all_namespaces else namespaces,
                liveness_endpoint=liveness,
            )
        finally:
            await ctx.close()  # after kopf: a timer may still be finishing its pass

    asyncio.run(operate())


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "crd":
        sys.stdout.write(crd_yaml())
    elif args.command == "run":
        cmd_run(args)
