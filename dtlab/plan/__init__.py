"""``dtlab plan`` (search.py, calibrate.py, validate.py, measured.py) and ``dtlab memory``
(memory_estimate.py): layouts ranked by predicted step time and memory, and memory by ZeRO stage."""
from __future__ import annotations


def cmd_plan(args, rest) -> int:
    if getattr(args, "measured_set", None) is not None:
        from dtlab.errors import UsageError
        from dtlab.plan import measured
        if args.action != "validate":
            raise UsageError(f"--measured-set goes with 'dtlab plan validate', not "
                             f"{args.action!r}")
        return measured.run(args)
    from dtlab.plan import search
    return search.run(args)


def cmd_memory(args, rest) -> int:
    from dtlab.plan import memory_estimate
    return memory_estimate.run(args)


def add_commands(sub) -> None:
    from dtlab.plan import memory_estimate, search  # no torch at import: their flags live there
    memory_estimate.add_arguments(sub.add_parser(
        "memory", help="estimate GPU and CPU memory per ZeRO stage, offload and precision",
        description=memory_estimate.__doc__.split("\n\n")[0])).set_defaults(func=cmd_memory)
    p = search.add_arguments(sub.add_parser(
        "plan", help="rank the layouts that fit a model on a cluster by predicted step time "
        "and memory; calibrate this machine; validate the predictions against runs",
        description=search.__doc__.split("\n\n")[0]))
    p.add_argument("--measured-set", metavar="NAME", default=None,
                   help="validate: check the GPU step model against runs measured by others "
                        "instead (playbook-h100: the Ultra-Scale Playbook's H100 sweep); needs "
                        "no cluster and no root; --json the record, --img its folder")
    p.set_defaults(func=cmd_plan)
