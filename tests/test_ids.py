from ampo_cache.ids import normalise_problem, prompt_id, text_hash


def test_spacing_and_unicode_forms_do_not_change_identity():
    assert prompt_id("What is  2 + 2?\n") == prompt_id(" What is 2 + 2?")
    # NFKC: full-width digits and a non-breaking space are their plain forms.
    assert prompt_id("What is ２\u00a0+ 2?") == prompt_id("What is 2 + 2?")
    assert normalise_problem("a\t\tb\n c") == "a b c"


def test_case_and_content_do_change_identity():
    assert prompt_id("Solve for x") != prompt_id("Solve for X")
    assert prompt_id("What is 2 + 2?") != prompt_id("What is 2 + 3?")
    assert len(prompt_id("x")) == 16 and len(text_hash("x")) == 16
