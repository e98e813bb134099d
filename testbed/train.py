"""Train the testbed video DiT on procedural sprite clips (rectified flow, one GPU, time-limited).

    python -m fastattn.testbed.train --out testbed/weights --minutes 15      # H100, ~16 min wall
    python -m fastattn.testbed.train --out /tmp/tb --tiny --steps 5          # CPU smoke test

Batches cycle through four modes so one model serves video and image work: 16-frame 64 px clips
(twice), 8-frame 48 px clips (3x batch; the reduced size a CPU demo samples at) and single 64 px frames
(8x batch; image mode). Data are rendered on the fly on the training device from a per-step seed. The loop stops at
``--minutes`` or ``--steps``; the learning rate decays with elapsed time, so a slower GPU trains fewer
steps but still ends annealed. Writes ``testbed_video.safetensors`` (EMA weights, bf16), ``config.json``
and ``loss.json`` (loss curve, held-out loss per t) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import NUM_CLASSES, SpriteVideos
from .model import TestbedConfig, TestbedDiT, count_parameters
from .sample import WEIGHTS_FILE

HELDOUT_SEED = 2**31 - 1  # training seeds are seed * 1_000_003 + step: never this one in practice


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="testbed/weights", help="output folder")
    ap.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget of the training loop")
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: time only)")
    ap.add_argument("--batch", type=int, default=16, help="16-frame clips per step (other modes scale it)")
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--warmup", type=int, default=300, help="linear warm-up steps")
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay")
    ap.add_argument(
        "--cfg-dropout", type=float, default=0.1, help="label dropout for classifier-free guidance"
    )
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default=None, help="default: cuda if available else cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (off by default)")
    ap.add_argument("--tiny", action="store_true", help="tiny model and clips (CPU smoke test)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--save-every-min", type=float, default=5.0, help="checkpoint interval (minutes)")
    return ap.parse_args(argv)


def batch_modes(cfg: TestbedConfig, batch: int) -> list[tuple[str, int, int, int]]:
    """(name, frames, frame size, batch size) cycled over steps; roughly equal tokens per step.

    The "short" mode (half the frames at 3/4 size) is what a CPU demo samples at in under a minute.
    """
    short = max(cfg.patch, (cfg.size * 3 // 4) // cfg.patch * cfg.patch)
    return [
        ("video", cfg.frames, cfg.size, batch),
        ("video", cfg.frames, cfg.size, batch),
        ("short", max(cfg.frames // 2, 1), short, batch * 3),
        ("image", 1, cfg.size, batch * 8),
    ]


def lr_at(step: int, progress: float, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % over the (time) budget: ``progress`` in [0, 1]."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    return base * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def flow_loss(model, x0, y, gen, cfg_dropout: float, num_classes: int, autocast) -> torch.Tensor:
    """Rectified-flow loss: ``|| model(x_t, t, y) - (noise - x0) ||^2``, ``t ~ logit-normal(0, 1)``."""
    b = x0.shape[0]
    t = torch.sigmoid(torch.randn(b, device=x0.device, generator=gen))
    noise = torch.randn(x0.shape, device=x0.device, generator=gen)
    drop = torch.rand(b, device=x0.device, generator=gen) < cfg_dropout
    y = torch.where(drop, torch.full_like(y, num_classes), y)
    tb = t.view(b, 1, 1, 1, 1)
    xt = (1 - tb) * x0 + tb * noise
    with autocast:
        v = model(xt, t, y)
    return F.mse_loss(v.float(), noise - x0)


@torch.no_grad()
def heldout_loss(model, data: SpriteVideos, cfg: TestbedConfig, device, autocast, n: int = 8) -> dict:
    """Loss of ``model`` on fixed clips (seed never used in training) at fixed t: ``{t: loss}``."""
    x, y = data(n, cfg.frames, seed=HELDOUT_SEED)
    x0 = x * 2 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7)).to(device)
    out = {}
    for t in (0.1, 0.3, 0.5, 0.7, 0.9):
        xt = (1 - t) * x0 + t * noise
        losses = []
        for i in range(0, n, 2):  # small chunks: fits any GPU and the CPU
            with autocast:
                v = model(
                    xt[i : i + 2], torch.full((xt[i : i + 2].shape[0],), t, device=device), y[i : i + 2]
                )
            losses.append(F.mse_loss(v.float(), (noise - x0)[i : i + 2], reduction="sum"))
        out[f"{t:.1f}"] = float(sum(losses) / x0.numel())
    return out


def save(out: Path, ema: TestbedDiT, meta: dict, curve: list) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in ema.state_dict().items()}
    save_file(
        state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "model": "fastattn.testbed.TestbedDiT"}
    )
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "loss.json").write_text(json.dumps({"curve": curve, **meta.get("results", {})}, indent=1) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    torch.manual_seed(args.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = TestbedConfig.tiny() if args.tiny else TestbedConfig(num_classes=NUM_CLASSES)
    if args.tiny and args.batch == 16:
        args.batch = 2
    batch = args.batch
    if args.steps is not None:  # short runs (smoke tests) still reach the full learning rate
        args.warmup = min(args.warmup, max(1, args.steps // 10))

    model = TestbedDiT(cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    n_params = count_parameters(model)
    print(
        f"testbed: {n_params / 1e6:.2f} M params, {cfg.depth} layers x {cfg.heads} heads x {cfg.head_dim}, "
        f"grid {cfg.grid()} = {math.prod(cfg.grid())} tokens, device {device}"
    )
    train_model = torch.compile(model) if args.compile else model
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # no weight decay on norms, biases, embeddings, modulation
        (decay if p.ndim == 2 and "embed" not in name and "modulation" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
        **({"fused": True} if cuda else {}),
    )
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda)
    data = SpriteVideos(cfg.size, device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    modes = batch_modes(cfg, batch)
    ema_params, params = list(ema.parameters()), list(model.parameters())

    budget = args.minutes * 60
    max_steps = args.steps if args.steps is not None else 10**9
    curve, acc = [], {m[0]: [] for m in modes}
    out = Path(args.out)
    t_start = last_save = time.time()
    step = 0
    while step < max_steps:
        elapsed = time.time() - t_start
        if elapsed >= budget:
            break
        progress = elapsed / budget if args.steps is None else max(elapsed / budget, step / max_steps)
        lr = lr_at(step, progress, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        name, frames, size, bs = modes[step % len(modes)]
        x, y = data(bs, frames, seed=args.seed * 1_000_003 + step, size=size)
        loss = flow_loss(train_model, x * 2 - 1, y, gen, args.cfg_dropout, cfg.num_classes, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))  # short effective horizon early on
        torch._foreach_lerp_(ema_params, params, 1 - d)
        acc[name].append(loss.detach())
        step += 1
        if step % args.log_every == 0 or step == max_steps:
            entry = {"step": step, "time_s": round(time.time() - t_start, 1), "lr": lr}
            for k, v in acc.items():
                if v:
                    entry[f"loss_{k}"] = float(torch.stack(v).mean())
            acc = {k: [] for k in acc}
            curve.append(entry)
            print(json.dumps(entry), flush=True)
            if not all(math.isfinite(v) for k, v in entry.items() if k.startswith("loss")):
                raise FloatingPointError(f"non-finite loss at step {step}: {entry}")
        if time.time() - last_save > args.save_every_min * 60:  # crash insurance
            save(out, ema, _meta(cfg, args, step, time.time() - t_start, n_params, {}), curve)
            last_save = time.time()

    train_s = time.time() - t_start
    results = {"heldout_loss_ema": heldout_loss(ema, data, cfg, device, autocast)}
    results["heldout_loss_ema_mean"] = sum(results["heldout_loss_ema"].values()) / 5
    meta = _meta(cfg, args, step, train_s, n_params, results)
    save(out, ema, meta, curve)
    size_mb = (out / WEIGHTS_FILE).stat().st_size / 1e6
    print(
        f"done: {step} steps in {train_s / 60:.1f} min, held-out loss {results['heldout_loss_ema_mean']:.4f}, "
        f"weights {size_mb:.1f} MB -> {out}"
    )
    return meta


def _meta(cfg, args, steps, seconds, n_params, results) -> dict:
    return {
        "model": cfg.to_dict(),
        "tokens_per_video": math.prod(cfg.grid()),
        "params": n_params,
        "train": {
            "seed": args.seed,
            "steps": steps,
            "seconds": round(seconds, 1),
            "batch": args.batch,
            "lr": args.lr,
            "ema": args.ema,
            "cfg_dropout": args.cfg_dropout,
            "modes": [list(m) for m in batch_modes(cfg, args.batch)],
            "objective": "rectified flow, x_t=(1-t)x0+t*noise, predict noise-x0, t~logit-normal(0,1)",
            "data": "fastattn.testbed.data.SpriteVideos, seed*1000003+step per step",
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name()
            if torch.cuda.is_available() and args.device != "cpu"
            else "cpu",
        },
        "results": results,
    }


if __name__ == "__main__":
    main()
