"""`osprey models list|show|promote|rollback`: the registry from the command line.

`register_models_cli(subparsers)` adds the `models` command to an argparse parser (the `osprey` CLI
wires it); each sub-command sets `func`, so the caller runs `args.func(args)`. Also runnable alone:
`python -m training.models_cli list`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .registry import Registry, RegistryError


def _fmt(value: Any, pct: bool = True) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


def _last_reason(decisions: list[dict[str, Any]]) -> str:
    gates = [d for d in decisions if d.get("kind") in ("gate", "rollback")]
    if not gates:
        return ""
    d = gates[-1]
    head = "; ".join(d.get("reasons", []))
    if d.get("kind") == "gate" and d.get("current") is not None:
        head = f"{d['metric']} {_fmt(d.get('candidate'))} vs {_fmt(d.get('current'))}: {head}"
    return head


def cmd_list(reg: Registry, args: argparse.Namespace) -> int:
    versions = reg.list()
    if args.json:
        print(json.dumps([v.to_dict() for v in versions], indent=2, default=str))
        return 0
    if not versions:
        print(f"no versions under {reg.root}")
        return 0
    rows = [("VERSION", "STATUS", "CREATED", "ACCURACY", "MACRO-F1", "PARENT", "LAST DECISION")]
    for v in versions:
        m = v.metrics or {}
        rows.append((v.version, v.status, v.created_at, _fmt(m.get("accuracy")), _fmt(m.get("macro_f1")),
                     v.parent or "-", _last_reason(v.decisions)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def cmd_show(reg: Registry, args: argparse.Namespace) -> int:
    print(json.dumps(reg.show(args.version), indent=2, default=str))
    return 0


def cmd_promote(reg: Registry, args: argparse.Namespace) -> int:
    reg.promote(args.version, reason=args.reason)
    print(f"current: {reg.current()}")
    return 0


def cmd_rollback(reg: Registry, args: argparse.Namespace) -> int:
    print(f"current: {reg.rollback()}")
    return 0


def _run(args: argparse.Namespace) -> int:
    try:
        return args.models_func(Registry(args.model_dir), args)
    except RegistryError as exc:
        print(f"osprey models: {exc}", file=sys.stderr)
        return 2


def register_models_cli(subparsers) -> argparse.ArgumentParser:
    """Add `models` with list/show/promote/rollback to an argparse sub-parsers object."""
    p = subparsers.add_parser("models", help="model versions: list, show, promote, rollback")
    p.add_argument("--model-dir", default=os.environ.get("MODEL_DIR", "data"),
                   help="data directory holding registry/ (MODEL_DIR, default ./data)")
    sub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    s = sub.add_parser("list", help="every version with its status, held-out numbers and last decision")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(models_func=cmd_list)
    s = sub.add_parser("show", help="one version: manifest, metrics, decisions")
    s.add_argument("version")
    s.set_defaults(models_func=cmd_show)
    s = sub.add_parser("promote", help="serve a version now (bypasses the gate; checksums are verified)")
    s.add_argument("version")
    s.add_argument("--reason", default="manual promotion", help="recorded with the promotion")
    s.set_defaults(models_func=cmd_promote)
    s = sub.add_parser("rollback", help="serve the previously promoted version again")
    s.set_defaults(models_func=cmd_rollback)
    p.set_defaults(func=_run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="osprey")
    register_models_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
