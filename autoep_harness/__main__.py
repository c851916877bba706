"""python -m autoep_harness conformance|mutants ARGS: the installed harness's commands."""

from __future__ import annotations

import sys

from autoep_harness import conformance_main, mutants_main

COMMANDS = {"conformance": conformance_main, "mutants": mutants_main}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m autoep_harness {{{'|'.join(COMMANDS)}}} ARGS", file=sys.stderr)
        sys.exit(2)
    sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
