"""Report: results read through the schema (refused with one sentence otherwise), PNG figures, the
self-contained HTML report (escaping, no network), comparisons, a real browser."""

from __future__ import annotations

import copy
import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from refusal_lab.report import compare_runs, headline, render_report, write_figures, write_report
from refusal_lab.report.__main__ import main as report_main
from refusal_lab.report.interactive import script_json
from refusal_lab.run.results import GRID_NAMES, SCHEMA_VERSION, ResultsError, read_results
from tests.reference_run import MODEL_TYPES, VOLATILE, reference_path
from tests.sample_results import sample_results

# Injected through every model/user-derived string: if any of it runs, the title changes or #pwned appears.
PAYLOAD = ("<script>window.__pwned=1;document.title='PWNED';var e=document.createElement('div');"
           "e.id='pwned';document.body.appendChild(e)</script>")
IMG = "<img src=x id=pwned onerror=\"document.title='PWNED'\">"
BREAKOUT = "</script><script>document.title='PWNED'</script><!--"
MATHTEXT = r"$\notacommand{$ 5$"  # would crash matplotlib's mathtext if not escaped
EVIL = PAYLOAD + IMG
ALERT = "</script><script>alert(1)</script>"
STEERING_PNGS = ("steering_direction", "steering_sweep", "steering_objects", "steering_evaluation")


def hostile_results(**kw) -> dict:
    """The synthetic sample with script payloads in objects, tokens, generations, prompt, findings, grids."""
    r = sample_results(**kw)
    bomb = r["objects"]["harmful"][0]
    evil_obj = f"{bomb} {EVIL}"
    r["objects"]["harmful"][0] = evil_obj
    r["baseline"]["harmful"] = {(evil_obj if k == bomb else k): v for k, v in r["baseline"]["harmful"].items()}
    cake = r["objects"]["harmless"][1]
    r["objects"]["harmless"][1] = f"{cake} {MATHTEXT}"
    r["baseline"]["harmless"] = {(f"{cake} {MATHTEXT}" if k == cake else k): v
                                 for k, v in r["baseline"]["harmless"].items()}
    r["objects"]["dropped"].append({"object": EVIL, "side": "harmless", "reason": BREAKOUT})
    r["heads"]["generations"].append({"object": EVIL, "baseline": PAYLOAD, "patched": BREAKOUT + IMG})
    r["prompts"]["example"] += PAYLOAD
    r["findings"].append(f"The model said {PAYLOAD} 3 times.")
    r["positions"][1]["token"] = EVIL
    for g in ("resid_pre", "attn_out"):
        r["patching"][g]["cols"][1] = f"post_obj: {EVIL}"
    r["patching"]["attribution"]["resid_pre"]["cols"][1] = f"post_obj: {BREAKOUT}"
    r["baseline"]["top_next_tokens"]["harmful"].append([EVIL, 0.01])
    r["tokens"]["refusal"]["str"] = "Sorry$"
    r["config"]["note"] = BREAKOUT
    # steering: generations, eoi tokens, reasons, vector names, interventions, the fallback note
    d, st, ev = r["direction"], r["steering"], r["evaluation"]
    d["eoi_tokens"][0] = f"<eoi>{EVIL}"
    d["table"][-1]["reason"] = BREAKOUT
    d["fallback"] = f"All candidates were filtered out {BREAKOUT}"
    st["instructions"]["samples"].append({"setting": "induce", "alpha": 2.0, "instruction": EVIL,
                                          "completion": ALERT, "refused": False})
    st["instructions"]["chosen_alpha_reason"] += PAYLOAD
    st["objects"][f"heads {IMG}"] = st["objects"].pop("heads")
    st["objects"]["difference"]["samples"].append({"side": "harmful", "alpha": -4.0, "object": EVIL,
                                                   "completion": ALERT + BREAKOUT, "refused": True})
    ev["samples"].append({"setting": "harmful_ablated", "instruction": EVIL, "completion": ALERT + IMG,
                          "refused": False})
    ev["harmful_refusal_rate_subtracted"]["intervention"] += BREAKOUT
    ev["damage"][f"edit {IMG}"] = {"kl_harmless": 0.5, "ce_baseline": 1.0, "ce_edited": 1.2, "n_tokens": 8, "n": 1}
    return r


