"""Bad ``callback_kwargs`` (Hypothesis): the Composite, every built-in, telemetry settings.

Every example is constructed the way a replica does it, through Ray's own
``LLMConfig(...).get_or_create_callback()``. That call makes a placement group first, so a
real (local) Ray runs for the module; each example's groups are removed after it.

Properties:

* invalid input fails with :class:`CallbackConfigError` (a ValueError) whose message names
  the entry (``callbacks[i] (name)`` or the class) and the field; never a TypeError /
  AttributeError / KeyError from inside, never an unknown key ignored;
* valid input constructs, and the values are the ones given.
"""

from __future__ import annotations

import math
import string
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llm_otel_callbacks import CallbackConfigError, Composite
from llm_otel_callbacks._validation import clip
from llm_otel_callbacks.config import MAX_NAME_LENGTH, MAX_TIMEOUT_S
from llm_otel_callbacks.telemetry import TelemetrySettings

T = "tests.callbacks_for_tests."
B = "llm_otel_callbacks.builtin."
COMPOSITE = "llm_otel_callbacks.Composite"
HUGE = "x" * 200_000

SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module", autouse=True)
def _ray(ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # A module that fails while being imported, for the import-path properties.
    mods = tmp_path_factory.mktemp("mods")
    (mods / "explodes_on_import.py").write_text("raise RuntimeError('import-time failure')\n")
    sys.path.insert(0, str(mods))
    yield
    sys.path.remove(str(mods))


def _remove_groups() -> None:
    """get_or_create_callback() made a placement group (even when construction failed)."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    for pg_id, info in ray.util.placement_group_table().items():
        if info.get("state") != "REMOVED":
            ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))


def construct(callback_class: str, kwargs: dict[str, Any], raise_error: bool = True) -> Any:
    """Ray's path: LLMConfig validation, then get_or_create_callback()."""
    from ray.serve.llm import LLMConfig

    llm_config = LLMConfig(  # type: ignore[call-arg]
        model_loading_config={"model_id": "tiny", "model_source": "/nonexistent/tiny"},
        placement_group_config={"bundles": [{"CPU": 0.001}]},
        callback_config={  # type: ignore[arg-type]
            "callback_class": callback_class,
            "callback_kwargs": kwargs,
            "raise_error_on_callback": raise_error,
        },
    )
    try:
        return llm_config.get_or_create_callback()
    finally:
        _remove_groups()


def rejected(callback_class: str, kwargs: dict[str, Any]) -> str:
    """Construct; it must fail with a CallbackConfigError. Returns the message."""
    try:
        construct(callback_class, kwargs)
    except CallbackConfigError as exc:
        message = str(exc)
        assert len(message) < 5_000, "an error message must stay readable"
        return message
    except Exception as exc:  # a crash from inside, not a validation error
        raise AssertionError(
            f"expected CallbackConfigError, got {type(exc).__name__}: {exc}"
        ) from exc
    raise AssertionError(f"accepted invalid input: {kwargs!r:.300}")


def names_field(message: str, field: str) -> bool:
    return f"field '{clip(field)}" in message


# --- value strategies -------------------------------------------------------------------------

BOOL_WORDS = {"0", "off", "f", "false", "n", "no", "1", "on", "t", "true", "y", "yes"}
# No digits and none of the letters of inf/nan/infinity/e: never parses as a number.
NOT_NUMBER_TEXT = st.text(alphabet="bcdghjkmopqrsuvwxz!@#%&*()[]{} ", min_size=1, max_size=20)
CONTAINERS = st.one_of(
    st.lists(st.integers(), min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=3),
)


def not_bool() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers().filter(lambda i: i not in (0, 1)),
        st.text(min_size=1, max_size=20).filter(
            lambda s: s.strip().lower() not in BOOL_WORDS and s.lower() not in BOOL_WORDS
        ),
        CONTAINERS,
        st.just(HUGE),
    )


def not_str() -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(), st.floats(), st.booleans(), CONTAINERS)


def not_number() -> st.SearchStrategy[Any]:
    return st.one_of(NOT_NUMBER_TEXT, CONTAINERS, st.just(HUGE), st.none())


