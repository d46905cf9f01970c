"""Two `paddle.distributed.launch` launchers on this machine acting as two nodes of one job (one CPU process
each, gloo), as README's multi-node command runs them on two machines."""
import os
import socket
import subprocess
import sys

from helpers.runs import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(script, argv, log_root, cwds=(None, None), env=None, timeout=300):
    """Run `script argv` as node 0 and node 1 (`--nnodes 2 --master 127.0.0.1:<free port> --rank 0|1
    --nproc_per_node 1`, each with its own `--log_dir` and working directory). Returns [(exit status, launcher
    output + worker log)] for node 0 and node 1."""
    master = f"127.0.0.1:{free_port()}"
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    launchers = []
    for node in (0, 1):
        log_dir = os.path.join(str(log_root), f"node{node}-logs")
        command = [sys.executable, "-m", "paddle.distributed.launch", "--nnodes", "2", "--master", master,
                   "--rank", str(node), "--nproc_per_node", "1", "--log_dir", log_dir, script, *map(str, argv)]
        launchers.append((log_dir, subprocess.Popen(command, cwd=cwds[node] or ROOT, env=full_env, text=True,
                                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
    results = []
    for log_dir, launcher in launchers:
        try:
            output, _ = launcher.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for _, other in launchers:
                other.kill()
            output, _ = launcher.communicate()
        worker_log = os.path.join(log_dir, "workerlog.0")
        if os.path.isfile(worker_log):
            with open(worker_log, errors="replace") as f:
                output += f.read()
        results.append((launcher.returncode, output))
    return results