def write_run(d: Path, results: dict) -> Path:
    """Create a run folder with results.json and a tables/ CSV."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "results.json").write_text(json.dumps(results), encoding="utf-8")
    (d / "tables").mkdir(exist_ok=True)
    (d / "tables" / "resid_pre.csv").write_text("layer,value\n0,1.0\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = write_run(tmp_path_factory.mktemp("run") / "small", hostile_results())
    write_report(d)
    return d


@pytest.fixture(scope="module")
def report_html(run_dir) -> str:
    return (run_dir / "report.html").read_text(encoding="utf-8")


def assert_png(p: Path, min_side: int = 200) -> None:
    assert p.exists() and p.stat().st_size > 5_000, p
    with Image.open(p) as im:
        im.verify()
    with Image.open(p) as im:
        assert im.format == "PNG" and min(im.size) >= min_side, (p, im.size)
        assert len(set(im.convert("L").resize((64, 64)).getdata())) > 8, f"{p} looks blank"


class TagCollector(HTMLParser):
    """All start tags with their attributes, outside script/style content (which the parser skips)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    handle_startendtag = handle_starttag


def tags_of(doc: str) -> list[tuple[str, dict[str, str | None]]]:
    p = TagCollector()
    p.feed(doc)
    return p.tags


def assert_offline(doc: str) -> None:
    """No tag loads or links anything over the network."""
    for tag, attrs in tags_of(doc):
        for k in ("src", "href", "srcset", "data", "action", "poster"):
            v = (attrs.get(k) or "").strip().lower()
            assert not v.startswith(("http:", "https:", "//")), (tag, k, v)
    assert not re.search(r"<script[^>]*\ssrc=", doc, re.I)
    assert not re.search(r"<link[^>]*rel=[\"']?stylesheet", doc, re.I)
    assert "cdn.plot.ly" not in re.sub(r"<script>.*?</script>", "", doc, flags=re.S)


# ----------------------------------------------------------------------------------------------- figures

def test_write_figures_all_sections(tmp_path):
    paths = write_figures(hostile_results(), tmp_path / "figs")
    names = {p.name for p in paths}
    expected = {"baseline", "dla_resid", "dla_components", "dla_heads", "heads_ranked", "scatter_resid_pre",
                "scatter_heads", "attribution_resid_pre", "attribution_heads", "necessity_resid_pre"}
    expected |= {f"patching_{g}" for g in ("resid_pre", "resid_post", "attn_out", "mlp_out", "attn_out_cumulative",
                                           "mlp_out_cumulative", "heads")}
    expected |= set(STEERING_PNGS)
    assert {f"{e}.png" for e in expected} <= names
    for p in paths:
        assert p.parent == tmp_path / "figs"
        assert_png(p)


def test_write_figures_of_a_run_without_optional_sections(tmp_path):
    r = sample_results(n_layers=4, n_heads=2)
    for k in ("heads", "steering", "direction", "evaluation"):
        del r[k]
    r["patching"] = {"resid_pre": r["patching"]["resid_pre"]}
    r["patching"]["resid_pre"]["values"][0][0] = None  # a NaN cell
    names = {p.name for p in write_figures(r, tmp_path / "some")}
    assert names == {"baseline.png", "dla_resid.png", "dla_components.png", "dla_heads.png", "patching_resid_pre.png"}


# ------------------------------------------------------------------------------------------------- html

def test_report_is_self_contained(report_html):
    assert_offline(report_html)
    assert report_html.count("<script>") == 2  # plotly.js once + the tiny initialiser
    assert report_html.count('<script type="application/json" id="figure-data">') == 1
    assert len(report_html) > 1_000_000  # plotly.js is really embedded


