"""A real single-node Slurm cluster on localhost for the workflow tests.

`SlurmCluster(workdir).start()` writes /etc/slurm/slurm.conf and /etc/slurm/gres.conf (jobs
launched by the Snakemake Slurm plugin do not see SLURM_CONF, so the config must be at the
default path; an existing file there is moved aside and restored by `stop()`), starts munged,
slurmctld and slurmd as child processes of this Python process, and waits until the node is
idle. The node has 2 fake GPUs (`Gres=gpu:2`, gres.conf files /dev/null and /dev/zero), so
`--gpus=1` jobs schedule; CUDA is absent, so the training code runs on CPU. No accounting:
the workflow profile queries job states with squeue. `stop()` ends exactly the daemons it
started (by pid) and restores the config files.

Needs root and Debian's `slurm-wlm munge` (`make system-deps`). Command line, for debugging:
  python -m tests.slurm.cluster start DIR   /   python -m tests.slurm.cluster stop DIR
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SLURM_DIR = Path("/etc/slurm")
PARTITION = "smallbig-test"
MARK = "# written by smallbig tests/slurm/cluster.py"
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol")


class SlurmError(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    found = {b: shutil.which(b) or (Path("/usr/sbin") / b).exists() for b in BINARIES}
    return [b for b, ok in found.items() if not ok]


def _exe(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    if (Path("/usr/sbin") / name).exists():
        return str(Path("/usr/sbin") / name)
    raise SlurmError(f"{name}: not installed (run `make system-deps`: apt-get install slurm-wlm munge)")


def _node_hardware() -> tuple[str, str]:
    """(node name, hardware description) from `slurmd -C` (CPUs, sockets, cores, memory)."""
    out = subprocess.run([_exe("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0].split()
    fields = dict(kv.split("=", 1) for kv in first if "=" in kv)
    hw = " ".join(kv for kv in first if not kv.startswith("NodeName="))
    return fields["NodeName"], hw


class SlurmCluster:
    def __init__(self, workdir: str | Path, gpus: int = 2):
        self.workdir = Path(workdir).resolve()
        self.gpus = gpus
        self.procs: dict[str, subprocess.Popen] = {}
        self._backups: dict[Path, Path] = {}
        self.node = None

    # ---------------------------------------------------------------- config files
    def _write_config(self) -> None:
        node, hardware = _node_hardware()
        self.node = node
        d = self.workdir
        for sub in ("state", "spool", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        conf = f"""{MARK}
