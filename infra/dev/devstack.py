"""Local development services that mirror the cloud: an S3 endpoint (moto's server) and a Ray head.

    python infra/dev/devstack.py up      # start both, print the environment to use
    python infra/dev/devstack.py env     # print it again (eval "$(python infra/dev/devstack.py env)")
    python infra/dev/devstack.py status
    python infra/dev/devstack.py down    # stop both; no process is left behind

State (process ids, ports) lives in ``.devstack/`` at the repository root, or ``$DEVSTACK_DIR``.
The Ray head runs ``ray start --head --block`` in its own process group, so ``down`` stops
exactly the processes this stack started and never another Ray on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from jobs._cluster import forget_cluster
from jobs._local_s3 import free_port, s3_environment, server_command

STATE_DIR = Path(os.environ.get("DEVSTACK_DIR", Path(__file__).resolve().parents[2] / ".devstack"))
STATE_FILE = STATE_DIR / "state.json"
BUCKET = "dev"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def wait_for(check, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise SystemExit(f"devstack: {what} did not come up within {timeout:.0f} s (logs in {STATE_DIR})")


def http_ok(url: str) -> bool:
    """Whether a server answers at ``url`` at all (an auth refusal is an answer)."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def environment(state: dict) -> dict[str, str]:
    return {
        **s3_environment(f"http://127.0.0.1:{state['s3_port']}"),
        # ray.init() in a local driver joins through GCS; `ray job submit` talks to the dashboard.
        "RAY_ADDRESS": f"127.0.0.1:{state['ray_port']}",
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{state['dashboard_port']}",
        # The head turns token authentication on; clients joining it must say so to send the token.
        "RAY_AUTH_MODE": "token",
        "DEVSTACK_BUCKET": f"s3://{BUCKET}",
    }


def print_env(state: dict) -> None:
    for key, value in environment(state).items():
        print(f"export {key}={value}")


def spawn(command: list[str], log: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    # `ray job submit -- python ...` runs `python` from the head's PATH: make it this interpreter.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    with open(STATE_DIR / log, "ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "PATH": path, **(env or {})}
        )


def up(num_cpus: int) -> None:
    if STATE_FILE.exists():
        state = json.loads(STATE_FILE.read_text())
        if alive(state["s3_pid"]) or alive(state["ray_pid"]):
            print("# devstack is already running", file=sys.stderr)
            print_env(state)
            return
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state = {"s3_port": free_port(), "ray_port": free_port(), "dashboard_port": free_port()}
    s3 = spawn(server_command(state["s3_port"]), "s3.log")
    state["s3_pid"] = s3.pid
    ray = spawn(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            f"--port={state['ray_port']}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={state['dashboard_port']}",
            f"--num-cpus={num_cpus}",
        ],
        # Workers inherit the head's environment: they reach the same S3 endpoint as the user.
        "ray.log",
        env={k: v for k, v in environment(state).items() if not k.startswith("RAY_ADDRESS")},
    )
    state["ray_pid"] = ray.pid
    STATE_FILE.write_text(json.dumps(state))
    wait_for(lambda: http_ok(f"http://127.0.0.1:{state['s3_port']}/"), "the S3 endpoint", 30)
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{state['s3_port']}/{BUCKET}", method="PUT"))
    wait_for(lambda: http_ok(f"http://127.0.0.1:{state['dashboard_port']}/api/version"), "the Ray head", 120)
    print(
        f"# devstack up: S3 at http://127.0.0.1:{state['s3_port']} (bucket s3://{BUCKET}), "
        f"Ray at 127.0.0.1:{state['ray_port']}, dashboard http://127.0.0.1:{state['dashboard_port']}",
        file=sys.stderr,
    )
    print_env(state)


def down() -> None:
    if not STATE_FILE.exists():
        print("devstack: not running")
        return
    state = json.loads(STATE_FILE.read_text())
    for name in ("ray_pid", "s3_pid"):
        pid = state[name]
        # Each service leads its own process group: signal the group, so that raylet, GCS and
        # workers go with the head.
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while group_members(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not group_members(pid):
                break
    left = group_members(state["ray_pid"]) + group_members(state["s3_pid"])
    if left:
        raise SystemExit(f"devstack: processes still running after stop: {left}")
    forget_cluster(state["ray_port"])
    STATE_FILE.unlink()
    print("devstack: stopped")


def status() -> int:
    if not STATE_FILE.exists():
        print("devstack: not running")
        return 1
    state = json.loads(STATE_FILE.read_text())
    s3_up, ray_up = alive(state["s3_pid"]), alive(state["ray_pid"])
    print(f"S3 endpoint pid {state['s3_pid']}: {'up' if s3_up else 'down'}; Ray head pid {state['ray_pid']}: {'up' if ray_up else 'down'}")
    return 0 if s3_up and ray_up else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "env", "status"])
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray head (default 4)")
    args = parser.parse_args(argv)
    if args.command == "up":
        up(args.num_cpus)
    elif args.command == "down":
        down()
    elif args.command == "status":
        return status()
    else:
        if not STATE_FILE.exists():
            raise SystemExit("devstack: not running; start it with: python infra/dev/devstack.py up")
        print_env(json.loads(STATE_FILE.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
