"""The ComfyUI process's side of Multi-GPU: the worker processes, the process group, and what rank 0 sends.

One :class:`Cluster` at a time (torch.distributed's default group is per process): rank 0 is the ComfyUI
process on the device ComfyUI runs the model on, ranks 1.. are workers (``multigpu_worker``), one per extra
device. :func:`cluster_for` starts one when a Multi-GPU forward first needs it and keeps it while Multi-GPU
models use those devices; asking for other devices stops it and starts another.

Per forward (:meth:`Cluster.forward`), rank 0 brings the workers up to date (mesh, the model's weights when
they changed, the attention plan), sends the forward's inputs, and runs its own shard; every rank then runs
the same collectives.

Failures end the run on every rank, never a hang: a worker that raises reports its error up its pipe and
exits; one that dies (killed, out of memory) closes its sockets; rank 0's collective then fails (with NCCL a
watcher thread aborts the group when a worker process is gone), and :meth:`Cluster.forward` stops every worker,
leaves the process group and raises :class:`MultiGPUError` naming the rank, its device and what it reported.
The next run starts new workers. Workers stop when their models are no longer used (the last Multi-GPU patch
is collected), at interpreter exit (``atexit``), and by themselves when the ComfyUI process is gone.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Pipe, wait

import torch
import torch.distributed as dist

from .multigpu_rank import RankState
from .multigpu_transport import pack, send_tensors
from .multigpu_worker import BOOT

logger = logging.getLogger("fastattn.multigpu")
_ROOT = __name__.rsplit(".nodes.host.", 1)[0]  # the name the pack was imported under (ComfyUI picks one)
STARTUP_S = 180.0  # a worker must import torch (and ComfyUI's model code) within this


class MultiGPUError(RuntimeError):
    """A Multi-GPU run failed on some rank; every rank stopped. The message names the rank and what happened."""


@dataclass(frozen=True)
class DeviceList:
    """The devices of one cluster, rank order: ``kind`` ``"cuda"`` or ``"cpu"``; ``indices`` the CUDA indices
    as the ComfyUI process sees them (rank 0, the ComfyUI process's own device, first), or ``(None,) * world``
    for CPU ranks."""

    kind: str
    indices: tuple

    @property
    def world(self) -> int:
        return len(self.indices)

    def device(self, rank: int) -> torch.device:
        return torch.device("cpu") if self.kind == "cpu" else torch.device("cuda", self.indices[rank])

    def describe(self, rank: int) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.indices[rank]}"

    @property
    def backend(self) -> str:
        return "gloo" if self.kind == "cpu" else "nccl"


@dataclass
class Job:
    """What rank 0 decided for one forward (``MultiGPUPatch`` builds it)."""

    heads: int | None
    config: dict  # ParallelConfig fields, degrees resolved or "auto"
    family: str
    blocks: list  # [(kind, index, cut)] of the model
    weights_key: tuple  # changes when the weights the workers need change
    plan_key: tuple
    plan: object
    num_layers: int | None
    ctx: object  # ForwardContext
    payload: bytes  # the forward's inputs (structure)
    tensors: list  # and their tensors
    reset_run: bool


def _comfy_args() -> dict | None:
    """ComfyUI's parsed command-line settings with plain values (None outside ComfyUI)."""
    mod = sys.modules.get("comfy.cli_args")
    args = getattr(mod, "args", None)
    if args is None:
        return None
    plain = (str, int, float, bool, type(None))
    return {k: v for k, v in vars(args).items() if isinstance(v, plain) or (
        isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))}  # fmt: skip


