from tinyworld.diagnose import box_vs_chain


def test_box_vs_chain_compares_the_box_with_the_last_reduction():
    texts = ["3+4+5=7+5=\\boxed{12}",   # derived and right
             "8+6=\\boxed{13}",          # off chain (8+6 is 14), wrong
             "9+9+9=17+9=\\boxed{27}",   # off chain and lucky: the chain slipped (9+9=17), the box is right
             "\\boxed{9}",               # no chain: not counted
             "1+2=3"]                    # no box: not counted
    answers = ["12", "14", "27", "9", "3"]
    assert box_vs_chain(texts, answers) == (2, 1, 3)
