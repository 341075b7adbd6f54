"""Path tracing (lineage §7.3, §7.4 step 9): cubic Bézier curves join lettered start markers (left) to numbered
end markers (right); "What number does C connect to?" The gold thinking is the start point, a point sequence
along the curve (denser where it bends), the end point, then ``\\boxed{3}``.

Layouts where a curve touches another curve's marker are redrawn (the paper's rule: no endpoint may be touched
or crossed by an unrelated line), so the answer is never ambiguous. ``uniform`` draws every line with the same
colour and width to remove colour shortcuts; difficulty grows with the number of lines and the curvature.
Ground truth keeps each curve as a dense polyline in 0-999 units for the trajectory reward.
"""
from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from optictx.data.sample import Sample, boxed, check_mode, check_side, rng, wrap_prompt
from optictx.errors import ConfigError
from optictx.primitives import format_points, point_to_999

LINE_COLOURS = ((220, 40, 40), (30, 110, 220), (30, 150, 60), (230, 130, 20), (140, 60, 180), (20, 150, 150),
                (200, 60, 150), (90, 90, 90))
SLOTS = 7  # marker rows per side: 0.13·side apart, so two markers never touch
QUESTIONS = ("What number does {start} connect to? Put the number in \\boxed{{}}.",
             "Follow the line from {start}. Which number does it reach? Answer in \\boxed{{}}.")


@dataclass
class PathConfig:
    side: int = 252
    lines: tuple[int, int] = (2, 4)  # inclusive range of curves per image
    curvature: float = 0.35  # control-point spread as a fraction of the side
    uniform_prob: float = 0.5  # chance that every line has the same colour and width
    trace_points: int = 8  # points cited along the curve (start and end included)
    style: str = "train"  # "unseen": dark background and square markers

    def validate(self) -> "PathConfig":
        check_side(self.side)
        lo, hi = self.lines
        if not 1 <= lo <= hi <= SLOTS:
            raise ConfigError(f"path lines must satisfy 1 <= lo <= hi <= {SLOTS}, got {self.lines}")
        if self.trace_points < 2:
            raise ConfigError("trace_points must be at least 2 (start and end)")
        if self.style not in ("train", "unseen"):
            raise ConfigError(f"path style must be 'train' or 'unseen', got {self.style!r}")
        return self


