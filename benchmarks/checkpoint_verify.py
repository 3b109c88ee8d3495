"""Cost of checkpoint verification (:mod:`harness.components.checkpoint_verify`): seconds per GiB of the CRC-32 used,
against the stdlib hashes one might pick instead, on a file of random bytes (read twice: the first pass may come from
disk, the second from the page cache). Prints one JSON line per checksum.

    python benchmarks/checkpoint_verify.py --gib 1 --file /tmp/ckpt_verify.bin
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

from harness.components.checkpoint_verify import file_crc32

GIB = 2 ** 30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0, help="file size in GiB")
    p.add_argument("--file", default="/tmp/ckpt_verify.bin", help="scratch file (overwritten, then removed)")
    args = p.parse_args()
    size = int(args.gib * GIB)
    with open(args.file, "wb") as f:
        for _ in range(0, size, 2 ** 24):
            f.write(os.urandom(2 ** 24))

    def digest(name):
        def run(path):
            with open(path, "rb") as fh:
                return hashlib.file_digest(fh, name).hexdigest()
        return run

    try:
        for name, fn in [("crc32 (harness)", file_crc32)] + [(h, digest(h)) for h in ("sha1", "sha256", "blake2b")]:
            times = []
            for _ in range(2):
                t = time.perf_counter()
                fn(args.file)
                times.append(time.perf_counter() - t)
            print(json.dumps({"checksum": name, "gib": args.gib, "s_per_gib_first": times[0] / args.gib,
                              "s_per_gib_cached": times[1] / args.gib}))
    finally:
        os.remove(args.file)


if __name__ == "__main__":
    main()
