"""gpufleet quota set|unset|list: caps on the GPUs running at once, of a project or of a user in it,
optionally of one GPU model. A run that would go over one waits, saying which."""

from __future__ import annotations

import argparse

from rich.console import Console

from gpufleet import present
from gpufleet.commands.common import add_json, add_project, project, show
from gpufleet.errors import EXIT_OK


def register(sub) -> None:
    q = sub.add_parser("quota", help="set, unset or list GPU quotas of projects and users")
    qs = q.add_subparsers(dest="quota_command", required=True, metavar="ACTION")
    qset = qs.add_parser("set", help="cap the GPUs running at once (the project's: server admins; a user's in "
                                     "it: project admins)")
    _scope(qset)
    qset.add_argument("--gpus", type=_count, required=True, metavar="N", help="the most GPUs running at once")
    qset.set_defaults(func=set_quota)
    qu = qs.add_parser("unset", help="remove a quota")
    _scope(qu)
    qu.set_defaults(func=unset)
    ql = qs.add_parser("list", help="quotas and how much of each is in use")
    add_project(ql)
    add_json(ql)
    ql.set_defaults(func=list_quotas)


def _scope(parser: argparse.ArgumentParser) -> None:
    add_project(parser, required=True)
    parser.add_argument("--user", metavar="U", help="a user's quota in the project (default: the whole project's)")
    parser.add_argument("--gpu", metavar="MODEL", help="only GPUs of this model, e.g. H100 (default: any model)")


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GPUs (0 or more)")
    return n


def set_quota(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect

    q = connect().put("/api/quotas", {"project": args.project, "user": args.user, "gpu": args.gpu, "gpus": args.gpus})
    present.plain(console, f"Quota set: {present.quota_scope(q)}: at most {q['gpus']} at once.")
    return EXIT_OK


def unset(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect

    connect().delete("/api/quotas", project=args.project, user=args.user, gpu=args.gpu)
    present.plain(console, f"Quota removed: {present.quota_scope(vars(args))}.")
    return EXIT_OK


def list_quotas(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.client import connect

    client = connect()
    return show(console, args, client.get("/api/quotas", project=project(args, client)), present.quotas_table,
                "No quotas.")
