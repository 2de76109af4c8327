"""Run `megatrain CMD ...` many times without paying for Python, torch and DeepSpeed's imports each time.

A server process imports them once; for every command it forks a child that changes to the command's folder, sends
its stdout and stderr to files, runs `megatrain.cli.main(argv)`, runs the atexit handlers (as a process of its own
would) and exits. The exit code, stdout and stderr come back as a subprocess.CompletedProcess would. Each
command gets its own fresh copy of the server's memory, so no state leaks from one command to the next.

    with CliServer() as cli:
        r = cli.run(["generate", "--checkpoint", "nope"], cwd=tmp, timeout=120)
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile

SERVER = r"""
import atexit, json, os, sys, traceback
import torch, deepspeed  # noqa: F401  (the imports every child shares)
import megatrain.cli
sys.stdout.flush()
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(req["cwd"])
        for fd, path in ((1, req["out"]), (2, req["err"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        os.setpgid(0, 0)  # its own process group: a timeout kills the command and whatever it started
        try:
            rc = megatrain.cli.main(req["argv"])
        except SystemExit as e:  # argparse: exit 2 with its usage line
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
        atexit._run_exitfuncs()  # what sys.exit would run, without tearing down torch's modules (~1 s)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class CliServer:
    def __init__(self, env: dict | None = None):
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.tmp = tempfile.mkdtemp(prefix="cli_server")

    def __enter__(self) -> "CliServer":
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=self.env)
        while self._line(300) != "ready":  # DeepSpeed's import prints to stdout
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def _line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        return self.proc.stdout.readline().strip()

    def run(self, argv: list[str], cwd: str, timeout: float = 300) -> subprocess.CompletedProcess:
        out, err = os.path.join(self.tmp, "out"), os.path.join(self.tmp, "err")
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": cwd, "out": out, "err": err}) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self._line(60))["pid"]
        try:
            rc = json.loads(self._line(timeout))["rc"]
        except TimeoutError:
            os.killpg(pid, signal.SIGKILL)
            self._line(60)
            raise subprocess.TimeoutExpired(argv, timeout) from None
        with open(out) as f_out, open(err) as f_err:
            return subprocess.CompletedProcess(argv, rc, f_out.read(), f_err.read())
