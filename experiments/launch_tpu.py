"""Run one ``kvshare`` command on every host of a Cloud TPU VM or pod slice.

    python experiments/launch_tpu.py --name kv16 --zone us-west4-a \\
        --accelerator v5litepod-16 --spot --teardown -- \\
        kvshare train --config configs/llama_110m.py --workdir gs://BUCKET/runs/110m

Steps (each printed as it runs; ``--dry-run`` prints them and runs nothing):

1. request the slice as a queued resource (``--spot``, ``--reserved``, ``--best-effort``
   or on-demand by default) and poll it until it is ACTIVE (``--wait-timeout``);
   ``--reuse`` skips this and uses an existing TPU VM of that name;
2. pack the local working tree (``git ls-files``: tracked and untracked files, not the
   ignored ones) or, with ``--commit SHA``, that commit (``git archive``) into a tarball,
   and ``scp`` it to every worker; nothing is installed from a git remote;
3. on every worker: unpack into ``~/kvshare_jax``, create ``~/kvshare_venv`` with
   Python >= 3.11 through ``uv`` (installed with the image's pip; it brings its own
   CPython when the image has none: TPU VM images are Ubuntu 22.04 with Python 3.10),
   then ``uv pip install -e ".[tpu]"`` (jax[tpu] + gcsfs);
4. start the command on every worker under ``nohup`` + ``setsid`` (it survives a dropped
   SSH session), output in ``~/kvshare_run/worker-<i>.log``; when it ends the worker
   copies its log to ``<workdir>/logs/worker-<i>.log`` (a ``gs://`` workdir) and writes
   its exit status to ``~/kvshare_run/exit-code``;
5. watch: poll the exit-code files of all workers; as soon as one worker fails, stop the
   job on all of them and exit non-zero (fail fast);
6. ``--teardown``: delete the queued resource (or, with ``--reuse``, the TPU VM) at the
   end, whether the run succeeded, failed or was interrupted.

Multi-host slices (``v5litepod-16``: 4 hosts) run the identical command on all workers;
``kvshare train|study`` get ``--distributed`` (``jax.distributed.initialize()`` finds the
other hosts), and the workdir must be a ``gs://`` bucket so that checkpoints are shared.
Bad arguments print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

PROG = "launch_tpu.py"
ROOT = pathlib.Path(__file__).resolve().parents[1]
REMOTE_TREE = "$HOME/kvshare_jax"  # the unpacked tree on each worker
REMOTE_VENV = "$HOME/kvshare_venv"  # kept across launches (reinstalled into)
REMOTE_RUN = "$HOME/kvshare_run"  # pid, exit-code and worker-<i>.log of the current run
REMOTE_TARBALL = "kvshare_jax.tar.gz"  # in the worker's home directory
WORKER_ID = (
    "$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata"
    "/v1/instance/attributes/agent-worker-number || echo 0)"
)
FAILED_STATES = {"FAILED", "SUSPENDING", "SUSPENDED", "DELETING"}


class UsageError(ValueError):
    """A bad command-line argument: one line, exit status 2."""


class ArgParser(argparse.ArgumentParser):
    """argparse whose usage errors raise :class:`UsageError` instead of exiting."""

    def error(self, message: str):
        raise UsageError(message)


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation: default runtime image, and how its type number maps to hosts."""

    runtime: str
    per_host: int  # type number per host on multi-host slices (cores or chips)
    single_host_max: int  # type numbers up to this are one host
    sizes: tuple[int, ...] | None  # valid type numbers (None: multiples of per_host)
    max_size: int


# Type number = TensorCores for v2/v3/v4/v5p (2 per chip, 4 chips per host) and chips for
# v5e/v6e (1 core per chip; 8-chip single-host VMs, 4-chip hosts in multi-host slices).
GENERATIONS = {
    "v2": Generation("tpu-ubuntu2204-base", 8, 8, (8, 32, 128, 256, 512), 512),
    "v3": Generation("tpu-ubuntu2204-base", 8, 8, (8, 32, 64, 128, 256, 512, 1024, 2048), 2048),
    "v4": Generation("tpu-ubuntu2204-base", 8, 8, None, 8192),
    "v5litepod": Generation("v2-alpha-tpuv5-lite", 4, 8, (1, 4, 8, 16, 32, 64, 128, 256), 256),
    "v5p": Generation("v2-alpha-tpuv5", 8, 8, None, 12288),
    "v6e": Generation("v2-alpha-tpuv6e", 4, 8, (1, 4, 8, 16, 32, 64, 128, 256), 256),
}
ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod", "v6": "v6e", "v5": "v5p"}


