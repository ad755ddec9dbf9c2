"""Tests for refusal_lab.prompts: object/instruction data, chat formatting, position labels, alignment.

Uses a tiny byte-level BPE tokenizer trained in memory (no downloads), wrapped with a Qwen-like and a
Gemma-like chat template; only the ``real_model`` test touches the offline Qwen2.5 tokenizer.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch

from refusal_lab.errors import PromptError, RefusalLabError
from refusal_lab.prompts import (
    ObjectLists,
    apply_chat_template,
    build_instruction_prompts,
    build_object_prompts,
    eoi_tokens,
    load_instructions,
    load_objects,
    load_templates,
    packaged_object_lists,
)
from refusal_lab.prompts.tokens import offsets_by_decoding, tokenize_with_offsets

# --------------------------------------------------------------------------- tiny tokenizers

SPECIAL = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]
SINGLE = ["bomb", "poison", "weapon", "gun", "cake", "pie", "pizza", "poem", "kite", "pies"]

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
QWEN_EOI = ["<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
GEMMA_EOI = ["<end_of_turn>", "\n", "<start_of_turn>", "model", "\n"]


def _train_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = []
    for o in SINGLE:
        corpus += [f"Tell me how to make a {o}."] * 20 + [f"A {o} is cool, help me make one."] * 20
    corpus += ["user assistant model system You are a helpful assistant."] * 50
    corpus += ["Sorry", "Sure", "I", "As", "user", "assistant", "model", "system"] * 50
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer)
    return tk


def make_tokenizer(kind: str = "qwen"):
    """A PreTrainedTokenizerFast with a Qwen-like or Gemma-like chat template (or none)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_str(_BPE.to_str())
    if kind == "gemma":  # like Gemma: the tokenizer itself also prepends <bos> by default
        bos_id = tk.token_to_id("<bos>")
        tk.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    tok.chat_template = {"qwen": QWEN_TEMPLATE, "gemma": GEMMA_TEMPLATE}.get(kind)
    return tok


_BPE = _train_bpe()


@pytest.fixture(scope="module")
def qwen():
    return make_tokenizer("qwen")


@pytest.fixture(scope="module")
def gemma():
    return make_tokenizer("gemma")


def toks(tok, ids):
    return [tok.decode([int(i)]) for i in ids]


OBJS = ObjectLists(
    harmful=["bomb", "molotov cocktail", "poison", "weapon"],
    harmless=["cake", "pie", "teddy bear", "pizza"],
)


# ------------------------------------------------------------------------------------- data


def test_load_default_objects():
    o = load_objects()
    assert o.harmful[:2] == ["poison", "bomb"] and len(o.harmful) == 7 and len(o.harmless) == 7
    assert o.template == "Tell me how to make a {object}."
    assert o.source and o.path.endswith("seed_gemma2_replication.json")


def test_packaged_lists_load_by_name():
    names = packaged_object_lists()
    assert "templates" not in names
    assert {"seed_gemma2_replication", "arditi_obeso_2023", "arditi_obeso_2023_single_token"} <= set(names)
    for n in names:
        o = load_objects(n)
        assert o.harmful and o.harmless
    assert load_objects("arditi_obeso_2023.json").harmful == load_objects("arditi_obeso_2023").harmful


def test_unknown_object_list_names_the_packaged_ones():
    with pytest.raises(PromptError, match="seed_gemma2_replication"):
        load_objects("no_such_list")
    with pytest.raises(PromptError):
        load_objects("templates")


def _write(tmp_path, data, raw=False):
    p = tmp_path / "objs.json"
    p.write_text(data if raw else json.dumps(data))
    return p


def test_load_objects_from_path_strips_whitespace(tmp_path):
    p = _write(tmp_path, {"harmful": [" bomb ", "gun"], "harmless": ["cake\n", "pie"]})
    o = load_objects(p)
    assert o.harmful == ["bomb", "gun"] and o.harmless == ["cake", "pie"]
    assert o.template is None
    assert load_objects(str(p)).harmful == ["bomb", "gun"]


