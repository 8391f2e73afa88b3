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