ClusterName=smallbigtest
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=300
KillWait=30
SchedulerParameters=sched_interval=1
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 {hardware} Gres=gpu:{self.gpus} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""
        files = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random"][: self.gpus]
        gres = MARK + "\n" + "".join(f"Name=gpu File={f}\n" for f in files)
        SLURM_DIR.mkdir(parents=True, exist_ok=True)
        for name, text in (("slurm.conf", conf), ("gres.conf", gres)):
            path = SLURM_DIR / name
            if path.exists() and MARK not in path.read_text(errors="replace"):
                backup = self.workdir / f"{name}.orig"
                shutil.copy2(path, backup)
                self._backups[path] = backup
            path.write_text(text)

    def _restore_config(self) -> None:
        for name in ("slurm.conf", "gres.conf"):
            path = SLURM_DIR / name
            if path in self._backups:
                shutil.copy2(self._backups[path], path)
            elif path.exists() and MARK in path.read_text(errors="replace"):
                path.unlink()

    # ---------------------------------------------------------------- daemons
    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / "log" / f"{name}.out", "ab")  # noqa: SIM115 - handed to the daemon process
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        time.sleep(0.5)
        if self.procs[name].poll() is not None:
            raise SlurmError(
                f"{name} exited at start (code {self.procs[name].returncode}); "
                f"see {self.workdir}/log/{name}.out\n{self.tail(name)}"
            )

    def tail(self, name: str, n: int = 30) -> str:
        text = ""
        for f in (self.workdir / "log" / f"{name}.out", self.workdir / "log" / f"{name}.log"):
            if f.exists():
                text += "\n".join(f.read_text(errors="replace").splitlines()[-n:]) + "\n"
        return text

    def start(self, timeout: float = 60) -> SlurmCluster:
        missing = missing_binaries()
        if missing:
            raise SlurmError(f"not installed: {', '.join(missing)} (run `make system-deps`)")
        if os.geteuid() != 0:
            raise SlurmError("a local Slurm test cluster needs root (it writes /etc/slurm)")
        if socket_in_use(6817) or socket_in_use(6818):
            raise SlurmError("ports 6817/6818 are in use: another slurmctld/slurmd is running")
        self._write_config()
        # munged runs as the munge user, which must reach its files: not under a private
        # (0700) temporary directory such as pytest's, so in a directory of its own in /tmp
        self.munge_dir = Path(tempfile.mkdtemp(prefix="smallbig-munge-"))
        self.munge_dir.chmod(0o755)
        d = self.munge_dir
        try:
            for sub in ("munge-run", "munge-lib", "munge-log"):
                (d / sub).mkdir()
                shutil.chown(d / sub, "munge", "munge")
            sock = d / "munge-run" / "munge.socket.2"
            # munged runs as the munge user (it refuses root); the clients find it at the
            # default socket, so the default socket path is linked to ours.
            self._spawn(
                "munged",
                [
                    "runuser",
                    "-u",
                    "munge",
                    "--",
                    _exe("munged"),
                    "-F",
                    "--socket",
                    str(sock),
                    "--pid-file",
                    str(d / "munge-run" / "munged.pid"),
                    "--log-file",
                    str(d / "munge-log" / "munged.log"),
                    "--seed-file",
                    str(d / "munge-lib" / "munged.seed"),
                ],
            )
            default_dir = Path("/run/munge")
            default_dir.mkdir(parents=True, exist_ok=True)
            default_sock = default_dir / "munge.socket.2"
            if default_sock.is_symlink() or not default_sock.exists():
                if default_sock.is_symlink():
                    default_sock.unlink()
                default_sock.symlink_to(sock)
                self._munge_link = default_sock
            _wait(
                lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0,
                timeout,
                "munge credentials",
                lambda: self.tail("munged"),
            )
            d = self.workdir
            self._spawn("slurmctld", [_exe("slurmctld"), "-D", "-i", "-c"])
            self._spawn("slurmd", [_exe("slurmd"), "-D", "-N", self.node])
            _wait(
                self.node_idle,
                timeout,
                "the node to become idle",
                lambda: self.tail("slurmctld") + self.tail("slurmd"),
            )
        except BaseException:
            self.stop()
            raise
        return self

    def node_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True)
        return r.returncode == 0 and r.stdout.strip() in ("idle", "mix", "alloc")

    def stop(self) -> None:
        # cancel whatever is left, then end our daemons (by pid, children of this process)
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--user", "root"], capture_output=True)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        link = getattr(self, "_munge_link", None)
        if link is not None and link.is_symlink():
            link.unlink()
        munge_dir = getattr(self, "munge_dir", None)
        if munge_dir is not None:
            shutil.rmtree(munge_dir, ignore_errors=True)
        self._restore_config()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def socket_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(cond, timeout: float, what: str, diag=lambda: "") -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.5)
    raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}\n{diag()}")


def make_test_profile(profile_src: str | Path, out_dir: str | Path, **definitions) -> Path:
    """The user's slurm profile with this cluster's partition (and no account), 2 GPUs per node
    and any other `definitions` (NAME=python literal text): the only difference is the values of
    the definitions block at its top."""
    values = {
        "GPU_PARTITION": f'"{PARTITION}"',
        "CPU_PARTITION": f'"{PARTITION}"',
        "ACCOUNT": '""',
        "GPUS_PER_NODE": "2",
    }
    values.update({k: str(v) for k, v in definitions.items()})
    src = Path(profile_src).read_text()
    lines, seen = [], set()
    for line in src.splitlines():
        s = line.strip()
        key = s[2:].split("=")[0].strip() if s.startswith("- ") and "=" in s else None
        if key in values:
            line = f"{line[: line.index('-')]}- {key} = {values[key]}"
            seen.add(key)
        lines.append(line)
    missing = set(values) - seen
    if missing:
        raise ValueError(f"{profile_src}: no definition line for {sorted(missing)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":  # pragma: no cover - debugging aid
    cmd, wd = sys.argv[1], sys.argv[2]
    c = SlurmCluster(wd)
    if cmd == "start":
        c.start()
        print(json.dumps({k: p.pid for k, p in c.procs.items()}))
        print("running; Ctrl-C stops it")
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            c.stop()