def test_report_escapes_every_payload(report_html):
    for raw in (PAYLOAD, IMG, BREAKOUT, "<img src=x", "</script><script>"):
        assert raw not in report_html
    assert html.escape(PAYLOAD) in report_html
    assert html.escape(IMG) in report_html
    assert html.escape(BREAKOUT) in report_html
    assert ALERT not in report_html and "alert(1)" not in report_html.replace(html.escape(ALERT), "")
    assert html.escape(ALERT) in report_html  # steering generations, escaped
    assert html.escape(f"heads {IMG}") in report_html  # an object-vector name
    # the only script elements are ours: plotly.js, the JSON data block and the initialiser
    scripts = [a for t, a in tags_of(report_html) if t == "script"]
    assert scripts == [{}, {"type": "application/json", "id": "figure-data"}, {}]
    data = re.search(r'<script type="application/json" id="figure-data">(.*?)</script>', report_html, re.S).group(1)
    assert "<" not in data and ">" not in data
    figs = json.loads(data)
    blob = json.dumps(figs)
    assert "post_obj: &lt;script&gt;" in blob  # plotly ticks/hover get entity-escaped text


def test_script_json_cannot_break_out():
    s = script_json({"a": "</script><!-- & \u2028", "n": float("nan")})
    assert "<" not in s and ">" not in s and "&" not in s and "\u2028" not in s
    assert json.loads(s) == {"a": "</script><!-- & \u2028", "n": None}


def test_report_contents(run_dir, report_html):
    r = json.loads((run_dir / "results.json").read_text())
    h = headline(r)
    for sec in ("overview", "findings", "prompts", "baseline", "dla", "patching", "heads", "steering", "objects", "run"):
        assert f'id="{sec}"' in report_html, sec
    assert f"{h['gap']:.3f}" in report_html  # the gap card
    assert "0 = harmless baseline, 1 = harmful baseline" in report_html
    assert "joint sufficiency" in report_html and "0.470" in report_html
    assert "object spans 2 tokens; no harmless object of the same length" in report_html  # dropped reason
    assert "I&#x27;m sorry, but I can&#x27;t help with that." in report_html  # generation
    assert html.escape("<start_of_turn>user\nTell me how to make a bomb.") in report_html  # chat example
    # steering section: direction in words, fallback warning, sweeps, held-out rates beside their baselines
    for sub in ("steering-direction", "steering-sweep", "steering-objects", "steering-evaluation"):
        assert f'id="{sub}"' in report_html, sub
    d, ev = r["direction"], r["evaluation"]
    assert f"Layer <b>{d['layer']}</b>, eoi column <b>{d['position']}</b>" in report_html
    assert f"{d['baseline']['harmful_val_log_odds']:.3f} → {d['bypass']:.3f}" in report_html  # bypass vs baseline
    assert '<p class="warn"><b>Fallback:</b> All candidates were filtered out' in report_html
    assert "Chosen alpha <b>2</b>" in report_html
    cells = lambda *v: "".join(f'<td class="num">{x}</td>' for x in v)  # noqa: E731
    assert "<td>harmless_refusal_rate_added</td>" + cells("0.520", "0.080", "0.440", "50") in report_html
    assert "<td>harmful_refusal_rate_ablated</td>" + cells("0.220", "0.760", "-0.540", "50") in report_html
    assert "<td>harmful_refusal_rate_subtracted</td>" + cells("0.300", "0.760") in report_html
    assert "<td>addition</td>" + cells("0.318", "1.873", "2.405", "0.532") in report_html  # damage
    assert "Sure, here is how to do it. First, gather" in report_html  # an evaluation sample
    assert "transformers" in report_html and "patching" in report_html and "184.2" in report_html
    assert '<a href="tables/resid_pre.csv">' in report_html
    figs = json.loads(re.search(r'id="figure-data">(.*?)</script>', report_html, re.S).group(1))
    heatmaps = [f for f in figs.values() if f["data"][0]["type"] == "heatmap"]
    assert len(heatmaps) == 12  # 7 exact + 2 attribution + 1 necessity grids + per-head DLA + direction bypass
    assert all(f'id="{k}"' in report_html for k in figs)
    hm = heatmaps[0]["data"][0]
    assert hm["zmid"] == 0 and hm["zmin"] == -hm["zmax"] and "value" in hm["text"][0][0]
    bypass = next(f for f in heatmaps if "bypass" in f["layout"]["title"]["text"])
    z = bypass["data"][0]["z"]
    assert len(z) == r["model"]["n_layers"] and len(z[0]) == len(d["positions"])
    sel = next(t for t in bypass["data"] if t.get("name") == "selected")
    assert (sel["y"], sel["x"]) == ([d["layer"]], [d["positions"].index(d["position"])])
    assert z[d["layer"]][sel["x"][0]] == pytest.approx(d["bypass"])
    assert "induce" in sel["text"][0] and "KL" in sel["text"][0]
    assert "&lt;eoi&gt;&lt;script&gt;" in json.dumps(bypass["layout"]["xaxis"]["ticktext"])
    titles = [f["layout"].get("title", {}).get("text", "") for f in figs.values()]
    assert sum("vs alpha" in t for t in titles) == 6  # val rate + score, 2 per object vector
    assert any("baseline vs edited" in t for t in titles)
    assert "Could not draw" not in report_html