def bezier(p: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Points of the cubic Bézier with control points ``p`` [4, 2] at parameters ``t`` [m] -> [m, 2]."""
    t = t[:, None]
    return ((1 - t) ** 3) * p[0] + 3 * ((1 - t) ** 2) * t * p[1] + 3 * (1 - t) * t ** 2 * p[2] + t ** 3 * p[3]


def adaptive_points(poly: np.ndarray, m: int) -> np.ndarray:
    """``m`` points along a polyline, spaced by arc length plus turning angle (denser where it bends)."""
    seg = np.diff(poly, axis=0)
    length = np.hypot(seg[:, 0], seg[:, 1])
    ang = np.arctan2(seg[:, 1], seg[:, 0])
    turn = np.abs((np.diff(ang) + np.pi) % (2 * np.pi) - np.pi)
    weight = length + np.concatenate([[0.0], turn]) * length.mean() * 6
    cum = np.concatenate([[0.0], np.cumsum(weight)])
    idx = np.searchsorted(cum, np.linspace(0, cum[-1], m))
    return poly[np.clip(idx, 0, len(poly) - 1)]


def point_to_polyline(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Distance from each point [k, 2] to the polyline [m, 2] (segments, not just vertices)."""
    a, b = poly[:-1], poly[1:]
    ab = b - a
    denom = np.maximum((ab ** 2).sum(-1), 1e-12)
    t = np.clip(((points[:, None, :] - a[None]) * ab[None]).sum(-1) / denom[None], 0, 1)
    proj = a[None] + t[..., None] * ab[None]
    return np.hypot(*(points[:, None, :] - proj).transpose(2, 0, 1)).min(axis=1)


@dataclass
class Layout:
    starts: list[np.ndarray]  # marker centres, px
    ends: list[np.ndarray]
    controls: list[np.ndarray]  # curve i joins starts[i] to ends[perm[i]]
    perm: list[int]
    radius: float


def _layout(r: np.random.Generator, k: int, cfg: PathConfig) -> Layout:
    side, radius = cfg.side, cfg.side * 0.045
    ys = lambda: np.sort(r.choice(np.linspace(0.1, 0.9, SLOTS), size=k, replace=False)) * side  # noqa: E731
    starts = [np.array([side * r.uniform(0.07, 0.14), y]) for y in ys()]
    ends = [np.array([side * r.uniform(0.86, 0.93), y]) for y in ys()]
    perm = [int(i) for i in r.permutation(k)]
    controls = []
    for i in range(k):
        p0, p3 = starts[i], ends[perm[i]]
        spread = cfg.curvature * side
        p1 = p0 + np.array([r.uniform(0.2, 0.45) * side, r.uniform(-spread, spread)])
        p2 = p3 + np.array([-r.uniform(0.2, 0.45) * side, r.uniform(-spread, spread)])
        controls.append(np.clip(np.stack([p0, p1, p2, p3]), radius, side - radius))
    return Layout(starts, ends, controls, perm, radius)


def _clear(layout: Layout, side: int) -> bool:
    """No curve comes within a marker radius (+3 px) of a marker it does not belong to, or leaves the image."""
    t = np.linspace(0, 1, 200)
    for i, ctrl in enumerate(layout.controls):
        poly = bezier(ctrl, t)
        if poly.min() < 2 or poly.max() > side - 2:
            return False
        for j, s in enumerate(layout.starts):
            if j != i and np.hypot(*(poly - s).T).min() < layout.radius + 3:
                return False
        for j, e in enumerate(layout.ends):
            if j != layout.perm[i] and np.hypot(*(poly - e).T).min() < layout.radius + 3:
                return False
    return True


def _draw(layout: Layout, r: np.random.Generator, cfg: PathConfig, uniform: bool) -> Image.Image:
    from optictx.data.scenes import _glyph_font

    unseen = cfg.style == "unseen"
    bg = tuple(int(v) for v in (r.integers(20, 50, size=3) if unseen else r.integers(230, 256, size=3)))
    img = Image.new("RGB", (cfg.side, cfg.side), bg)
    draw = ImageDraw.Draw(img)
    width = int(r.integers(2, 4))
    colour0 = (230, 230, 230) if unseen else (40, 40, 40)
    for i, ctrl in enumerate(layout.controls):
        colour = colour0 if uniform else LINE_COLOURS[i % len(LINE_COLOURS)]
        w = width if uniform else int(r.integers(2, 4))
        poly = bezier(ctrl, np.linspace(0, 1, 120))
        draw.line([tuple(p) for p in poly], fill=colour, width=w, joint="curve")
    font = _glyph_font(int(layout.radius * 1.5))
    marker_fill = (245, 245, 245) if unseen else (20, 20, 20)
    text_fill = (20, 20, 20) if unseen else (255, 255, 255)
    for labels, centres in ((string.ascii_uppercase, layout.starts), ("123456789", layout.ends)):
        for label, (x, y) in zip(labels, centres):
            rr = layout.radius
            if unseen:
                draw.rectangle((x - rr, y - rr, x + rr, y + rr), fill=marker_fill)
            else:
                draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=marker_fill)
            draw.text((x, y), label, font=font, fill=text_fill, anchor="mm")
    return img


def path_trace(start_label: str, start_999, pts_999, answer: str, mode: str) -> str:
    if mode == "direct":
        return boxed(answer)
    return (f"Start {start_label} {format_points([start_999])} Follow the line: {format_points(pts_999)} "
            f"It reaches {answer}. {boxed(answer)}")


def path(seed: int, index: int, cfg: PathConfig | None = None, mode: str = "trigger") -> Sample:
    cfg = (cfg or PathConfig()).validate()
    r = rng(seed, index, "path")
    k = int(r.integers(cfg.lines[0], cfg.lines[1] + 1))
    for _ in range(200):
        layout = _layout(r, k, cfg)
        if _clear(layout, cfg.side):
            break
    else:
        raise ConfigError(f"no clear layout for {k} lines on {cfg.side} px; lower lines or curvature")
    uniform = bool(r.random() < cfg.uniform_prob)
    image = _draw(layout, r, cfg, uniform)
    size = (cfg.side, cfg.side)
    to999 = lambda p: point_to_999(tuple(p), size)  # noqa: E731
    i = int(r.integers(k))
    start_label, answer = string.ascii_uppercase[i], str(layout.perm[i] + 1)
    poly = bezier(layout.controls[i], np.linspace(0, 1, 64))
    pts = [to999(p) for p in adaptive_points(poly, cfg.trace_points)]
    question = QUESTIONS[int(r.integers(len(QUESTIONS)))].format(start=start_label)
    meta = {
        "side": cfg.side, "start_label": start_label, "start": list(to999(layout.starts[i])),
        "polyline": [list(to999(p)) for p in poly],
        "ends": {str(j + 1): list(to999(e)) for j, e in enumerate(layout.ends)},
        "radius_999": cfg.side * 0.045 / cfg.side * 999, "lines": k, "uniform": uniform,
    }
    return Sample("path", image, wrap_prompt(question, check_mode(mode)),
                  path_trace(start_label, to999(layout.starts[i]), pts, answer, mode), answer, mode, seed, index,
                  meta)
