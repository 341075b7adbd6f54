"""OCR 2.0 tasks at small scale (paper §3.2.2; reference deepseek-ocr.md §7.2): the figure is drawn from a
structure we generate, so the target is exact.

* charts (matplotlib bar / line / pie, random data and labels) -> the data table as HTML
  ``<table><tr><td>...``, header row first;
* formulas (random LaTeX: fractions, sub/superscripts, Greek, sums, integrals, roots, limits) rendered with
  matplotlib mathtext -> ``\\(latex\\)``;
* chemical structures drawn with RDKit from SMILES (a fragment grammar plus a list of common molecules)
  -> the canonical SMILES. RDKit is the optional ``chem`` extra; without it this task raises ConfigError;
* plane geometry (segments, dashed segments, labelled points, circles) -> the Python-dict string the
  official runner ``eval``s to redraw ``geo.jpg``: ``{'Line': {'line': ['(x0, y0) -- (x1, y1)', ...],
  'line_type': ['-', '--', ...], 'line_endpoint': ['A: (x, y)', ...]}, 'Circle': {'circle_center':
  ['O: (x, y)', ...], 'radius': [r, ...]}}`` in the runner's -15..15 plot coordinates.

The prompt of all four is the official "Parse the figure." (reference §7.2). Everything is drawn with the
object-oriented matplotlib API (no pyplot state), so it is safe in DataLoader worker processes.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from optictx.data.dataset import OCRSample, make_sample, sample_rng
from optictx.data.documents import html_table
from optictx.errors import ConfigError
from optictx.prompts import PROMPTS

PROMPT = PROMPTS["figure"]
PALETTES = ("tab10", "Set2", "Dark2", "Paired", "Set1", "tab20b")


def _pick(r: np.random.Generator, items):
    return items[int(r.integers(len(items)))]


def _figure(width: int, height: int, dpi: int = 100, layout: str | None = "constrained"):
    """A matplotlib Figure of exactly width x height px, with its Agg canvas (no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _to_image(fig) -> Image.Image:
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy(), "RGB")


@lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    """English category words (Faker's en_US lorem list: short, common, MIT-licensed)."""
    from faker.providers.lorem.en_US import Provider

    return tuple(sorted({w.capitalize() for w in Provider.word_list if w.isalpha() and 3 <= len(w) <= 9}))


# --------------------------------------------------------------------------- charts
@dataclass(frozen=True)
class ChartConfig:
    sizes: tuple[tuple[int, int], ...] = ((640, 480), (512, 512), (768, 512))
    kinds: tuple[str, ...] = ("bar", "line", "pie")
    points: tuple[int, int] = (3, 8)  # categories per chart
    max_series: int = 3
    p_value_labels: float = 0.5  # share of bar/line charts with every value printed on the chart


MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _categories(r: np.random.Generator, n: int) -> tuple[str, list[str]]:
    """(axis title, n category labels): years, months, quarters or words."""
    kind = int(r.integers(4))
    if kind == 0:
        y0 = int(r.integers(1990, 2030 - n))
        return "Year", [str(y0 + i) for i in range(n)]
    if kind == 1:
        m0 = int(r.integers(0, 12 - n + 1)) if n <= 12 else 0
        return "Month", list(MONTHS[m0:m0 + n])
    if kind == 2:
        y0 = int(r.integers(2000, 2030))
        return "Quarter", [f"Q{i % 4 + 1} {y0 + i // 4}" for i in range(n)]
    words = _words()
    picked = [words[i] for i in r.choice(len(words), size=n, replace=False)]
    return _pick(r, ("Category", "Item", "Group", "Region", "Product")), picked


def _values(r: np.random.Generator, n: int, walk: bool) -> tuple[list[float], int]:
    """n values and their decimals: integers at scales 10..10^4 or 1-decimal floats under 100."""
    decimals = int(r.random() < 0.4)
    top = float(10 ** int(r.integers(1, 3))) if decimals else float(10 ** int(r.integers(1, 5)))
    if walk:
        v = np.cumsum(r.normal(0, 0.15 * top, n)) + r.uniform(0.3, 0.7) * top
        v = np.clip(v, 0.02 * top, None)
    else:
        v = r.uniform(0.05 * top, top, n)
    return [round(float(x), decimals) for x in v], decimals


