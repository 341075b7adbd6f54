"""Maze navigation (lineage §7.2, §7.4): perfect mazes on an n×n grid from randomised DFS, Prim or Kruskal,
solvable/unsolvable twins, a DFS narration grounded with points, and the verifier behind the maze reward.

* A perfect maze is a spanning tree of the grid: exactly one route between any two cells. Cutting one passage
  on the start→goal route therefore disconnects them, so each pair of twins differs by **exactly one wall**
  and looks solvable until that wall is found (the paper adds a few walls "near the middle of that path";
  we add one, between 30% and 70% of the route, away from start and goal). Sample ``2k`` is the solvable
  twin and ``2k + 1`` the unsolvable one, drawn identically apart from that wall: a 50/50 balance.
* Cells are ``r * n + c``; a passage is the pair ``(a, b)`` with ``a < b``. One merged ViT token covers
  42×42 px, so a cell is ``cell_px`` ≥ 42 px and the image is ``42·⌈(n·cell_px + 2·margin)/42⌉`` px.
* The gold thinking narrates the DFS as the paper describes: start and goal points, then one step per
  corridor ("Step k: <|point|>[[…]]<|/point|> junction / dead end / goal", turning points only), then
  "Final path: <|point|>[[…]]<|/point|>" and ``\\boxed{True}``, or the full exploration and ``\\boxed{False}``.
* :func:`analyse_trace` reads *any* output the same way: every point is snapped to a cell, consecutive points
  of one list must be joined by a straight corridor with no wall, a new list must start from a cell already
  reached (or it is a teleport), one-point lists are mentions. The five reward components of §7.2 come from it.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from optictx.data.sample import Sample, boxed, check_mode, pick, rng, wrap_prompt
from optictx.errors import ConfigError
from optictx.primitives import format_points, point_to_999

ALGORITHMS = ("dfs", "prim", "kruskal")
MARKER_COLOURS = {"lime": (90, 200, 40), "tangerine": (245, 135, 30), "crimson": (200, 20, 60),
                  "azure": (30, 120, 230), "violet": (140, 70, 200), "teal": (20, 150, 140),
                  "magenta": (220, 40, 200), "gold": (220, 180, 20)}
MARKER_SHAPES = ("circle", "square", "triangle", "diamond")
TIERS = {"easy": (3, 4), "medium": (5, 6), "hard": (7, 9), "nightmare": (10, 12)}
QUESTION = ("Is there a feasible way to get from the {start} to the {goal}? Please draw the route if any. "
            "Display \\boxed{{True}} at the end if there is a path, else display \\boxed{{False}}.")

Edge = tuple[int, int]


def edge(a: int, b: int) -> Edge:
    return (a, b) if a < b else (b, a)


# ----------------------------------------------------------------------------- graphs


def grid_edges(n: int) -> list[Edge]:
    """Every wall between two adjacent cells of an n×n grid (the candidate passages)."""
    out = []
    for r in range(n):
        for c in range(n):
            if c + 1 < n:
                out.append((r * n + c, r * n + c + 1))
            if r + 1 < n:
                out.append((r * n + c, (r + 1) * n + c))
    return out


def grid_neighbours(n: int, cell: int) -> list[int]:
    r, c = divmod(cell, n)
    return [rr * n + cc for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)) if 0 <= rr < n and 0 <= cc < n]


def generate_dfs(n: int, r: np.random.Generator) -> set[Edge]:
    """Randomised depth-first search (recursive backtracker): long winding corridors, few junctions."""
    stack, passages = [int(r.integers(n * n))], set()
    seen = {stack[0]}
    while stack:
        cell = stack[-1]
        options = [m for m in grid_neighbours(n, cell) if m not in seen]
        if not options:
            stack.pop()
            continue
        nxt = options[int(r.integers(len(options)))]
        passages.add(edge(cell, nxt))
        seen.add(nxt)
        stack.append(nxt)
    return passages


def generate_prim(n: int, r: np.random.Generator) -> set[Edge]:
    """Randomised Prim: grow the tree by a random frontier wall; many short dead ends."""
    start = int(r.integers(n * n))
    seen, passages = {start}, set()
    frontier = [(start, m) for m in grid_neighbours(n, start)]
    while frontier:
        a, b = frontier.pop(int(r.integers(len(frontier))))
        if b in seen:
            continue
        passages.add(edge(a, b))
        seen.add(b)
        frontier.extend((b, m) for m in grid_neighbours(n, b) if m not in seen)
    return passages


def generate_kruskal(n: int, r: np.random.Generator) -> set[Edge]:
    """Randomised Kruskal: remove walls in random order when they join two different trees."""
    parent = list(range(n * n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    walls = grid_edges(n)
    passages = set()
    for i in r.permutation(len(walls)):
        a, b = walls[int(i)]
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
            passages.add((a, b))
    return passages


GENERATORS = {"dfs": generate_dfs, "prim": generate_prim, "kruskal": generate_kruskal}


def adjacency(n: int, passages) -> list[list[int]]:
    adj: list[list[int]] = [[] for _ in range(n * n)]
    for a, b in passages:
        adj[a].append(b)
        adj[b].append(a)
    return adj


def bfs(n: int, passages, start: int) -> dict[int, int]:
    """Distance (in cells) from ``start`` to every reachable cell."""
    adj, dist, queue = adjacency(n, passages), {start: 0}, deque([start])
    while queue:
        cell = queue.popleft()
        for m in adj[cell]:
            if m not in dist:
                dist[m] = dist[cell] + 1
                queue.append(m)
    return dist


def shortest_path(n: int, passages, start: int, goal: int) -> list[int] | None:
    adj, parent, queue = adjacency(n, passages), {start: start}, deque([start])
    while queue:
        cell = queue.popleft()
        if cell == goal:
            path = [goal]
            while path[-1] != start:
                path.append(parent[path[-1]])
            return path[::-1]
        for m in adj[cell]:
            if m not in parent:
                parent[m] = cell
                queue.append(m)
    return None


@dataclass(frozen=True)
class Maze:
    n: int
    passages: frozenset[Edge]
    start: int
    goal: int
    algorithm: str

    @property
    def solvable(self) -> bool:
        return self.goal in bfs(self.n, self.passages, self.start)


@dataclass(frozen=True)
class MazeTwins:
    solvable: Maze
    unsolvable: Maze
    cut: Edge  # the one passage the unsolvable twin walls up


def make_twins(n: int, algorithm: str, r: np.random.Generator) -> MazeTwins:
    """A perfect maze, start/goal far apart, and its twin with one passage of the route walled up."""
    if n < 3:
        raise ConfigError(f"maze grid must be at least 3×3, got n={n}")
    if algorithm not in GENERATORS:
        raise ConfigError(f"unknown maze algorithm {algorithm!r}; expected one of {ALGORITHMS}")
    passages = frozenset(GENERATORS[algorithm](n, r))
    start = int(r.integers(n * n))
    dist = bfs(n, passages, start)
    far = max(dist.values())
    need = min(far, max(3, n))  # a route of at least ~n cells, so it has a middle to cut
    goals = sorted(c for c, d in dist.items() if d >= need)
    goal = goals[int(r.integers(len(goals)))]
    route = shortest_path(n, passages, start, goal)
    k = len(route) - 1  # edges on the route
    lo, hi = max(1, int(np.ceil(0.3 * k))), max(1, int(np.floor(0.7 * k)))
    i = int(r.integers(lo, max(lo, hi) + 1)) - 1  # edge route[i] - route[i+1]
    cut = edge(route[i], route[i + 1])
    solvable = Maze(n, passages, start, goal, algorithm)
    return MazeTwins(solvable, Maze(n, passages - {cut}, start, goal, algorithm), cut)


# ----------------------------------------------------------------------------- geometry and drawing


@dataclass(frozen=True)
class Geometry:
    """Where the grid sits in the image (pixels) and how a cell maps to 0-999 coordinates."""

    n: int
    side: int
    margin: float
    cell_px: float

    def centre_px(self, cell: int) -> tuple[float, float]:
        r, c = divmod(cell, self.n)
        return (self.margin + (c + 0.5) * self.cell_px, self.margin + (r + 0.5) * self.cell_px)

    def centre_999(self, cell: int) -> tuple[int, int]:
        return point_to_999(self.centre_px(cell), (self.side, self.side))

    def snap(self, point: tuple[int, ...]) -> int | None:
        """0-999 point -> its cell, or None when farther than half a cell from every centre (off grid)."""
        x, y = point[0] / 999 * self.side, point[1] / 999 * self.side
        c = int(np.floor((x - self.margin) / self.cell_px))
        r = int(np.floor((y - self.margin) / self.cell_px))
        if not (0 <= r < self.n and 0 <= c < self.n):
            return None
        cx, cy = self.centre_px(r * self.n + c)
        return r * self.n + c if np.hypot(x - cx, y - cy) <= 0.5 * self.cell_px else None


def geometry_for(n: int, cell_px: int) -> Geometry:
    side = 42 * int(np.ceil((n * cell_px + cell_px) / 42))
    return Geometry(n, side, (side - n * cell_px) / 2, float(cell_px))


@dataclass(frozen=True)
class MazeStyle:
    background: tuple[int, int, int]
    wall: tuple[int, int, int]
    wall_width: int
    start: tuple[str, str]  # (colour name, marker shape)
    goal: tuple[str, str]

    def marker_name(self, which: str) -> str:
        colour, shape = self.start if which == "start" else self.goal
        return f"{colour} {shape}"


def random_style(r: np.random.Generator, cell_px: int, unseen: bool) -> MazeStyle:
    """Training style: light paper, dark walls. Unseen style: dark paper, light extra-thick walls."""
    colours = list(MARKER_COLOURS)
    c1 = pick(r, colours)
    c2 = pick(r, [c for c in colours if c != c1])
    s1, s2 = pick(r, MARKER_SHAPES), pick(r, MARKER_SHAPES)
    if unseen:
        bg = tuple(int(v) for v in r.integers(20, 60, size=3))
        wall = tuple(int(v) for v in r.integers(200, 256, size=3))
        width = max(3, int(cell_px * r.uniform(0.16, 0.22)))
    else:
        bg = tuple(int(v) for v in r.integers(225, 256, size=3))
        wall = tuple(int(v) for v in r.integers(0, 70, size=3))
        width = max(2, int(cell_px * r.uniform(0.07, 0.13)))
    return MazeStyle(bg, wall, width, (c1, s1), (c2, s2))


def _marker(draw: ImageDraw.ImageDraw, centre: tuple[float, float], size: float, shape: str, colour) -> None:
    x, y, h = centre[0], centre[1], size / 2
    if shape == "circle":
        draw.ellipse((x - h, y - h, x + h, y + h), fill=colour)
    elif shape == "square":
        draw.rectangle((x - h, y - h, x + h, y + h), fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=colour)
    else:
        draw.polygon([(x, y - h), (x + h, y), (x, y + h), (x - h, y)], fill=colour)


def render_maze(maze: Maze, geo: Geometry, style: MazeStyle) -> Image.Image:
    """Walls are every grid edge that is not a passage, plus the outer border."""
    img = Image.new("RGB", (geo.side, geo.side), style.background)
    draw = ImageDraw.Draw(img)
    n, m, s, w = geo.n, geo.margin, geo.cell_px, style.wall_width
    passages = maze.passages
    for a, b in grid_edges(n):
        if (a, b) in passages:
            continue
        ra, ca = divmod(a, n)
        if b == a + 1:  # vertical wall on the right of a
            x = m + (ca + 1) * s
            draw.line((x, m + ra * s, x, m + (ra + 1) * s), fill=style.wall, width=w)
        else:  # horizontal wall below a
            y = m + (ra + 1) * s
            draw.line((m + ca * s, y, m + (ca + 1) * s, y), fill=style.wall, width=w)
    draw.rectangle((m, m, m + n * s, m + n * s), outline=style.wall, width=w)
    for which, cell in (("start", maze.start), ("goal", maze.goal)):
        colour, shape = style.start if which == "start" else style.goal
        _marker(draw, geo.centre_px(cell), 0.55 * s, shape, MARKER_COLOURS[colour])
    return img


# ----------------------------------------------------------------------------- gold thinking


def turning_points(n: int, cells: list[int]) -> list[int]:
    """Keep the ends and every cell where the direction changes (straight runs are implied)."""
    if len(cells) <= 2:
        return list(cells)
    keep = [cells[0]]
    for prev, cur, nxt in zip(cells, cells[1:], cells[2:]):
        if cur - prev != nxt - cur:
            keep.append(cur)
    keep.append(cells[-1])
    return keep


def dfs_exploration(maze: Maze) -> tuple[list[tuple[list[int], str]], bool]:
    """The narrated search: corridors walked from junctions, in DFS order, neighbours nearest the goal first.

    Returns ``[(cells of the corridor, "junction" | "dead end" | "goal"), ...]`` and whether the goal was found.
    """
    n, adj = maze.n, adjacency(maze.n, maze.passages)
    gr, gc = divmod(maze.goal, n)
    visited, steps = {maze.start}, []

    def order(cells: list[int]) -> list[int]:
        return sorted(cells, key=lambda c: (abs(c // n - gr) + abs(c % n - gc), c))

    def walk(frm: int, first: int) -> list[int]:
        path, cur = [frm, first], first
        visited.add(first)
        while cur != maze.goal:
            nxt = [m for m in adj[cur] if m not in visited]
            if len(nxt) != 1:
                break
            cur = nxt[0]
            visited.add(cur)
            path.append(cur)
        return path

    def explore(cell: int) -> bool:
        for nb in order(adj[cell]):
            if nb in visited:
                continue
            corridor = walk(cell, nb)
            end = corridor[-1]
            if end == maze.goal:
                steps.append((corridor, "goal"))
                return True
            if not any(m not in visited for m in adj[end]):
                steps.append((corridor, "dead end"))
                continue
            steps.append((corridor, "junction"))
            if explore(end):
                return True
        return False

    found = maze.start == maze.goal or explore(maze.start)
    return steps, found


def maze_trace(maze: Maze, geo: Geometry, mode: str) -> str:
    """The gold answer for a maze in a thinking mode (see ``data.sample``)."""
    solvable = maze.solvable
    if mode == "direct":
        return boxed(solvable)
    pts = lambda cells: format_points([geo.centre_999(c) for c in cells])  # noqa: E731
    parts = [f"Start {pts([maze.start])} goal {pts([maze.goal])}."]
    steps, found = dfs_exploration(maze)
    for k, (cells, outcome) in enumerate(steps, 1):
        parts.append(f"Step {k}: {pts(turning_points(maze.n, cells))} {outcome}.")
    if found:
        route = shortest_path(maze.n, maze.passages, maze.start, maze.goal)
        parts.append(f"Final path: {pts(turning_points(maze.n, route))} The maze is solvable. {boxed(True)}")
    else:
        parts.append(f"Every reachable cell is explored without reaching the goal. {boxed(False)}")
    return " ".join(parts)


# ----------------------------------------------------------------------------- samples


@dataclass
class MazeConfig:
    sizes: tuple[int, ...] = (3, 4, 5)
    algorithms: tuple[str, ...] = ALGORITHMS
    cell_px: int = 42
    style: str = "train"  # "unseen": dark paper, light thick walls (held out from training)

    def validate(self) -> "MazeConfig":
        if not self.sizes or min(self.sizes) < 3:
            raise ConfigError(f"maze sizes must be >= 3, got {self.sizes}")
        if self.cell_px < 42:
            raise ConfigError(f"cell_px {self.cell_px} < 42: a cell would be smaller than one merged ViT token")
        bad = set(self.algorithms) - set(ALGORITHMS)
        if bad or not self.algorithms:
            raise ConfigError(f"unknown maze algorithms {sorted(bad)}; expected {ALGORITHMS}")
        if self.style not in ("train", "unseen"):
            raise ConfigError(f"maze style must be 'train' or 'unseen', got {self.style!r}")
        return self


def maze_pair(seed: int, pair: int, cfg: MazeConfig) -> tuple[MazeTwins, Geometry, MazeStyle]:
    r = rng(seed, pair, "maze")
    n = int(pick(r, tuple(cfg.sizes)))
    twins = make_twins(n, pick(r, tuple(cfg.algorithms)), r)
    return twins, geometry_for(n, cfg.cell_px), random_style(r, cfg.cell_px, cfg.style == "unseen")


def maze(seed: int, index: int, cfg: MazeConfig | None = None, mode: str = "trigger") -> Sample:
    """Sample ``index``: the solvable twin of pair ``index // 2`` when ``index`` is even, else the unsolvable one."""
    cfg = (cfg or MazeConfig()).validate()
    twins, geo, style = maze_pair(seed, index // 2, cfg)
    m = twins.solvable if index % 2 == 0 else twins.unsolvable
    question = QUESTION.format(start=style.marker_name("start"), goal=style.marker_name("goal"))
    meta = {"n": m.n, "passages": sorted(list(p) for p in m.passages), "start": m.start, "goal": m.goal,
            "solvable": m.solvable, "side": geo.side, "margin": geo.margin, "cell_px": geo.cell_px,
            "algorithm": m.algorithm, "cut": list(twins.cut)}
    return Sample("maze", render_maze(m, geo, style), wrap_prompt(question, check_mode(mode)),
                  maze_trace(m, geo, mode), str(m.solvable), mode, seed, index, meta)


def tier_of(n: int) -> str:
    for name, (lo, hi) in TIERS.items():
        if lo <= n <= hi:
            return name
    return "beyond"


# ----------------------------------------------------------------------------- verifier


@dataclass
class TraceReport:
    """What a model's maze output did, read against the true walls."""

    explored: set[int] = field(default_factory=set)  # cells reached by the causally valid prefix
    transitions: int = 0  # moves between two different cells, anywhere (final path included)
    violations: int = 0  # moves through a wall, diagonal/non-straight jumps, teleports, off-grid points
    final_path: list[int] | None = None  # snapped cells of the "Final path" list (None if absent)
    final_path_valid: bool = False


def straight_run(n: int, a: int, b: int) -> list[int] | None:
    """Cells from a to b along one row or column (both ends included), or None if not aligned."""
    ra, ca = divmod(a, n)
    rb, cb = divmod(b, n)
    if ra == rb:
        step = 1 if cb > ca else -1
        return [ra * n + c for c in range(ca, cb + step, step)]
    if ca == cb:
        step = 1 if rb > ra else -1
        return [r * n + ca for r in range(ra, rb + step, step)]
    return None


def corridor_open(n: int, passages, a: int, b: int) -> list[int] | None:
    """The cells walked from a to b if a straight wall-free corridor joins them, else None."""
    run = straight_run(n, a, b)
    if run is None or any(edge(x, y) not in passages for x, y in zip(run, run[1:])):
        return None
    return run


_FINAL = re.compile(r"(final|verified)\s+(path|route)", re.IGNORECASE)


def _point_lists(text: str) -> tuple[list[tuple[tuple[int, ...], ...]], int | None]:
    """Every <|point|> list in order, and the index of the one that follows the last "Final path" phrase."""
    from optictx.primitives import _spans  # the lenient scanner shared with parse_primitives

    spans = [s for s in _spans(text) if s.kind == "point"]
    lists = [s.coords for s in spans]
    final = None
    for m in _FINAL.finditer(text):
        after = [i for i, s in enumerate(spans) if s.start >= m.end()]
        final = after[0] if after else final
    return lists, final


def analyse_trace(text: str, meta: dict) -> TraceReport:
    """Replay a model's points against the maze in ``meta`` (see module doc for the reading rules)."""
    n, passages = meta["n"], {tuple(p) for p in meta["passages"]}
    geo = Geometry(n, meta["side"], meta["margin"], meta["cell_px"])
    lists, final_idx = _point_lists(text if isinstance(text, str) else "")
    report = TraceReport(explored={meta["start"]})
    claimed = {meta["start"]}  # every cell the trace says it reached, valid or not (for teleport checks)
    causal = True
    for i, coords in enumerate(lists):
        cells = [geo.snap(p) for p in coords]
        if i == final_idx:
            report.final_path = cells
        if len(cells) < 2:
            continue  # a mention ("start", "goal"), not a move
        if i != final_idx and (cells[0] is None or cells[0] not in claimed):
            report.violations += 1  # a move that starts somewhere never reached: a teleport
            causal = False
        for a, b in zip(cells, cells[1:]):
            if a is not None and a == b:
                continue
            report.transitions += 1
            run = corridor_open(n, passages, a, b) if a is not None and b is not None else None
            if run is None:
                report.violations += 1
                causal = False
            if i != final_idx:
                claimed.update(run or [c for c in (a, b) if c is not None])
                if causal:
                    report.explored.update(run)
    fp = report.final_path
    if fp and None not in fp:
        report.final_path_valid = (fp[0] == meta["start"] and fp[-1] == meta["goal"] and
                                   all(a == b or corridor_open(n, passages, a, b) for a, b in zip(fp, fp[1:])))
    return report