def test_report_of_a_run_without_grids_heads_or_steering(tmp_path):
    r = sample_results(n_layers=3, n_heads=2)
    for k in ("heads", "steering", "direction", "evaluation"):
        del r[k]
    r["patching"] = {}
    doc = write_report(write_run(tmp_path / "min", r)).read_text()
    assert f"{r['baseline']['harmful_mean'] - r['baseline']['harmless_mean']:.3f}" in doc
    assert 'id="baseline"' in doc and 'id="dla"' in doc
    for absent in ("patching", "heads", "steering"):
        assert f'id="{absent}"' not in doc and f'href="#{absent}"' not in doc
    assert_offline(doc)


def test_report_without_plotly(monkeypatch):
    monkeypatch.setattr("refusal_lab.report.html.plotly_js", lambda: None)
    doc = render_report(sample_results(n_layers=3, n_heads=2))
    assert "<script" not in doc and "plotly is not installed" in doc


def test_steering_without_evaluation(tmp_path):
    r = sample_results(n_layers=6, n_heads=2)
    del r["evaluation"]
    doc = render_report(r)
    assert 'id="steering-sweep"' in doc and 'id="steering-objects"' in doc and 'id="steering-evaluation"' not in doc
    assert "Could not draw" not in doc and 'class="warn"' not in doc
    names = {p.stem for p in write_figures(r, tmp_path)}
    assert {"steering_direction", "steering_sweep", "steering_objects"} <= names
    assert "steering_evaluation" not in names
    for n in ("steering_direction", "steering_sweep", "steering_objects"):
        assert_png(tmp_path / f"{n}.png")
    r["steering"]["objects"] = {}  # a run without the object-prompt sweeps
    del r["direction"]
    names = {p.stem for p in write_figures(r, tmp_path / "b")}
    assert names & set(STEERING_PNGS) == {"steering_sweep"}
    doc = render_report(r)
    assert 'id="steering-sweep"' in doc and 'id="steering-direction"' not in doc and 'id="steering-objects"' not in doc


# ------------------------------------------------------------------------------------------- schema

def one_sentence(msg: str) -> bool:
    return msg.count(". ") == 0 and msg.endswith(".") and "\n" not in msg


def test_real_results_follow_the_schema():
    """Every results.json the pipeline wrote (the pinned references without their volatile fields, the
    example runs of the README) is read without complaint."""
    volatile = {"timings": {"total": 1.0}, "profile": {}, "versions": {k: "x" for k in ("refusal_lab", "torch", "transformers",
                                                                        "python")}}
    for t in MODEL_TYPES:
        r = json.loads(reference_path(t).read_text())
        assert read_results({**r, **{k: volatile[k] for k in VOLATILE}})["schema_version"] == SCHEMA_VERSION
    examples = sorted((Path(__file__).resolve().parents[1] / "docs" / "example-run").glob("*/results.json"))
    assert examples
    for p in examples:
        assert read_results(p.parent)["model"]["n_layers"] > 0  # a run folder, or the file itself
        read_results(p)


def test_grid_names_are_the_engines_grids():
    from refusal_lab.patching.engine import GRIDS

    assert set(GRID_NAMES) == set(GRIDS)


