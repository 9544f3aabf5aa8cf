"""The ``asymlora`` console command.

Commands implemented in Rust (``inspect``; more later) are parsed by the Rust
command line, shared with the standalone binary. Commands that need Python
(``demo``, ``generator-check``) are dispatched here first. Nothing here imports torch.
SIGINT, SIGTERM and SIGHUP stop a merge cleanly (exit code 128 + the signal's number):
see :mod:`asymlora._signals`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Callable


def _demo(argv: Sequence[str]) -> int:
    from asymlora import demo

    return demo.main(argv)


def _generator_check(argv: Sequence[str]) -> int:
    from asymlora import generator_check

    return generator_check.main(argv)


PYTHON_COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "demo": (_demo, "Fine-tune all-MiniLM-L6-v2 on movie reviews: B-only vs LoRA vs PEFT"),
    "generator-check": (
        _generator_check,
        "Build a Llama-2-7B-shaped seed-plus-B adapter and verify every A",
    ),
}


def _python_help() -> str:
    lines = ["Python commands:"]
    lines += [f"  {name:<16} {about}" for name, (_, about) in PYTHON_COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in PYTHON_COMMANDS:
        handler, _ = PYTHON_COMMANDS[args[0]]
        return handler(args[1:])
    from asymlora import _native
    from asymlora._signals import Interrupted, exit_code, stopping_on_signals

    sys.stdout.flush()
    try:
        # A merge polls the handlers: it stops, cleans up and reports the signal itself.
        with stopping_on_signals():
            return _native.cli_main(["asymlora", *args], _python_help())
    except Interrupted as e:  # came while a command that does not poll was running
        print(f"asymlora: interrupted by {e.signal_name}", file=sys.stderr)
        return exit_code(e.signum)


if __name__ == "__main__":
    sys.exit(main())
