"""Create (or reuse) a Cloud TPU VM / pod slice, install kvshare_jax on every worker and
run the same ``kvshare`` command on all hosts.

    python experiments/launch_tpu.py --name kv-v4 --zone us-central2-b \\
        --accelerator v4-8 --dry-run -- \\
        kvshare train --config configs/llama_110m.py --workdir gs://my-bucket/runs/110m

Multi-host slices (e.g. ``v5litepod-32``: 8 hosts) run the identical command on every
worker (``--worker=all``); ``kvshare train`` calls ``jax.distributed.initialize()``,
which discovers the other hosts on TPU, and each process loads its own data shard. The
workdir must be shared storage (a ``gs://`` bucket) so that checkpoints are shared.
``--dry-run`` prints the exact gcloud commands instead of running them.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import subprocess
import sys

# Accelerator family -> TPU VM software version (see `gcloud compute tpus versions list`).
RUNTIME = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}


def default_repo() -> str | None:
    """The ``origin`` URL of this checkout, if it has one."""
    out = subprocess.run(
        ["git", "-C", str(pathlib.Path(__file__).parent), "remote", "get-url", "origin"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or None


def runtime_version(accelerator: str) -> str:
    """The TPU VM image for an accelerator type such as ``v4-8`` or ``v5litepod-32``."""
    family = accelerator.rsplit("-", 1)[0]
    if family not in RUNTIME:
        raise ValueError(f"unknown accelerator {accelerator!r}: expected one of {sorted(RUNTIME)}")
    return RUNTIME[family]


def gcloud_commands(args: argparse.Namespace) -> list[list[str]]:
    """The gcloud invocations, in order: create (unless --reuse), install, run."""
    where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    cmds = []
    if not args.reuse:
        create = [
            *tpu,
            "create",
            args.name,
            *where,
            f"--accelerator-type={args.accelerator}",
            f"--version={args.version or runtime_version(args.accelerator)}",
        ]
        cmds.append(create + (["--spot"] if args.spot else []))
    install = (
        f"(git clone {shlex.quote(args.repo)} kvshare_jax || git -C kvshare_jax pull) && "
        f"git -C kvshare_jax checkout {shlex.quote(args.ref)} && cd kvshare_jax && "
        "python3 -m venv .venv && .venv/bin/pip install -U pip && "
        ".venv/bin/pip install -e '.[tpu]'"
    )
    command = list(args.command)
    if command[1] in ("train", "study") and "--distributed" not in command:
        command.append("--distributed")  # every host joins the same jax.distributed job
    run = "cd kvshare_jax && .venv/bin/" + shlex.join(command)
    for remote in (install, run):
        cmds.append([*tpu, "ssh", args.name, *where, "--worker=all", f"--command={remote}"])
    return cmds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--name", required=True, help="TPU VM / slice name")
    p.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e)")
    p.add_argument("--accelerator", default="v4-8", help="v4-8, v5litepod-32, ...")
    p.add_argument("--project", default="", help="GCP project (default: gcloud's)")
    p.add_argument("--version", default="", help="TPU software version (default by family)")
    p.add_argument("--repo", default=None, help="git URL of kvshare_jax (default: origin)")
    p.add_argument("--ref", default="main", help="git branch / tag / commit to install")
    p.add_argument("--reuse", action="store_true", help="use an existing TPU VM")
    p.add_argument("--spot", action="store_true", help="create a spot (preemptible) VM")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- kvshare train|study ...")
    args = p.parse_args(argv)
    args.command = [c for c in args.command if c != "--"] or [
        "kvshare",
        "train",
        "--config",
        "configs/llama_110m.py",
        "--workdir",
        "runs/110m",
    ]
    args.repo = args.repo or default_repo()
    if not args.repo:
        p.error("this checkout has no 'origin' remote: pass --repo <git URL>")
    if args.command[0] != "kvshare":
        p.error("the remote command must start with 'kvshare'")
    try:
        cmds = gcloud_commands(args)
    except ValueError as e:
        p.error(str(e))
    for cmd in cmds:
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
