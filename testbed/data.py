"""Procedural video data for the testbed: textured sprites moving over panning textured backgrounds.

Every clip shows one or two sprites of one *shape* that all follow one *motion type*; the class label is
``shape_index * len(MOTIONS) + motion_index`` (24 classes). Backgrounds are random crops of scikit-image's
bundled photos and textures, panned by a moving camera; sprites are filled with another texture that moves,
rotates and scales with them, and have a dark rim. So the clips have local texture, object edges, object
motion (temporal correlation) and global camera motion: structure that attention has to learn.

All random parameters of a batch are drawn on the CPU from ``torch.Generator().manual_seed(seed)``, then
the clip is rendered with vectorised ``grid_sample`` on the target device: a seed gives the same clip on
any device (up to float rounding), and rendering costs far less than a training step.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

SHAPES = ("disc", "square", "triangle", "star", "ring", "cross")
MOTIONS = ("translate", "rotate", "zoom", "orbit")
NUM_CLASSES = len(SHAPES) * len(MOTIONS)

# scikit-image images bundled with the wheel (no download); grey ones are tinted at random.
TEXTURE_SOURCES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "colorwheel",
    "brick",
    "grass",
    "gravel",
    "camera",
    "moon",
)
# (centre y, centre x, side) of the square crops cut from each image, as fractions of the short side.
_CROPS = ((0.5, 0.5, 1.0), (0.3, 0.3, 0.5), (0.7, 0.7, 0.5))
NUM_SLOTS = 2  # sprites per clip (the second is present in ~40 % of the clips)


def class_index(shape: str, motion: str) -> int:
    return SHAPES.index(shape) * len(MOTIONS) + MOTIONS.index(motion)


def class_name(index: int) -> str:
    return f"{SHAPES[index // len(MOTIONS)]}/{MOTIONS[index % len(MOTIONS)]}"


@functools.lru_cache(maxsize=4)
def texture_bank(res: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Square texture crops from scikit-image, resized with antialiasing.

    Returns ``(bank [N, 3, res, res] float32 in [0, 1], is_grey [N] bool)`` on the CPU. Falls back to
    smooth random noise textures if scikit-image is missing, so the module still works (worse data).
    """
    images, grey = [], []
    try:
        from skimage import data as skdata
    except ImportError:  # pragma: no cover - scikit-image is a dependency of the testbed
        skdata = None
    for name in TEXTURE_SOURCES if skdata is not None else ():
        try:
            arr = torch.from_numpy(getattr(skdata, name)().copy())
        except Exception:  # an image missing from this scikit-image build: skip it
            continue
        img = arr.float()
        img = img / (255.0 if arr.dtype == torch.uint8 or img.max() > 1.5 else 1.0)
        is_grey = img.ndim == 2
        img = img.unsqueeze(0).expand(3, -1, -1) if is_grey else img[..., :3].permute(2, 0, 1)
        h, w = img.shape[1:]
        side = min(h, w)
        for cy, cx, frac in _CROPS:
            s = int(side * frac)
            y0 = min(max(int(cy * h - s / 2), 0), h - s)
            x0 = min(max(int(cx * w - s / 2), 0), w - s)
            crop = img[:, y0 : y0 + s, x0 : x0 + s].unsqueeze(0)
            images.append(
                F.interpolate(crop, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
            )
            grey.append(is_grey)
    if not images:  # fallback: low-pass noise
        g = torch.Generator().manual_seed(0)
        noise = torch.rand(16, 3, res // 8, res // 8, generator=g)
        return F.interpolate(noise, size=(res, res), mode="bicubic", align_corners=False).clamp(
            0, 1
        ), torch.zeros(16, dtype=torch.bool)
    return torch.cat(images).clamp(0, 1).contiguous(), torch.tensor(grey)


# ----------------------------------------------------------------------------------------------------------
# shapes: signed distance (negative inside) in sprite-local units, sprite "radius" ~ 1


def _polygon(u: torch.Tensor, n: int, inradius: float) -> torch.Tensor:
    ang = torch.atan2(u[..., 1], u[..., 0])
    r = u.norm(dim=-1)
    # distance to the nearest edge normal direction of a regular n-gon with one vertex pointing up
    sector = 2 * math.pi / n
    a = torch.remainder(ang + math.pi / 2, sector) - sector / 2
    return r * torch.cos(a) - inradius


def shape_sdf(u: torch.Tensor) -> torch.Tensor:
    """Signed distance of points ``u [..., 2]`` to each shape of :data:`SHAPES` -> ``[len(SHAPES), ...]``."""
    x, y = u[..., 0], u[..., 1]
    r = u.norm(dim=-1)
    ang = torch.atan2(y, x)
    disc = r - 1.0
    square = torch.maximum(x.abs(), y.abs()) - 0.8
    triangle = _polygon(u, 3, 0.5)
    star = (r - (0.62 + 0.33 * torch.cos(5 * (ang - math.pi / 2)))) * 0.7  # 0.7: roughly normalise slope
    ring = (r - 0.72).abs() - 0.28
    cross = torch.minimum(
        torch.maximum(x.abs() - 0.32, y.abs() - 0.95), torch.maximum(x.abs() - 0.95, y.abs() - 0.32)
    )
    return torch.stack([disc, square, triangle, star, ring, cross])


# ----------------------------------------------------------------------------------------------------------
# parameters (CPU, seeded) and rendering (any device)


def _u(g, *shape, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(*shape, generator=g)


def _colour_matrices(g: torch.Generator, grey: torch.Tensor) -> torch.Tensor:
    """Per-texture 3x3 colour transforms ``[N, 3, 3]``: a random tint for grey textures, a random channel
    permutation (half of the time) for colour ones, so a small bank looks varied."""
    n = grey.shape[0]
    tint = _u(g, n, 3, lo=0.25, hi=1.0)
    tint = tint / tint.max(dim=1, keepdim=True).values
    grey_m = tint[:, :, None] * torch.full((1, 1, 3), 1 / 3)
    perms = torch.rand(n, 3, generator=g).argsort(dim=1)
    keep = torch.rand(n, generator=g) < 0.5
    perms = torch.where(keep[:, None], torch.arange(3).expand(n, 3), perms)
    colour_m = F.one_hot(perms, 3).float()
    return torch.where(grey[:, None, None], grey_m, colour_m)


def sample_params(batch: int, seed: int, bank_size: int, bank_grey: torch.Tensor, labels=None) -> dict:
    """Draw every random choice of a batch on the CPU (deterministic in ``seed``)."""
    g = torch.Generator().manual_seed(int(seed))
    b, k = batch, NUM_SLOTS
    if labels is None:
        labels = torch.randint(0, NUM_CLASSES, (b,), generator=g)
    else:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).expand(b).clone()
        torch.randint(0, NUM_CLASSES, (b,), generator=g)  # keep the stream aligned with the unlabelled case
    p = {"labels": labels, "shape": labels // len(MOTIONS), "motion": labels % len(MOTIONS)}
    # background: texture, crop half-size s, camera path o0 -> o1 over 16 frames, brightness
    p["bg_tex"] = torch.randint(0, bank_size, (b,), generator=g)
    s = _u(g, b, lo=0.35, hi=0.7)
    lim = (1 - s)[:, None]
    o0 = _u(g, b, 2, lo=-1, hi=1) * lim
    o_end = _u(g, b, 2, lo=-1, hi=1) * lim
    pan = _u(g, b, 1, lo=0.0, hi=0.6) * (torch.rand(b, 1, generator=g) < 0.7)  # 30 % static camera
    p.update(bg_scale=s, bg_o0=o0, bg_o1=o0 + pan * (o_end - o0), bg_gain=_u(g, b, lo=0.55, hi=0.9))
    p["bg_colour"] = _colour_matrices(g, bank_grey[p["bg_tex"]])
    # sprites [B, K]: texture, texture crop, size, start pose and motion parameters
    p["sp_tex"] = torch.randint(0, bank_size, (b, k), generator=g)
    p["sp_colour"] = _colour_matrices(g, bank_grey[p["sp_tex"]].reshape(-1)).reshape(b, k, 3, 3)
    p["sp_tex_scale"] = _u(g, b, k, lo=0.3, hi=0.7)
    p["sp_tex_off"] = _u(g, b, k, 2, lo=-0.5, hi=0.5)
    p["sp_gain"] = _u(g, b, k, lo=0.9, hi=1.3)
    p["active"] = torch.cat([torch.ones(b, 1), (torch.rand(b, k - 1, generator=g) < 0.4).float()], dim=1)
    p["radius"] = _u(g, b, k, lo=0.22, hi=0.38)
    p["centre"] = _u(g, b, k, 2, lo=-0.55, hi=0.55)
    p["angle"] = _u(g, b, k, lo=0, hi=2 * math.pi)
    speed = _u(g, b, k, lo=0.035, hi=0.09)
    heading = _u(g, b, k, lo=0, hi=2 * math.pi)
    p["velocity"] = torch.stack([speed * torch.cos(heading), speed * torch.sin(heading)], dim=-1)
    sign = torch.where(torch.rand(b, k, generator=g) < 0.5, -1.0, 1.0)
    p["spin"] = sign * _u(g, b, k, lo=0.12, hi=0.3)  # rad / frame
    p["zoom_amp"] = _u(g, b, k, lo=0.3, hi=0.5)
    p["zoom_period"] = _u(g, b, k, lo=8.0, hi=16.0)
    p["phase"] = _u(g, b, k, lo=0, hi=2 * math.pi)
    p["orbit_radius"] = _u(g, b, k, lo=0.25, hi=0.45)
    p["orbit_speed"] = sign * _u(g, b, k, lo=0.2, hi=0.4)
    return p


def _reflect(x: torch.Tensor, lim: float) -> torch.Tensor:
    """Fold ``x`` into ``[-lim, lim]`` like a ball bouncing between walls."""
    y = torch.remainder(x + lim, 4 * lim)
    return torch.where(y > 2 * lim, 4 * lim - y, y) - lim


def sprite_poses(p: dict, frames: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre ``[B, K, F, 2]``, angle ``[B, K, F]`` and radius ``[B, K, F]`` of every sprite in every frame.

    Motion is defined per frame index, so an 8-frame clip is the first half of the 16-frame one.
    """
    q = {k: v.to(device) for k, v in p.items()}
    f = torch.arange(frames, device=device, dtype=torch.float32).view(1, 1, -1)  # [1, 1, F]
    c0, ang0, r0 = q["centre"].unsqueeze(2), q["angle"].unsqueeze(2), q["radius"].unsqueeze(2)
    ones = torch.ones_like(f)
    # candidate poses of every motion type, then pick the clip's one
    c_translate = _reflect(c0 + q["velocity"].unsqueeze(2) * f.unsqueeze(-1), 0.8)
    c_fixed = c0.expand(-1, -1, frames, -1)
    orbit_a = q["phase"].unsqueeze(2) + q["orbit_speed"].unsqueeze(2) * f
    c_orbit = 0.6 * c0 + q["orbit_radius"].unsqueeze(2).unsqueeze(-1) * torch.stack(
        [torch.cos(orbit_a), torch.sin(orbit_a)], dim=-1
    )
    centres = torch.stack([c_translate, c_fixed, c_fixed, c_orbit])  # [M, B, K, F, 2]
    angles = torch.stack([ang0 * ones, ang0 + q["spin"].unsqueeze(2) * f, ang0 * ones, ang0 * ones])
    zoom = torch.exp(
        q["zoom_amp"].unsqueeze(2)
        * torch.sin(2 * math.pi * f / q["zoom_period"].unsqueeze(2) + q["phase"].unsqueeze(2))
    )
    radii = torch.stack([r0 * ones, r0 * ones, r0 * zoom * 0.85, r0 * ones])
    m = q["motion"].view(1, -1, 1, 1)
    centre = centres.gather(0, m.unsqueeze(-1).expand(1, -1, *centres.shape[2:])).squeeze(0)
    angle = angles.gather(0, m.expand(1, -1, *angles.shape[2:])).squeeze(0)
    radius = radii.gather(0, m.expand(1, -1, *radii.shape[2:])).squeeze(0)
    return centre, angle, radius


def render(p: dict, frames: int, size: int, device="cpu", bank_res: int = 128) -> torch.Tensor:
    """Render the clips described by ``p`` (from :func:`sample_params`): ``[B, F, 3, size, size]`` in [0, 1]."""
    bank, _ = texture_bank(bank_res)
    bank = _device_bank(bank_res, str(device)) if str(device) != "cpu" else bank
    b, k = p["labels"].shape[0], NUM_SLOTS
    q = {key: v.to(device) for key, v in p.items()}
    lin = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1  # pixel centres
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    screen = torch.stack([xx, yy], dim=-1)  # [H, W, 2] as (x, y), grid_sample's convention

    # background: an affine crop of the texture whose centre moves along the camera path
    fr = torch.arange(frames, device=device, dtype=torch.float32) / 15.0  # 16-frame clip spans the path
    s = q["bg_scale"].view(b, 1, 1, 1, 1)
    lim = 1 - s
    centre = q["bg_o0"].view(b, 1, 1, 1, 2) + (q["bg_o1"] - q["bg_o0"]).view(b, 1, 1, 1, 2) * fr.view(
        1, -1, 1, 1, 1
    )
    centre = torch.maximum(torch.minimum(centre, lim), -lim)
    grid = (screen.view(1, 1, size, size, 2) * s + centre).reshape(b, frames * size, size, 2)
    bg = F.grid_sample(
        bank[q["bg_tex"]], grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    bg = torch.einsum("bij,bjhw->bihw", q["bg_colour"], bg) * q["bg_gain"].view(b, 1, 1, 1)
    video = bg.view(b, 3, frames, size, size).permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W]

    # sprites: local coordinates u = R(-angle) (screen - centre) / radius
    c, a, r = sprite_poses(p, frames, device)  # [B, K, F, 2], [B, K, F], [B, K, F]
    d = screen.view(1, 1, 1, size, size, 2) - c.view(b, k, frames, 1, 1, 2)
    cos, sin = torch.cos(a).view(b, k, frames, 1, 1), torch.sin(a).view(b, k, frames, 1, 1)
    rr = r.view(b, k, frames, 1, 1)
    u = torch.stack(
        [cos * d[..., 0] + sin * d[..., 1], -sin * d[..., 0] + cos * d[..., 1]], dim=-1
    ) / rr.unsqueeze(-1)
    sdf = shape_sdf(u)  # [S, B, K, F, H, W]
    shp = q["shape"].view(1, b, 1, 1, 1, 1).expand(1, b, k, frames, size, size)
    sdf = sdf.gather(0, shp).squeeze(0)  # [B, K, F, H, W]
    dist_px = sdf * rr * (size / 2)  # signed distance in pixels: antialiased edges at any size
    alpha = (0.5 - dist_px).clamp(0, 1) * q["active"].view(b, k, 1, 1, 1)
    rim = (1 - (dist_px + 1.2).abs() / 1.2).clamp(0, 1)  # dark outline just inside the edge
    # texture moves, rotates and scales with the sprite
    tex_grid = u * q["sp_tex_scale"].view(b, k, 1, 1, 1, 1) + q["sp_tex_off"].view(b, k, 1, 1, 1, 2)
    tex = F.grid_sample(
        bank[q["sp_tex"].reshape(-1)],
        tex_grid.reshape(b * k, frames * size, size, 2),
        mode="bilinear",
        padding_mode="reflection",
        align_corners=False,
    )
    tex = torch.einsum("nij,njhw->nihw", q["sp_colour"].reshape(b * k, 3, 3), tex)
    tex = tex.view(b, k, 3, frames, size, size).permute(0, 1, 3, 2, 4, 5)  # [B, K, F, 3, H, W]
    tex = tex * q["sp_gain"].view(b, k, 1, 1, 1, 1) * (1 - 0.7 * rim).unsqueeze(3)
    for j in range(k):  # slot 0 at the back
        al = alpha[:, j].unsqueeze(2)
        video = video * (1 - al) + tex[:, j] * al
    return video.clamp(0, 1)


@functools.lru_cache(maxsize=4)
def _device_bank(res: int, device: str) -> torch.Tensor:
    return texture_bank(res)[0].to(device)


class SpriteVideos:
    """Generator of labelled procedural clips.

    ``SpriteVideos(size=64)(batch, frames, seed) -> (video [B, F, 3, size, size] in [0, 1], labels [B])``.
    ``frames=1`` gives images (first frames of clips).
    """

    def __init__(self, size: int = 64, device="cpu", bank_res: int = 128):
        self.size, self.device, self.bank_res = size, torch.device(device), bank_res
        bank, grey = texture_bank(bank_res)
        self.bank_size, self.bank_grey = bank.shape[0], grey

    def params(self, batch: int, seed: int, labels=None) -> dict:
        return sample_params(batch, seed, self.bank_size, self.bank_grey, labels)

    def __call__(self, batch: int, frames: int, seed: int, labels=None, size: int | None = None):
        p = self.params(batch, seed, labels)
        video = render(p, frames, size or self.size, self.device, self.bank_res)
        return video, p["labels"].to(self.device)
