#!/usr/bin/env python3
"""The accuracy table of bench/accuracy.sh: reads the run folders it made (metrics.jsonl,
probe.json, knn.json, config.json, command.txt) and writes <out>.md, <out>.json and <out>.svg
(online-probe top-1 on the test set against epochs, one line per method, with the final linear
and kNN top-1 as markers). Standard library only.

    python3 bench/accuracy_table.py runs/accuracy-fashion_mnist bench/results/accuracy-fashion_mnist
"""
import json
import os
import sys


def read_jsonl(path):
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def row(run_dir):
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    lines = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    summary = [l for l in lines if l.get("summary")][-1]
    curve = [(l["epoch"] + 1, l["online_probe_eval_top1"]) for l in lines if "online_probe_eval_top1" in l]
    probe = json.load(open(os.path.join(run_dir, "probe.json")))
    knn = json.load(open(os.path.join(run_dir, "knn.json")))
    model = cfg["model"]
    backbone = model["backbone"]
    return {
        "method": cfg.get("method", cfg["loss"]["type"]),
        "backbone": "%s width %s%s" % (backbone["type"], backbone.get("width", 64),
                                       " layers %s" % backbone["layers"] if "layers" in backbone else ""),
        "epochs": cfg["train"]["epochs"],
        "batch": cfg["train"]["batch_size"],
        "projector": model["projector"].get("spec", model["projector"].get("type")),
        "linear_top1": probe["top1"],
        "linear_protocol": probe.get("protocol", ""),
        "knn_top1": {k: v["top1"] for k, v in knn["k"].items()},
        "wall_s": summary["wall_s"],
        "images_per_s": summary["images_per_s"],
        "device": summary["device"],
        "online_probe_curve": curve,
        "commands": open(os.path.join(run_dir, "command.txt")).read().strip().splitlines(),
    }


COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def svg(rows, title):
    W, H, L, T, PW, PH = 720, 420, 70, 40, 470, 320
    pts = [a for r in rows for _, a in r["online_probe_curve"]] + [r["linear_top1"] for r in rows]
    lo, hi = min(pts + [100]) - 1, max(pts) + 1
    emax = max([r["epochs"] for r in rows] + [1])
    x = lambda e: L + PW * (e / emax)
    y = lambda a: T + PH * (1 - (a - lo) / (hi - lo))
    s = ["<svg xmlns='http://www.w3.org/2000/svg' width='%d' height='%d' font-family='sans-serif'>" % (W, H),
         "<rect width='100%' height='100%' fill='white'/>",
         "<text x='%d' y='22' text-anchor='middle' font-size='15'>%s</text>" % (W / 2, title),
         "<line x1='%d' y1='%d' x2='%d' y2='%d' stroke='black'/>" % (L, T + PH, L + PW, T + PH),
         "<line x1='%d' y1='%d' x2='%d' y2='%d' stroke='black'/>" % (L, T, L, T + PH),
         "<text x='%d' y='%d' text-anchor='middle' font-size='12'>epoch</text>" % (L + PW / 2, H - 12),
         "<text x='16' y='%d' font-size='12' transform='rotate(-90 16 %d)'>top-1 (%%)</text>" % (T + PH / 2, T + PH / 2)]
    for k in range(6):
        a = lo + (hi - lo) * k / 5
        s.append("<text x='%d' y='%d' text-anchor='end' font-size='11'>%.1f</text>" % (L - 6, y(a) + 4, a))
    for e in range(0, emax + 1):
        s.append("<text x='%d' y='%d' text-anchor='middle' font-size='11'>%d</text>" % (x(e), T + PH + 16, e))
    for i, r in enumerate(rows):
        c = COLOURS[i % len(COLOURS)]
        curve = r["online_probe_curve"]
        if curve:
            s.append("<polyline fill='none' stroke='%s' stroke-width='2' points='%s'/>" %
                     (c, " ".join("%.1f,%.1f" % (x(e), y(a)) for e, a in curve)))
        s.append("<circle cx='%.1f' cy='%.1f' r='5' fill='%s'/>" % (x(r["epochs"]), y(r["linear_top1"]), c))
        knn = max(r["knn_top1"].values())
        s.append("<rect x='%.1f' y='%.1f' width='8' height='8' fill='none' stroke='%s' stroke-width='2'/>" %
                 (x(r["epochs"]) - 4, y(knn) - 4, c))
        s.append("<text x='%d' y='%d' font-size='12' fill='%s'>%s: linear %.2f, kNN %.2f</text>" %
                 (L + PW + 20, T + 20 + 20 * i, c, r["method"], r["linear_top1"], knn))
    s.append("<text x='%d' y='%d' font-size='11' fill='#555'>line: online probe (test set) per epoch</text>" % (L + PW + 20, T + 40 + 20 * len(rows)))
    s.append("<text x='%d' y='%d' font-size='11' fill='#555'>dot: linear probe; square: best kNN</text>" % (L + PW + 20, T + 56 + 20 * len(rows)))
    s.append("</svg>")
    return "\n".join(s) + "\n"


def main():
    runs, out = sys.argv[1], sys.argv[2]
    rows = [row(os.path.join(runs, d)) for d in sorted(os.listdir(runs)) if os.path.exists(os.path.join(runs, d, "knn.json"))]
    json.dump({"generator": "bench/accuracy.sh", "rows": rows}, open(out + ".json", "w"), indent=2)
    ks = sorted({k for r in rows for k in r["knn_top1"]}, key=int)
    md = ["| method | backbone | epochs | batch | projector | linear top-1 | " + " | ".join("kNN k=%s" % k for k in ks) +
          " | wall | images/s | device |",
          "|---|---|---|---|---|---|" + "---|" * len(ks) + "---|---|---|"]
    for r in rows:
        md.append("| %s | %s | %d | %d | %s | %.2f | %s | %.0f s | %.0f | %s |" % (
            r["method"], r["backbone"], r["epochs"], r["batch"], r["projector"], r["linear_top1"],
            " | ".join("%.2f" % r["knn_top1"][k] for k in ks), r["wall_s"], r["images_per_s"], r["device"]))
    open(out + ".md", "w").write("\n".join(md) + "\n")
    open(out + ".svg", "w").write(svg(rows, os.path.basename(out)))
    print("\n".join(md))


if __name__ == "__main__":
    main()