def _fmt(v: float, decimals: int) -> str:
    return f"{v:.{decimals}f}"


def _pie_shares(r: np.random.Generator, n: int) -> list[int]:
    """n integer percentages >= 2 summing to 100 (printed exactly by autopct)."""
    w = r.dirichlet(np.ones(n) * 2)
    shares = [2 + int(x) for x in w * (100 - 2 * n)]
    shares[int(np.argmax(shares))] += 100 - sum(shares)
    return shares


def chart(seed: int, index: int, config: ChartConfig | None = None) -> tuple[Image.Image, list[list[str]], dict]:
    """(image, table rows with the header first, meta) of chart sample (seed, index)."""
    cfg = config or ChartConfig()
    if not cfg.kinds or any(k not in ("bar", "line", "pie") for k in cfg.kinds):
        raise ConfigError(f"chart kinds must be some of bar, line, pie; got {cfg.kinds}")
    import matplotlib

    r = sample_rng(seed, index, "chart")
    kind = _pick(r, cfg.kinds)
    w, h = _pick(r, cfg.sizes)
    n = int(r.integers(cfg.points[0], cfg.points[1] + 1))
    x_title, cats = _categories(r, n)
    fig = _figure(w, h)
    ax = fig.add_subplot()
    colors = matplotlib.colormaps[_pick(r, PALETTES)].colors
    fontsize = float(r.uniform(8, 11))
    title = " ".join(_pick(r, _words()) for _ in range(int(r.integers(1, 4))))
    if r.random() < 0.7:
        ax.set_title(title, fontsize=fontsize + 2)
    labels_on = r.random() < cfg.p_value_labels
    if kind == "pie":
        shares = _pie_shares(r, n)
        ax.pie(shares, labels=cats, colors=[colors[i % len(colors)] for i in range(n)],
               startangle=float(r.uniform(0, 360)), autopct="%.0f%%", textprops={"fontsize": fontsize},
               counterclock=bool(r.random() < 0.5))
        ax.set_aspect("equal")
        rows = [["Category", "Share (%)"]] + [[c, str(s)] for c, s in zip(cats, shares)]  # no axis title on a pie
        return _to_image(fig), rows, {"kind": kind, "series": 1, "points": n, "value_labels": True}
    n_series = int(r.integers(1, cfg.max_series + 1))
    names = ([str(y) for y in range(int(r.integers(2000, 2030)), 2100)][:n_series] if r.random() < 0.3
             else [_pick(r, _words()) for _ in range(n_series)])
    names = list(dict.fromkeys(names)) or ["Value"]
    series = [_values(r, n, walk=kind == "line") for _ in names]
    x = np.arange(n)
    horizontal = kind == "bar" and r.random() < 0.25
    width = 0.8 / len(names)
    for s, (name, (vals, dec)) in enumerate(zip(names, series)):
        color = colors[s % len(colors)]
        if kind == "bar":
            pos = x - 0.4 + width * (s + 0.5)
            bars = (ax.barh if horizontal else ax.bar)(pos, vals, width * 0.9, label=name, color=color)
            if labels_on:
                ax.bar_label(bars, labels=[_fmt(v, dec) for v in vals], fontsize=fontsize * 0.8, padding=2)
        else:
            ax.plot(x, vals, marker=_pick(r, ("o", "s", "^", "D")), color=color, label=name,
                    linestyle=_pick(r, ("-", "--", "-.")))
            if labels_on:
                for xi, v in zip(x, vals):
                    ax.annotate(_fmt(v, dec), (xi, v), textcoords="offset points", xytext=(0, 5), ha="center",
                                fontsize=fontsize * 0.8)
    (ax.set_yticks if horizontal else ax.set_xticks)(x, cats, fontsize=fontsize)
    ax.tick_params(labelsize=fontsize)
    if len(names) > 1 or r.random() < 0.5:
        ax.legend(fontsize=fontsize * 0.9)
    else:  # every header cell of the target must be readable: a lone series is named on the value axis
        (ax.set_xlabel if horizontal else ax.set_ylabel)(names[0], fontsize=fontsize)
    if r.random() < 0.5:
        ax.grid(axis="x" if horizontal else "y", alpha=0.4)
    (ax.set_ylabel if horizontal else ax.set_xlabel)(x_title, fontsize=fontsize)
    rows = [[x_title] + names] + [[c] + [_fmt(vals[i], dec) for vals, dec in series] for i, c in enumerate(cats)]
    return _to_image(fig), rows, {"kind": kind, "series": len(names), "points": n, "value_labels": labels_on,
                                  "horizontal": horizontal}


