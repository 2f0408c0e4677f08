"""What tests/training/test_ddp.py has torchrun start in each process: `cxrlabel train`, with
an audit hook on ranks other than 0 that records every file they create, change or delete
under $CXR_AUDIT_ROOT (printed as one JSON line at exit), and with $CXR_STOP_AFTER_STEPS,
train() stopped after that many steps as if killed (checkpoint every $CXR_EVERY steps)."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys

WRITE_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.link", "os.truncate"}


def _audit(root: str, seen: list[str]) -> None:
    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode = args[1] or "r"
            flags = args[2] if len(args) > 2 else 0
            writes = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR)
            if writes and os.fsdecode(args[0]).startswith(root):
                seen.append(f"open {os.fsdecode(args[0])}")
        elif (
            event in WRITE_EVENTS
            and args
            and isinstance(args[0], (str, bytes, os.PathLike))
            and os.fsdecode(args[0]).startswith(root)
        ):
            seen.append(f"{event} {os.fsdecode(args[0])}")

    sys.addaudithook(hook)
    atexit.register(lambda: print("AUDIT " + json.dumps(seen), flush=True))


def main() -> int:
    root = os.environ.get("CXR_AUDIT_ROOT")
    if root and os.environ.get("RANK", "0") != "0":
        _audit(root, [])
    stop = os.environ.get("CXR_STOP_AFTER_STEPS")
    if stop is None:
        from cxrlabel.cli import main as cli_main

        return cli_main(sys.argv[1:])
    from cxrlabel.config import build_config, parse_overrides
    from cxrlabel.training.finetune import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    args = sys.argv[1:]
    config = build_config("tiny-cpu", parse_overrides(args))
    train(config, stop_after_steps=int(stop), checkpoint_every_steps=int(os.environ["CXR_EVERY"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
