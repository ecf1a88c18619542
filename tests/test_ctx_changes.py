"""The ctx diff alone (_ctx_changes.py), on Ray's real CallbackCtx: replaced, edited in place,
added and removed fields and custom_data keys, and summaries that never carry a secret."""

from __future__ import annotations

import enum

from llm_otel_callbacks._ctx_changes import MISSING, diff, snapshot, summary
from llm_otel_callbacks._ray import CallbackCtx


def test_nothing_changed_gives_no_changes():
    ctx = CallbackCtx()
    ctx.custom_data["a"] = {"x": 1}
    assert diff(snapshot(ctx), snapshot(ctx)) == []


def test_a_replaced_field_names_old_and_new_and_keeps_the_new_value():
    ctx = CallbackCtx()
    before = snapshot(ctx)
    ctx.run_init_node = False
    (change,) = diff(before, snapshot(ctx))
    assert (change.field, change.old, change.new, change.value) == (
        "run_init_node", "True", "False", False)


def test_an_in_place_edit_is_seen_through_the_fingerprint():
    ctx = CallbackCtx()
    ctx.custom_data["slot"] = {"a": 1}
    before = snapshot(ctx)
    ctx.custom_data["slot"]["b"] = 2  # same object, new content
    (change,) = diff(before, snapshot(ctx))
    assert change.field == "custom_data[slot]"
    assert change.old == "dict(1 keys: a)"  # its summary when the snapshot was taken
    assert change.new == "dict(2 keys: a, b)"


def test_added_and_removed_keys_are_absent_on_one_side_in_field_order():
    ctx = CallbackCtx()
    ctx.custom_data["gone"] = 1
    before = snapshot(ctx)
    del ctx.custom_data["gone"]
    ctx.custom_data["added"] = "v"
    changes = diff(before, snapshot(ctx))
    assert [(c.field, c.old, c.new) for c in changes] == [
        ("custom_data[added]", "<absent>", "str(len=1)"),
        ("custom_data[gone]", "<int>", "<absent>"),
    ]
    assert changes[1].value is MISSING


def test_summaries_never_carry_secrets():
    assert summary("api_key", "sk-123") == "str(len=6)"
    assert summary("custom_data[token]", "short") == "str(len=5)"
    long_plain = "x" * 40
    assert summary("name", long_plain) == "str(len=40)"
    env = {"env_vars": {"HF_TOKEN": "hf_secret", "A": "1"}, "pip": ["x"]}
    text = summary("runtime_env", env)
    assert "HF_TOKEN" in text and "hf_secret" not in text
    ctx = CallbackCtx()
    ctx.runtime_env = {"env_vars": {"HF_TOKEN": "hf_secret"}}
    before = snapshot(ctx)
    ctx.runtime_env["env_vars"]["HF_TOKEN"] = "hf_other"  # in place: the old one is a repr
    (change,) = diff(before, snapshot(ctx))
    assert "hf_secret" not in change.old and "hf_other" not in change.new


def test_summaries_of_plain_values_enums_and_objects():
    class Mode(enum.Enum):
        TOKENIZER_ONLY = "tokenizer_only"

    assert summary("f", None) == "None"
    assert summary("f", 3) == "3"
    assert summary("f", "ok") == "'ok'"
    assert summary("f", Mode.TOKENIZER_ONLY) == "TOKENIZER_ONLY"
    assert summary("f", object()) == "<object>"


def test_custom_data_values_are_shown_by_type_size_and_keys_only():
    """A child editing its slot in place used to show the old dict's repr (a planted hf_token
    in full); a plain string under a harmless key (a mirror URL with a password) as is."""
    token, password = "hf_PLANTEDtokenAbc123", "s3cr3t-pw"
    ctx = CallbackCtx()
    ctx.custom_data["slot"] = {"hf_token": token, "n": 1}
    ctx.custom_data["mirror"] = "m"
    before = snapshot(ctx)
    ctx.custom_data["slot"]["seen"] = True  # in place
    ctx.custom_data["mirror"] = f"https://user:{password}@mirror.example/models"
    ctx.custom_data["numbers"] = [4, 8, 15]
    changes = {c.field: (c.old, c.new) for c in diff(before, snapshot(ctx))}
    assert changes == {
        "custom_data[mirror]": ("str(len=1)", "str(len=44)"),
        "custom_data[numbers]": ("<absent>", "list(len=3)"),
        "custom_data[slot]": ("dict(2 keys: hf_token, n)", "dict(3 keys: hf_token, n, seen)"),
    }
    assert token not in repr(changes) and password not in repr(changes)
    # Typed fields keep their values: they are what the change log is for.
    before = snapshot(ctx)
    ctx.run_init_node = False
    (change,) = diff(before, snapshot(ctx))
    assert (change.old, change.new) == ("True", "False")