def chart_sample(seed: int, index: int, mode: str = "tiny", config: ChartConfig | None = None) -> OCRSample:
    image, rows, meta = chart(seed, index, config)
    target = html_table(rows)
    return make_sample("chart", image, PROMPT, target, target, seed, index, mode, meta)


# --------------------------------------------------------------------------- formulas
@dataclass(frozen=True)
class FormulaConfig:
    font_sizes: tuple[int, int] = (18, 34)
    fontsets: tuple[str, ...] = ("cm", "stix", "stixsans", "dejavusans", "dejavuserif")
    max_depth: int = 2
    pad: tuple[int, int] = (8, 40)  # white margin around the formula, px


GREEK = ("\\alpha", "\\beta", "\\gamma", "\\delta", "\\epsilon", "\\theta", "\\lambda", "\\mu", "\\pi",
         "\\sigma", "\\phi", "\\omega", "\\rho", "\\tau")
VARIABLES = ("x", "y", "z", "a", "b", "c", "n", "k", "t", "m", "u", "v")
INDICES = ("i", "j", "k", "n", "0", "1", "2")
FUNCTIONS = ("\\sin", "\\cos", "\\tan", "\\log", "\\ln", "\\exp")
RELATIONS = ("=", "=", "=", "\\leq", "\\geq", "\\neq", "\\approx", "<", ">")


