"""Run under torchrun: the probe CLI, recording every file this rank creates, opens for writing,
renames or removes (a Python audit hook), to LOG_DIR/writes-rank<RANK>.json at exit.

Usage: torchrun ... audited_cli.py LOG_DIR [probe arguments...]
"""

import atexit
import json
import os
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def main() -> None:
    log_dir, args = sys.argv[1], sys.argv[2:]
    writes: list[str] = []

    def hook(event: str, a: tuple) -> None:
        if event == "open" and isinstance(a[0], (str, bytes, os.PathLike)):
            mode, flags = a[1], a[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & _WRITE_FLAGS:
                writes.append(os.path.abspath(os.fsdecode(a[0])))
        elif event in ("os.rename", "os.remove", "os.mkdir", "shutil.rmtree"):
            target = a[1] if event == "os.rename" else a[0]
            writes.append(os.path.abspath(os.fsdecode(target)))

    def dump() -> None:
        path = os.path.join(log_dir, f"writes-rank{os.environ.get('RANK', '0')}.json")
        snapshot = list(writes)
        with open(path, "w") as f:
            json.dump(snapshot, f)

    sys.addaudithook(hook)
    atexit.register(dump)
    from probe.cli.main import cli

    cli.main(args, prog_name="probe")


if __name__ == "__main__":
    main()
