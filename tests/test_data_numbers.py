"""Tests of the English and Dutch number words of the numbers_en_nl task."""
import re

import pytest

from ketchup_jax.data import numbers

DUTCH = {
    0: "nul", 1: "één", 2: "twee", 3: "drie", 8: "acht", 11: "elf", 12: "twaalf",
    13: "dertien", 14: "veertien", 18: "achttien", 19: "negentien", 20: "twintig",
    21: "eenentwintig", 22: "tweeëntwintig", 23: "drieëntwintig", 24: "vierentwintig",
    30: "dertig", 32: "tweeëndertig", 33: "drieëndertig", 40: "veertig",
    45: "vijfenveertig", 50: "vijftig", 60: "zestig", 70: "zeventig",
    77: "zevenenzeventig", 80: "tachtig", 88: "achtentachtig", 90: "negentig",
    99: "negenennegentig", 100: "honderd", 101: "honderdeen", 102: "honderdtwee",
    110: "honderdtien", 111: "honderdelf", 121: "honderdeenentwintig",
    122: "honderdtweeëntwintig", 200: "tweehonderd", 342: "driehonderdtweeënveertig",
    999: "negenhonderdnegenennegentig", 1000: "duizend", 1001: "duizend één",
    1100: "duizend honderd", 1234: "duizend tweehonderdvierendertig",
    2000: "tweeduizend", 2025: "tweeduizend vijfentwintig",
    3003: "drieduizend drie", 9999: "negenduizend negenhonderdnegenennegentig",
    10000: "tienduizend", 12345: "twaalfduizend driehonderdvijfenveertig",
    21000: "eenentwintigduizend", 22000: "tweeëntwintigduizend",
    47800: "zevenenveertigduizend achthonderd", 100000: "honderdduizend",
    101000: "honderdeenduizend", 999999:
    "negenhonderdnegenennegentigduizend negenhonderdnegenennegentig",
}

ENGLISH = {
    0: "zero", 1: "one", 13: "thirteen", 20: "twenty", 21: "twenty-one",
    99: "ninety-nine", 100: "one hundred", 101: "one hundred one",
    110: "one hundred ten", 1000: "one thousand", 1001: "one thousand one",
    1234: "one thousand two hundred thirty-four", 2025: "two thousand twenty-five",
    45010: "forty-five thousand ten",
    999999: "nine hundred ninety-nine thousand nine hundred ninety-nine",
}


@pytest.mark.parametrize("n,word", sorted(DUTCH.items()))
def test_dutch_known_spellings(n, word):
  assert numbers.dutch(n) == word


@pytest.mark.parametrize("n,word", sorted(ENGLISH.items()))
def test_english_known_spellings(n, word):
  assert numbers.english(n) == word


def test_both_sides_are_one_to_one_on_the_default_range():
  dutch = [numbers.dutch(n) for n in range(10000)]
  english = [numbers.english(n) for n in range(10000)]
  assert len(set(dutch)) == 10000
  assert len(set(english)) == 10000


def test_dutch_spelling_rules_hold_everywhere():
  for n in range(0, 100000, 7):
    word = numbers.dutch(n)
    # A trema on the joint exactly after twee/drie; never "eenhonderd"/"eenduizend".
    assert not re.search(r"(twee|drie)en(twintig|dertig|veertig|vijftig|zestig|"
                         r"zeventig|tachtig|negentig)", word), word
    assert "eenhonderd" not in word and not word.startswith("eenduizend"), word
    # One space at most, and only right after "duizend".
    assert word.count(" ") <= 1
    if " " in word:
      assert word.split(" ")[0].endswith("duizend"), word


def test_english_hyphenates_exactly_the_compound_tens():
  for n in range(100):
    assert ("-" in numbers.english(n)) == (n > 20 and n % 10 != 0)


@pytest.mark.parametrize("bad", [-1, 1_000_000, 2.0, "3", True])
def test_out_of_range_is_a_value_error(bad):
  with pytest.raises(ValueError, match="n must be an int in"):
    numbers.dutch(bad)
  with pytest.raises(ValueError, match="n must be an int in"):
    numbers.english(bad)
