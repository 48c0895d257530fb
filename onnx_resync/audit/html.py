"""A self-contained HTML page for an audit: verdict, evidence, and per layer a heatmap of the matched
similarity matrix with histograms of margins and norm ratios.

No network, no scripts: each figure is an inline SVG (the heatmap's pixels are a PNG inside the SVG,
written here with zlib, so a 256x256 matrix stays a few kB). The similarity matrix has the reference's
neurons as rows and the suspect's, put back in the reference's order, as columns: a derived model
shows a bright diagonal; matrices larger than the display size are max-pooled (heatmaps.py: computed
when this page reads them).
"""

from __future__ import annotations

import base64
import html
import struct
import zlib

import numpy as np

from ..io import write_text_atomic

VERDICT_COLOURS = {"identical": "#1a7f37", "permuted": "#1a7f37", "perturbed": "#bf8700", "not derived": "#cf222e",
                   "cannot judge": "#8250df"}  # cannot judge: neither a pass nor a fail (too little compared)
# viridis anchors (0 -> 1)
_VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def write_html(report, path) -> None:
    write_text_atomic(path, render_html(report))


def render_html(report) -> str:
    e = html.escape
    colour = VERDICT_COLOURS.get(report.verdict, "#57606a")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>onnx-resync audit: {e(report.suspect)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>onnx-resync audit</h1>",
        '<table class="files">',
        f"<tr><th>suspect</th><td>{e(report.suspect)}</td></tr>",
        f"<tr><th>reference</th><td>{e(report.reference)}</td></tr>",
        "</table>",
        f'<div class="verdict" style="border-color:{colour}">',
        f'<span class="badge" style="background:{colour}">{e(report.verdict.upper())}</span> {e(report.summary)}',
        "<ul>" + "".join(f"<li>{e(x)}</li>" for x in report.evidence) + "</ul>",
        "</div>",
        "<h2>Layers</h2>",
        _summary_table(report),
        '<p class="note">Heatmaps: cosine similarity of every reference neuron (rows) with every suspect '
        "neuron (columns, in the reference's order after resync); matched pairs lie on the diagonal. "
        f"{_legend_svg()}</p>",
    ]
    for k, row in enumerate(report.layers):
        parts.append(_layer_section(k, row, report.similarity.get(row.group)))
    t = report.timings
    parts.append(f'<p class="note">audited in {t.get("total", 0):.2f}s by onnx-resync</p>')
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary_table(report) -> str:
    e = html.escape
    head = ("<tr><th>#</th><th>suspect layer</th><th>neurons</th><th>matched</th><th>moved</th><th>live</th>"
            "<th>decayed</th>"
            "<th>cosine mean</th><th>cosine worst</th><th>margin median</th><th>margin worst</th>"
            "<th>norm ratio</th><th>max rel. diff</th></tr>")
    rows = []
    for k, r in enumerate(report.layers):
        pct = 100 * r.matched / max(r.neurons, 1)
        cls = ' class="bad"' if pct < 99 else ""
        rows.append(
            f'<tr{cls}><td><a href="#layer{k}">{k}</a></td><td>{e(_names(r.layers) or r.group)}</td>'
            f"<td>{r.neurons}</td><td>{r.matched} ({pct:.1f}%)</td><td>{r.moved}</td><td>{r.live}</td><td>{r.decayed}</td>"
            f"<td>{r.cosine_mean:.5f}</td><td>{r.cosine_min:.4f}</td><td>{r.margin_median:.4f}</td>"
            f"<td>{r.margin_min:.4f}</td><td>{r.norm_ratio_min:.3f} - {r.norm_ratio_max:.3f}</td>"
            f"<td>{r.max_relative_difference:.2e}</td></tr>")
    return f'<table class="layers">{head}{"".join(rows)}</table>'


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _layer_section(k: int, row, matrix) -> str:
    e = html.escape
    title = _names(row.layers, 4) or row.group
    pct = 100 * row.matched / max(row.neurons, 1)
    figs = []
    if matrix is not None:
        figs.append(_heatmap_svg(matrix, row.neurons))
    figs.append(_histogram_svg(row.margins, "margin to the runner-up", lo=min(0.0, min(row.margins, default=0.0))))
    figs.append(_histogram_svg(row.norm_ratios, "norm ratio (suspect / reference)", centre=1.0))
    weights = ", ".join(row.weights[:6]) + (f" (+{len(row.weights) - 6})" if len(row.weights) > 6 else "")
    return (f'<section id="layer{k}"><h3>{k}. {e(title)}</h3>'
            f'<p class="meta">{row.neurons} neurons, {row.matched} matched ({pct:.1f}%), {row.moved} moved, '
            f"{row.live} live, {row.decayed} decayed (functionally inert, not evidence); "
            f"cosine mean {row.cosine_mean:.5f}, worst {row.cosine_min:.4f}; evidence {row.evidence:.2f}<br>"
            f"weights: {e(weights) or '-'}<br>reference: {e(_names(row.reference_layers, 4))} "
            f"<span class=\"key\">[{e(row.group)}]</span></p>"
            f'<div class="figs">{"".join(figs)}</div></section>')