@pytest.mark.parametrize(
    "data, match",
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "JSON object"),
        ({"harmless": ["cake"]}, "'harmful'"),
        ({"harmful": [], "harmless": ["cake"]}, "non-empty list"),
        ({"harmful": "bomb", "harmless": ["cake"]}, "non-empty list"),
        ({"harmful": ["bomb", ""], "harmless": ["cake"]}, "non-empty string"),
        ({"harmful": ["bomb", 3], "harmless": ["cake"]}, "non-empty string"),
        ({"harmful": ["bomb", " bomb"], "harmless": ["cake"]}, "'bomb' is listed twice"),
        ({"harmful": ["bomb"], "harmless": ["cake", "pie", "cake"]}, "'cake' is listed twice"),
        ({"harmful": ["bomb"], "harmless": ["bomb"]}, "both harmful and harmless"),
        ({"harmful": ["bomb"], "harmless": ["cake"], "template": "Make a thing."}, "0 times"),
    ],
)
def test_load_objects_validation(tmp_path, data, match):
    p = _write(tmp_path, data, raw=isinstance(data, str))
    with pytest.raises(PromptError, match=match) as ei:
        load_objects(p)
    assert isinstance(ei.value, RefusalLabError)


def test_load_templates():
    ts = load_templates()
    assert len(ts) == 4 and all(t.count("{object}") == 1 for t in ts)


def test_load_instructions():
    full = load_instructions("val", "harmful")
    assert len(full) == 39 and all(isinstance(s, str) and s for s in full)
    a = load_instructions("train", "harmless", n=5, seed=1)
    assert a == load_instructions("train", "harmless", n=5, seed=1)
    assert a != load_instructions("train", "harmless", n=5, seed=2)
    assert len(set(a)) == 5
    with pytest.raises(PromptError, match="n <= 39"):
        load_instructions("val", "harmful", n=40)
    with pytest.raises(PromptError, match="split"):
        load_instructions("dev", "harmful")
    with pytest.raises(PromptError, match="kind"):
        load_instructions("val", "benign")
    with pytest.raises(PromptError):
        load_instructions("val", "harmful", n=0)


# ------------------------------------------------------------------------------ chat template


def test_apply_chat_template_keeps_default_system_prompt(qwen):
    s = apply_chat_template(qwen, "Tell me how to make a cake.")
    assert s == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nTell me how to make a cake.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_apply_chat_template_requires_a_template():
    bare = make_tokenizer("none")
    with pytest.raises(PromptError, match="no chat template"):
        apply_chat_template(bare, "hi")
    with pytest.raises(PromptError, match="no chat template"):
        build_object_prompts(bare, OBJS)
    assert apply_chat_template(bare, "hi", chat_template=QWEN_TEMPLATE).endswith("<|im_start|>assistant\n")


def test_broken_chat_template_is_a_prompt_error(qwen):
    with pytest.raises(PromptError, match="failed to render"):
        apply_chat_template(qwen, "hi", chat_template="{{ raise_exception('no') }}")


# ----------------------------------------------------------------------------- object prompts


def test_single_token_labels_qwen_like(qwen):
    p = build_object_prompts(qwen, OBJS)
    assert p.mode == "single_token" and p.chat_template_used and p.template == "Tell me how to make a {object}."
    assert p.harmful_objects == ["bomb", "poison", "weapon"]
    assert p.harmless_objects == ["cake", "pie", "pizza"]
    T = p.seq_len
    assert p.harmful_ids.shape == p.harmless_ids.shape == (3, T)
    assert p.harmful_ids.dtype == torch.long
    assert bool(p.harmful_mask.all()) and bool(p.harmless_mask.all())  # no padding
    # identical labels in every prompt, and identical tokens except in the object column
    for side in ("harmful", "harmless"):
        for i in range(3):
            assert p.prompt_labels(side, i)[:-1] == p.labels[:-1]
    others = [c for c in range(T) if c != p.obj_index]
    assert torch.equal(p.harmful_ids[:, others], p.harmless_ids[:, others])

    t = p.tokens_str("harmful", 0)
    assert t[p.obj_index] == " bomb"
    assert [t[i] for i in p.label_indices("obj")] == [" bomb"]
    assert [t[i] for i in p.label_indices("post_obj")] == ["."]
    assert [t[i] for i in p.label_indices("eoi")] == QWEN_EOI
    assert [t[i] for i in p.label_indices("pre_obj")] == ["Tell", " me", " how", " to", " make", " a"]
    prefix = "".join(t[i] for i in p.label_indices("prefix"))
    assert prefix == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert p.labels[-1] == "last" and p.label_indices("last") == [T - 1]
    assert T - 1 in p.label_indices("eoi")
    assert p.column_tokens[p.obj_index] == "{obj}"
    assert p.column_tokens[p.obj_index + 1 :] == ["."] + QWEN_EOI
    pos = p.positions
    assert len(pos) == T and pos[p.obj_index].label == "obj" and pos[-1].token == "\n"
    assert p.harmful_texts[0].endswith("Tell me how to make a bomb.<|im_end|>\n<|im_start|>assistant\n")