def bad_positive_float(upper: float | None = None) -> st.SearchStrategy[Any]:
    """For a finite float that must be > 0 (and <= upper)."""
    bad = [
        st.floats(max_value=0.0, allow_nan=False),
        st.sampled_from([math.nan, math.inf, -math.inf, "nan", "inf", True, False]),
        not_number().filter(lambda v: v is not None),
    ]
    if upper is not None:
        bad.append(st.floats(min_value=upper, exclude_min=True, allow_infinity=False))
    return st.one_of(*bad)


def bad_int(minimum: int, maximum: int | None = None) -> st.SearchStrategy[Any]:
    bad = [
        st.integers(max_value=minimum - 1),
        st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f)),
        NOT_NUMBER_TEXT,
        CONTAINERS,
        st.booleans(),  # pydantic's lax mode would read True as 1
    ]
    if maximum is not None:
        bad.append(st.integers(min_value=maximum + 1))
    return st.one_of(*bad)


def bad_choice(allowed: set[str], any_case: bool) -> st.SearchStrategy[Any]:
    def invalid(s: str) -> bool:
        return (s.strip().upper() if any_case else s) not in allowed

    return st.one_of(
        st.text(min_size=0, max_size=30).filter(invalid), st.integers(), CONTAINERS,
        st.just(HUGE),
    )


def unknown_key(known: set[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(min_size=1, max_size=30), st.just("k" * 100_000), st.just("timeout"),
        st.just("callback_kwarg"), st.just("\n\x00"),
    ).filter(lambda k: k not in known)


# --- the Composite ----------------------------------------------------------------------------

ENTRY_KEYS = {"callback_class", "callback_kwargs", "raise_error_on_callback", "timeout_s", "name"}
VALID_CLASSES = [T + "NoopChild", T + "RayStyleChild", T + "SeedStyleChild", T + "phase_child",
                 B + "Timing", B + "TokenCounter"]
valid_names = st.text(
    alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "Zs")),
    min_size=1, max_size=MAX_NAME_LENGTH,
).filter(lambda s: s.strip() != "" and s.isprintable())

BAD_PATHS = st.one_of(
    st.sampled_from([
        ".relative.Cls", "..up", "tests..callbacks_for_tests.NoopChild", "no_such_pkg_q.mod.Cls",
        "os.no_such_attribute", "os", "os:", ":Cls", "os.sep", "builtins.int", "a b.c",
        "tests.callbacks_for_tests.NoopChild\n", "a\x00b.C", "explodes_on_import.Cls",
        "tests.callbacks_for_tests.unpicklable_kwargs", "", "   ", "x" * 100_000 + ".Cls",
    ]),
    st.text(max_size=40).filter(lambda s: "." not in s.strip() and ":" not in s),
    st.integers(), st.floats(), st.none(), CONTAINERS,
)


def bad_entry_field() -> st.SearchStrategy[tuple[str, Any]]:
    """(field, value): one field of an otherwise valid entry made invalid."""
    return st.one_of(
        st.tuples(st.just("callback_class"), BAD_PATHS),
        st.tuples(st.just("name"), st.one_of(
            not_str(), st.just(""), st.just("   "), st.just("a\nb"), st.just(HUGE),
            st.text(min_size=MAX_NAME_LENGTH + 1, max_size=MAX_NAME_LENGTH + 5),
        )),
        st.tuples(st.just("timeout_s"), bad_positive_float(MAX_TIMEOUT_S)),
        st.tuples(st.just("raise_error_on_callback"), not_bool()),
        st.tuples(st.just("callback_kwargs"), st.one_of(
            st.lists(st.integers(), max_size=2), st.text(max_size=5), st.integers(),
            st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2),
        )),
        st.tuples(unknown_key(ENTRY_KEYS), st.integers()),
    )