@dataclasses.dataclass(frozen=True)
class Slice:
    """An accelerator type resolved to its generation, default runtime and host count."""

    accelerator: str
    generation: str
    hosts: int
    runtime: str


def parse_accelerator(accelerator: str) -> Slice:
    """``v5litepod-16`` -> Slice(hosts=4, runtime="v2-alpha-tpuv5-lite"); ValueError if unknown."""
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator)
    family = m.group(1) if m else accelerator.split("-")[0]
    if family in ALIASES:
        raise UsageError(
            f"unknown accelerator {accelerator!r}: Cloud TPU calls it "
            f"{ALIASES[family]}-{m.group(2) if m else 'N'}"
        )
    if not m or family not in GENERATIONS:
        raise UsageError(
            f"unknown accelerator {accelerator!r}: expected <generation>-<size> with "
            f"generation in {', '.join(GENERATIONS)} (e.g. v4-8, v5litepod-16, v6e-8)"
        )
    gen, size = GENERATIONS[family], int(m.group(2))
    valid = size in gen.sizes if gen.sizes else size % gen.per_host == 0
    if not valid or size > gen.max_size:
        allowed = (
            ", ".join(map(str, gen.sizes))
            if gen.sizes
            else f"multiples of {gen.per_host} up to {gen.max_size}"
        )
        raise UsageError(f"unknown accelerator {accelerator!r}: {family} sizes are {allowed}")
    hosts = 1 if size <= gen.single_host_max else size // gen.per_host
    return Slice(accelerator, family, hosts, gen.runtime)


def command_workdir(command: list[str]) -> str | None:
    """The value of ``--workdir`` in a kvshare command line, if any."""
    for i, arg in enumerate(command):
        if arg == "--workdir" and i + 1 < len(command):
            return command[i + 1]
        if arg.startswith("--workdir="):
            return arg.split("=", 1)[1]
    return None


