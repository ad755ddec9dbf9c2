"""Property tests: random user input either works or raises ``RefusalLabError`` (never a crash).

Random object lists (arbitrary unicode, empties, duplicates, non-strings, nested values), random
templates (with/without ``{object}``, several placeholders, stray braces) and random config dicts
(unknown keys, wrong types) are thrown at ``validate_objects``, ``load_objects`` (through a JSON
file), ``build_object_prompts`` (with the tiny chat tokenizer) and ``RunConfig.from_dict``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refusal_lab.errors import RefusalLabError
from refusal_lab.prompts.builder import build_object_prompts
from refusal_lab.prompts.data import ObjectLists, load_objects, validate_objects, validate_template
from refusal_lab.run.config import RunConfig
from tests.helpers_tiny_chat import WORDS, tiny_chat_tokenizer

TOKENIZER = tiny_chat_tokenizer()  # built once for the module
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

# ---------------------------------------------------------------------------------- strategies

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
known_words = st.sampled_from(WORDS + ["bomb", "cake", "pie", "poison", "kite"])
object_strings = st.one_of(
    known_words,
    st.text(max_size=10),  # arbitrary unicode, including "" and whitespace
    st.sampled_from(["", " ", "\n", "{object}", "{", "}", "<|im_end|>", "a b", " bomb "]),
)
object_items = st.one_of(object_strings, object_strings, json_values)
object_sides = st.one_of(
    st.lists(object_items, max_size=5),
    st.lists(known_words, min_size=1, max_size=4),  # duplicates likely
    json_values,
)
templates = st.one_of(
    st.none(),
    st.builds(lambda a, b: f"{a}{{object}}{b}", st.text(max_size=12), st.text(max_size=12)),
    st.sampled_from([
        "Tell me how to make a {object}.", "{object}", "{object}{object}", "Tell me {object} and {object}.",
        "no placeholder", "", "{obj}", "{{object}}", "{ {object} }", "{object", "}{object}{", "  {object}  ",
        "Tell me how to make a {object}.<|im_end|>", "{0} {object} {}", "\n{object}\n",
    ]),
    st.text(max_size=20),
    json_scalars,
)
config_keys = st.sampled_from([
    "model", "dtype", "device", "objects", "template", "mode", "refusal", "compliance", "grids", "directions",
    "heads_position", "threshold", "attribution", "generate_tokens", "max_rows", "seed",
])
config_dicts = st.dictionaries(
    st.one_of(config_keys, config_keys, st.text(max_size=8)),
    st.one_of(json_values, st.sampled_from([["resid_pre", "heads"], ["bogus"], ["sufficiency"], [], "float32",
                                            "align", 0, -1, 1.5, True])),
    max_size=6,
)


def _ok_or_project_error(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RefusalLabError:
        return None


# -------------------------------------------------------------------------------------- tests


@SETTINGS
@given(harmful=object_sides, harmless=object_sides, template=templates, source=json_values)
def test_validate_objects_never_crashes(harmful, harmless, template, source):
    out = _ok_or_project_error(validate_objects, ObjectLists(harmful, harmless, template, source))
    if out is not None:
        assert all(isinstance(o, str) and o.strip() == o and o for o in out.harmful + out.harmless)
        assert len(set(out.harmful)) == len(out.harmful) and not set(out.harmful) & set(out.harmless)


@SETTINGS
@given(data=st.one_of(
    st.fixed_dictionaries({"harmful": object_sides, "harmless": object_sides},
                          optional={"template": templates, "source": json_values, "extra": json_values}),
    json_values,
), raw=st.one_of(st.none(), st.text(max_size=20)))
def test_load_objects_never_crashes(data, raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "objects.json"
        path.write_text(json.dumps(data) if raw is None else raw, encoding="utf-8")
        _ok_or_project_error(load_objects, path)
        _ok_or_project_error(load_objects, str(path))


@SETTINGS
@given(name=st.one_of(st.text(max_size=15), st.sampled_from(["", ".", "templates", "templates.json", "/", "x.json"])))
def test_load_objects_by_name_never_crashes(name):
    _ok_or_project_error(load_objects, name)


@SETTINGS
@given(template=templates)
def test_validate_template_never_crashes(template):
    out = _ok_or_project_error(validate_template, template)
    if out is not None:
        assert out.count("{object}") == 1


@SETTINGS
@given(
    harmful=st.one_of(st.lists(object_strings, min_size=1, max_size=4), object_sides),
    harmless=st.one_of(st.lists(object_strings, min_size=1, max_size=4), object_sides),
    template=templates,
    list_template=templates,
    mode=st.one_of(st.sampled_from(["single_token", "align"]), st.sampled_from(["bogus", "", None])),
)
def test_build_object_prompts_never_crashes(harmful, harmless, template, list_template, mode):
    prompts = _ok_or_project_error(
        build_object_prompts, TOKENIZER, ObjectLists(harmful, harmless, list_template), template=template, mode=mode
    )
    if prompts is not None:
        n, T = prompts.n_pairs, prompts.seq_len
        assert n >= 1 and prompts.harmful_ids.shape == prompts.harmless_ids.shape == (n, T)
        assert len(prompts.labels) == T and prompts.labels[prompts.obj_index] in ("obj", "last")


@SETTINGS
@given(data=config_dicts)
def test_run_config_from_dict_never_crashes(data):
    cfg = _ok_or_project_error(RunConfig.from_dict, data)
    if cfg is not None:
        cfg.digest()  # a valid config can be hashed for the run-folder guard


def test_run_config_nested_direction_is_a_config_error():
    with pytest.raises(RefusalLabError):
        RunConfig.from_dict({"directions": [[]]})
