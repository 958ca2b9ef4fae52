import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ric.conditioning import RewardConditioning

HH = "{prompt} {rewards}\n\nAssistant:"
SUMMARY = "### Instruction: Generate a one-sentence summary of this post. ### Input: {prompt} {rewards} ### Response: "


def test_paper_formats():
    c = RewardConditioning(["harmless", "helpful"], template=HH)
    text = c.format("\n\nHuman: How do I bake bread?", [0.31, -1.24])
    assert text == "\n\nHuman: How do I bake bread? <R1> 0.3 <R2> -1.2\n\nAssistant:"
    s = RewardConditioning(["pref1", "faithful"], template=SUMMARY)
    assert s.format("my post", [1, 2]) == (
        "### Instruction: Generate a one-sentence summary of this post. ### Input: my post <R1> 1.0 <R2> 2.0 "
        "### Response: "
    )
    assert s.format_unconditioned("my post") == (
        "### Instruction: Generate a one-sentence summary of this post. ### Input: my post ### Response: "
    )
    assert c.format_unconditioned("\n\nHuman: hi") == "\n\nHuman: hi\n\nAssistant:"


def test_negative_zero_is_written_as_zero():
    c = RewardConditioning(["a"])
    assert c.format("x", [-0.04]) == "x <R1> 0.0"


def test_custom_markers_and_decimals():
    c = RewardConditioning(["a", "b"], template="{rewards} | {prompt}", markers=["[harm]", "[help]"], decimals=2)
    text = c.format("q?", [1.234, -0.5])
    assert text == "[harm] 1.23 [help] -0.50 | q?"
    assert c.parse(text)[0] == "q?"
    np.testing.assert_allclose(c.parse(text)[1], [1.23, -0.5])


prompt_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60)


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 6),
    prompt=prompt_text,
    data=st.data(),
    decimals=st.integers(0, 3),
    template=st.sampled_from([HH, SUMMARY, "{rewards} {prompt}", "{prompt}{rewards}", "A {prompt} B {rewards} C"]),
)
def test_round_trip_any_n(n, prompt, data, decimals, template):
    values = np.array(data.draw(st.lists(st.floats(-50, 50), min_size=n, max_size=n)))
    c = RewardConditioning([f"r{i}" for i in range(n)], template=template, decimals=decimals)
    parsed_prompt, parsed = c.parse(c.format(prompt, values))
    assert parsed_prompt == prompt
    np.testing.assert_allclose(parsed, c.round(values), atol=0)
    assert np.all(np.abs(parsed - values) <= 0.5 * 10.0**-decimals + 1e-9)


def test_errors_name_the_problem():
    c = RewardConditioning(["harmless", "helpful"])
    with pytest.raises(
        ValueError,
        match=r"reward values \[1.0, 2.0, 3.0\] need 2 finite values, one per reward \['harmless', 'helpful'\]",
    ):
        c.format("x", [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        c.format("x", [1, np.nan])
    with pytest.raises(ValueError, match="does not follow"):
        c.parse("no markers here")
    with pytest.raises(ValueError, match=r"\{rewards\} exactly once"):
        RewardConditioning(["a"], template="{prompt}")
    with pytest.raises(ValueError, match="duplicates"):
        RewardConditioning(["a", "a"])
    with pytest.raises(ValueError, match="1 markers"):
        RewardConditioning(["a", "b"], markers=["<x>"])
    with pytest.raises(ValueError, match="empty"):
        RewardConditioning([])


@pytest.mark.parametrize("decimals", [0, 1, 2])
def test_digits_right_after_the_markers_parse(decimals):
    c = RewardConditioning(["a", "b"], template="{rewards}\n{prompt}", decimals=decimals)
    for prompt in ["0", "05 apples", "1.5", "-3", " 7"]:
        assert c.parse(c.format(prompt, [0.0, -12.34]))[0] == prompt
    with pytest.raises(ValueError, match="right after"):
        RewardConditioning(["a"], template="{rewards}{prompt}")