class FormulaWriter:
    """A tiny grammar of LaTeX that mathtext draws and LaTeX reads the same way. Every group is braced
    (``x^{2}``, ``\\frac{a}{b}``) and tokens are space-separated, so the target has one spelling."""

    def __init__(self, r: np.random.Generator, max_depth: int):
        self.r, self.max_depth = r, max_depth

    def atom(self) -> str:
        u = self.r.random()
        if u < 0.45:
            return _pick(self.r, VARIABLES)
        if u < 0.75:
            return _pick(self.r, GREEK)
        return str(int(self.r.integers(1, 100)))

    def term(self, depth: int) -> str:
        r, deeper = self.r, depth < self.max_depth
        u = r.random()
        if deeper and u < 0.18:
            return f"\\frac{{{self.expr(depth + 1, 2)}}}{{{self.expr(depth + 1, 2)}}}"
        if deeper and u < 0.26:
            return f"\\sqrt{{{self.expr(depth + 1, 2)}}}"
        if deeper and u < 0.34:
            return f"\\left( {self.expr(depth + 1, 3)} \\right)^{{{int(r.integers(2, 5))}}}"
        if u < 0.42:
            return f"{_pick(r, FUNCTIONS)} {self.atom()}"
        if u < 0.58:
            return f"{self.atom()}^{{{self.small()}}}"
        if u < 0.72:
            return f"{_pick(r, VARIABLES)}_{{{_pick(r, INDICES)}}}"
        if u < 0.78:
            return f"{_pick(r, VARIABLES)}_{{{_pick(r, INDICES)}}}^{{{self.small()}}}"
        return self.atom()

    def small(self) -> str:
        """An exponent: a number, a variable or a short sum."""
        u = self.r.random()
        if u < 0.5:
            return str(int(self.r.integers(2, 10)))
        if u < 0.8:
            return _pick(self.r, VARIABLES)
        return f"{_pick(self.r, VARIABLES)} {_pick(self.r, ('+', '-'))} {int(self.r.integers(1, 10))}"

    def expr(self, depth: int, max_terms: int) -> str:
        n = int(self.r.integers(1, max_terms + 1))
        parts = [self.term(depth)]
        for _ in range(n - 1):
            parts += [_pick(self.r, ("+", "-", "+", "\\cdot", "\\times")), self.term(depth)]
        return " ".join(parts)

    def formula(self) -> str:
        r = self.r
        u = r.random()
        i, lo = _pick(r, ("i", "j", "k", "n")), int(r.integers(0, 2))
        if u < 0.15:
            top = _pick(r, ("n", "N", "m", "\\infty"))
            head = f"\\sum_{{{i}={lo}}}^{{{top}}} {self.term(1)}"
        elif u < 0.3:
            a, b = _pick(r, ("0", "1", "a", "-\\infty")), _pick(r, ("1", "b", "x", "\\infty", "\\pi"))
            head = f"\\int_{{{a}}}^{{{b}}} {self.expr(1, 2)} \\, d{_pick(r, ('x', 't', 'u'))}"
        elif u < 0.38:
            head = f"\\prod_{{{i}={lo}}}^{{n}} {self.term(1)}"
        elif u < 0.46:
            v = _pick(r, ("x", "n", "t"))
            to = _pick(r, ("0", "\\infty", "a"))
            head = f"\\lim_{{{v} \\to {to}}} {self.term(1)}"
        else:
            head = self.expr(0, 3)
        if r.random() < 0.6:
            return f"{head} {_pick(r, RELATIONS)} {self.expr(1, 2)}"
        return head


def render_formula(latex: str, font_size: float, fontset: str, dpi: int = 100) -> Image.Image:
    """mathtext drawing of ``latex`` (without delimiters), cropped tight, black on white."""
    from matplotlib import mathtext
    from matplotlib.font_manager import FontProperties

    buf = io.BytesIO()
    mathtext.math_to_image(f"${latex}$", buf, prop=FontProperties(size=font_size, math_fontfamily=fontset),
                           dpi=dpi, format="png")
    buf.seek(0)
    rgba = Image.open(buf).convert("RGBA")
    page = Image.new("RGB", rgba.size, (255, 255, 255))
    page.paste(rgba, mask=rgba.getchannel("A"))
    return page


def formula(seed: int, index: int, config: FormulaConfig | None = None) -> tuple[Image.Image, str, dict]:
    """(image, LaTeX without delimiters, meta) of formula sample (seed, index)."""
    cfg = config or FormulaConfig()
    r = sample_rng(seed, index, "formula")
    latex = FormulaWriter(r, cfg.max_depth).formula()
    size, fontset = float(r.uniform(*cfg.font_sizes)), _pick(r, cfg.fontsets)
    drawn = render_formula(latex, size, fontset)
    pl, pt, pr, pb = (int(p) for p in r.integers(cfg.pad[0], cfg.pad[1] + 1, 4))
    image = Image.new("RGB", (drawn.width + pl + pr, drawn.height + pt + pb), (255, 255, 255))
    image.paste(drawn, (pl, pt))
    return image, latex, {"fontset": fontset, "font_size": round(size, 2)}


def formula_sample(seed: int, index: int, mode: str = "tiny", config: FormulaConfig | None = None) -> OCRSample:
    image, latex, meta = formula(seed, index, config)
    target = f"\\({latex}\\)"
    return make_sample("formula", image, PROMPT, target, target, seed, index, mode, meta)


# --------------------------------------------------------------------------- chemistry
@dataclass(frozen=True)
class ChemConfig:
    sizes: tuple[int, ...] = (256, 320, 384)
    p_known: float = 0.3  # share drawn from COMMON_MOLECULES, the rest from the fragment grammar
    max_substituents: int = 3
    max_heavy_atoms: int = 32


