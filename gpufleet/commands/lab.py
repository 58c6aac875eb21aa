"""gpufleet lab up|down: a local lab of simulated GPU hosts behind a login node."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from gpufleet.errors import EXIT_OK


def register(sub) -> None:
    from gpufleet.lab import VENDORS  # not gpufleet.lab.core: every command registers this one

    lab = sub.add_parser("lab", help="a local lab of simulated GPU hosts behind a login node")
    ls = lab.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    lu = ls.add_parser("up", help="create the lab (needs root)")
    lu.add_argument("--nodes", type=int, default=2)
    lu.add_argument("--gpus", type=int, default=8)
    lu.add_argument("--vendor", default="nvidia", choices=VENDORS)
    lu.add_argument("--hops", type=int, default=1, choices=(1, 2),
                    help="jump hops in front of the nodes: 1 (a login node) or 2 (a gateway, then the login node)")
    lu.add_argument("--dir", help="where the lab's fleet.yml and keys go (default: $GPUFLEET_HOME/lab)")
    lu.set_defaults(func=up)
    ld = ls.add_parser("down", help="remove the lab and everything it made")
    ld.add_argument("--dir")
    ld.set_defaults(func=down)
    from gpufleet.lab.gputools import FAULT_KINDS

    lf = ls.add_parser("fault", help="make a lab GPU report a hardware fault (nvidia-smi's health fields)",
                       description="Kinds: " + "; ".join(f"{k}: {v}" for k, v in FAULT_KINDS.items()))
    lf.add_argument("--node", type=int, required=True, help="the lab node, counted from 0 (node-N)")
    lf.add_argument("--gpu", type=int, required=True, help="the GPU's index on that node")
    lf.add_argument("--kind", choices=list(FAULT_KINDS), default="ecc")
    lf.add_argument("--clear", action="store_true", help="make the GPU healthy again")
    lf.add_argument("--dir")
    lf.set_defaults(func=fault)


def _dir(args: argparse.Namespace) -> Path:
    from gpufleet.lab import core

    return Path(args.dir) if args.dir else core.default_dir()


def up(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.lab import core

    core.up(_dir(args), nodes=args.nodes, gpus=args.gpus, vendor=args.vendor, hops=args.hops,
            log=console.print)
    return EXIT_OK


def down(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.lab import core

    core.down(_dir(args), log=console.print)
    return EXIT_OK


def fault(args: argparse.Namespace, console: Console) -> int:
    from gpufleet.errors import UsageError
    from gpufleet.lab import core

    lab = core.load(_dir(args))
    if lab is None:
        raise UsageError(f"no lab in {_dir(args)}: start one with `gpufleet lab up`")
    host = core.node(lab, args.node)
    core.fault(lab, host, args.gpu, None if args.clear else args.kind)
    what = "healthy again" if args.clear else f"faulty ({args.kind})"
    console.print(f"GPU {args.gpu} of {host.hostname} ({host.address}) now reads {what}", markup=False)
    return EXIT_OK