@st.composite
def entries_with_one_bad(draw: st.DrawFn) -> tuple[list[Any], int, str]:
    """Valid entries (distinct names) with one bad entry at a random position."""
    good = [{"callback_class": T + "NoopChild", "name": f"ok{i}"}
            for i in range(draw(st.integers(0, 3)))]
    index = draw(st.integers(0, len(good)))
    kind = draw(st.sampled_from(["field", "non_dict", "duplicate", "child_kwargs"]))
    bad: Any
    if kind == "field":
        field, value = draw(bad_entry_field())
        bad = {"callback_class": T + "RayStyleChild", "name": "bad", field: value}
    elif kind == "non_dict":
        field = "callback_class"
        bad = draw(st.one_of(st.integers(), st.floats(), st.none(), st.booleans(),
                             st.lists(st.integers(), max_size=2)))
    elif kind == "duplicate":
        if not good:
            good = [{"callback_class": T + "NoopChild", "name": "ok0"}]
            index = 1
        field = "name"
        bad = {"callback_class": T + "RayStyleChild", "name": good[0]["name"]}
        index = max(index, 1)
    else:  # a built-in child with a kwarg it does not know, or a per-child telemetry
        field = "callback_kwargs"
        key = draw(st.one_of(unknown_key({"callback_name"}), st.just("telemetry")))
        cls = draw(st.sampled_from([B + "Timing", B + "TokenCounter", T + "SeedStyleChild"]))
        bad = {"callback_class": cls, "name": "bad", "callback_kwargs": {key: 1}}
        field = "telemetry" if key == "telemetry" else key
        if cls.endswith("SeedStyleChild"):
            field = "callback_kwargs"
    entries = [*good[:index], bad, *good[index:]]
    return entries, index, field


@SETTINGS
@given(case=entries_with_one_bad())
def test_composite_rejects_bad_entries_naming_entry_and_field(
    case: tuple[list[Any], int, str],
) -> None:
    entries, index, field = case
    message = rejected(COMPOSITE, {"callbacks": entries})
    assert f"callbacks[{index}]" in message, message
    assert names_field(message, field) or f"'{clip(field)}'" in message, message
    # The other entries are not blamed.
    blamed = [
        other for other in range(len(entries))
        if other != index
        and f"callbacks[{other}] (" in message.replace(f"already used by callbacks[{other}]", "")
    ]
    assert blamed == [], message


@SETTINGS
@given(
    top=st.one_of(
        st.tuples(st.just("callbacks"), st.one_of(st.text(max_size=5), st.integers(),
                                                   st.dictionaries(st.text(), st.integers()))),
        st.tuples(unknown_key({"callbacks", "telemetry"}), st.integers()),
        st.tuples(st.just("telemetry"), st.one_of(st.text(), st.integers(),
                                                  st.lists(st.integers()))),
    )
)
def test_composite_rejects_bad_top_level_kwargs(top: tuple[str, Any]) -> None:
    field, value = top
    message = rejected(COMPOSITE, {"callbacks": [], field: value})
    assert "Composite callback_kwargs" in message or "telemetry" in message
    assert clip(field) in message, message


@settings(max_examples=15, deadline=None, derandomize=True)
@given(depth=st.integers(1, 25), bad=bad_entry_field())
def test_deep_nesting_names_the_whole_path(depth: int, bad: tuple[str, Any]) -> None:
    field, value = bad
    inner: Any = {"callback_class": T + "RayStyleChild", "name": "leaf", field: value}
    for level in reversed(range(depth)):
        inner = {"callback_class": COMPOSITE, "name": f"level{level}",
                 "callback_kwargs": {"callbacks": [inner]}}
    message = rejected(COMPOSITE, {"callbacks": [inner]})
    for level in range(depth):
        assert f"callbacks[0] (level{level})" in message, message
    assert names_field(message, field) or f"'{clip(field)}'" in message, message


