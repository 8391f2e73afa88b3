import re

import pytest

from ampo_cache.verify import Verifier, extract_answer, verify_one


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the sum is \\boxed{42}.", "42"),
        ("first \\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # the last box wins
        ("nested \\boxed{\\frac{\\sqrt{2}}{2}} ok", "\\frac{\\sqrt{2}}{2}"),
        ("Therefore, the answer is $-7$.", "-7"),
        ("The final answer is: 12", "12"),
        ("6 * 7 = 42\n#### 42", "42"),
        ("Q: what?\nA: 3/4\n", "3/4"),
        ("adding gives 10 and then 15", "15"),
        ("the total is 1,250.", "1,250"),
        ("I do not know", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, answer, status",
    [
        ("\\boxed{\\frac{1}{2}}", "0.5", "correct"),  # LaTeX fraction vs decimal
        ("\\boxed{0.5}", "\\frac{1}{2}", "correct"),
        ("\\boxed{\\frac{2}{4}}", "\\frac12", "correct"),
        ("\\boxed{0.51}", "\\frac{1}{2}", "wrong"),
        ("The answer is 1,000.", "1000", "correct"),  # thousands separator
        ("#### 1000", "1,000", "correct"),
        ("\\boxed{1,001}", "1000", "wrong"),
        ("\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", "correct"),  # sets ignore order
        ("\\boxed{\\{1, 2\\}}", "\\{1,2,3\\}", "wrong"),
        ("\\boxed{[0, 1)}", "[0,1)", "correct"),  # intervals keep their brackets
        ("\\boxed{(0, 1)}", "[0,1]", "wrong"),
        ("A: -3", "-3", "correct"),
        ("\\boxed{x = 5}", "5", "correct"),
        ("no digits here", "5", "no_answer"),
    ],
)
def test_verify_one(text, answer, status):
    verdict = verify_one(text, answer)
    assert verdict.status == status
    assert verdict.correct == (status == "correct")


def test_pool_times_out_pathological_items_and_keeps_the_rest():
    # sympy tries to evaluate this power tower and never returns: only the pool's kill stops it.
    texts = ["\\boxed{9^{9^{9^{9}}}}", "\\boxed{\\frac{1}{2}}", "nothing", "\\boxed{3}"]
    answers = ["1", "0.5", "1", "4"]
    with Verifier(timeout=1.5, workers=2) as verifier:
        verdicts = verifier.verify(texts, answers)
    assert [v.status for v in verdicts] == ["timeout", "correct", "no_answer", "wrong"]
    assert verdicts[0].extracted == "9^{9^{9^{9}}}"


def test_in_process_and_pool_agree():
    texts = ["\\boxed{\\frac{6}{8}}", "The answer is 0.75", "\\boxed{\\{1,2\\}}", "#### 7"]
    answers = ["\\frac{3}{4}", "3/4", "\\{2,1\\}", "8"]
    with Verifier(workers=0) as here, Verifier(workers=1) as pool:
        assert here.verify(texts, answers) == pool.verify(texts, answers)


def test_lengths_must_match():
    with pytest.raises(ValueError):
        Verifier(workers=0).verify(["a"], [])


# ---------------------------------------------------------------- <answer>...</answer> (rule 0)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>3 + 4 = 7</think> <answer>7</answer>", "7"),
        ("<think>maybe \\boxed{8}?</think><answer>7</answer>", "7"),  # the declared answer wins over a box outside
        ("<answer>\\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),  # a box inside the tag
        ("<answer> $\\frac{1}{2}$. </answer>", "\\frac{1}{2}"),  # LaTeX kept whole, not its last number
        ("<answer>(1, 2]</answer>", "(1, 2]"),
        ("<answer>The answer is 12.</answer>", "12"),
        ("<answer>\nx = 4, so\n x = 5 \n</answer>", "x = 5"),  # its last non-empty line
        ("<ANSWER>9</Answer>", "9"),  # tags in any case
        ("<answer>1</answer> then <answer>2</answer>", "2"),  # the last pair
        ("<answer></answer> so it is 5", "5"),  # an empty pair: the rules before tags, on the whole text
        ("<answer>\\boxed{}</answer>", None),
        ("<answer>7", "7"),  # unclosed (truncated): no pair, judged as before (the last number)
        ("so it is 4 </answer>", "4"),  # a close tag alone is no pair: the last number, as before
    ],
)
def test_extract_answer_tags(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, answer, status",
    [
        ("<think>2 + 2</think><answer>4</answer>", "4", "correct"),
        ("<think>...</think><answer>\\frac{2}{4}</answer>", "0.5", "correct"),  # math-verify on the tag's content
        ("<answer>x = 5</answer>", "5", "correct"),
        ("<think>\\boxed{4}</think><answer>5</answer>", "4", "wrong"),
        ("<answer></answer>", "4", "no_answer"),
    ],
)
def test_verify_tagged_responses(text, answer, status):
    assert verify_one(text, answer).status == status


def _extract_before_tags(text):
    """``extract_answer`` as it was before rule 0 (frozen here): what untagged responses must keep getting."""
    import re

    from ampo_cache.boxed import last_boxed_content

    def clean(answer):
        return re.sub(r"^[\s$]+|[\s$.]+$", "", answer)

    boxed = last_boxed_content(text)
    if boxed is not None:
        return clean(boxed) or None
    for pattern in (r"(?i)the (?:final )?answer is[:\s]*([^\n]+)", r"####\s*([^\n]+)", r"(?m)^\s*A:\s*(.+?)\s*$"):
        matches = re.findall(pattern, text)
        if matches:
            inner = last_boxed_content(matches[-1])
            answer = clean(inner if inner is not None else matches[-1])
            if answer:
                return answer
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?", text)
    return clean(numbers[-1]) if numbers else None


def test_responses_without_a_tag_pair_are_judged_exactly_as_before():
    import random

    # Pieces of real responses, <answer> alone and </answer> alone among them (an unclosed or stray tag is no pair).
    pieces = ["\\boxed{42}", "\\boxed{}", "\\boxed{\\frac{1}{2}}", "the answer is 7.", "The final answer is: $3$",
              "#### 1,000", "\nA: -3\n", "so 12 + 5 = 17", "3/4", " and ", "\n", "x = 5", "$\\{1, 2\\}$", "<answer>",
              "</answer>", "<think>", "</think>", "no number", "\\boxed{\\boxed{3}}", "\\fbox{9}", "</answer> <answer>"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 6))) for _ in range(3000)]
    untagged = [t for t in texts if not re.search(r"(?is)<answer>.*</answer>", t)]
    assert len(untagged) > 1500
    assert [extract_answer(t) for t in untagged] == [_extract_before_tags(t) for t in untagged]
