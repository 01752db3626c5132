"""What each worker of ``graft-run SCRIPT.py`` runs first: it gives the script a torch.distributed
world of its network's own, then runs the script as ``python SCRIPT.py`` would.

torchrun numbers every process of the job: rank r is replica r % G of network r // G (G =
``--data-parallel``). The script must not see that world, or its samplers, DDP, reductions and
rank-0 saving would span the networks. So, before the script runs:

* ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``
  (and torchrun's GROUP/ROLE variables) describe the network's G replicas, with a rendezvous
  address of their own; with G = 1 none of them is set, as for a script started with ``python``
  (Slurm's task layout, ``SLURM_PROCID``, ``SLURM_NTASKS``..., is hidden too);
* ``GRAFT_*`` describe graft's own world, which ``graft.Grafter()`` joins through process
  groups the script never sees: ``GRAFT_NETWORK``, ``GRAFT_NETWORKS``, ``GRAFT_REPLICA``,
  ``GRAFT_REPLICAS``, graft's ranks and its store (``graft_world`` lists them all);
* where graft-run counted GPUs, ``CUDA_VISIBLE_DEVICES`` shows the network's replicas their own
  GPUs (the script's ``cuda:LOCAL_RANK`` is then the right one);
* ``{network}`` in the script's arguments becomes the network's index
  (``--output-dir runs/net{network}``), so outputs do not collide.

A graft error (``graft: error: ...``) ends the worker in one line, which graft-run prints once;
any other exception keeps its traceback: it is the script's.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys
from pathlib import Path

from .cli import record_error

# What torchrun (and Slurm's srun, around graft-run) set that describes the whole job: removed, or
# replaced by the network's own world. Scripts read Slurm's task layout as a world too
# (torchvision's init_distributed_mode: SLURM_PROCID; Lightning: SLURM_NTASKS).
TORCHRUN_WORLD = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                  "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME",
                  "TORCHELASTIC_USE_AGENT_STORE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NTASKS",
                  "SLURM_NPROCS", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_STEP_NUM_TASKS",
                  "SLURM_STEP_TASKS_PER_NODE")


# torchelastic's description of the job, which Lightning reads as a world: hidden with G = 1.
TORCHELASTIC_JOB = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")


class LaunchError(Exception):
    """The job cannot be split into networks as asked. ``everywhere``: every rank finds it alike
    (it is said without a rank, so graft-run prints it once)."""

    def __init__(self, message: str, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


def graft_world(env: dict) -> dict:
    """The GRAFT_* variables, from torchrun's variables and graft-run's GRAFT_REPLICAS."""
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank, local_world = int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world))
    replicas = int(env.get("GRAFT_REPLICAS", "1"))
    if world % replicas:
        raise LaunchError(f"{world} processes do not split into networks of --data-parallel {replicas}: start "
                          f"networks x {replicas} processes", everywhere=True)
    if local_world % replicas:
        raise LaunchError(f"{local_world} processes on this node do not hold whole networks of --data-parallel "
                          f"{replicas}: each network's replicas must share a node (--nproc_per_node a multiple "
                          f"of {replicas})")
    return {"GRAFT_RANK": rank, "GRAFT_WORLD": world, "GRAFT_REPLICAS": replicas, "GRAFT_NETWORK": rank // replicas,
            "GRAFT_NETWORKS": world // replicas, "GRAFT_REPLICA": rank % replicas, "GRAFT_LOCAL_RANK": local_rank,
            "GRAFT_LOCAL_WORLD": local_world, "GRAFT_STORE": f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
            "GRAFT_STORE_HOSTED": "1" if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" else "0",
            "GRAFT_ATTEMPT": env.get("TORCHELASTIC_RESTART_COUNT", "0")}


def visible_gpus(gpus: str, local_rank: int, replica: int, replicas: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES of one worker: its network's replicas' GPUs on this node (the
    node's GPUs in order of local rank), or None where the node has fewer GPUs than workers."""
    node = [g for g in gpus.split(",") if g]
    first = local_rank - replica
    if not node or first + replicas > len(node):
        return None
    return ",".join(node[first:first + replicas])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def network_address(g: dict, timeout: float = 300.0) -> tuple[str, int]:
    """The rendezvous address of this network's own world: replica 0 picks a free port on its
    host and publishes it in graft's store; the other replicas read it there."""
    from datetime import timedelta

    import torch.distributed as dist

    host, _, port = g["GRAFT_STORE"].rpartition(":")
    store = dist.TCPStore(host, int(port), g["GRAFT_WORLD"], is_master=False, timeout=timedelta(seconds=timeout),
                          wait_for_workers=False) if g["GRAFT_STORE_HOSTED"] == "1" else None
    if store is None:
        raise LaunchError("--data-parallel > 1 needs torchrun's agent store (torch 2.3 or later)")
    prefix = f"graft/attempt{g['GRAFT_ATTEMPT']}/"
    key = f"{prefix}network{g['GRAFT_NETWORK']}/address"
    if g["GRAFT_REPLICA"] == 0:
        host = socket.getfqdn()
        while True:  # a port no other network on this host took (each frees its probe before binding it)
            port = _free_port()
            if store.add(f"{prefix}ports/{host}:{port}", 1) == 1:
                break
        store.set(key, f"{host}:{port}")
    store.wait([key], timedelta(seconds=timeout))
    address, _, found = store.get(key).decode().rpartition(":")
    return address, int(found)