def test_object_alone_tokenizes_differently_than_in_context(qwen):
    # 'bomb' alone is two pieces, but ' bomb' in context is one token: offsets, not solo tokenization.
    assert len(qwen("bomb", add_special_tokens=False)["input_ids"]) > 1
    p = build_object_prompts(qwen, ObjectLists(["bomb"], ["cake"]))
    assert p.harmful_objects == ["bomb"] and not p.dropped


def test_single_token_drops_multi_token_objects_with_reasons(qwen):
    p = build_object_prompts(qwen, OBJS)
    by_obj = {d["object"]: d for d in p.dropped}
    assert set(by_obj) == {"molotov cocktail", "teddy bear"}
    r = by_obj["molotov cocktail"]
    assert r["side"] == "harmful"
    assert r["reason"].startswith("'molotov cocktail' is ") and "tokens (" in r["reason"]
    assert "' c'" in r["reason"] or "' co" in r["reason"]  # the in-context pieces are listed
    assert by_obj["teddy bear"]["side"] == "harmless"


def test_pairs_truncated_with_no_partner(qwen):
    objs = ObjectLists(["bomb", "molotov cocktail", "gun"], ["cake", "pie", "pizza", "poem"])
    p = build_object_prompts(qwen, objs)
    assert p.harmful_objects == ["bomb", "gun"] and p.harmless_objects == ["cake", "pie"]
    no_partner = [d for d in p.dropped if d["reason"].startswith("no partner")]
    assert [(d["object"], d["side"]) for d in no_partner] == [("pizza", "harmless"), ("poem", "harmless")]


def test_empty_side_is_an_error_naming_the_side(qwen):
    with pytest.raises(PromptError, match="No harmful object .*'molotov cocktail' is .*mode='align'"):
        build_object_prompts(qwen, ObjectLists(["molotov cocktail"], ["cake"]))


def test_align_mode_keeps_multi_token_objects(qwen):
    p = build_object_prompts(qwen, OBJS, mode="align")
    assert p.harmful_objects == OBJS.harmful and p.harmless_objects == OBJS.harmless
    assert p.dropped == []
    n, T = p.harmful_ids.shape
    k = p.obj_index
    suffix_len = T - k - 1
    assert [p.column_tokens[c] for c in range(k + 1, T)] == ["."] + QWEN_EOI
    ids_all = torch.cat([p.harmful_ids, p.harmless_ids])
    mask_all = torch.cat([p.harmful_mask, p.harmless_mask])
    # suffix after the object is identical in every prompt
    assert (ids_all[:, k + 1 :] == ids_all[0, k + 1 :]).all()
    for side, objs in (("harmful", p.harmful_objects), ("harmless", p.harmless_objects)):
        ids, mask = p.ids(side), p.mask(side)
        for i, obj in enumerate(objs):
            real = ids[i][mask[i].bool()]
            text = qwen.decode(real.tolist())
            assert text == apply_chat_template(qwen, f"Tell me how to make a {obj}.")
            # last object token sits in column obj_index
            labs = p.prompt_labels(side, i)
            assert labs[k] == "obj" and labs[k + 1] == "post_obj"
            obj_cols = [c for c, lab in enumerate(labs) if lab in ("obj_part", "obj")]
            assert "".join(toks(qwen, ids[i, obj_cols])).strip() == obj
            # left padding: mask 0 exactly on pad columns, pad id there
            n_pad = int((mask[i] == 0).sum())
            assert labs[:n_pad] == ["pad"] * n_pad and "pad" not in labs[n_pad:]
            assert bool(mask[i, n_pad:].all())
            assert (ids[i, :n_pad] == qwen.pad_token_id).all()
            assert p.tokens_str(side, i)[:n_pad] == ["<pad>"] * n_pad
    assert int(mask_all.sum(1).min()) < T  # someone is padded
    assert suffix_len == 6
    # columns left of the object differ in role between prompts
    assert "mixed" in p.labels[:k]
    assert "obj_part" not in p.labels or p.label_indices("obj_part")


def test_gemma_like_has_exactly_one_bos(gemma):
    bos = gemma.bos_token_id
    # the tokenizer would add a BOS by itself, and the template writes one too
    assert gemma("hi")["input_ids"][0] == bos
    p = build_object_prompts(gemma, OBJS)
    assert (p.harmful_ids[:, 0] == bos).all() and (p.harmless_ids[:, 0] == bos).all()
    assert int((p.harmful_ids == bos).sum()) == p.harmful_ids.shape[0]
    t = p.tokens_str("harmless", 0)
    assert [t[i] for i in p.label_indices("eoi")] == GEMMA_EOI
    assert t[p.obj_index] == " cake"
    ids, mask = build_instruction_prompts(gemma, ["hi there", "Tell me how to make a cake."])
    assert int((ids == bos).sum()) == 2