def _physical_gpu(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of this process's CUDA device ``index``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if index < len(entries):
            return entries[index]
    return str(index)


class Cluster:
    """Rank 0 and one worker process per extra device (module docstring)."""

    def __init__(self, devices: DeviceList, timeout_s: float):
        self.devices = devices
        self.timeout_s = float(timeout_s)
        self.procs: list[subprocess.Popen] = []
        self.conns: list = []
        self.rank = RankState(0, devices.world)
        self.weights_key = None
        self.plan_keys: list = []
        self.closed = False
        self.in_flight = False
        self.lock = threading.RLock()
        self._watcher: threading.Thread | None = None

    # ------------------------------------------------------------------ start / stop
    def start(self) -> None:
        if dist.is_initialized():
            raise MultiGPUError(
                "fastattn Multi-GPU: torch.distributed is already started in the ComfyUI process (by another node "
                "or extension); Multi-GPU needs to start its own process group"
            )
        devices = self.devices
        if devices.kind == "cuda":
            torch.cuda.set_device(devices.device(0))
        store = dist.TCPStore("127.0.0.1", 0, devices.world, True, timeout=self._td(), wait_for_workers=False)
        pack_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        threads = max(1, (os.cpu_count() or 1) // devices.world) if devices.kind == "cpu" else 0
        comfy_args = _comfy_args()
        try:
            for rank in range(1, devices.world):
                mine, theirs = Pipe(duplex=True)
                env = dict(os.environ)
                env["CUDA_VISIBLE_DEVICES"] = (
                    "" if devices.kind == "cpu" else _physical_gpu(devices.indices[rank])
                )
                proc = subprocess.Popen(
                    [sys.executable, "-c", BOOT, str(theirs.fileno())], pass_fds=(theirs.fileno(),), env=env,
                    stdin=subprocess.DEVNULL,
                )  # fmt: skip
                theirs.close()
                self.procs.append(proc)
                self.conns.append(mine)
                cfg = dict(rank=rank, world=devices.world, parent_pid=os.getpid(), sys_path=list(sys.path),
                           root=_ROOT, pack_dir=pack_dir, pack_init=os.path.join(pack_dir, "__init__.py"),
                           comfy_args=comfy_args, threads=threads,
                           device="cpu" if devices.kind == "cpu" else "cuda:0", backend=devices.backend,
                           host="127.0.0.1", port=store.port, timeout_s=self.timeout_s)  # fmt: skip
                mine.send_bytes(pickle.dumps(cfg))
            self._wait_ready()
            dist.init_process_group(devices.backend, store=store, rank=0, world_size=devices.world,
                                    timeout=self._td())  # fmt: skip
        except BaseException:
            self._teardown()
            raise
        # the thread holds a weak reference only: were it the last owner, the process groups would be freed on
        # it, possibly while the interpreter shuts down (a crash in their destructors)
        self._watcher = threading.Thread(target=_watch, args=(weakref.ref(self),), name="fastattn-multigpu-watch",
                                         daemon=True)  # fmt: skip
        self._watcher.start()
        logger.info("fastattn Multi-GPU: %d ranks on %s (%s)", devices.world,
                    ", ".join(devices.describe(r) for r in range(devices.world)), devices.backend)  # fmt: skip

    def _td(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)

    def _wait_ready(self) -> None:
        waiting = dict(enumerate(self.conns, start=1))
        deadline = time.monotonic() + max(STARTUP_S, self.timeout_s)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MultiGPUError(f"fastattn Multi-GPU: workers {sorted(waiting)} did not start within "
                                    f"{max(STARTUP_S, self.timeout_s):.0f}s")  # fmt: skip
            for conn in wait(list(waiting.values()), timeout=min(left, 0.5)):
                rank = next(r for r, c in waiting.items() if c is conn)
                msg = self._recv(conn)
                if msg is None or msg[0] != "ready":
                    raise MultiGPUError(self._describe_failure(f"worker {rank} failed to start"))
                del waiting[rank]
            for rank in list(waiting):
                if self.procs[rank - 1].poll() is not None:
                    raise MultiGPUError(self._describe_failure(f"worker {rank} failed to start"))

    @staticmethod
    def _recv(conn):
        try:
            return pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return None

    def stop(self) -> None:
        """Stop every worker (asked first, killed after a grace period) and leave the process group."""
        with self.lock:
            if self.closed:
                return
            for conn in self.conns:
                try:
                    conn.send_bytes(pickle.dumps(("stop",)))
                except (OSError, ValueError):
                    pass
            self._teardown(grace_s=10.0)
            logger.info("fastattn Multi-GPU: workers stopped")

    def _teardown(self, grace_s: float = 0.0) -> None:
        self.closed = True
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for conn in self.conns:
            conn.close()
        self.rank = RankState(0, self.devices.world)  # the mesh's groups are freed here, on this thread
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except (RuntimeError, ValueError) as e:
                logger.warning("fastattn Multi-GPU: leaving the process group: %s", e)

    def alive(self) -> bool:
        return not self.closed and all(p.poll() is None for p in self.procs)

    # ------------------------------------------------------------------ failures
    def _describe_failure(self, what: str) -> str:
        """What every worker reported or how it ended, waiting briefly for the reports of dying workers."""
        deadline = time.monotonic() + 3.0
        lines = []
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            reported = None
            while time.monotonic() < deadline:
                try:
                    ready = conn.poll(0.1)
                except (OSError, ValueError):
                    break
                if not ready:
                    if proc.poll() is not None:
                        break
                    continue
                msg = self._recv(conn)
                if msg is None:
                    break
                if msg[0] == "error":
                    reported = msg[2]
                    break
            code = proc.poll()
            where = f"worker rank {rank} ({self.devices.describe(rank)}, pid {proc.pid})"
            if reported is not None:
                lines.append(f"{where} raised {reported}")
            elif code is not None:
                lines.append(f"{where} exited with {_exit_text(code)}")
        detail = "; ".join(lines) if lines else "no worker reported an error"
        return f"fastattn Multi-GPU: {what}: {detail}"

    def _failed(self, e: BaseException) -> BaseException:
        """Stop everything after a failure mid-command; the error to raise."""
        from ...parallel.comm import ParallelError

        comm = isinstance(e, (ParallelError, OSError, EOFError, dist.DistError)) or any(
            p.poll() is not None for p in self.procs
        )
        message = self._describe_failure("the run stopped on every rank") if comm else None
        self._teardown()
        if message is None:
            return e  # rank 0's own error (the workers were stopped with it)
        seen = (str(e).splitlines() or [""])[0]
        seen = seen if len(seen) < 240 else seen[:240] + "..."
        return MultiGPUError(
            f"{message} (rank 0 saw {type(e).__name__}: {seen}). The next run starts new workers."
        )

    # ------------------------------------------------------------------ commands
    def _send(self, *msg) -> None:
        data = pickle.dumps(msg)
        for conn in self.conns:
            conn.send_bytes(data)

    def _sync(self, job: Job, dm) -> None:
        config = dict(job.config)
        key = (tuple(sorted(config.items())), job.heads)
        if key != self.rank.mesh_key:
            self._send("mesh", config, job.heads)
            self.rank.set_mesh(config, job.heads)
            self.plan_keys.clear()
        if job.weights_key != self.weights_key:
            self.weights_key = None
            payload, tensors = pack(dm)
            self._send("model", job.weights_key, payload, job.family, job.blocks)
            send_tensors(tensors, self.rank.mesh.device, what="the model's weights", timeout_s=self.timeout_s)
            self.weights_key = job.weights_key
        if job.plan_key not in self.plan_keys:
            payload, tensors = pack(job.plan)
            self._send("plan", job.plan_key, payload, job.num_layers)
            send_tensors(tensors, self.rank.mesh.device, what="an attention plan", timeout_s=self.timeout_s)
            self.rank.set_plan(job.plan_key, job.plan, job.num_layers)
            self.plan_keys.append(job.plan_key)
            while len(self.plan_keys) > len(self.rank.plans):
                self.plan_keys.pop(0)

    def forward(self, job: Job, dm, run_local):
        """One parallel forward: workers updated, inputs sent, this rank's shard run (``run_local()``: the
        host's forward on rank 0). Raises :class:`MultiGPUError` when any rank failed (all stopped)."""
        with self.lock:
            if self.closed:
                raise MultiGPUError("fastattn Multi-GPU: the workers were stopped")
            self.in_flight = True
            try:
                self._sync(job, dm)
                self._send("forward", job.plan_key, job.payload, job.reset_run)
                send_tensors(
                    job.tensors, self.rank.mesh.device, what="a forward's inputs", timeout_s=self.timeout_s
                )
                if job.reset_run:
                    self.rank.reset_run()
                return self.rank.run(job.plan_key, job.ctx, job.family, run_local)
            except BaseException as e:
                raise self._failed(e) from e
            finally:
                self.in_flight = False

    def release_model(self) -> None:
        """ComfyUI unloaded the model: the workers drop their copies (GPU memory freed)."""
        with self.lock:
            if self.closed or self.weights_key is None:
                return
            self.weights_key = None
            try:
                self._send("release")
            except (OSError, ValueError):
                pass  # a worker that is gone is found at the next forward


def _watch(ref) -> None:
    """With NCCL a collective waits for a dead peer until the timeout: abort the group when a worker is gone
    mid-forward (gloo sees the closed sockets by itself). Ends when the cluster is closed or collected."""
    while True:
        cluster = ref()
        if cluster is None or cluster.closed:
            return
        dead = any(p.poll() is not None for p in cluster.procs)
        if dead and cluster.in_flight and cluster.devices.backend == "nccl":
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort is not None:
                try:
                    abort()
                except RuntimeError as e:
                    logger.warning("fastattn Multi-GPU: aborting the process group: %s", e)
            return
        del cluster
        time.sleep(0.2)


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name} (killed)"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


# ---------------------------------------------------------------------------------------------- registry
_LOCK = threading.RLock()
_CURRENT: Cluster | None = None
_USERS: dict = {}  # (DeviceList, timeout) -> WeakSet of the Multi-GPU patches using those devices


def register_user(patch, devices: DeviceList, timeout_s: float) -> None:
    """``patch`` uses ``devices``: the cluster on them stays up while some such patch lives."""
    key = (devices, float(timeout_s))
    with _LOCK:
        _USERS.setdefault(key, weakref.WeakSet()).add(patch)
    weakref.finalize(patch, _user_gone, key)


def _user_gone(key) -> None:
    with _LOCK:
        users = _USERS.get(key)
        # iterate: len() may still count the patch being collected (its WeakSet callback has not run yet)
        if users is not None and not any(True for _ in users):
            del _USERS[key]
            if _CURRENT is not None and (_CURRENT.devices, _CURRENT.timeout_s) == key:
                stop_all()


def cluster_for(devices: DeviceList, timeout_s: float, mid_run: bool = False) -> Cluster:
    """The running cluster on ``devices``, or a new one (stopping one on other devices, or one whose worker is
    gone). ``mid_run``: a parallel forward of this sampling run already ran; a worker gone since then ends the
    run with :class:`MultiGPUError` (its caches and this run's state are lost) instead of a silent restart."""
    global _CURRENT
    with _LOCK:
        current = _CURRENT
        if current is not None and current.devices == devices and current.timeout_s == float(timeout_s):
            if current.alive():
                return current
            if not current.closed:
                message = current._describe_failure("a worker stopped between forwards")
                current._teardown()
                if mid_run:
                    raise MultiGPUError(f"{message}; the run stopped. The next run starts new workers.")
                logger.warning("%s; starting new workers", message)
        if current is not None:
            current.stop()
            _CURRENT = None
        cluster = Cluster(devices, timeout_s)
        cluster.start()
        _CURRENT = cluster
        return cluster


def current_cluster() -> Cluster | None:
    return _CURRENT


def stop_all() -> None:
    """Stop the running cluster, if any (also at interpreter exit)."""
    global _CURRENT
    with _LOCK:
        if _CURRENT is not None:
            _CURRENT.stop()
            _CURRENT = None


atexit.register(stop_all)