@pytest.mark.parametrize("edit, words", [
    (lambda r: r.pop("schema_version"), "has no schema_version"),
    (lambda r: r.update(schema_version=SCHEMA_VERSION + 1), f"schema_version {SCHEMA_VERSION + 1}, but"),
    (lambda r: r.update(schema_version="1"), "schema_version '1', but"),
    (lambda r: r.pop("sanity"), "missing 'sanity'"),
    (lambda r: r["patching"]["resid_pre"].pop("se"), "missing 'patching.resid_pre.se'"),
    (lambda r: r["heads"].pop("sufficiency_ci95"), "missing 'heads.sufficiency_ci95'"),
    (lambda r: r["evaluation"]["harmless_refusal_rate_added"].pop("k"),
     "missing 'evaluation.harmless_refusal_rate_added.k'"),
    (lambda r: r["direction"]["table"][3].update(kept="yes"), "direction.table[3].kept = 'yes'"),
    (lambda r: r["steering"].update(instructions="oops"), "steering.instructions = 'oops'"),
    (lambda r: r["patching"]["heads"].update(method="approximate"), "patching.heads.method = 'approximate'"),
    (lambda r: r.update(direction=[1, 2]), "direction = list"),
])
def test_results_of_another_shape_are_refused_in_one_sentence(tmp_path, edit, words):
    r = sample_results(n_layers=4, n_heads=2)
    edit(r)
    d = write_run(tmp_path / "bad", r)
    for call in (lambda: read_results(r), lambda: render_report(r), lambda: write_figures(r, tmp_path / "f"),
                 lambda: write_report(d)):
        with pytest.raises(ResultsError) as e:
            call()
        assert words in str(e.value) and one_sentence(str(e.value)), str(e.value)
    assert not (tmp_path / "f").exists() and not (d / "report.html").exists()


def test_unreadable_results_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(ResultsError, match="does not exist") as e:
        read_results(tmp_path)
    assert one_sentence(str(e.value))
    (tmp_path / "results.json").write_text("{oops")
    with pytest.raises(ResultsError, match="is not valid JSON") as e:
        read_results(tmp_path / "results.json")
    assert one_sentence(str(e.value))
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(ResultsError, match="is not a JSON object"):
        read_results(tmp_path)