def build_parser() -> ArgParser:
    p = ArgParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("--name", required=True, help="queued resource / TPU VM name")
    p.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e)")
    p.add_argument("--accelerator", required=True, help="v2-8, v4-16, v5litepod-16, v6e-8...")
    p.add_argument("--project", default="", help="GCP project (default: gcloud's)")
    p.add_argument(
        "--runtime-version",
        "--version",
        dest="runtime_version",
        default="",
        help="TPU VM image (default by generation, e.g. v2-alpha-tpuv5-lite for v5litepod)",
    )
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
    kind.add_argument("--reserved", action="store_true", help="use the project's reservation")
    kind.add_argument(
        "--best-effort", action="store_true", help="best-effort capacity (gcloud alpha)"
    )
    p.add_argument(
        "--reuse", action="store_true", help="use the existing TPU VM --name (no queued resource)"
    )
    p.add_argument("--commit", default="", help="ship this commit (git archive), not the tree")
    p.add_argument("--python", default="3.11", help="Python version of the workers' venv")
    p.add_argument(
        "--logs", default="", help="GCS folder for worker logs (default: <gs:// workdir>/logs)"
    )
    p.add_argument("--wait-timeout", type=float, default=3600.0, help="seconds to wait for ACTIVE")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between status polls")
    p.add_argument(
        "--teardown",
        action="store_true",
        help="delete the queued resource / TPU VM at the end (also on failure)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- kvshare train|study|... ARGS")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parses and validates the arguments; raises :class:`UsageError` (one line)."""
    args = build_parser().parse_args(argv)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("missing command after '--' (e.g. -- kvshare train --config ...)")
    if command[0] != "kvshare":
        raise UsageError(f"the command after '--' must start with 'kvshare', not {command[0]!r}")
    if len(command) < 2 or command[1].startswith("-"):
        raise UsageError("missing kvshare subcommand after '--' (e.g. -- kvshare train ...)")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", args.name):
        raise UsageError(f"bad --name {args.name!r}: lowercase letters, digits and '-'")
    if not re.fullmatch(r"[a-z]+-[a-z]+[0-9]+-[a-z]", args.zone):
        raise UsageError(f"bad --zone {args.zone!r}: expected e.g. us-central2-b")
    if args.project and not re.fullmatch(r"[a-z][-a-z0-9:.]{4,}[a-z0-9]", args.project):
        raise UsageError(f"bad --project {args.project!r}")
    if not re.fullmatch(r"3\.(1[1-9]|[2-9][0-9])", args.python):
        raise UsageError(f"bad --python {args.python!r}: kvshare_jax needs 3.11 or newer")
    if args.wait_timeout <= 0 or args.poll <= 0:
        raise UsageError("--wait-timeout and --poll must be positive")
    if args.reuse and (args.spot or args.reserved or args.best_effort):
        raise UsageError("--spot/--reserved/--best-effort apply to new slices, not --reuse")
    args.slice = parse_accelerator(args.accelerator)
    args.runtime_version = args.runtime_version or args.slice.runtime
    workdir = command_workdir(command)
    if args.slice.hosts > 1 and command[1] in ("train", "study"):
        if not (workdir or "").startswith("gs://"):
            raise UsageError(
                f"{args.accelerator} has {args.slice.hosts} hosts: --workdir must be a gs:// "
                "path (checkpoints are shared)"
            )
        if "--distributed" not in command:
            command.append("--distributed")  # every host joins the same jax.distributed job
    args.logs = args.logs or (f"{workdir}/logs" if (workdir or "").startswith("gs://") else "")
    args.logs = args.logs.rstrip("/")
    if args.logs and not args.logs.startswith("gs://"):
        raise UsageError(f"bad --logs {args.logs!r}: expected a gs:// folder")
    args.command = command
    if args.commit:
        args.commit = resolve_commit(args.commit)
    return args


def git(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True)


def resolve_commit(ref: str) -> str:
    """The full SHA of ``ref`` in this checkout; UsageError if it has no such commit."""
    out = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if out.returncode != 0:
        raise UsageError(f"unknown --commit {ref!r}: not a commit of {ROOT}")
    return out.stdout.decode().strip()


def tree_files() -> list[str]:
    """The working tree's files that git would ship: tracked + untracked, not ignored."""
    out = git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    if out.returncode != 0:
        raise UsageError(f"{ROOT} is not a git checkout: cannot pack the tree")
    names = [n for n in out.stdout.decode().split("\0") if n]
    return [n for n in dict.fromkeys(names) if (ROOT / n).is_file()]  # skip deleted files


def pack_tree(files: list[str], tarball: pathlib.Path) -> None:
    """Writes ``files`` (relative to the repository root) into a .tar.gz."""
    with tarfile.open(tarball, "w:gz") as tar:
        for name in files:
            tar.add(ROOT / name, arcname=name, recursive=False)


# ----------------------------------------------------------------------------- commands
def gcloud(args: argparse.Namespace, *words: str, alpha: bool = False) -> list[str]:
    """``gcloud [alpha] compute tpus WORDS --zone=Z [--project=P]``."""
    where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
    return ["gcloud", *(["alpha"] if alpha else []), "compute", "tpus", *words, *where]


def create_cmd(args: argparse.Namespace) -> list[str]:
    """The queued-resource request for the slice."""
    cmd = gcloud(args, "queued-resources", "create", args.name, alpha=args.best_effort)
    cmd += [
        f"--node-id={args.name}",
        f"--accelerator-type={args.accelerator}",
        f"--runtime-version={args.runtime_version}",
    ]
    for flag in ("spot", "reserved", "best_effort"):
        if getattr(args, flag):
            cmd.append("--" + flag.replace("_", "-"))
    return cmd


def describe_cmd(args: argparse.Namespace) -> list[str]:
    return gcloud(args, "queued-resources", "describe", args.name) + ["--format=value(state.state)"]


def delete_cmd(args: argparse.Namespace) -> list[str]:
    if args.reuse:
        return gcloud(args, "tpu-vm", "delete", args.name) + ["--quiet"]
    # --force deletes the slice's TPU VMs first, then the queued resource
    return gcloud(args, "queued-resources", "delete", args.name) + ["--force", "--quiet"]


