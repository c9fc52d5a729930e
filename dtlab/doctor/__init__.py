"""``dtlab doctor``: a DeepSpeed hostfile, its configs and a multi-node network checked before a
launch (diagnose.py; hostfile.py, config_check.py, connectivity.py, collective_check.py)."""
from __future__ import annotations


def cmd_doctor(args, rest) -> int:
    from dtlab.doctor import diagnose
    return diagnose.run(args)


def add_commands(sub) -> None:
    from dtlab.doctor import diagnose  # standard library only at import: its flags live there
    diagnose.add_arguments(sub.add_parser(
        "doctor", help="check a DeepSpeed hostfile and a multi-node setup before launch",
        description=diagnose.__doc__.split("\n\n")[0])).set_defaults(func=cmd_doctor)
