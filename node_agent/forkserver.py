"""Fork server: import torch and the model code ONCE, then fork one agent per emulated host.

Started by the controller in the root namespace (``python -m node_agent.forkserver --socket PATH``),
it serves one controller connection on a Unix socket:
  ``preload {model: {arg, seed}}``    load the full state dict before forking (children share it
                                      copy-on-write, so it is charged to the fork server, not to
                                      the hosts' cgroups);
  ``spawn {name, netns_pid, control_path, log_path, data_port, mem_dir, mem_version, model}``
                                      fork; the child joins the host's network namespace with
                                      ``setns(/proc/<netns_pid>/ns/net, CLONE_NEWNET)`` and runs
                                      ``node_agent.agent``; the reply carries the child's PID (the
                                      controller writes it into the host's cgroup and manifest);
  ``roofline {model}``                this machine's one-core roofline on the model's blocks
                                      (``node_agent.machine``), measured in a short-lived child so
                                      nothing torch ran in this process before later forks;
  ``status {pids}``                   exit status of children (-N = killed by signal N), reaped here;
  ``kill {pid}``                      SIGKILL one of OUR children (by PID, never by name);
  ``shutdown``                        kill every child still running, exit.
When the controller's connection closes, the fork server kills its children and exits.
Nothing torch runs in parallel before a fork (no OpenMP pool to inherit).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import signal
import socket
import sys
import traceback

CLONE_NEWNET = 0x40000000


def setns_net(netns_pid: int) -> None:
    """Join the network namespace of ``netns_pid`` (Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{netns_pid}/ns/net", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into netns of pid {netns_pid}: {os.strerror(err)}")
    finally:
        os.close(fd)


class ForkServer:
    def __init__(self, path: str, threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        import node_agent.agent  # noqa: F401  (import everything the children need, once)
        import node_agent.shards  # noqa: F401

        self.path, self.threads = path, threads
        self.children: dict[int, int | None] = {}  # pid -> returncode (None while running)
        gc.collect()
        gc.freeze()

    def _reap(self) -> None:
        for pid, rc in list(self.children.items()):
            if rc is not None:
                continue
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                self.children[pid] = -255
                continue
            if got:
                self.children[pid] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def serve(self) -> None:
        from node_agent import protocol as P
        from node_agent.wire import BadFrame, WireError, recv_frame, send_frame

        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(self.path)
        srv.listen(1)
        print("ready", flush=True)
        conn, _ = srv.accept()
        self._fds = (srv, conn)
        try:
            while True:
                try:
                    frame = recv_frame(conn)
                except BadFrame as exc:  # read whole, stream in sync: say so and go on
                    send_frame(conn, P.error_frame(None, exc))
                    continue
                except (WireError, OSError):
                    return
                h = frame.header
                try:
                    result = getattr(self, "cmd_" + str(h.get("cmd")))(h)
                    send_frame(conn, P.ok_frame(h.get("id"), **result))
                except Exception as exc:
                    traceback.print_exc()
                    send_frame(conn, P.error_frame(h.get("id"), exc))
                if h.get("cmd") == "shutdown":
                    return
        finally:
            self.kill_all()

    def cmd_preload(self, h: dict) -> dict:
        from node_agent.shards import preload

        cfg = preload(h["model"]["arg"], int(h["model"].get("seed", 0)))
        gc.collect()
        gc.freeze()  # keep the inherited objects' pages shared after fork
        return {"config": cfg.to_dict()}

    def cmd_spawn(self, h: dict) -> dict:
        self._reap()
        pid = os.fork()
        if pid == 0:
            self._child(h)  # never returns
        self.children[pid] = None
        return {"pid": pid}

    def _child(self, cfg: dict) -> None:
        code = 0
        try:
            for s in self._fds:
                s.close()
            os.setsid()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            fd = os.open(cfg["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            setns_net(int(cfg["netns_pid"]))
            from node_agent.agent import run_agent

            run_agent({"threads": self.threads, **cfg})
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def cmd_roofline(self, h: dict) -> dict:
        import json

        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(rfd)
                from node_agent.machine import machine_roofline
                from node_agent.shards import model_state

                cfg, sd = model_state(h["model"]["arg"], int(h["model"].get("seed", 0)))
                os.write(wfd, json.dumps(machine_roofline(cfg, sd)).encode())
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not data:
            raise RuntimeError(f"roofline measurement failed (child status {status})")
        return {"roofline": json.loads(data)}

    def cmd_status(self, h: dict) -> dict:
        self._reap()
        return {"status": {str(p): self.children.get(int(p), -255) for p in h["pids"]}}

    def cmd_kill(self, h: dict) -> dict:
        pid = int(h["pid"])
        if pid not in self.children:
            raise ValueError(f"{pid} is not a child of this fork server")
        self._reap()
        if self.children[pid] is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self.children[pid] = -signal.SIGKILL
        return {"status": self.children[pid]}

    def cmd_ping(self, h: dict) -> dict:
        return {"pid": os.getpid(), "children": len(self.children)}

    def cmd_shutdown(self, h: dict) -> dict:
        return {}

    def kill_all(self) -> None:
        self._reap()
        for pid, rc in self.children.items():
            if rc is None:
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    ForkServer(args.socket, args.threads).serve()


if __name__ == "__main__":
    main()
