"""Pipeline text: parsing, printing, errors, and the registry's typed option conversion.

The pipeline text is the canonical form a report hands back to a command line, so parse and
print must round-trip exactly and every malformed entry must be a UserError (exit 2), never
an internal error.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from qcompiler import Model, Pass, PassContext, PassRegistry, PassResult, PassSpec, UserError
from qcompiler.pipeline import format_pipeline, parse_pipeline


@dataclass(frozen=True)
class TypedOptions(Pass):
    """Test pass whose only purpose is to carry one option of each supported type."""

    name = "typed-options"
    flag: bool = False
    count: int = 3
    ratio: float = 0.5
    names: tuple[str, ...] = ()
    sizes: tuple[int, ...] = (1, 2)
    label: str = "x"
    maybe: int | None = None

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        return PassResult(False)


@pytest.fixture
def registry() -> PassRegistry:
    """Built-in passes plus TypedOptions, without third-party entry points."""
    reg = PassRegistry(use_entry_points=False)
    reg.register(TypedOptions)
    return reg


@pytest.mark.parametrize("text", [
    "fold-constants,fuse-conv-bn,insert-qdq{per-channel=true}",
    "insert-qdq{exclude=[a,b],per-channel=false}",
    "typed-options{names=[conv1,conv2],sizes=[3,4,5],ratio=0.25}",
    "canonicalize",
    "a{x=[]},b2-c{y-z=1}",
])
def test_round_trip_is_identical(text: str) -> None:
    """format(parse(text)) must reproduce canonical text byte for byte."""
    assert format_pipeline(parse_pipeline(text)) == text


def test_parse_structure_keeps_order_and_strings() -> None:
    """Options stay strings in written order; list values are not split at their commas."""
    specs = parse_pipeline("fold-constants, insert-qdq{exclude=[a,b], per-channel=true}")
    assert specs == [
        PassSpec("fold-constants"),
        PassSpec("insert-qdq", (("exclude", "[a,b]"), ("per-channel", "true"))),
    ]
    assert specs[1].option_dict() == {"exclude": "[a,b]", "per-channel": "true"}
    # whitespace is not part of the canonical form
    assert format_pipeline(specs) == "fold-constants,insert-qdq{exclude=[a,b],per-channel=true}"


def test_empty_pipeline_is_empty_list() -> None:
    """An empty --pipeline means no passes, not an error."""
    assert parse_pipeline("") == []
    assert parse_pipeline("   ") == []


@pytest.mark.parametrize("text, fragment", [
    ("insert-qdq{per-channel=true", "unbalanced"),
    ("insert-qdq}per-channel=true", "unbalanced"),
    ("insert-qdq{exclude=[a,b}", "unbalanced"),
    ("Fold-Constants", "Fold-Constants"),
    ("fold_constants", "fold_constants"),
    ("fold-constants,,canonicalize", "kebab-case"),
    ("insert-qdq{per-channel}", "per-channel"),
    ("insert-qdq{per_channel=true}", "per_channel"),
    ("insert-qdq{per-channel=true}x", "insert-qdq{per-channel=true}x"),
])
def test_malformed_pipeline_is_user_error(text: str, fragment: str) -> None:
    """Each malformed pipeline raises UserError whose message points at the faulty part."""
    with pytest.raises(UserError) as err:
        parse_pipeline(text)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_equals_message_says_key_value() -> None:
    """A bare option word is reported as needing key=value."""
    with pytest.raises(UserError, match="key=value"):
        parse_pipeline("insert-qdq{per-channel}")


def test_instantiate_converts_typed_options(registry: PassRegistry) -> None:
    """String option values become the field's declared type."""
    spec = parse_pipeline("typed-options{flag=true,count=0x10,ratio=0.125,names=[a,b],sizes=[7],"
                          "label=hello,maybe=none}")[0]
    p = registry.instantiate(spec)
    assert isinstance(p, TypedOptions)
    assert p.flag is True
    assert p.count == 16 and isinstance(p.count, int)
    assert p.ratio == 0.125 and isinstance(p.ratio, float)
    assert p.names == ("a", "b")
    assert p.sizes == (7,) and isinstance(p.sizes[0], int)
    assert p.label == "hello"
    assert p.maybe is None


@pytest.mark.parametrize("raw, expected", [("true", True), ("1", True), ("on", True),
                                           ("false", False), ("0", False), ("off", False)])
def test_bool_spellings(registry: PassRegistry, raw: str, expected: bool) -> None:
    """Booleans accept the usual spellings, case-insensitively."""
    p = registry.instantiate(PassSpec("typed-options", (("flag", raw.upper()),)))
    assert p.flag is expected


def test_optional_int_takes_a_number(registry: PassRegistry) -> None:
    """``int | None`` converts a number to int."""
    p = registry.instantiate(PassSpec("typed-options", (("maybe", "4"),)))
    assert p.maybe == 4


def test_builtin_pass_options_convert(registry: PassRegistry) -> None:
    """A built-in pass (insert-qdq) gets a real bool and tuple from text."""
    p = registry.instantiate(parse_pipeline("insert-qdq{per-channel=false,exclude=[conv1,gemm]}")[0])
    assert p.per_channel is False
    assert p.exclude == ("conv1", "gemm")


def test_unknown_option_names_pass_and_option(registry: PassRegistry) -> None:
    """An unknown option must name both the pass and the option, and list the valid ones."""
    with pytest.raises(UserError) as err:
        registry.instantiate(PassSpec("insert-qdq", (("per-chanel", "true"),)))
    msg = str(err.value)
    assert "insert-qdq" in msg and "per-chanel" in msg
    assert "per-channel" in msg  # the list of known options


@pytest.mark.parametrize("key, raw", [("flag", "maybe"), ("count", "three"), ("ratio", "fast"),
                                      ("sizes", "[1,x]")])
def test_bad_option_value_is_user_error(registry: PassRegistry, key: str, raw: str) -> None:
    """A value that doesn't convert names the pass, the option and the value."""
    with pytest.raises(UserError) as err:
        registry.instantiate(PassSpec("typed-options", ((key, raw),)))
    msg = str(err.value)
    assert "typed-options" in msg and key in msg


def test_spec_prints_only_non_default_options() -> None:
    """Pass.spec() lists options that differ from defaults, in field order, kebab-case."""
    assert TypedOptions().spec() == "typed-options"
    assert TypedOptions(count=3, flag=True).spec() == "typed-options{flag=true}"
    assert TypedOptions(names=("a", "b"), sizes=(), ratio=0.75).spec() == \
        "typed-options{ratio=0.75,names=[a,b],sizes=[]}"


def test_spec_round_trips_through_registry(registry: PassRegistry) -> None:
    """parse(spec()) instantiates an equal pass, so reports can be replayed."""
    original = TypedOptions(flag=True, count=-2, ratio=1.5, names=("n1",), sizes=(4, 5), label="z", maybe=9)
    again = registry.instantiate(parse_pipeline(original.spec())[0])
    assert again == original
    insert = registry.instantiate(parse_pipeline("insert-qdq{per-channel=false,exclude=[a,b]}")[0])
    assert insert.spec() == "insert-qdq{per-channel=false,exclude=[a,b]}"
