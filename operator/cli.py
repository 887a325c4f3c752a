"""`herald-operator`: run the operator, or print its CRD.

herald-operator run [--namespace NS ...|--all-namespaces] [--redis-url URL] ...
herald-operator crd        # the CustomResourceDefinition as YAML
"""

from __future__ import annotations

import argparse
import sys

from herald_operator.crd import crd_yaml


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="herald-operator")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("crd", help="print the RealtimeGateway CRD as YAML")
    args = parser.parse_args(argv)
    if args.command == "crd":
        sys.stdout.write(crd_yaml())
