"""Entry point of a node agent started over SSH (``testbed.backends.ssh``): the control protocol runs
on the SSH channel's stdin/stdout instead of a Unix socket.

``python -m node_agent.remote --name h1 --data-host 10.0.0.2 --data-port 7070 --log FILE
--model JSON [--cgroup-procs FILE]...`` first writes its own PID into each ``cgroup.procs`` file
(so everything it allocates from then on is charged to the device's transient cgroup), then moves
the control stream off fds 0/1 (stdout and stderr go to the log file, so no stray print can corrupt
a frame), writes ONE text line ``headroom-agent <pid> <start_time>`` for the controller's resource
journal, and serves frames until the channel closes — which is also how it ends when the
orchestrator or its SSH connection dies.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


class StdioStream:
    """The socket calls ``node_agent.wire`` makes (``recv_into``, ``sendall``), on two file descriptors."""

    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd = rfd, wfd

    def recv_into(self, view, nbytes: int = 0) -> int:
        view = memoryview(view)
        return os.readv(self.rfd, [view[:nbytes or len(view)]])

    def sendall(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self.wfd, view):]

    def settimeout(self, _timeout) -> None:  # blocking fds; the controller times every call
        return None

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass


def start_time(pid: int) -> int:
    """Kernel start time of ``pid`` (clock ticks since boot): with the PID, names the process uniquely."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def detach_stdio(log_path: str) -> StdioStream:
    """Keep the control stream on fresh fds; point 0 at /dev/null and 1, 2 at the log."""
    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    return StdioStream(rfd, wfd)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--data-host", required=True)
    ap.add_argument("--data-port", type=int, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--model", default="null", help="JSON {arg, seed} or null")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mem-dir")
    ap.add_argument("--mem-version")
    ap.add_argument("--cgroup-procs", action="append", default=[])
    args = ap.parse_args(argv)
    for procs in args.cgroup_procs:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    stream = detach_stdio(args.log)
    stream.sendall(f"headroom-agent {os.getpid()} {start_time(os.getpid())}\n".encode())
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import logging

    import torch

    from node_agent.agent import Agent
    from node_agent.budget import tune_allocator

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.name} %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    tune_allocator()
    agent = Agent(args.name, None, args.data_port, args.mem_dir, args.mem_version, json.loads(args.model),
                  data_host=args.data_host)
    agent.exit_on_shutdown = False
    try:
        agent.serve_stream(stream)
    finally:
        stream.close()
        os._exit(0)  # daemon threads (readers, worker) end with the process


if __name__ == "__main__":
    main()