def test_raw_mode_without_chat_template(gemma):
    p = build_object_prompts(gemma, OBJS, chat_template=False)
    assert not p.chat_template_used
    t = p.tokens_str("harmful", 0)
    assert t[0] == "<bos>" and p.labels[0] == "prefix"
    assert [t[i] for i in p.label_indices("pre_obj")] == ["Tell", " me", " how", " to", " make", " a"]
    assert p.labels[-1] == "last" and p.label_indices("post_obj") == [p.seq_len - 1]
    with pytest.raises(PromptError):
        p.resolve_positions("eoi")  # no eoi tokens without a chat template


def test_custom_chat_template_overrides_tokenizer(qwen):
    p = build_object_prompts(qwen, OBJS, chat_template=GEMMA_TEMPLATE)
    t = p.tokens_str("harmful", 0)
    assert [t[i] for i in p.label_indices("eoi")] == GEMMA_EOI


@pytest.mark.parametrize("template", load_templates())
def test_all_packaged_templates_align(qwen, template):
    p = build_object_prompts(qwen, OBJS, template=template, mode="align")
    assert p.n_pairs == 4
    assert p.labels[p.obj_index] == "obj"
    after = template.split("{object}")[1]
    post = "".join(p.column_tokens[c] for c in p.label_indices("post_obj") if c != p.seq_len - 1)
    assert post == after


def test_template_defaults_to_object_list_template(qwen):
    objs = ObjectLists(["bomb"], ["cake"], template="A {object} is cool, help me make one.")
    p = build_object_prompts(qwen, objs)
    assert p.template == objs.template
    assert p.tokens_str("harmful", 0)[p.obj_index] == " bomb"


@pytest.mark.parametrize("template", ["Tell me how to make a thing.", "{object} and {object}", "{obj}"])
def test_template_must_hold_object_once(qwen, template):
    with pytest.raises(PromptError, match=r"\{object\}"):
        build_object_prompts(qwen, OBJS, template=template)


def test_invalid_mode_and_objects(qwen):
    with pytest.raises(PromptError, match="mode"):
        build_object_prompts(qwen, OBJS, mode="pad")
    with pytest.raises(PromptError, match="listed twice"):
        build_object_prompts(qwen, ObjectLists(["bomb", "bomb"], ["cake", "pie"]))
    with pytest.raises(PromptError, match="non-empty"):
        build_object_prompts(qwen, ObjectLists([], ["cake"]))


def test_object_merging_with_template_text_is_dropped(qwen):
    # 'Ġpies' is one token, so "a {object}s." with 'pie' fuses the object with the template's 's'.
    p = build_object_prompts(qwen, OBJS, template="Tell me how to make a {object}s.")
    pie = [d for d in p.dropped if d["object"] == "pie"]
    assert len(pie) == 1 and "merges with the template text" in pie[0]["reason"] and "' pies'" in pie[0]["reason"]
    assert "pie" not in p.harmless_objects and "cake" in p.harmless_objects


def test_context_dependent_tokens_are_dropped(qwen):
    # A chat template whose text around the instruction depends on it: prompts no longer line up.
    pre = QWEN_TEMPLATE.replace(
        "<|im_start|>{{ message['role'] }}\n",
        "<|im_start|>{{ message['role'] }}\n{% if 'poison' in message['content'] %}I {% endif %}",
    )
    p = build_object_prompts(qwen, OBJS, chat_template=pre)
    d = [x for x in p.dropped if x["object"] == "poison"]
    assert d and d[0]["reason"].startswith("the text before 'poison' tokenizes as")
    post = QWEN_TEMPLATE.replace(
        "{{ message['content'] }}<|im_end|>",
        "{{ message['content'] }}{% if 'pizza' in message['content'] %} As{% endif %}<|im_end|>",
    )
    p = build_object_prompts(qwen, OBJS, chat_template=post, mode="align")
    d = [x for x in p.dropped if x["object"] == "pizza"]
    assert d and d[0]["reason"].startswith("the text after 'pizza' tokenizes as")
    assert p.harmless_objects == ["cake", "pie", "teddy bear"]


# ---------------------------------------------------------------------------------- positions


