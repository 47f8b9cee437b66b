"""The analysis report as one self-contained HTML page: inline SVG charts, no script, no
network. Numbers are printed exactly as the JSON report holds them (already rounded), so the
page and the JSON agree digit for digit; the same report gives the same bytes."""

from __future__ import annotations

from html import escape
from typing import Any

__all__ = ["render_html", "fmt"]

_W, _H = 1000, 260  # layer plot size
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin:0 0 8px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.summary{background:#f4f7fb;border-left:4px solid #2a6fdb;padding:10px 14px;font-size:15px}
.summary p{margin:4px 0} table{border-collapse:collapse;font-size:13px} td,th{padding:3px 8px;
border-bottom:1px solid #eee;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.w{max-width:200px;font-size:12px;color:#555}
table#worst td:nth-child(2){max-width:280px;overflow-wrap:anywhere}
.bad{color:#b00020;font-weight:600} .hists{display:flex;flex-wrap:wrap;gap:12px}
.hist{border:1px solid #ddd;padding:6px} .muted{color:#777} svg text{font:11px sans-serif}
.part{margin:4px 0}
"""


def fmt(x: Any) -> str:
    """A number as the JSON holds it ('-' for missing)."""
    if x is None:
        return "-"
    return str(x)


def _short(precision: str) -> str:
    """The precision text, abbreviated for a table cell (the JSON has the long form)."""
    for long, short in (("activations ", "act "), ("weights ", "w "), ("per-channel", "per-ch"),
                        ("per-tensor", "per-t"), ("output ", "out ")):
        precision = precision.replace(long, short)
    return precision


def _pct(x: Any) -> str:
    return "-" if x is None else f"{x * 100:.4f}%"


def render_html(r: dict[str, Any]) -> str:
    e = escape
    parts = ["<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>qcompiler analyze: {e(r['quant_model'])}</title><style>{_CSS}</style></head><body>",
             f"<h1>Quantization analysis: {e(r['quant_model'])} vs {e(r['float_model'])}</h1>",
             f"<p class=\"muted\">target {e(r['target'])}; {r['samples']} sample(s); {e(r['method'])}</p>",
             "<div class=\"summary\" id=\"summary\">" + "".join(f"<p>{e(s)}</p>" for s in r["summary"]) + "</div>",
             "<h2>Model outputs</h2>", _outputs(r), "<h2>Per layer, in graph order</h2>", _plot(r),
             "<h2>Worst layers first (by sensitivity)</h2>", _worst(r),
             "<h2>Histograms of the worst layers' tensors (float values; dashed: the chosen range)</h2>",
             "<div class=\"hists\">" + "".join(_hist(h) for h in r["histograms"]) + "</div>",
             "<h2>Integer partitions and float nodes</h2>", _partitions(r), "</body></html>\n"]
    return "\n".join(parts)


def _outputs(r: dict[str, Any]) -> str:
    """The model outputs with everything quantized, then (error split) with only the weights
    and only the activations quantized."""
    rows = ["<table id=\"outputs\"><tr><th>output</th><th>quantized</th><th>cosine</th><th>SQNR dB</th>"
            "<th>top-1 agreement</th></tr>"]
    split = r.get("error_split") or {}
    for part, label, figures in (("all", "everything", r["outputs"]),
                                 ("weights", "weights only", split.get("weights_only") or {}),
                                 ("activations", "activations only", split.get("activations_only") or {})):
        for name, o in figures.items():
            rows.append(f"<tr data-output=\"{escape(name)}\" data-part=\"{part}\"><td>{escape(name)}</td>"
                        f"<td>{label}</td><td class=\"n\">{fmt(o['cosine'])}</td>"
                        f"<td class=\"n\">{fmt(o['sqnr_db'])}</td><td class=\"n\">{fmt(o.get('top1_agreement'))}</td></tr>")
    return "".join(rows) + "</table>"


def _plot(r: dict[str, Any]) -> str:
    """Accumulated SQNR (line) and sensitivity (dots: output SQNR with only that layer
    quantized) per layer; lower is worse. Missing/infinite values sit at the top."""
    layers = r["layers"]
    vals = [x["accumulated"]["sqnr_db"] for x in layers if x["accumulated"] and x["accumulated"]["sqnr_db"] is not None]
    vals += [x["sensitivity"]["score_db"] for x in layers if x["sensitivity"]["score_db"] is not None]
    top = max([10.0] + vals)
    top = float(int(top / 10) + 1) * 10
    bottom = min([0.0] + vals)
    bottom = float(int(bottom / 10) - (1 if bottom < 0 else 0)) * 10
    left, right, pad = 50, 10, 20
    n = max(1, len(layers))

    def x(i: int) -> float:
        return left + (i + 0.5) * (_W - left - right) / n

    def y(v: float | None) -> float:
        v = top if v is None else v
        return pad + (top - v) * (_H - 2 * pad) / (top - bottom)

    out = [f"<svg id=\"layer-plot\" width=\"{_W}\" height=\"{_H}\" viewBox=\"0 0 {_W} {_H}\" "
           "xmlns=\"http://www.w3.org/2000/svg\" role=\"img\">"]
    step = 10 if top - bottom <= 80 else 20
    v = bottom
    while v <= top:
        out.append(f"<line x1=\"{left}\" x2=\"{_W - right}\" y1=\"{y(v):.1f}\" y2=\"{y(v):.1f}\" stroke=\"#eee\"/>"
                   f"<text x=\"{left - 6}\" y=\"{y(v) + 4:.1f}\" text-anchor=\"end\">{v:g} dB</text>")
        v += step
    pts = " ".join(f"{x(i):.1f},{y(l['accumulated']['sqnr_db'] if l['accumulated'] else None):.1f}"
                   for i, l in enumerate(layers))
    out.append(f"<polyline points=\"{pts}\" fill=\"none\" stroke=\"#2a6fdb\" stroke-width=\"1.5\"/>")
    for i, l in enumerate(layers):
        s = l["sensitivity"]["score_db"]
        a = l["accumulated"]["sqnr_db"] if l["accumulated"] else None
        out.append(f"<circle cx=\"{x(i):.1f}\" cy=\"{y(s):.1f}\" r=\"3.5\" fill=\"#e0533d\"><title>"
                   f"{escape(l['name'])} ({escape(l['op'])}): sensitivity {fmt(s)} dB, accumulated {fmt(a)} dB"
                   "</title></circle>")
    out.append(f"<text x=\"{left + 4}\" y=\"12\" fill=\"#2a6fdb\">line: accumulated SQNR of the layer output "
               "(everything quantized)</text><text x=\"480\" y=\"12\" fill=\"#e0533d\">dots: sensitivity = "
               "output SQNR with only this layer quantized</text>")
    out.append(f"<text x=\"{_W - right}\" y=\"{_H - 4}\" text-anchor=\"end\">layers in graph order "
               f"(1..{len(layers)}) &#8594;</text></svg>")
    return "".join(out)


def _worst(r: dict[str, Any]) -> str:
    by = {x["name"]: x for x in r["layers"]}
    rows = ["<table id=\"worst\"><tr><th>#</th><th>layer</th><th>op</th><th>sensitivity dB</th>"
            "<th>accumulated SQNR dB</th><th>accumulated cosine</th><th>clipped</th><th>chosen range</th>"
            "<th>observed</th><th>precision</th><th>kernel</th></tr>"]
    for rank, name in enumerate(r["ranking"], 1):
        x = by[name]
        acc = x["accumulated"] or {}
        rg = x.get("range") or {}
        cls = " class=\"bad\"" if rank <= 3 else ""
        chosen = rg.get("chosen") or [None, None]
        obs = rg.get("observed") or [None, None]
        notes = ("; " + "; ".join(x["notes"])) if x["notes"] else ""
        rows.append(f"<tr data-layer=\"{escape(name)}\"{cls}><td class=\"n\">{rank}</td><td>{escape(name)}</td>"
                    f"<td>{escape(x['op'])}</td><td class=\"n\">{fmt(x['sensitivity']['score_db'])}</td>"
                    f"<td class=\"n\">{fmt(acc.get('sqnr_db'))}</td><td class=\"n\">{fmt(acc.get('cosine'))}</td>"
                    f"<td class=\"n\">{_pct(rg.get('clipped_fraction'))}</td>"
                    f"<td class=\"n\">[{fmt(chosen[0])}, {fmt(chosen[1])}]</td>"
                    f"<td class=\"n\">[{fmt(obs[0])}, {fmt(obs[1])}]</td>"
                    f"<td class=\"w\" title=\"{escape(x['reason'])}\">{escape(_short(x['precision']))}</td>"
                    f"<td class=\"w\">{escape(x['kernel'] + notes)}</td></tr>")
    return "".join(rows) + "</table>"


def _hist(h: dict[str, Any]) -> str:
    w, hh, pad = 300, 140, 16
    counts = h["counts"]
    peak = max(counts) or 1
    lo, hi = h["lo"], h["hi"]
    span = (hi - lo) or 1.0
    bw = (w - 2 * pad) / len(counts)

    def xv(v: float) -> float:
        return pad + (v - lo) / span * (w - 2 * pad)

    out = [f"<div class=\"hist\" data-layer=\"{escape(h['layer'])}\"><div>{escape(h['layer'])}</div>"
           f"<svg width=\"{w}\" height=\"{hh + 20}\" viewBox=\"0 0 {w} {hh + 20}\" xmlns=\"http://www.w3.org/2000/svg\">"]
    for i, c in enumerate(counts):
        if c:
            bh = max(1.0, (hh - pad) * (c / peak) ** 0.5)  # square-root scale: tails stay visible
            out.append(f"<rect x=\"{pad + i * bw:.1f}\" y=\"{hh - bh:.1f}\" width=\"{max(bw - 1, 1):.1f}\" "
                       f"height=\"{bh:.1f}\" fill=\"#7a9cc6\"><title>{c}</title></rect>")
    for v in h["chosen"]:
        if v is not None:
            out.append(f"<line x1=\"{xv(v):.1f}\" x2=\"{xv(v):.1f}\" y1=\"4\" y2=\"{hh}\" stroke=\"#e0533d\" "
                       "stroke-dasharray=\"4 3\" stroke-width=\"1.5\"/>")
    out.append(f"<text x=\"{pad}\" y=\"{hh + 14}\">{fmt(lo)}</text>"
               f"<text x=\"{w - pad}\" y=\"{hh + 14}\" text-anchor=\"end\">{fmt(hi)}</text></svg>"
               f"<div class=\"muted\">range [{fmt(h['chosen'][0])}, {fmt(h['chosen'][1])}]</div></div>")
    return "".join(out)


def _partitions(r: dict[str, Any]) -> str:
    out = [f"<p>{len(r['integer_nodes'])} nodes run in integer in {len(r['partitions'])} partition(s); "
           f"{len(r['float_nodes'])} stay float.</p>"]
    for p in r["partitions"]:
        out.append(f"<div class=\"part\" data-partition=\"{p['id']}\"><b>partition {p['id']}</b>: "
                   f"{len(p['nodes'])} nodes ({escape(p['nodes'][0])} &#8230; {escape(p['nodes'][-1])}); "
                   f"in: {escape(', '.join(p['inputs']))}; out: {escape(', '.join(p['outputs']))}</div>")
    if r["float_nodes"]:
        out.append("<table id=\"float-nodes\"><tr><th>float node</th><th>reason</th></tr>")
        for name, why in r["float_nodes"].items():
            out.append(f"<tr><td>{escape(name)}</td><td>{escape(why)}</td></tr>")
        out.append("</table>")
    return "".join(out)