COMMON_MOLECULES = (
    "CCO", "CC(=O)O", "CC(C)O", "CC(=O)C", "OCCO", "C=CC=C", "CCN(CC)CC", "CC(=O)OC", "ClCCl", "NC(=O)N",
    "c1ccccc1", "Cc1ccccc1", "Oc1ccccc1", "Nc1ccccc1", "OC(=O)c1ccccc1", "CC(=O)Oc1ccccc1C(=O)O",
    "CC(=O)Nc1ccc(O)cc1", "CC(C)Cc1ccc(C(C)C(=O)O)cc1", "Cn1cnc2c1c(=O)n(C)c(=O)n2C", "c1ccc2ccccc2c1",
    "c1ccncc1", "c1ccoc1", "c1ccsc1", "C1CCCCC1", "C1CCOC1", "O=C1CCCCC1", "c1ccc(-c2ccccc2)cc1",
    "COc1ccc(C=O)cc1O", "OC(=O)CC(O)(CC(=O)O)C(=O)O", "NCC(=O)O", "CC(N)C(=O)O", "OC(=O)C=CC(=O)O",
    "CCCCCCCC(=O)O", "CC(C)(C)O", "C#N", "CC#N", "O=[N+]([O-])c1ccccc1", "Clc1ccc(Cl)cc1", "FC(F)(F)c1ccccc1",
    "CS(=O)(=O)N", "OCC1OC(O)C(O)C(O)C1O", "c1ccc2[nH]ccc2c1", "O=C(O)c1ccccc1O", "CCOC(=O)C", "CCCCO",
)
RINGS = ("c1ccccc1", "c1ccccc1", "C1CCCCC1", "c1ccncc1", "C1CCOC1", "c1ccoc1", "c1ccsc1", "C1CCC1", "C1CCNCC1",
         "c1cncnc1", "C1CC1", "c1ccc2ccccc2c1")
SUBSTITUENTS = ("C", "CC", "O", "N", "F", "Cl", "Br", "C(=O)O", "C(=O)N", "OC", "N(C)C", "C#N", "[N+](=O)[O-]",
                "C(F)(F)F", "S(=O)(=O)N", "C=O", "CC(C)C", "OCC", "C(=O)OC", "NC(=O)C", "CO", "C=C")
LINKERS = ("", "C", "O", "CC", "C(=O)N", "N", "OC")


def _rdkit():
    try:
        from rdkit import Chem, RDLogger
    except ImportError as e:
        raise ConfigError("the chemistry task draws molecules with RDKit: install it with "
                          "`pip install 'optictx[chem]'` (or `pip install rdkit`)") from e
    RDLogger.DisableLog("rdApp.*")
    return Chem


def _attach(Chem, mol, frag_smiles: str, r: np.random.Generator, linker: str = ""):
    """Bond fragment atom 0 (through an optional linker) to a random atom of ``mol`` that has a hydrogen."""
    sites = [a.GetIdx() for a in mol.GetAtoms() if a.GetTotalNumHs() > 0 and not a.GetFormalCharge()]
    if not sites:
        return mol
    frag = Chem.MolFromSmiles(linker + frag_smiles) if linker else Chem.MolFromSmiles(frag_smiles)
    site, offset = int(_pick(r, sites)), mol.GetNumAtoms()
    combo = Chem.RWMol(Chem.CombineMols(mol, frag))
    combo.AddBond(site, offset, Chem.BondType.SINGLE)
    out = combo.GetMol()
    try:
        Chem.SanitizeMol(out)
    except Exception:  # noqa: BLE001 - a valence the grammar did not foresee: keep the molecule as it was
        return mol
    return out