@st.composite
def valid_entries(draw: st.DrawFn) -> list[dict[str, Any]]:
    count = draw(st.integers(1, 5))
    names = draw(st.lists(valid_names, min_size=count, max_size=count, unique=True))
    entries = []
    for name in names:
        cls = draw(st.sampled_from(VALID_CLASSES))
        entry: dict[str, Any] = {"callback_class": cls, "name": name}
        timeout = draw(st.one_of(st.none(), st.floats(min_value=1e-3, max_value=MAX_TIMEOUT_S),
                                 st.integers(1, 3600)))
        if timeout is not None:
            entry["timeout_s"] = timeout
        policy = draw(st.one_of(st.none(), st.booleans()))
        if policy is not None:
            entry["raise_error_on_callback"] = policy
        if cls.endswith("NoopChild"):
            entry["callback_kwargs"] = draw(st.dictionaries(
                # telemetry and timeout_s are set on the composite and on the entry, and
                # refused inside a child's callback_kwargs (test_seeds_unit.py).
                st.text(min_size=1, max_size=10).filter(
                    lambda k: k not in ("telemetry", "timeout_s")),
                st.one_of(st.integers(), st.text(max_size=10), st.booleans()), max_size=3,
            ))
        elif cls.endswith("SeedStyleChild"):
            entry["callback_kwargs"] = {"note": draw(st.text(max_size=10))}
        entries.append(entry)
    return entries


@SETTINGS
@given(entries=valid_entries(), default_policy=st.booleans())
def test_valid_entries_construct_with_the_values_given(
    entries: list[dict[str, Any]], default_policy: bool
) -> None:
    callback = construct(COMPOSITE, {"callbacks": entries}, raise_error=default_policy)
    assert isinstance(callback, Composite)
    assert callback.failed_children == {}
    assert [c.name for c in callback.children] == [e["name"] for e in entries]
    for child, entry in zip(callback.children, entries, strict=True):
        expected_timeout = entry.get("timeout_s")
        assert child.timeout_s == (None if expected_timeout is None else float(expected_timeout))
        assert child.raise_error is entry.get("raise_error_on_callback", default_policy)
    # Each child kind got what its entry gave (kwargs, name; the seed child's note).
    pairs = list(zip(callback.children, entries, strict=True))
    noop = [(c, e) for c, e in pairs if e["callback_class"].endswith("NoopChild")]
    seed = [(c, e) for c, e in pairs if e["callback_class"].endswith("SeedStyleChild")]
    assert [(c.instance.kwargs, c.instance.callback_name) for c, _ in noop] == [
        (e["callback_kwargs"], e["name"]) for _, e in noop
    ]
    assert [c.instance.note for c, _ in seed] == [e["callback_kwargs"]["note"] for _, e in seed]


# --- built-ins ----------------------------------------------------------------------------------

POLICY_NAMES = {"MODEL_AND_TOKENIZER", "TOKENIZER_ONLY", "EXCLUDE_SAFETENSORS", "NONE"}
BAD_BUNDLES = st.one_of(
    st.sampled_from([[], [{}], [{"CPU": -1}], [{"CPU": math.nan}], [{"CPU": math.inf}],
                     [{"": 1}], [{"CPU": 0}], [{"CPU": 0, "GPU": 0}], "CPU", [1],
                     [{"CPU": "lots"}], [{"CPU": 1}, {}], [{"CPU": True}]]),
    st.lists(st.dictionaries(st.text(min_size=1, max_size=4),
                             st.floats(max_value=-1e-9), min_size=1, max_size=2),
             min_size=1, max_size=2),
)
BAD_PRICE = st.one_of(
    st.sampled_from([{"input": -1, "output": 1}, {"input": math.nan, "output": 1},
                     {"input": 1, "output": math.inf}, {"input": 1}, {"input": 1, "output": 1,
                                                                       "cached": 2},
                     {"input": "free", "output": 1}, {"input": 1, "output": True}, 3,
                     "1/1"]),
)

