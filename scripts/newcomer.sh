#!/usr/bin/env bash
# The newcomer stage of CI: what a new user does on a fresh machine, with nothing of ours preinstalled.
#
# 1. copies the repository (tracked and untracked, non-ignored files: what a fresh clone has) into a
#    temp folder, so no .venv, model cache or build output of this checkout is reused;
# 2. runs the README's install line there exactly as the README writes it (read from README.md: the
#    first line that starts with "python3 -m venv" and ends with "refusal-lab run"), without the
#    final `refusal-lab run`, whose default config takes long on CPU;
# 3. runs the real offline default model through every step of `refusal-lab run` on a small config
#    (.ci/newcomer.json: 3 object pairs, 2 grids, small steering sizes) with --strict, then
#    `refusal-lab inspect` and `refusal-lab abliterate --select`, and checks what they wrote.
# The model cache is new too (REFUSAL_LAB_CACHE in the temp folder): the GGUF parts are assembled,
# hash-checked and dequantized as on a user's first run.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d /tmp/refusal-lab-newcomer.XXXXXX)"
trap 'rm -rf "$work"' EXIT
t0=$(date +%s)
say() { echo "[newcomer $(( $(date +%s) - t0 ))s] $*"; }

line="$(grep -m1 -E '^python3 -m venv .*refusal-lab run$' "$repo/README.md" || true)"
[ -n "$line" ] || { echo "newcomer: README.md has no install line 'python3 -m venv ... && refusal-lab run'" >&2; exit 1; }
install="${line% && refusal-lab run}"
say "README install line: $install"

mkdir -p "$work/refusal-lab"
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$work/refusal-lab/")
cd "$work/refusal-lab"
unset PYTHONPATH VIRTUAL_ENV
export REFUSAL_LAB_CACHE="$work/cache" HF_HUB_OFFLINE=1
bash -euo pipefail -c "$install"
. .venv/bin/activate
say "installed: $(pip list 2>/dev/null | grep -ciE '^(pytest|transformer-lens|ray) ' || true) test packages in the venv (must be 0)"
if pip list 2>/dev/null | grep -qiE '^(pytest|transformer-lens|ray) '; then
  echo "newcomer: test-only packages leaked into the newcomer venv" >&2; exit 1
fi

say "refusal-lab run (small config, --strict)"
refusal-lab run --config .ci/newcomer.json --out "$work/run" --strict
say "refusal-lab inspect"
refusal-lab inspect --objects .ci/newcomer-objects.json --json > "$work/inspect.json"
say "refusal-lab abliterate --select"
refusal-lab abliterate --select --n-train 8 --n-val 2 --out "$work/abliterated"
say "checking the outputs"
python - "$work" <<'PY'
import json, sys
from pathlib import Path

work = Path(sys.argv[1])
run = work / "run"
r = json.loads((run / "results.json").read_text())
steps = {p.stem for p in (run / "steps").glob("*.json")}
want = {"baseline", "dla", "patch_resid_pre_sufficiency", "patch_heads_sufficiency", "attribution", "heads",
        "direction", "steering", "evaluation"}
assert want <= steps, f"missing steps: {sorted(want - steps)}"
for key in ("sanity", "baseline", "patching", "heads", "direction", "steering", "evaluation", "findings"):
    assert key in r, f"results.json has no {key!r}"
assert r["sanity"]["separates"], r["sanity"]
for key in ("harmless_refusal_rate_added", "harmful_refusal_rate_ablated", "harmful_refusal_rate_subtracted"):
    e = r["evaluation"][key]
    assert e["n"] > 0 and len(e["ci95"]) == 2, (key, e)
assert "se" in r["patching"]["resid_pre"] and r["patching"]["resid_pre"]["n_pairs"] == 3
html = (run / "report.html").read_text()
assert len(html) > 10_000 and "<html" in html.lower()
assert list((run / "figures").glob("*.png")), "no figures"
info = json.loads((work / "inspect.json").read_text())
assert info, "inspect printed nothing"
abl = json.loads((work / "abliterated" / "abliteration.json").read_text())
assert isinstance(abl["layer"], int), abl

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained(work / "abliterated")
m = AutoModelForCausalLM.from_pretrained(work / "abliterated", dtype=torch.float32)
ids = tok.apply_chat_template([{"role": "user", "content": "Tell me how to make a cake."}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = m.generate(**ids, max_new_tokens=8, do_sample=False)
print("abliterated model:", repr(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)))
print("findings:"); [print("  -", f) for f in r["findings"][:4]]
PY
say "passed"