def scp_cmd(args: argparse.Namespace, tarball: pathlib.Path) -> list[str]:
    return gcloud(args, "tpu-vm", "scp", str(tarball), f"{args.name}:~/{REMOTE_TARBALL}") + [
        "--worker=all"
    ]


def ssh_cmd(args: argparse.Namespace, remote: str) -> list[str]:
    return gcloud(args, "tpu-vm", "ssh", args.name) + ["--worker=all", f"--command={remote}"]


def kill_script() -> str:
    """Stops the job's process group on a worker (no-op when none runs)."""
    return (
        f"if [ -f {REMOTE_RUN}/pid ] && [ ! -f {REMOTE_RUN}/exit-code ]; then "
        f"kill -TERM -- -$(cat {REMOTE_RUN}/pid) 2>/dev/null; fi; true"
    )


def setup_script(args: argparse.Namespace) -> str:
    """Unpacks the tarball and installs ``.[tpu]`` into a Python >= 3.11 venv."""
    uv = "python3 -m uv"
    return " && ".join(
        [
            "set -e",
            kill_script(),  # a job left by an earlier launch on a reused VM
            f"rm -rf {REMOTE_TREE} {REMOTE_RUN}",
            f"mkdir -p {REMOTE_TREE} {REMOTE_RUN}",
            f"tar -xzf $HOME/{REMOTE_TARBALL} -C {REMOTE_TREE}",
            "python3 -m pip install --user --quiet --upgrade uv",
            f"({REMOTE_VENV}/bin/python -c 'import sys; assert sys.version_info >= "
            f"({args.python.replace('.', ', ')})' 2>/dev/null || "
            f"{uv} venv --python {args.python} {REMOTE_VENV})",
            f"cd {REMOTE_TREE}",
            f"{uv} pip install --python {REMOTE_VENV}/bin/python -e '.[tpu]'",
        ]
    )


def run_script(args: argparse.Namespace) -> str:
    """Starts the job on a worker in the background, detached from the SSH session."""
    log = f"{REMOTE_RUN}/worker-$W.log"
    copy = f"gcloud storage cp {log} {args.logs}/worker-$W.log || true; " if args.logs else ""
    job = (
        f"cd {REMOTE_TREE} || exit 1; setsid {REMOTE_VENV}/bin/{shlex.join(args.command)} "
        f"> {log} 2>&1 < /dev/null & echo $! > {REMOTE_RUN}/pid; wait $!; rc=$?; "
        f"{copy}echo $rc > {REMOTE_RUN}/exit-code"
    )
    return (
        f"export W={WORKER_ID} && mkdir -p {REMOTE_RUN} && "
        f"rm -f {REMOTE_RUN}/exit-code {REMOTE_RUN}/pid && sudo rm -f /tmp/libtpu_lockfile; "
        f"nohup bash -c {shlex.quote(job)} > /dev/null 2>&1 < /dev/null & "
        f'echo "kvshare-started $W"'
    )


def status_script() -> str:
    """Prints ``kvshare-status <worker> <exit status|running>`` on a worker."""
    return (
        f"W={WORKER_ID}; "
        f'echo "kvshare-status $W $(cat {REMOTE_RUN}/exit-code 2>/dev/null || echo running)"'
    )


# ----------------------------------------------------------------------------- running
class LaunchError(RuntimeError):
    """A step failed at run time (not a usage error): exit status 1."""


