"""A Multi-GPU worker: one process per extra device, started by the ComfyUI process (``multigpu_cluster``).

It is started as ``python -c BOOT <fd>`` (not ``multiprocessing`` spawn, which would re-run ComfyUI's
``main.py`` as the child's main module), with one end of a socket pair as its control pipe. Over the pipe it
reads its configuration (the parent's ``sys.path`` and the name the pack was imported under, so pickled
ComfyUI and fastattn classes resolve to the same modules), then joins the process group (NCCL on GPU, gloo on
CPU) through rank 0's TCP store and serves commands until told to stop:

=============  ================================================================================================
``mesh``       build the Ulysses x ring mesh (collective)
``model``      receive the diffusion model: its structure over the pipe, its weights by broadcast from rank 0
``release``    drop the model (ComfyUI unloaded it)
``plan``       a runtime for an attention plan (the Fast Attention node's, or dense)
``drop_plan``  forget a plan
``forward``    receive one forward's inputs and run the model on this rank's token shards
``stop``       leave the process group and exit
=============  ================================================================================================

A command that fails sends ``("error", rank, message, traceback)`` up the pipe and exits the process at once:
rank 0's next collective with it fails (its socket is gone), and rank 0 reports the worker's message. A watchdog
thread exits the worker when the ComfyUI process is gone (killed without a chance to stop it).
"""

from __future__ import annotations

import datetime
import gc
import os
import pickle
import sys
import threading
import time
import traceback

BOOT = r"""
import importlib, importlib.util, pickle, sys
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
cfg = pickle.loads(conn.recv_bytes())
sys.path[:] = cfg["sys_path"]
root = cfg["root"]
if root not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        root, cfg["pack_init"], submodule_search_locations=[cfg["pack_dir"]])
    module = importlib.util.module_from_spec(spec)
    sys.modules[root] = module
    spec.loader.exec_module(module)
importlib.import_module(root + ".nodes.host.multigpu_worker").main(conn, cfg)
"""


def log(rank: int, message: str) -> None:
    print(f"fastattn multi-GPU worker {rank}: {message}", file=sys.stderr, flush=True)


def _watch_parent(parent_pid: int) -> None:
    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)  # the ComfyUI process is gone: nothing else will stop this one
            time.sleep(0.5)

    threading.Thread(target=watch, name="fastattn-multigpu-watchdog", daemon=True).start()


def _apply_comfy_args(values: dict) -> None:
    """ComfyUI's command-line settings of the parent (``--cpu``, attention flags...) before ``comfy`` modules
    that read them are imported by unpickling the model."""
    import comfy.cli_args

    vars(comfy.cli_args.args).update(values)


def main(conn, cfg: dict) -> None:
    rank = cfg["rank"]
    _watch_parent(cfg["parent_pid"])
    try:
        if cfg.get("comfy_args") is not None:
            _apply_comfy_args(cfg["comfy_args"])
        import torch
        import torch.distributed as dist

        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        device = torch.device(cfg["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        conn.send_bytes(pickle.dumps(("ready", rank, os.getpid())))
        timeout = datetime.timedelta(seconds=cfg["timeout_s"])
        store = dist.TCPStore(cfg["host"], cfg["port"], cfg["world"], False, timeout=timeout)
        dist.init_process_group(
            cfg["backend"], store=store, rank=rank, world_size=cfg["world"], timeout=timeout
        )
        Worker(conn, rank, cfg["world"], device, cfg["timeout_s"]).serve()
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, then this process ends
        _fail(conn, rank, e)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        os._exit(0)


def _fail(conn, rank: int, e: BaseException) -> None:
    tb = traceback.format_exc()
    log(rank, f"failed: {type(e).__name__}: {e}\n{tb}")
    try:
        conn.send_bytes(pickle.dumps(("error", rank, f"{type(e).__name__}: {e}", tb)))
    except (OSError, ValueError, pickle.PicklingError):
        pass
    os._exit(1)  # no cleanup: the peers see this rank's sockets close and stop at once


class Worker:
    """The command loop of one worker (see the module docstring)."""

    def __init__(self, conn, rank: int, world: int, device, timeout_s: float):
        from .multigpu_rank import RankState

        self.conn = conn
        self.rank = rank
        self.device = device
        self.timeout_s = timeout_s
        self.state = RankState(rank, world)
        self.model = None
        self.model_key = None
        self.blocks: list = []
        self.family = None

    def serve(self) -> None:
        while True:
            try:
                msg = pickle.loads(self.conn.recv_bytes())
            except EOFError:  # rank 0 closed the pipe without a stop (it is gone)
                return
            op = msg[0]
            if op == "stop":
                return
            getattr(self, f"op_{op}")(*msg[1:])

    def _receive(self, payload: bytes, what: str, markers: dict | None = None):
        from .multigpu_transport import receive_tensors, unpack

        obj, tensors = unpack(payload, self.device, markers)
        receive_tensors(tensors, what=what, timeout_s=self.timeout_s)
        return obj

    def op_mesh(self, config: dict, heads) -> None:
        self.state.set_mesh(config, heads)

    def op_model(self, key, payload: bytes, family: str, blocks: list) -> None:
        self.op_release()
        self.model = self._receive(payload, "the model's weights")
        self.model_key, self.family, self.blocks = key, family, blocks
        log(self.rank, f"model received ({type(self.model).__name__}, "
                       f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.1f} M parameters on {self.device})")  # fmt: skip

    def op_release(self) -> None:
        if self.model is None:
            return
        self.model = None
        self.model_key = None
        gc.collect()
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log(self.rank, "model released")

    def op_plan(self, key, payload: bytes, num_layers) -> None:
        plan = self._receive(payload, "an attention plan")
        self.state.set_plan(key, plan, num_layers)

    def op_drop_plan(self, key) -> None:
        self.state.plans.pop(key, None)

    def op_forward(self, key, payload: bytes, reset_run: bool) -> None:
        import torch

        from .multigpu_shard import DIT, REPLACE, block_entries

        if self.model is None:
            raise RuntimeError("a forward arrived but this worker holds no model")
        to: dict = {}
        args, kwargs, sent, ctx = self._receive(payload, "a forward's inputs", {"to": to})
        to.update(sent)
        to[REPLACE] = {DIT: block_entries(self.blocks)}
        if reset_run:
            self.state.reset_run()
        with torch.inference_mode():
            self.state.run(key, ctx, self.family, lambda: self.model(*args, **kwargs))