def random_molecule(r: np.random.Generator, cfg: ChemConfig):
    """A valid molecule: a common one, or rings with substituents from the fragment grammar."""
    Chem = _rdkit()
    if r.random() < cfg.p_known:
        return Chem.MolFromSmiles(_pick(r, COMMON_MOLECULES)), "known"
    mol = Chem.MolFromSmiles(_pick(r, RINGS))
    if r.random() < 0.35:  # a second ring through a linker
        mol = _attach(Chem, mol, _pick(r, RINGS), r, _pick(r, LINKERS))
    for _ in range(int(r.integers(1, cfg.max_substituents + 1))):
        candidate = _attach(Chem, mol, _pick(r, SUBSTITUENTS), r)
        if candidate.GetNumHeavyAtoms() <= cfg.max_heavy_atoms:
            mol = candidate
    return mol, "grammar"


def draw_molecule(mol, size: int, rotate: float, line_width: float, bw: bool) -> Image.Image:
    from rdkit.Chem import rdDepictor
    from rdkit.Chem.Draw import rdMolDraw2D

    mol = type(mol)(mol)  # depict a copy: the caller's molecule keeps no conformer
    rdDepictor.Compute2DCoords(mol)
    d = rdMolDraw2D.MolDraw2DCairo(size, size)
    opts = d.drawOptions()
    opts.rotate, opts.bondLineWidth = rotate, line_width
    if bw:
        opts.useBWAtomPalette()
    d.DrawMolecule(mol)
    d.FinishDrawing()
    return Image.open(io.BytesIO(d.GetDrawingText())).convert("RGB")


def chemistry(seed: int, index: int, config: ChemConfig | None = None) -> tuple[Image.Image, str, dict]:
    """(image, canonical SMILES, meta) of chemistry sample (seed, index)."""
    cfg = config or ChemConfig()
    Chem = _rdkit()
    r = sample_rng(seed, index, "chemistry")
    mol, source = random_molecule(r, cfg)
    smiles = Chem.MolToSmiles(mol)
    image = draw_molecule(mol, int(_pick(r, cfg.sizes)), float(r.uniform(0, 360)), float(r.uniform(1, 2.5)),
                          bool(r.random() < 0.5))
    return image, smiles, {"source": source, "heavy_atoms": mol.GetNumHeavyAtoms()}


def chemistry_sample(seed: int, index: int, mode: str = "tiny", config: ChemConfig | None = None) -> OCRSample:
    image, smiles, meta = chemistry(seed, index, config)
    return make_sample("chemistry", image, PROMPT, smiles, smiles, seed, index, mode, meta)


# --------------------------------------------------------------------------- plane geometry
@dataclass(frozen=True)
class GeometryConfig:
    sizes: tuple[int, ...] = (384, 448, 512)
    points: tuple[int, int] = (3, 5)  # polygon vertices
    limit: int = 12  # vertex coordinates are integers in [-limit, limit]; the plot spans -15..15
    p_extra_segment: float = 0.5
    p_dashed: float = 0.5  # chance an extra segment is dashed
    max_circles: int = 2


def _polygon(r: np.random.Generator, n: int, limit: int) -> list[tuple[int, int]]:
    """n integer vertices of a convex-ish polygon (sorted by angle), well apart, of a visible area."""
    for _ in range(200):
        pts = {(int(x), int(y)) for x, y in r.integers(-limit, limit + 1, (n, 2))}
        if len(pts) < n or min(math.dist(p, q) for p in pts for q in pts if p != q) < 5:
            continue
        cx, cy = np.mean(list(pts), axis=0)
        pts = sorted(pts, key=lambda p: math.atan2(p[1] - cy, p[0] - cx))
        area = abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]))) / 2
        if area >= 25:
            return pts
    return [(-8, -6), (8, -6), (0, 9)][:n] if n == 3 else [(-8, -8), (8, -8), (8, 8), (-8, 8), (0, 11)][:n]