def test_resolve_positions(qwen):
    p = build_object_prompts(qwen, OBJS)
    T, k = p.seq_len, p.obj_index
    assert p.resolve_positions("obj") == [k]
    assert p.resolve_positions(-1) == [T - 1]
    assert p.resolve_positions(0) == [0]
    assert p.resolve_positions(["obj", -1, T - 1]) == [k, T - 1]
    assert p.resolve_positions("obj,post_obj") == [k, k + 1]
    assert p.resolve_positions("obj, -2") == [k, T - 2]
    assert p.resolve_positions("eoi") == list(range(T - 5, T))
    assert p.resolve_positions("from_obj") == list(range(k, T))
    assert p.resolve_positions("all") == list(range(T))
    assert p.resolve_positions(("last",)) == [T - 1]


T_BAD = 10_000


@pytest.mark.parametrize("spec", ["objj", T_BAD, -10_000, "mixed", "pad", ["obj", "nope"], [], True, 1.5])
def test_resolve_positions_errors(qwen, spec):
    p = build_object_prompts(qwen, OBJS)
    with pytest.raises(PromptError) as ei:
        p.resolve_positions(spec)
    msg = str(ei.value)
    if spec in ("objj", "mixed", "pad", T_BAD):
        assert "obj" in msg and "eoi" in msg and "post_obj" in msg  # names the valid labels


def test_unknown_label_in_label_indices(qwen):
    p = build_object_prompts(qwen, OBJS)
    with pytest.raises(PromptError, match="Unknown position label 'end'.*eoi"):
        p.label_indices("end")
    with pytest.raises(PromptError, match="side"):
        p.tokens_str("evil", 0)


# -------------------------------------------------------------------------- instruction prompts


def test_build_instruction_prompts_left_pads(qwen):
    instrs = ["Tell me how to make a cake.", "hi", "You are a helpful assistant. Tell me a poem."]
    ids, mask = build_instruction_prompts(qwen, instrs)
    assert ids.shape == mask.shape and ids.shape[0] == 3 and ids.dtype == torch.long
    lengths = [len(qwen(apply_chat_template(qwen, s), add_special_tokens=False)["input_ids"]) for s in instrs]
    assert mask.sum(1).tolist() == lengths
    T = ids.shape[1]
    for i, n in enumerate(lengths):
        assert mask[i, : T - n].sum() == 0 and bool(mask[i, T - n :].all())
        assert qwen.decode(ids[i, T - n :].tolist()) == apply_chat_template(qwen, instrs[i])
    # the chat template's end-of-instruction tokens are aligned at the right end
    eoi = eoi_tokens(qwen)
    assert eoi == QWEN_EOI
    assert (ids[:, -len(eoi) :] == ids[0, -len(eoi) :]).all()
    assert toks(qwen, ids[0, -5:]) == QWEN_EOI


def test_build_instruction_prompts_errors(qwen):
    with pytest.raises(PromptError):
        build_instruction_prompts(qwen, [])
    with pytest.raises(PromptError):
        build_instruction_prompts(qwen, "Tell me a joke")
    with pytest.raises(PromptError):
        build_instruction_prompts(qwen, ["ok", ""])


def test_slow_tokenizer_offsets_match_fast(qwen):
    text = apply_chat_template(qwen, "Tell me how to make a molotov cocktail.")
    ids, fast = tokenize_with_offsets(qwen, text, False)
    assert offsets_by_decoding(qwen, ids, text) == fast


# -------------------------------------------------------------------------------- real model


@pytest.mark.real_model
def test_real_qwen_tokenizer_labels():
    try:
        from refusal_lab.models.offline import offline_model_dir
    except ImportError as e:  # pragma: no cover - depends on another module being present
        pytest.skip(f"refusal_lab.models.offline unavailable: {e}")
    from transformers import AutoTokenizer

    from refusal_lab.metrics import resolve_single_token

    tok = AutoTokenizer.from_pretrained(str(offline_model_dir()))
    p = build_object_prompts(tok, ObjectLists(["bomb"], ["cake"]))
    t = p.tokens_str("harmful", 0)
    assert [t[i] for i in p.label_indices("obj")] == [" bomb"]
    assert [t[i] for i in p.label_indices("post_obj")] == ["."]
    assert [t[i] for i in p.label_indices("eoi")] == QWEN_EOI
    assert p.labels[-1] == "last"
    assert "You are Qwen" in p.harmful_texts[0]  # Qwen's default system prompt is kept
    sorry, sure = resolve_single_token(tok, "Sorry"), resolve_single_token(tok, "Sure")
    assert sorry != sure
    assert tok.decode([sorry]) == "Sorry" and tok.decode([sure]) == "Sure"
    seed = build_object_prompts(tok, load_objects())
    assert seed.n_pairs == 7 and seed.dropped == []