def prepare(env: dict) -> dict:
    """The environment the script runs with (a new dict; ``env`` is torchrun's)."""
    g = graft_world(env)
    hidden = TORCHRUN_WORLD if g["GRAFT_REPLICAS"] > 1 else TORCHRUN_WORLD + TORCHELASTIC_JOB
    out = {k: v for k, v in env.items() if k not in hidden}
    out.update({k: str(v) for k, v in g.items()})
    replicas, replica = g["GRAFT_REPLICAS"], g["GRAFT_REPLICA"]
    if replicas > 1:
        address, port = network_address(g)
        out.update(RANK=str(replica), WORLD_SIZE=str(replicas), LOCAL_RANK=str(replica),
                   LOCAL_WORLD_SIZE=str(replicas), GROUP_RANK="0", GROUP_WORLD_SIZE="1", ROLE_RANK=str(replica),
                   ROLE_WORLD_SIZE=str(replicas), MASTER_ADDR=address, MASTER_PORT=str(port))
    gpus = visible_gpus(env.get("GRAFT_GPUS", ""), g["GRAFT_LOCAL_RANK"], replica, replicas)
    if gpus is not None:
        out["CUDA_VISIBLE_DEVICES"] = gpus
    return out


def report(line: str) -> None:
    """Leave the worker's one line where torchrun's agent and graft-run find it."""
    if not record_error(line):
        print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    as_module = argv[:1] == ["-m"]
    target, *script_args = argv[1:] if argv[:1] in (["-m"], ["--"]) else argv
    try:
        env = prepare(dict(os.environ))
    except LaunchError as e:
        report(f"graft: error: {e}" if e.everywhere else f"graft: error: rank {os.environ.get('RANK', '?')}: {e}")
        return 1
    os.environ.clear()
    os.environ.update(env)
    network = env["GRAFT_NETWORK"]
    script_args = [a.replace("{network}", network) for a in script_args]
    from .errors import UserError  # after the environment: it installs nothing in script mode

    try:
        if as_module:
            sys.argv = [target, *script_args]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target, *script_args]
            sys.path.insert(0, str(Path(target).resolve().parent))
            runpy.run_path(target, run_name="__main__")
    except UserError as e:  # graft's own errors (a peer that stopped, other settings...): one line
        report(f"graft: error: network {network} (its rank {env['GRAFT_REPLICA']}): {e}"
               if not getattr(e, "names_rank", False) else f"graft: error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