def geometry_structure(r: np.random.Generator, cfg: GeometryConfig) -> dict:
    """The figure as the official dict: segments between labelled points, and circles."""
    n = int(r.integers(cfg.points[0], cfg.points[1] + 1))
    pts = _polygon(r, n, cfg.limit)
    labels = [chr(ord("A") + i) for i in range(n)]
    segments = [(i, (i + 1) % n, "-") for i in range(n)]
    if r.random() < cfg.p_extra_segment:
        style = "--" if r.random() < cfg.p_dashed else "-"
        if n >= 4:
            segments.append((0, 2, style))  # a diagonal
        else:  # a vertex to a new point on the opposite side's line, at integer coordinates when possible
            (x1, y1), (x2, y2) = pts[1], pts[2]
            pts.append((round((x1 + x2) / 2), round((y1 + y2) / 2)))
            labels.append(chr(ord("A") + n))
            segments.append((0, n, style))
    line = [f"({pts[a][0]}, {pts[a][1]}) -- ({pts[b][0]}, {pts[b][1]})" for a, b, _ in segments]
    used = sorted({i for a, b, _ in segments for i in (a, b)})
    out = {"Line": {"line": line, "line_type": [t for _, _, t in segments],
                    "line_endpoint": [f"{labels[i]}: ({pts[i][0]}, {pts[i][1]})" for i in used]}}
    centers, radii = [], []
    for k in range(int(r.integers(0, cfg.max_circles + 1))):
        if r.random() < 0.5:  # centred on a vertex
            i = int(r.integers(n))
            (cx, cy), name = pts[i], labels[i]
        else:
            cx, cy = (int(v) for v in r.integers(-8, 9, 2))
            name = "O" if k == 0 else f"O{k}"
        room = 15 - max(abs(cx), abs(cy))
        if room >= 2:
            centers.append(f"{name}: ({cx}, {cy})")
            radii.append(int(r.integers(2, min(room, 9) + 1)))
    if centers:
        out["Circle"] = {"circle_center": centers, "radius": radii}
    return out


def _point(text: str) -> tuple[float, float]:
    x, y = text.strip().strip("()").split(",")
    return float(x), float(y)


def draw_geometry(structure: dict, size: int, line_width: float = 1.2) -> Image.Image:
    """Draw the dict the way the official runner reads it (segments split on ' -- ', 'A: (x, y)' labels)."""
    from matplotlib.patches import Circle

    fig = _figure(size, size, layout=None)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-15, 15)
    ax.set_ylim(-15, 15)
    ax.set_aspect("equal")
    ax.axis("off")
    lines = structure["Line"]
    for seg, style in zip(lines["line"], lines["line_type"]):
        (x0, y0), (x1, y1) = (_point(p) for p in seg.split(" -- "))
        ax.plot([x0, x1], [y0, y1], color="k", linewidth=line_width, linestyle="--" if style == "--" else "-")
    labelled = list(lines["line_endpoint"]) + list(structure.get("Circle", {}).get("circle_center", []))
    for item in dict.fromkeys(labelled):
        name, xy = item.split(": ")
        x, y = _point(xy)
        ax.scatter([x], [y], s=8, color="k", zorder=3)
        ax.annotate(name, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=size / 40)
    circles = structure.get("Circle", {})
    for center, radius in zip(circles.get("circle_center", []), circles.get("radius", [])):
        ax.add_patch(Circle(_point(center.split(": ")[1]), radius=radius, fill=False, edgecolor="k",
                            linewidth=line_width))
    return _to_image(fig)


def geometry(seed: int, index: int, config: GeometryConfig | None = None) -> tuple[Image.Image, str, dict]:
    """(image, dict string, meta) of geometry sample (seed, index)."""
    cfg = config or GeometryConfig()
    r = sample_rng(seed, index, "geometry")
    structure = geometry_structure(r, cfg)
    image = draw_geometry(structure, int(_pick(r, cfg.sizes)), float(r.uniform(0.8, 2.0)))
    return image, str(structure), {"segments": len(structure["Line"]["line"]),
                                   "circles": len(structure.get("Circle", {}).get("radius", []))}


def geometry_sample(seed: int, index: int, mode: str = "tiny", config: GeometryConfig | None = None) -> OCRSample:
    image, target, meta = geometry(seed, index, config)
    return make_sample("geometry", image, PROMPT, target, target, seed, index, mode, meta)
