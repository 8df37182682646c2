"""A process that runs ``unroll.cli.main`` on command lines it reads from stdin, one JSON list a
line, under an address-space limit, and answers each with a JSON line: exit status, what was
printed, seconds and the process's peak resident memory.

The fuzz test talks to one such worker, so torch is imported once, and every allocation torch
makes counts against the limit (accounting inside the test process would miss torch's own
allocator). ``python tests/fuzz_worker.py LIMIT_BYTES``.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import resource
import sys
import time
import traceback


def main() -> None:
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    reply = sys.stdout
    from unroll.cli import main as cli  # after the limit: torch's import counts too

    for line in sys.stdin:
        args = json.loads(line)
        out, err = io.StringIO(), io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli(args)
            except BaseException:  # noqa: BLE001 - anything escaping the CLI is what we look for
                code, err = None, io.StringIO(err.getvalue() + traceback.format_exc())
        seconds = time.perf_counter() - start
        gc.collect()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        reply.write(json.dumps({"code": code, "stdout": out.getvalue()[-4000:], "stderr": err.getvalue()[-20000:],
                                "seconds": seconds, "peak_bytes": peak}) + "\n")
        reply.flush()


if __name__ == "__main__":
    main()