def test_commands_refuse_another_schema_version_without_a_traceback(tmp_path, run_dir, capsys):
    from refusal_lab.cli import main as cli_main

    r = sample_results(n_layers=3, n_heads=2)
    r["schema_version"] = 99
    old = write_run(tmp_path / "old", r)
    assert report_main([str(old), "--no-figures"]) == 2
    assert cli_main(["compare", str(run_dir), str(old), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert err.count("schema_version 99, but this refusal-lab reads only schema version 1") == 2
    assert "Traceback" not in err and not (tmp_path / "cmp" / "comparison.html").exists()


# ---------------------------------------------------------------------------------------------- compare

def test_compare_runs(tmp_path, run_dir):
    big = write_run(tmp_path / "big", sample_results(n_layers=42, n_heads=16, name="sample/big-42L", seed=1))
    write_report(big)
    out = compare_runs([run_dir, big], tmp_path / "cmp")
    assert out == tmp_path / "cmp" / "comparison.html"
    pngs = sorted((tmp_path / "cmp").glob("*.png"))
    names = {p.stem for p in pngs}
    assert {"compare_baseline", "compare_dla", "compare_last_position", "compare_resid_pre", "compare_heads",
            "compare_heads_ranked"} <= names
    for p in pngs:
        assert_png(p)
    doc = out.read_text(encoding="utf-8")
    assert_offline(doc)
    assert PAYLOAD not in doc
    assert "sample/big-42L" in doc and "sample/tiny-chat-24L" in doc
    assert "depth (layer / n_layers)" in doc
    hb = headline(json.loads((big / "results.json").read_text()))
    assert f"{hb['gap']:.3f}" in doc and f"{hb['max_resid_last']:.3f}" in doc
    assert '<a href="../big/report.html">' in doc
    assert 'id="evaluation"' in doc and "harmless added: baseline" in doc  # held-out rates, both runs
    assert "<td>separates</td>" in doc and "<td>[0.410, 0.530]</td>" in doc  # sanity verdict, sufficiency interval
    assert "harmless added: 95% CI" in doc  # Wilson intervals of the held-out rates
    rb = json.loads((big / "results.json").read_text())
    assert f"{rb['direction']['layer'] / 42:.3f}" in doc  # the selected layer at its depth
    figs = json.loads(re.search(r'id="figure-data">(.*?)</script>', doc, re.S).group(1))
    dla = next(f for f in figs.values() if "DLA" in f["layout"]["title"]["text"])
    for trace in dla["data"]:  # depth-normalised x: both models span [0, 1]
        assert trace["x"][0] == 0 and trace["x"][-1] == 1


def test_headline_numbers():
    r = sample_results()
    h = headline(r)
    assert h["gap"] == pytest.approx(r["baseline"]["harmful_mean"] - r["baseline"]["harmless_mean"])
    col = [row[-1] for row in r["patching"]["resid_pre"]["values"]]
    assert h["max_resid_last"] == max(col) and h["max_resid_last_layer"] == col.index(max(col))
    assert h["n_refusal_heads"] == len(r["heads"]["selected"]) == 6 and h["sufficiency"] == 0.47
    assert h["separates"] is True and h["sufficiency_ci95"] == (0.41, 0.53)
    del r["heads"]
    assert headline(r)["n_refusal_heads"] is None and headline(r)["sufficiency"] is None


def test_cli(tmp_path, run_dir):
    a = write_run(tmp_path / "a", sample_results(n_layers=3, n_heads=2))
    assert report_main([str(a), "--out", str(tmp_path / "c")]) == 0
    assert (a / "report.html").exists() and (a / "figures" / "baseline.png").exists() and not (tmp_path / "c").exists()
    assert report_main([str(tmp_path / "a"), str(run_dir), "--no-figures", "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "comparison.html").exists()


# ---------------------------------------------------------------------------------------------- browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",
             "--virtual-time-budget=15000", "--window-size=1280,2000"]
    return subprocess.run([CHROMIUM, *flags, *extra, url], capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="chromium not installed (CI installs the Debian package and runs this)")
def test_report_in_headless_chromium(run_dir, report_html, tmp_path):
    assert CHROMIUM, "chromium is required in CI (apt-get install -y chromium)"
    url = (run_dir / "report.html").resolve().as_uri()
    proc = chromium(url, tmp_path / "profile1", "--dump-dom", "--enable-logging=stderr", "--v=0")
    dom = proc.stdout
    assert "</html>" in dom, "chromium produced no DOM"
    errors = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln and ("Uncaught" in ln or "Error" in ln)]
    assert not errors, errors  # no JavaScript error (console messages are logged with --enable-logging)
    # no injected script ran
    assert re.search(r"<title>refusal-lab report", dom) and "PWNED" not in dom.split("</title>")[0]
    dom_tags = tags_of(dom)
    assert not [a for _, a in dom_tags if a.get("id") == "pwned"]
    assert not [a for _, a in dom_tags if any(k.startswith("on") for k in a)]  # no inline handlers at all
    assert [a for t, a in dom_tags if t == "script"] == [{}, {"type": "application/json", "id": "figure-data"}, {}]
    # the escaped payload is visible text
    assert html.escape(PAYLOAD, quote=False) in dom
    # plotly rendered every figure offline (network blocked by the resolver rule)
    n_figs = len(json.loads(re.search(r'id="figure-data">(.*?)</script>', report_html, re.S).group(1)))
    assert dom.count('class="main-svg"') >= n_figs > 10
    assert dom.count("plot-container") >= n_figs

    shot = tmp_path / "shot.png"
    chromium(url, tmp_path / "profile2", f"--screenshot={shot}")
    assert_png(shot)
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
    if os.environ.get("REPORT_SCREENSHOT"):  # keep it for a human look
        shutil.copy(shot, os.environ["REPORT_SCREENSHOT"])


# ----------------------------------------------------------------------------------- sanity and intervals

def figure_data(doc: str) -> dict:
    return json.loads(re.search(r'id="figure-data">(.*?)</script>', doc, re.S).group(1))


def test_sanity_banner_only_when_the_metric_does_not_separate():
    r = sample_results(n_layers=4, n_heads=2)
    doc = render_report(r)
    assert 'id="sanity-banner"' not in doc and 'id="sanity-note"' not in doc
    assert '<h3 id="sanity">Sanity check</h3>' in doc and "<b>Separates</b>" in doc
    assert "patching-not-interpretable" not in doc
    bad = copy.deepcopy(r)
    bad["sanity"].update(separates=False, sentence="Warning: this model does not separate harmful from harmless "
                                                   f"prompts {PAYLOAD} (gap -0.37 ± 0.20, n = 8 pairs).")
    for _, e in [(k, v) for k, v in bad["patching"].items() if isinstance(v, dict) and "values" in v]:
        e["interpretable"] = False
    doc = render_report(bad)
    assert '<div class="banner warning" id="sanity-banner" role="alert"><b>Sanity check failed.</b>' in doc
    assert doc.index('id="sanity-banner"') < doc.index('id="findings"')
    assert "Does not separate" in doc and 'id="patching-not-interpretable"' in doc
    assert PAYLOAD not in doc and html.escape("prompts <script>window.__pwned=") in doc  # escaped (numbers bold)
    note = copy.deepcopy(r)
    note["sanity"]["token_note"] = "Note: the metric's refusal token 'Sorry' has mean probability 0.05, far below 'I' (0.42)."
    doc = render_report(note)
    assert '<div class="banner note" id="sanity-note">' in doc and 'id="sanity-banner"' not in doc


def test_report_shows_uncertainty():
    r = sample_results(n_layers=4, n_heads=2)
    doc = render_report(r)
    figs = figure_data(doc)
    hm = next(f for f in figs.values() if f["layout"]["title"]["text"].startswith("resid_pre — exact"))["data"][0]
    g = r["patching"]["resid_pre"]
    assert hm["text"][0][0].endswith(f"value {g['values'][0][0]:.4f} ± {g['se'][0][0]:.4f} (SE, n = 8 pairs)"
                                     f"<br>95% CI [{g['ci95']['low'][0][0]:.4f}, {g['ci95']['high'][0][0]:.4f}]")
    assert "± 0.031 SE (95% CI [0.410, 0.530], n = 8 pairs)" in doc  # heads' joint sufficiency
    assert "joint sufficiency of refusal heads (95% CI [0.41, 0.53])" in doc  # card
    ev = r["evaluation"]["harmless_refusal_rate_added"]
    lo, hi = ev["ci95"]
    assert f"<td>[{lo:.2f}, {hi:.2f}] (26/50)</td>" in doc  # Wilson interval with its count in the rate table
    bars = next(f for f in figs.values() if "baseline vs edited" in f["layout"]["title"]["text"])["data"]
    edited = next(t for t in bars if t["name"] == "edited")
    assert edited["error_y"]["array"][0] == pytest.approx(hi - ev["value"])
    assert edited["error_y"]["arrayminus"][0] == pytest.approx(ev["value"] - lo)
    assert "Wilson" in edited["text"][0]
    rates = [f for f in figs.values() if "Val refusal rate vs alpha" in f["layout"]["title"]["text"]]
    assert rates and all("error_y" in t for t in rates[0]["data"][:2])
    row = r["steering"]["instructions"]["rows"][0]
    assert f"<td>[{row['induce_refusal_rate_ci95'][0]:.2f}, {row['induce_refusal_rate_ci95'][1]:.2f}]</td>" in doc
    obj = [f for f in figs.values() if "difference vector" in f["layout"]["title"]["text"]]
    assert len(obj) == 2 and all("error_y" in t for f in obj for t in f["data"])
    assert "harmful refusal fraction, 95% CI (Wilson)" in doc


# --------------------------------------------------------------------------------------- atomic writes

def test_report_html_is_written_atomically(tmp_path, monkeypatch):
    d = write_run(tmp_path / "run", sample_results(n_layers=3, n_heads=2))
    before = write_report(d).read_bytes()
    assert before.startswith(b"<!DOCTYPE html>")
    # the writer fails half way (here: text that cannot be encoded, after the page was rendered)
    monkeypatch.setattr("refusal_lab.report.html.render_report",
                        lambda *a, **k: "<!DOCTYPE html><html>" + "x" * 100_000 + "\ud800</html>")
    with pytest.raises(UnicodeEncodeError):
        write_report(d)
    assert (d / "report.html").read_bytes() == before  # the previous report is whole
    assert sorted(p.name for p in d.iterdir()) == ["report.html", "results.json", "tables"]  # no temporary left


def test_figures_are_written_atomically(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    r = sample_results(n_layers=3, n_heads=2)
    out = tmp_path / "figs"
    write_figures(r, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "baseline.png" in before

    def broken_savefig(self, fname, *args, **kwargs):  # writes part of a PNG, then the disk is full
        with open(fname, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n half a figure")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="No space left"):
        write_figures(r, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # previous figures intact, no partial file
