from tinyworld.diagnose import guessed_fraction


def test_guessed_fraction_compares_the_box_with_the_chain():
    texts = ["3+4+5=7+5=12 \\boxed{12}",   # derived
             "8+6=14 \\boxed{13}",          # guessed: the box ignores the chain's 14
             "\\boxed{9}",                  # no chain: not counted
             "1+2=3"]                       # no box (the last number is the chain's): derived
    assert guessed_fraction(texts) == (1, 3)
