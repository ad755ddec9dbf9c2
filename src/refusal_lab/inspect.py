"""`refusal-lab inspect`: what the model and the prompts look like before a run."""

from __future__ import annotations

from pathlib import Path

import torch

from refusal_lab.metrics import resolve_refusal_tokens
from refusal_lab.models.hooked import BLOCK_SITES, HookedChatModel
from refusal_lab.prompts import build_object_prompts, load_objects


@torch.no_grad()
def inspect_model(model: HookedChatModel, objects=None, template=None, mode="single_token",
                  refusal="Sorry", compliance="Sure", top_k: int = 5) -> dict:
    tok = model.tokenizer
    prompts = build_object_prompts(tok, load_objects(objects), template=template, mode=mode)
    tokens = resolve_refusal_tokens(tok, refusal, compliance)
    info = {
        "model": model.cfg.to_dict(),
        "source": model_source(model),
        "sites": {"global": ["hook_embed", "ln_final.hook_normalized"],
                  "per_block": [f"blocks.{{l}}.{s}" for s in BLOCK_SITES], "n_layers": model.cfg.n_layers},
        "tokens": {"refusal": {"str": tokens.refusal_str, "id": tokens.refusal_id},
                   "compliance": {"str": tokens.compliance_str, "id": tokens.compliance_id}},
        "prompts": {"template": prompts.template, "mode": prompts.mode, "seq_len": prompts.seq_len,
                    "obj_index": prompts.obj_index, "example": prompts.harmful_texts[0],
                    "columns": [{"index": p.index, "label": p.label, "token": p.token} for p in prompts.positions]},
        "dropped": prompts.dropped,
        "objects": {},
    }
    for side in ("harmful", "harmless"):
        ids, mask = prompts.ids(side).to(model.device), prompts.mask(side).to(model.device)
        logits = model(ids, mask, logits="last").float()
        scores = logits[:, tokens.refusal_id] - logits[:, tokens.compliance_id]
        probs = logits.softmax(-1)
        rows = []
        for i, obj in enumerate(getattr(prompts, f"{side}_objects")):
            top = probs[i].topk(top_k)
            rows.append({"object": obj, "score": float(scores[i]),
                         "tokens": prompts.tokens_str(side, i), "labels": prompts.prompt_labels(side, i),
                         "top_next_tokens": [[tok.decode([int(t)]), float(p)] for p, t in zip(top.values, top.indices)]})
        info["objects"][side] = {"mean_score": float(scores.mean()), "prompts": rows}
    return info


def model_source(model: HookedChatModel) -> dict:
    """Where the weights were read from: the folder or hub id, and for a converted folder (an
    offline model or a user ``.gguf``) which offline model or GGUF file it holds."""
    from refusal_lab.models.offline import OFFLINE_MODELS, read_source_info

    path = str(getattr(getattr(model.hf_model, "config", None), "_name_or_path", "") or "")
    marker = (read_source_info(Path(path)) if path and Path(path).is_dir() else None) or {}
    offline = marker.get("offline_model")
    if offline is None and marker.get("gguf_sha256"):  # folders cached before the marker named it
        offline = next((m.name for m in OFFLINE_MODELS.values() if m.gguf_sha256 == marker["gguf_sha256"]), None)
    return {"path": path, "local": bool(path) and Path(path).exists(), "offline_model": offline,
            "gguf_file": marker.get("gguf_file"), "gguf_sha256": marker.get("gguf_sha256"),
            "origin": marker.get("source")}


def format_source(src: dict) -> str:
    if src.get("offline_model"):
        return f"offline model {src['offline_model']} (registry packages), cached in {src['path']}"
    if src.get("gguf_file"):
        return f"converted from {src.get('origin') or src['gguf_file']}, cached in {src['path']}"
    return f"{src['path']}" + ("" if src.get("local") else " (hub)")


def format_inspect(info: dict) -> str:
    m = info["model"]
    lines = [f"model      {m['model_name']} ({m['model_type']}): {m['n_layers']} layers, d_model {m['d_model']}, "
             f"{m['n_heads']} heads ({m['n_key_value_heads']} kv) of {m['d_head']}, vocab {m['d_vocab']}, {m['dtype']} on {m['device']}",
             *([f"weights    {format_source(info['source'])}"] if info.get("source", {}).get("path") else []),
             f"sites      {', '.join(info['sites']['global'])}, " + ", ".join(info["sites"]["per_block"]),
             f"metric     logit[{info['tokens']['refusal']['str']!r}] - logit[{info['tokens']['compliance']['str']!r}]"
             f" (ids {info['tokens']['refusal']['id']}, {info['tokens']['compliance']['id']})",
             f"prompts    {info['prompts']['mode']}, {info['prompts']['seq_len']} tokens, object at column {info['prompts']['obj_index']}",
             "columns    " + " ".join(f"{c['index']}:{c['label']}={c['token']!r}" for c in info["prompts"]["columns"]
                                     if c["index"] >= info["prompts"]["obj_index"] - 2)]
    for d in info["dropped"]:
        lines.append(f"dropped    {d['side']} {d['object']!r}: {d['reason']}")
    for side, data in info["objects"].items():
        lines.append(f"{side:<10} mean score {data['mean_score']:+.3f}")
        for r in data["prompts"]:
            top = ", ".join(f"{t!r} {p:.2f}" for t, p in r["top_next_tokens"][:3])
            lines.append(f"  {r['object']:<18} {r['score']:+7.3f}   next: {top}")
    return "\n".join(lines)
