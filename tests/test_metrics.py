"""Text metrics against values worked out by hand."""

import math

import pytest

from dinm.metrics import Degeneracy, longest_letter_run, ngram_entropy, repetition, rouge_l, summarise, token_f1, words


def test_words_split_punctuation_and_keep_contractions():
    assert words("I can't help, sorry.") == ["I", "can't", "help", ",", "sorry", "."]


def test_fluency_worked_examples():
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit.
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    # three distinct words: two equally likely bigrams (1 bit), one trigram (0 bits)
    assert ngram_entropy("the cat sat") == pytest.approx((2 / 3 * 1.0) / 2)
    assert ngram_entropy("") == 0.0
    # a loop is less fluent than varied text of the same length
    assert ngram_entropy("yes " * 12) < ngram_entropy("one two three four five six seven eight nine ten eleven twelve")


def test_repetition_share_of_repeated_trigrams():
    assert repetition(list("abcabc")) == pytest.approx(1 / 4)  # abc bca cab abc
    assert repetition(list("abcdef")) == 0.0
    assert repetition(["a", "b"]) == 0.0


@pytest.mark.parametrize("reply,reason", [
    ("", "empty"),
    ("ok .", "empty"),
    ("Good-day, " * 20, "repetition"),
    ("I can't. " * 15, "repetition"),
    ("%%% 123 ### 456 @@@ 789 !!!", "gibberish"),
    ("I am HAGHHHHHHHHHHHHHHH now", "gibberish"),
    # the demo's refusal tail under 0.8.0's default: words run together, no letter repeated 8 times in a row
    ("I'm sorry, but I can't help with step-by-step instructions. Stealthplasimislimargellelejhehehehehe",
     "gibberish"),
    ("Use document.getElementsByClassName to find them; it is the longest identifier here.", None),
    ("It says " + "abcdefghij" * 3 + " twice.", None),  # a run of 30 letters: not more than max_letter_run
    ("It says " + "abcdefghij" * 3 + "k twice.", "gibberish"),  # 31
    # 45 uncased letters in a row (Chinese is written without spaces): not a run of `max_letter_run`
    ("Water, 水: 水在海平面的沸点大约是摄氏一百度这是一个常用的参考点因此人们常常用它来校准温度计而且很方便", None),
    ("I'm sorry, but I can't help with that. Stealing is a crime.", None),
    ("Water boils at 100 degrees Celsius at sea level, which is 212 degrees Fahrenheit.", None),
])
def test_degenerate_reasons(reply, reason):
    assert Degeneracy().reason(reply) == reason


def test_longest_letter_run_counts_cased_letters_only():
    assert longest_letter_run("ab, cde 1234 fg") == 3
    assert longest_letter_run("x" * 31) == 31
    assert longest_letter_run("Ελληνικά кириллица") == 9
    assert longest_letter_run("abc水水水水def") == 3  # an uncased letter ends a run
    assert longest_letter_run("") == 0
    run = "It says " + "abcdefghij" * 3 + "k twice."  # 31 letters in a row
    assert Degeneracy().reason(run) == "gibberish" and Degeneracy(max_letter_run=31).reason(run) is None


def test_token_f1_and_rouge_l_by_hand():
    # normalised: [cat, sat] vs [cat, sat, down] -> P = 1, R = 2/3, F1 = 0.8
    assert token_f1("The cat sat!", "a cat sat down") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0
    # LCS of [cat, sat, on, mat] and [cat, lay, on, mat] is 3 -> P = R = 3/4
    assert rouge_l("cat sat on mat", "the cat lay on the mat") == pytest.approx(0.75)
    assert rouge_l("mat on cat", "cat on mat") == pytest.approx(1 / 3)  # order matters for ROUGE-L
    assert token_f1("mat on cat", "cat on mat") == pytest.approx(1.0)  # not for bag-of-words F1


def test_bootstrap_interval():
    assert summarise([1.0, 1.0, 1.0]) == {"mean": 1.0, "low": 1.0, "high": 1.0, "n": 3}
    s = summarise([0.0, 1.0] * 50)
    # sampling, not rounding: the standard error of a mean of 100 coin flips is 0.05; 0.35 / 0.65 are 3 of them
    assert s["mean"] == 0.5 and 0.35 < s["low"] < 0.5 < s["high"] < 0.65
    assert summarise([0.0, 1.0] * 50) == s  # seeded
    assert summarise([])["mean"] is None