#: class -> (kwargs that are valid on their own, {field: strategy of invalid values})
BUILTINS: dict[str, tuple[dict[str, Any], dict[str, st.SearchStrategy[Any]]]] = {
    "Timing": ({}, {
        "log_summary": not_bool(),
        "summary_log_level": bad_choice({"DEBUG", "INFO", "WARNING"}, any_case=True),
        "warn_after_s": bad_positive_float(),
    }),
    "DownloadPolicy": ({}, {
        "worker_node": bad_choice(POLICY_NAMES, any_case=True),
        "env_var": st.one_of(
            st.text(min_size=0, max_size=20).filter(
                lambda s: not (s[:1].isascii() and (s[:1].isalpha() or s[:1] == "_"))
                or not all(c.isascii() and (c.isalnum() or c == "_") for c in s)
            ),
            st.integers(), CONTAINERS,
        ),
        "skip_weights_if_cached": not_bool(),
        "verify_mirror_hash": not_bool(),
    }),
    "CustomPlacementGroup": ({"bundles": [{"CPU": 1}]}, {
        "bundles": BAD_BUNDLES,
        "strategy": bad_choice({"PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"}, True),
        "name": st.one_of(st.just(""), not_str()),
        "ready_timeout_s": bad_positive_float(7 * 24 * 3600),
    }),
    "TokenCounter": ({}, {}),
    "CostTracker": ({}, {
        "prices": st.one_of(st.dictionaries(st.text(min_size=1, max_size=5), BAD_PRICE,
                                            min_size=1, max_size=2),
                            st.lists(st.integers(), min_size=1), st.text(min_size=1)),
        "default_price": BAD_PRICE,
        "currency": st.one_of(
            st.text(max_size=6).filter(
                lambda s: not (len(s) == 3 and all(c in string.ascii_uppercase for c in s))
            ),
            st.integers(),
        ),
    }),
    "RateLimiter": ({"requests_per_minute": 10}, {
        "requests_per_minute": bad_int(1),
        "tokens_per_minute": bad_int(1),
        "key": bad_choice({"api_key", "user", "global"}, any_case=False),
        "anonymous": bad_choice({"limit", "exempt"}, any_case=False),
        "max_keys": bad_int(1),
    }),
    "StreamingProgress": ({}, {
        "event_every": bad_int(1),
        "on_progress": st.one_of(BAD_PATHS.filter(lambda v: v is not None), st.just("os.sep")),
    }),
}


@st.composite
def builtin_with_one_bad(draw: st.DrawFn) -> tuple[str, dict[str, Any], str]:
    name = draw(st.sampled_from(sorted(BUILTINS)))
    base, bad_fields = BUILTINS[name]
    kwargs = dict(base)
    options_model = type(construct_options_model(name))
    choices = [*sorted(bad_fields), "<unknown>"]
    field = draw(st.sampled_from(choices))
    if field == "<unknown>":
        field = draw(unknown_key(set(options_model.model_fields) | {"telemetry"}))
        kwargs[field] = draw(st.integers())
    else:
        kwargs[field] = draw(bad_fields[field])
    return name, kwargs, field


def construct_options_model(name: str) -> Any:
    import llm_otel_callbacks.builtin as builtin

    return getattr(builtin, name).kwargs_model.model_construct()


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=builtin_with_one_bad(), as_child=st.booleans())
# Found in CI: pydantic's lax mode read True as a timeout of 1 s.
@example(case=("CustomPlacementGroup", {"bundles": [{"CPU": 1}], "ready_timeout_s": True},
               "ready_timeout_s"), as_child=False)
@example(case=("RateLimiter", {"requests_per_minute": True}, "requests_per_minute"),
         as_child=True)
def test_builtins_reject_bad_kwargs_naming_the_field(
    case: tuple[str, dict[str, Any], str], as_child: bool
) -> None:
    name, kwargs, field = case
    if as_child:
        entries = [{"callback_class": T + "NoopChild"},
                   {"callback_class": B + name, "name": "under_test", "callback_kwargs": kwargs}]
        message = rejected(COMPOSITE, {"callbacks": entries})
        assert "callbacks[1] (under_test)" in message, message
    else:
        message = rejected(B + name, kwargs)
    assert f"{name} callback_kwargs" in message, message
    assert names_field(message, field), message


def test_placement_group_needs_bundles_or_name() -> None:
    message = rejected(B + "CustomPlacementGroup", {"strategy": "spread"})
    assert "'bundles'" in message and "'name'" in message