class Shell:
    """Prints each command; runs it unless ``dry_run``."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def note(self, text: str) -> None:
        print(f"# {text}", flush=True)

    def run(self, cmd: list[str], capture: bool = False, check: bool = True) -> str:
        print(shlex.join(cmd), flush=True)
        if self.dry_run:
            return ""
        out = subprocess.run(cmd, capture_output=capture, text=True)
        if check and out.returncode != 0:
            detail = (out.stderr or "").strip().splitlines()[-1:] if capture else []
            raise LaunchError(f"{cmd[0]} exited with status {out.returncode}: " + "".join(detail))
        return out.stdout if capture else ""


def wait_active(args: argparse.Namespace, sh: Shell) -> None:
    """Polls the queued resource until ACTIVE; LaunchError on a failed state or timeout."""
    sh.note(f"repeated every {args.poll:g} s until ACTIVE (timeout {args.wait_timeout:g} s)")
    deadline = time.monotonic() + args.wait_timeout
    while True:
        state = sh.run(describe_cmd(args), capture=True, check=False).strip()
        if sh.dry_run or state == "ACTIVE":
            return
        if state in FAILED_STATES:
            raise LaunchError(f"queued resource {args.name} is {state}")
        if time.monotonic() > deadline:
            raise LaunchError(
                f"queued resource {args.name} not ACTIVE after {args.wait_timeout:g} s"
            )
        print(f"# {args.name}: {state or 'unknown state'}", flush=True)
        time.sleep(args.poll)


def worker_status(output: str) -> dict[int, str]:
    """``kvshare-status <i> <status>`` lines -> {worker: status}."""
    return {
        int(m.group(1)): m.group(2)
        for m in re.finditer(r"^kvshare-status (\d+) (\S+)\s*$", output, re.MULTILINE)
    }


def watch(
    args: argparse.Namespace, sh: Shell, max_ssh_failures: int = 3, grace_s: float = 120.0
) -> int:
    """Polls every worker's exit-code file; stops all workers as soon as one fails.

    Returns 0 when every worker exited 0, else the first failing worker's status (or 1)."""
    hosts = args.slice.hosts
    sh.note(f"repeated every {args.poll:g} s until all {hosts} workers have an exit code")
    sh.note("if a worker fails, the job is stopped on every worker with:")
    sh.note(shlex.join(ssh_cmd(args, kill_script())))
    if sh.dry_run:
        sh.run(ssh_cmd(args, status_script()))
        return 0
    start, failures = time.monotonic(), 0
    while True:
        out = subprocess.run(ssh_cmd(args, status_script()), capture_output=True, text=True)
        status = worker_status(out.stdout)
        failures = 0 if status else failures + 1
        if failures >= max_ssh_failures:
            raise LaunchError(f"lost contact with {args.name} (preempted?)")
        failed = {w: s for w, s in status.items() if s not in ("running", "0")}
        done = sum(s != "running" for s in status.values())
        print(f"[t={time.monotonic() - start:.0f}s] {done}/{hosts} workers done", flush=True)
        if failed:
            worker, code = min(failed.items())
            print(f"# worker {worker} exited with status {code}: stopping all", flush=True)
            sh.run(ssh_cmd(args, kill_script()), check=False)
            deadline = time.monotonic() + grace_s  # let the others write (and copy) their logs
            while time.monotonic() < deadline and "running" in status.values():
                time.sleep(min(args.poll, 10))
                out = subprocess.run(ssh_cmd(args, status_script()), capture_output=True, text=True)
                status = worker_status(out.stdout) or status
            return int(code) if code.isdigit() and int(code) else 1
        if done == hosts and len(status) == hosts:
            return 0
        time.sleep(args.poll)


def launch(args: argparse.Namespace, sh: Shell) -> int:
    """All steps in order, with ``--teardown`` in a ``finally``; the job's exit status."""
    s = args.slice
    sh.note(
        f"{s.accelerator}: {s.hosts} host(s), runtime {args.runtime_version}, "
        f"logs {args.logs + '/worker-<i>.log' if args.logs else '~/kvshare_run on each worker'}"
    )
    tarball = pathlib.Path(tempfile.gettempdir()) / f"kvshare_jax-{args.name}.tar.gz"
    try:
        if not args.reuse:
            sh.run(create_cmd(args))
            wait_active(args, sh)
        if args.commit:
            sh.run(["git", "-C", str(ROOT), "archive", "--format=tar.gz", "-o", str(tarball),
                    args.commit])  # fmt: skip
        else:
            files = tree_files()
            sh.note(f"pack the working tree ({len(files)} files from git ls-files) -> {tarball}")
            if not sh.dry_run:
                pack_tree(files, tarball)
        sh.run(scp_cmd(args, tarball))
        sh.run(ssh_cmd(args, setup_script(args)))
        sh.run(ssh_cmd(args, run_script(args)))
        rc = watch(args, sh)
        where = f"{args.logs}/" if args.logs else "~/kvshare_run/ on each worker"
        sh.note(f"{'done' if rc == 0 else f'failed (exit status {rc})'}; logs: {where}")
        return rc
    finally:
        if args.teardown:
            sh.run(delete_cmd(args), check=False)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    try:
        return launch(args, Shell(args.dry_run))
    except LaunchError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
