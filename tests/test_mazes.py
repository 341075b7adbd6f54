"""Mazes and path tracing: perfect mazes, twins that differ by one cut, BFS agreeing with the label, gold traces
that the verifier accepts, hand-made bad traces it rejects, Bézier path ground truth."""
import numpy as np
import pytest

from optictx.data import mazes, paths
from optictx.errors import ConfigError
from optictx.primitives import format_points, parse_primitives


@pytest.mark.parametrize("algorithm", mazes.ALGORITHMS)
@pytest.mark.parametrize("n", [3, 5, 8])
def test_generators_make_perfect_mazes(algorithm, n):
    passages = mazes.GENERATORS[algorithm](n, np.random.default_rng(n))
    assert len(passages) == n * n - 1  # a spanning tree of the grid...
    assert len(mazes.bfs(n, passages, 0)) == n * n  # ...that reaches every cell
    assert all(b in mazes.grid_neighbours(n, a) for a, b in passages)


def test_twins_differ_by_exactly_one_cut_on_the_route_and_bfs_agrees_with_the_label():
    cfg = mazes.MazeConfig(sizes=(3, 4, 5, 6, 7))
    for pair in range(40):
        solv, unsolv = mazes.maze(9, 2 * pair, cfg), mazes.maze(9, 2 * pair + 1, cfg)
        a, b = {tuple(p) for p in solv.meta["passages"]}, {tuple(p) for p in unsolv.meta["passages"]}
        assert a - b == {tuple(solv.meta["cut"])} and not b - a
        n, start, goal = solv.meta["n"], solv.meta["start"], solv.meta["goal"]
        route = mazes.shortest_path(n, a, start, goal)
        k = len(route) - 1
        cut_at = [mazes.edge(x, y) for x, y in zip(route, route[1:])].index(tuple(solv.meta["cut"]))
        assert 0.3 * k - 1 <= cut_at <= 0.7 * k  # near the middle of the route, away from start and goal
        assert (goal in mazes.bfs(n, a, start), goal in mazes.bfs(n, b, start)) == (True, False)
        assert (solv.answer, unsolv.answer) == ("True", "False")
        assert solv.target.endswith("\\boxed{True}") and unsolv.target.endswith("\\boxed{False}")
        diff = np.abs(np.asarray(solv.image, int) - np.asarray(unsolv.image, int)).sum(-1) > 0
        ys, xs = np.nonzero(diff)  # the images differ only around the one added wall
        assert len(ys) and xs.max() - xs.min() <= solv.meta["cell_px"] + 8 and ys.max() - ys.min() <= \
            solv.meta["cell_px"] + 8


def test_maze_samples_are_deterministic_and_sized_for_the_vit():
    a, b = mazes.maze(1, 4), mazes.maze(1, 4)
    assert a.target == b.target and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.image.width % 42 == 0 and a.image.size == (a.meta["side"],) * 2
    geo = mazes.geometry_for(5, 42)
    assert geo.side == 252 and all(geo.snap(geo.centre_999(c)) == c for c in range(25))
    assert geo.snap((0, 0)) is None  # the margin is off the grid


def test_gold_traces_pass_the_verifier():
    for i in range(30):
        s = mazes.maze(3, i, mazes.MazeConfig(sizes=(4, 6)))
        rep = mazes.analyse_trace(s.target, s.meta)
        assert rep.violations == 0 and rep.transitions > 0
        reach = set(mazes.bfs(s.meta["n"], {tuple(p) for p in s.meta["passages"]}, s.meta["start"]))
        if s.meta["solvable"]:
            assert rep.final_path_valid and rep.final_path[-1] == s.meta["goal"]
        else:
            assert rep.final_path is None and rep.explored == reach  # the whole reachable region, nothing more


def _tiny_maze():
    """3×3 maze, cells 0..8; a snake 0-1-2-5-4-3-6-7-8."""
    passages = [(0, 1), (1, 2), (2, 5), (4, 5), (3, 4), (3, 6), (6, 7), (7, 8)]
    geo = mazes.geometry_for(3, 42)
    meta = {"n": 3, "passages": passages, "start": 0, "goal": 8, "solvable": True, "side": geo.side,
            "margin": geo.margin, "cell_px": geo.cell_px}
    return meta, lambda cells: format_points([geo.centre_999(c) for c in cells])


def test_verifier_counts_wall_crossings_teleports_and_checks_the_final_path():
    meta, pts = _tiny_maze()
    good = f"Step 1: {pts([0, 2, 5, 3, 6, 8])} goal. Final path: {pts([0, 2, 5, 3, 6, 8])}"
    rep = mazes.analyse_trace(good, meta)
    assert (rep.violations, rep.transitions, rep.final_path_valid) == (0, 10, True)
    assert rep.explored == set(range(9))
    through_wall = f"Step 1: {pts([0, 3, 6, 8])} goal. Final path: {pts([0, 6, 8])}"
    rep = mazes.analyse_trace(through_wall, meta)
    # 0->3 crosses the wall under cell 0; 0->6 in the final path too. Exploration stops at the first crossing.
    assert (rep.violations, rep.transitions, rep.final_path_valid) == (2, 5, False)
    assert rep.explored == {0}
    teleport = f"Step 1: {pts([4, 3])}"  # starts from a cell never reached
    assert mazes.analyse_trace(teleport, meta).violations == 1
    diagonal = f"Step 1: {pts([0, 4])}"
    assert mazes.analyse_trace(diagonal, meta).violations == 1
    assert mazes.analyse_trace("no points at all", meta).transitions == 0


def test_bad_maze_configs_raise():
    for bad in (dict(sizes=(2,)), dict(cell_px=30), dict(algorithms=("wilson",)), dict(style="neon")):
        with pytest.raises(ConfigError):
            mazes.maze(0, 0, mazes.MazeConfig(**bad))
    assert mazes.tier_of(4) == "easy" and mazes.tier_of(11) == "nightmare"


def test_path_trace_follows_the_true_curve_to_the_answer():
    for i in range(12):
        s = paths.path(4, i, paths.PathConfig(lines=(2, 5)))
        prims = parse_primitives(s.target)
        traj = np.array(prims[-1].coords, float)
        poly = np.array(s.meta["polyline"], float)
        assert paths.point_to_polyline(traj, poly).max() < 4  # every cited point lies on the curve
        assert np.hypot(*(traj[-1] - np.array(s.meta["ends"][s.answer]))) < 4
        assert np.hypot(*(traj[0] - np.array(s.meta["start"]))) < 4
        assert s.target.endswith(f"\\boxed{{{s.answer}}}")
    assert paths.path(4, 3).target == paths.path(4, 3).target


def test_path_layouts_keep_curves_off_other_markers():
    cfg = paths.PathConfig(lines=(5, 5)).validate()
    r = np.random.default_rng(0)
    kept = 0
    for _ in range(30):
        layout = paths._layout(r, 5, cfg)
        if paths._clear(layout, cfg.side):
            kept += 1
            for i, ctrl in enumerate(layout.controls):
                poly = paths.bezier(ctrl, np.linspace(0, 1, 400))
                others = [e for j, e in enumerate(layout.ends) if j != layout.perm[i]]
                assert min(np.hypot(*(poly - e).T).min() for e in others) >= layout.radius + 2
    assert kept > 0


def test_point_to_polyline_distance():
    poly = np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0]])
    d = paths.point_to_polyline(np.array([[5.0, 3.0], [13.0, 5.0], [-4.0, -3.0]]), poly)
    assert np.allclose(d, [3.0, 3.0, 5.0])
