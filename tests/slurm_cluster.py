"""Where tests/test_slurm.py submits its jobs: a real single-node SLURM started for the test
session, or (only where SLURM cannot run here) the sbatch scripts run directly with the
stand-ins of examples/slurm/common.sh. Both answer the same questions the same way.

The real one: munged with a generated key, slurmctld and ``slurmd -N NODE`` from a generated
slurm.conf (this machine's CPUs, no GPUs, no accounting, requeue allowed, a short requeue hold),
all in one temporary directory on free ports, and stopped by their PIDs. Debian's slurm-wlm and
munge are installed first when missing and this process may (root with apt-get).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional

SBIN = ["/usr/sbin", "/sbin"]
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo")
# A requeued job is held this long before it may start again (SLURM's default is 120 s).
REQUEUE_HOLD_S = 20
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL")


def _with_sbin(path: str) -> str:
    return os.pathsep.join([path, *SBIN])


def _which(name: str) -> Optional[str]:
    return shutil.which(name, path=_with_sbin(os.environ.get("PATH", "")))


def install() -> str:
    """Install slurm-wlm and munge if a binary is missing; '' when all are there, else why not."""
    if all(_which(name) for name in DAEMONS):
        return ""
    if os.geteuid() != 0 or not _which("apt-get"):
        return "SLURM is not installed, and installing it needs root and apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if result.returncode:
            return f"{' '.join(cmd)} failed: {result.stderr.strip()[-500:]}"
    missing = [name for name in DAEMONS if not _which(name)]
    return f"still missing after apt-get: {missing}" if missing else ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_job(text: str) -> Dict[str, str]:
    """``scontrol show job -o`` as a dict (JobState, Reason, Restarts, ExitCode, ...)."""
    return dict(re.findall(r"(\S+?)=(\S*)", text))


class SingleNodeSlurm:
    """munged, slurmctld and slurmd for one node, this machine."""

    kind = "real SLURM"

    def __init__(self, root: str):
        self.root, self.procs = root, []
        self.conf = os.path.join(root, "slurm.conf")
        self.version = subprocess.run([_which("slurmctld"), "-V"], capture_output=True, text=True).stdout.strip()

    def _write_config(self) -> None:
        root, node = self.root, socket.gethostname().split(".")[0]
        hardware = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        hardware = re.sub(r"^NodeName=\S+", "", hardware.splitlines()[0]).strip()
        munge = os.path.join(root, "munge")
        lines = [
            "ClusterName=ratplustest", f"SlurmctldHost={node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={munge}/munge.socket,cred_expire={REQUEUE_HOLD_S}",
            f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
            f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
            f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "JobRequeue=1",
            "MpiDefault=none", "SwitchType=switch/none", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none",
            "SchedulerParameters=sched_interval=2",  # a held requeued job starts soon after its hold
            "MinJobAge=3600", "ReturnToService=2",  # finished jobs stay visible to scontrol
            f"NodeName={node} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN",
            f"PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        ]
        for sub in ("state", "spool", "munge"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        os.chmod(munge, 0o755)
        key = os.path.join(munge, "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o400), "wb") as f:
            f.write(os.urandom(1024))
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.node, self.munge = node, munge

    def _daemon(self, *cmd: str) -> None:
        log = open(os.path.join(self.root, os.path.basename(cmd[0]) + ".out"), "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env({}),
                                           start_new_session=True))

    def start(self) -> None:
        self._write_config()
        m = self.munge
        self._daemon(_which("munged"), "-F", "--force", f"--socket={m}/munge.socket", f"--key-file={m}/munge.key",
                     f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed", f"--log-file={m}/munged.log")
        self._wait_for(lambda: os.path.exists(f"{m}/munge.socket"), "munged")
        self._daemon(_which("slurmctld"), "-D", "-f", self.conf)
        self._daemon(_which("slurmd"), "-D", "-f", self.conf, "-N", self.node)
        self._wait_for(lambda: self._run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", "an idle node")

    def _wait_for(self, ready, what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError(f"single-node SLURM: no {what} ({dead or 'timeout'}); logs in {self.root}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel what still runs, let it end, then stop the daemons (newest first) by PID."""
        self._run("scancel", "--user=root")
        self._wait_for_no_jobs()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def _wait_for_no_jobs(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and self._run("squeue", "-h", "-o", "%i").stdout.strip():
            time.sleep(1)

    def env(self, env: Dict[str, str]) -> Dict[str, str]:
        """``env`` as a submission from outside any job sees it, pointed at this cluster."""
        env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        return dict(env, SLURM_CONF=self.conf, PATH=_with_sbin(env.get("PATH", os.defpath)))

    def _run(self, *cmd: str, env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None):
        return subprocess.run([_which(cmd[0]), *cmd[1:]], env=self.env(env or dict(os.environ)), cwd=cwd,
                              capture_output=True, text=True, timeout=60)

    def sbatch(self, script: str, env: Dict[str, str], args: List[str], cwd: str) -> str:
        result = self._run("sbatch", "--parsable", *args, script, env=env, cwd=cwd)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        """The job's record; a busy slurmctld sometimes answers nothing, so ask again."""
        for _ in range(30):
            job = parse_job(self._run("scontrol", "show", "job", "-o", job_id).stdout)
            if "JobState" in job:
                return job
            time.sleep(1)
        raise AssertionError(f"scontrol show job {job_id}: no answer in 30 tries; logs in {self.root}")

    def signal_batch(self, job_id: str, sig: str) -> None:
        """What ``--signal=B:SIG@T`` does at T seconds before the time limit."""
        result = self._run("scancel", "--batch", f"--signal={sig}", job_id)
        assert result.returncode == 0, result.stderr

    def cancel(self, job_id: str) -> None:
        result = self._run("scancel", job_id)
        assert result.returncode == 0, result.stderr

    def wait(self, job_id: str, timeout: float) -> Dict[str, str]:
        """Poll until the job reaches a final state (a requeued job passes through PENDING)."""
        deadline, seen = time.time() + timeout, None
        while True:
            job = self.job(job_id)
            state = " ".join(f"{k}={job.get(k)}" for k in ("JobState", "Reason", "Restarts", "ExitCode"))
            if state != seen:  # the transitions, for the test's output
                print(f"{time.strftime('%H:%M:%S')} job {job_id}: {state}")
                seen = state
            if job.get("JobState") in FINAL or time.time() > deadline:
                return job
            time.sleep(1)


class StandIns:
    """No SLURM here: each submission runs the script with bash, as the job's working directory,
    its output appended to --output; a requeue request (the stand-in scontrol's requeue.log)
    starts it again, as SLURM would."""

    kind = "stand-ins for srun and scontrol (no SLURM)"
    version = "none"

    def __init__(self, root: str):
        self.root, self.jobs = root, {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        for job in self.jobs.values():
            if job["proc"].poll() is None:
                os.killpg(job["proc"].pid, signal.SIGKILL)
                job["proc"].wait()

    def env(self, env: Dict[str, str]) -> Dict[str, str]:
        return {k: v for k, v in env.items() if not k.startswith("SLURM_")}

    def sbatch(self, script: str, env: Dict[str, str], args: List[str], cwd: str) -> str:
        options = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
        spool = os.path.join(self.root, f"spool{len(self.jobs)}")
        os.makedirs(spool)
        shutil.copy(os.path.join(cwd, script), spool)
        job = {"cmd": ["bash", os.path.join(spool, os.path.basename(script))], "env": self.env(env),
               "cwd": os.path.join(cwd, options.get("chdir", ".")), "log": options["output"], "restarts": 0}
        job_id = str(len(self.jobs) + 1)
        self.jobs[job_id] = job
        self._launch(job)
        return job_id

    def _launch(self, job) -> None:
        with open(job["log"], "a") as log:
            job["proc"] = subprocess.Popen(job["cmd"], cwd=job["cwd"], env=job["env"], stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        job["state"] = "RUNNING"

    def job(self, job_id: str) -> Dict[str, str]:
        job = self.jobs[job_id]
        code = job["proc"].poll()
        if code is not None and job["state"] == "RUNNING":
            requeues = os.path.join(job["env"]["RUN_DIR"], "requeue.log")
            if os.path.exists(requeues) and f"requeue {job['proc'].pid}\n" in open(requeues).read():
                job["restarts"] += 1
                self._launch(job)
            else:
                job["state"], job["code"] = ("COMPLETED" if code == 0 else "FAILED"), code
        return {"JobState": job["state"], "Restarts": str(job["restarts"]), "ExitCode": f"{job.get('code', 0)}:0"}

    def signal_batch(self, job_id: str, sig: str) -> None:
        os.kill(self.jobs[job_id]["proc"].pid, getattr(signal, "SIG" + sig))

    def cancel(self, job_id: str) -> None:
        """As SLURM does: SIGTERM to every process of the job; the state says CANCELLED."""
        job = self.jobs[job_id]
        os.killpg(job["proc"].pid, signal.SIGTERM)
        job["proc"].wait()
        job["state"], job["code"] = "CANCELLED", 0

    def wait(self, job_id: str, timeout: float) -> Dict[str, str]:
        deadline = time.time() + timeout
        while self.job(job_id)["JobState"] == "RUNNING" and time.time() < deadline:
            time.sleep(0.5)
        return self.job(job_id)