def _heatmap_svg(matrix: np.ndarray, neurons: int, size: int = 300) -> str:
    m = np.clip(np.nan_to_num(np.asarray(matrix, dtype=np.float64)), 0.0, 1.0)
    png = _png(_colour(m))
    pooled = m.shape[0] < neurons
    note = f"{neurons} x {neurons}" + (f", max-pooled to {m.shape[0]} x {m.shape[1]}" if pooled else "")
    pad_l, pad_t, pad_b = 30, 20, 30
    w, h = size + pad_l + 10, size + pad_t + pad_b
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
            f'role="img"><title>similarity matrix</title>'
            f'<text x="{pad_l}" y="14" class="t">similarity ({html.escape(note)})</text>'
            f'<image x="{pad_l}" y="{pad_t}" width="{size}" height="{size}" preserveAspectRatio="none" '
            f'style="image-rendering:pixelated" href="data:image/png;base64,{png}"/>'
            f'<rect x="{pad_l}" y="{pad_t}" width="{size}" height="{size}" fill="none" stroke="#888"/>'
            f'<text x="{pad_l + size / 2}" y="{pad_t + size + 18}" class="a" text-anchor="middle">suspect neuron</text>'
            f'<text x="12" y="{pad_t + size / 2}" class="a" text-anchor="middle" '
            f'transform="rotate(-90 12 {pad_t + size / 2})">reference neuron</text></svg>')


def _histogram_svg(values, label: str, bins: int = 24, lo: float | None = None, centre: float | None = None,
                   width: int = 300, height: int = 200) -> str:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    pad_l, pad_r, pad_t, pad_b = 36, 26, 20, 34
    pw, ph = width - pad_l - pad_r, height - pad_t - pad_b
    if v.size:
        a = float(v.min()) if lo is None else min(lo, float(v.min()))
        b = float(v.max())
        if centre is not None:  # keep the centre (a norm ratio of 1) in view
            a, b = min(a, centre - 0.05), max(b, centre + 0.05)
        if b - a < 1e-9:
            a, b = a - 0.5, b + 0.5
        counts, edges = np.histogram(v, bins=bins, range=(a, b))
    else:
        counts, edges = np.zeros(bins, dtype=int), np.linspace(0, 1, bins + 1)
    top = max(int(counts.max()), 1)
    bars = []
    bw = pw / bins
    for i, c in enumerate(counts):
        bh = ph * c / top
        bars.append(f'<rect x="{pad_l + i * bw:.1f}" y="{pad_t + ph - bh:.1f}" width="{max(bw - 1, 1):.1f}" '
                    f'height="{bh:.1f}" fill="#0969da"><title>{edges[i]:.4g} - {edges[i + 1]:.4g}: {c}</title></rect>')
    ticks = []
    for frac in (0.0, 0.5, 1.0):
        x = pad_l + frac * pw
        value = edges[0] + frac * (edges[-1] - edges[0])
        ticks.append(f'<text x="{x:.1f}" y="{pad_t + ph + 14}" class="a" text-anchor="middle">{value:.3g}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img"><title>{html.escape(label)}</title>'
            f'<text x="{pad_l}" y="14" class="t">{html.escape(label)} (n={v.size})</text>'
            f'<line x1="{pad_l}" y1="{pad_t + ph}" x2="{pad_l + pw}" y2="{pad_t + ph}" stroke="#888"/>'
            f'<text x="{pad_l - 4}" y="{pad_t + 8}" class="a" text-anchor="end">{top}</text>'
            + "".join(bars) + "".join(ticks)
            + f'<text x="{pad_l + pw / 2}" y="{height - 4}" class="a" text-anchor="middle">'
            f"{html.escape(label.split(' (')[0])}</text></svg>")


def _legend_svg(width: int = 220) -> str:
    ramp = _png(_colour(np.linspace(0, 1, 64)[None, :]))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="30" viewBox="0 0 {width} 30" '
            f'class="legend"><image x="20" y="2" width="{width - 40}" height="12" preserveAspectRatio="none" '
            f'href="data:image/png;base64,{ramp}"/><text x="20" y="27" class="a" text-anchor="middle">0</text>'
            f'<text x="{width - 20}" y="27" class="a" text-anchor="middle">1</text></svg>')


def _colour(m: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (viridis)."""
    x = np.clip(m, 0, 1) * (len(_VIRIDIS) - 1)
    i = np.minimum(np.floor(x).astype(int), len(_VIRIDIS) - 2)
    f = (x - i)[..., None]
    return np.round(_VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f).astype(np.uint8)


def _png(rgb: np.ndarray) -> str:
    """A base64 PNG of an (h, w, 3) uint8 array (no dependency: zlib + struct)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1f2328;max-width:1200px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:18px;margin-top:24px} h3{font-size:15px;margin:18px 0 4px}
table{border-collapse:collapse;font-size:13px} th,td{padding:3px 8px;border-bottom:1px solid #d0d7de;text-align:left}
table.layers td:nth-child(n+3){text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#ffebe9}
.files th{color:#57606a;font-weight:normal}
.verdict{border-left:6px solid;padding:8px 14px;margin:14px 0;background:#f6f8fa}
.badge{color:#fff;padding:2px 8px;border-radius:4px;font-weight:600;margin-right:6px}
.verdict ul{margin:6px 0 0;padding-left:20px;font-size:13px}
.note,.meta{font-size:12px;color:#57606a} .key{color:#8c959f}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
svg text.t{font-size:12px;fill:#1f2328} svg text.a{font-size:10px;fill:#57606a}
section{border-top:1px solid #d0d7de;padding-top:4px}
svg.legend{vertical-align:middle}
"""