@st.composite
def builtin_valid(draw: st.DrawFn) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(class, kwargs, expected options) for a valid configuration."""
    name = draw(st.sampled_from(sorted(BUILTINS)))
    finite_pos = st.floats(min_value=1e-3, max_value=1e6)
    if name == "Timing":
        level = draw(st.sampled_from(["debug", "INFO", " Warning "]))
        kw = {"log_summary": draw(st.booleans()), "summary_log_level": level,
              "warn_after_s": draw(st.one_of(st.none(), finite_pos))}
        return name, kw, {**kw, "summary_log_level": level.strip().upper()}
    if name == "DownloadPolicy":
        policy = draw(st.one_of(st.none(), st.sampled_from(sorted(POLICY_NAMES)).map(
            lambda p: draw(st.sampled_from([p, p.lower()])))))
        kw = {"worker_node": policy,
              "env_var": draw(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)),
              "skip_weights_if_cached": draw(st.booleans()),
              "verify_mirror_hash": draw(st.booleans())}
        return name, kw, {**kw, "worker_node": policy and policy.upper()}
    if name == "CustomPlacementGroup":
        bundles = draw(st.lists(st.dictionaries(
            st.sampled_from(["CPU", "GPU", "memory", "custom"]),
            st.floats(min_value=0.001, max_value=64), min_size=1), min_size=1, max_size=3))
        strategy = draw(st.sampled_from(["pack", "SPREAD", "strict_pack", "Strict_Spread"]))
        kw = {"bundles": bundles, "strategy": strategy,
              "ready_timeout_s": draw(st.floats(min_value=0.01, max_value=3600))}
        return name, kw, {**kw, "strategy": strategy.upper()}
    if name == "TokenCounter":
        return name, {}, {}
    if name == "CostTracker":
        price = st.fixed_dictionaries({"input": st.floats(0, 1e3), "output": st.floats(0, 1e3)})
        prices: dict[str, dict[str, float]] = draw(
            st.dictionaries(st.text(min_size=1, max_size=10), price, max_size=3))
        currency = draw(st.from_regex(r"[A-Z]{3}", fullmatch=True))
        return name, {"prices": prices, "currency": currency}, {
            "currency": currency, "prices": prices}
    if name == "RateLimiter":
        kw = {"requests_per_minute": draw(st.integers(1, 10**6)),
              "tokens_per_minute": draw(st.one_of(st.none(), st.integers(1, 10**9))),
              "key": draw(st.sampled_from(["api_key", "user", "global"])),
              "anonymous": draw(st.sampled_from(["limit", "exempt"])),
              "max_keys": draw(st.integers(1, 10**6))}
        return name, kw, kw
    kw = {"event_every": draw(st.integers(1, 10**6))}
    return name, kw, kw


@SETTINGS
@given(case=builtin_valid())
def test_builtins_construct_with_the_values_given(
    case: tuple[str, dict[str, Any], dict[str, Any]],
) -> None:
    name, kwargs, expected = case
    callback = construct(B + name, kwargs)
    options = callback.options.model_dump()
    for field, value in expected.items():
        assert options[field] == value, (field, options[field], value)


# --- telemetry settings -------------------------------------------------------------------------

TELEMETRY_BAD: dict[str, st.SearchStrategy[Any]] = {
    "enabled": not_bool(),
    "service_name": st.one_of(st.just(""), not_str()),
    "resource_attributes": st.one_of(
        st.text(alphabet="abc,", min_size=1, max_size=10).filter(
            lambda s: any(part.strip() for part in s.split(","))),
        st.dictionaries(st.text(max_size=3), st.one_of(st.integers(), CONTAINERS), min_size=1),
        st.lists(st.integers(), min_size=1),
    ),
    "endpoint": not_str().filter(lambda v: v is not None),
    "protocol": bad_choice({"grpc", "http/protobuf"}, any_case=False),
    "headers": st.one_of(
        st.sampled_from(["Bearer s3cr3t-token", "a=1,Bearer s3cr3t-token"]),
        st.dictionaries(st.text(min_size=1, max_size=3), st.one_of(st.integers(), CONTAINERS),
                        min_size=1, max_size=2),
    ),
    "sampler": bad_choice({"always_on", "always_off", "traceidratio", "parentbased_always_on",
                           "parentbased_always_off", "parentbased_traceidratio"}, False),
    "sampler_arg": st.one_of(st.floats(max_value=0, exclude_max=True),
                             st.floats(min_value=1, exclude_min=True),
                             st.sampled_from([math.nan, True]), NOT_NUMBER_TEXT),
    "metrics_backend": bad_choice({"auto", "ray", "prometheus", "none"}, any_case=False),
    "prometheus_port": st.one_of(bad_int(0, 65535)),
    "otlp_metrics": not_bool(),
    "metric_export_interval_ms": bad_int(100, 3_600_000),
    "export_timeout_s": bad_positive_float(3600),
    "schedule_delay_ms": bad_int(10, 3_600_000),
    "shutdown_timeout_s": st.one_of(st.floats(max_value=0, exclude_max=True),
                                    st.sampled_from([math.inf, math.nan, True, False]),
                                    NOT_NUMBER_TEXT,
                                    st.floats(min_value=3600, exclude_min=True)),
    "record_exception_messages": not_bool(),
}


@SETTINGS
@given(
    case=st.one_of(
        st.sampled_from(sorted(TELEMETRY_BAD)).flatmap(
            lambda f: st.tuples(st.just(f), TELEMETRY_BAD[f])),
        st.tuples(unknown_key(set(TelemetrySettings.model_fields)), st.integers()),
    ),
    top_level=st.booleans(),
)
def test_telemetry_settings_reject_bad_values_naming_the_field(
    case: tuple[str, Any], top_level: bool
) -> None:
    field, value = case
    # On the Composite, or on a single built-in used alone: same settings, same errors.
    cls = COMPOSITE if top_level else B + "TokenCounter"
    kwargs: dict[str, Any] = {"telemetry": {field: value}}
    if top_level:
        kwargs["callbacks"] = []
    message = rejected(cls, kwargs)
    assert message.startswith("telemetry:"), message
    assert names_field(message, field), message
    assert "s3cr3t" not in message  # header values are secrets, never echoed


@SETTINGS
@given(
    values=st.fixed_dictionaries({}, optional={
        "enabled": st.booleans(),
        "service_name": st.text(min_size=1, max_size=50),
        "endpoint": st.sampled_from(["http://127.0.0.1:4318", "http://collector:4318/"]),
        "protocol": st.sampled_from(["grpc", "http/protobuf"]),
        "sampler": st.sampled_from(["always_on", "traceidratio", "parentbased_always_off"]),
        "sampler_arg": st.floats(0, 1),
        "metrics_backend": st.sampled_from(["auto", "ray", "prometheus", "none"]),
        "prometheus_port": st.integers(0, 65535),
        "metric_export_interval_ms": st.integers(100, 3_600_000),
        "export_timeout_s": st.floats(1e-3, 3600),
        "schedule_delay_ms": st.integers(10, 3_600_000),
        "shutdown_timeout_s": st.floats(0, 3600),
        "record_exception_messages": st.booleans(),
        "resource_attributes": st.dictionaries(
            st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=3),
    })
)
def test_valid_telemetry_settings_are_kept(values: dict[str, Any]) -> None:
    callback = construct(COMPOSITE, {"callbacks": [], "telemetry": values})
    settings_ = callback.telemetry_settings
    for field, value in values.items():
        assert getattr(settings_, field) == value, field


def test_bad_otel_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for var, value, field in [
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon", "export_timeout_s"),
        ("OTEL_RESOURCE_ATTRIBUTES", "team", "resource_attributes"),
        ("OTEL_TRACES_SAMPLER_ARG", "2", "sampler_arg"),
        ("OTEL_BSP_SCHEDULE_DELAY", "-5", "schedule_delay_ms"),
    ]:
        with monkeypatch.context() as m:
            m.setenv(var, value)
            message = rejected(COMPOSITE, {"callbacks": []})
        assert field in message, message


def test_import_path_of_a_module_that_fails_on_import() -> None:
    message = rejected(COMPOSITE, {"callbacks": ["explodes_on_import.Cls"]})
    assert "callbacks[0] (explodes_on_import.Cls): field 'callback_class'" in message
    assert "RuntimeError: import-time failure" in message
