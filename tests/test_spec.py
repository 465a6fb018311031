import pytest

from lambdasplit.errors import SplitError, UnsupportedArchitectureError
from lambdasplit.split.adapters import adapter_for
from lambdasplit.split.spec import SplitChoice, SplitSpec


def test_ranges_cover_all_layers_once():
    spec = SplitSpec.create(3, 2, 10)
    assert spec.range("head") == (0, 3)
    assert spec.range("body") == (3, 8)
    assert spec.range("tail") == (8, 10)
    assert spec.as_dict() == {"layers": 10, "head": [0, 3], "body": [3, 8], "tail": [8, 10]}


@pytest.mark.parametrize("k,m", [(-1, 1), (1, -1), (6, 5), (11, 0)])
def test_invalid_splits_are_refused(k, m):
    with pytest.raises(SplitError):
        SplitSpec.create(k, m, 10, allow_shallow=True)


@pytest.mark.parametrize("k,m", [(5, 5), (10, 0), (0, 10)])
def test_a_split_that_leaves_the_body_empty_is_refused(k, m):
    with pytest.raises(SplitError, match="leaving the body \\(cloud\\) empty; choose K \\+ M < 10"):
        SplitSpec.create(k, m, 10, allow_shallow=True)


@pytest.mark.parametrize("k,m,word", [(0, 2, "embeddings"), (2, 0, "LM head")])
def test_shallow_splits_need_explicit_permission(k, m, word):
    with pytest.raises(SplitError, match=word):
        SplitSpec.create(k, m, 10)
    assert SplitSpec.create(k, m, 10, allow_shallow=True).range("body") == (k, 10 - m)


def test_parse_split():
    assert SplitChoice.parse("4, 1", ranged=False).point == (4, 1)
    assert SplitChoice.parse(" 1 - 4 ,2") == SplitChoice(1, 4, 2) and str(SplitChoice(1, 4, 2)) == "1-4,2"
    with pytest.raises(SplitError, match="K,M"):
        SplitChoice.parse("4")


@pytest.mark.parametrize("text,ranged,message", [
    ("-1,2", True, "'-1,2': expected K,M or KMIN-KMAX,M with non-negative integers, e.g. 2,2 or 1-4,2"),
    ("2,-2", False, "'2,-2': expected K,M with two non-negative integers, e.g. 2,2"),
    ("1-4,2", False, "'1-4,2': expected K,M with two non-negative integers"),
    ("2;2", True, "'2;2': expected K,M or KMIN-KMAX,M"),
    ("4-1,2", True, "'4-1,2': the K range must rise, e.g. 1-4,2"),
    ("2-2,2", True, "'2-2,2': the K range must rise"),
])
def test_bad_split_says_what_was_expected(text, ranged, message):
    with pytest.raises(SplitError) as caught:
        SplitChoice.parse(text, ranged)
    assert str(caught.value).startswith(message)


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitectureError) as info:
        adapter_for(GPT2Config())
    assert "gpt2" in str(info.value) and "llama" in str(info.value) and "gemma3_text" in str(info.value)
