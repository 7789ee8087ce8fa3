"""Caption text as reference captions write it, from the text a WordPiece (BERT) tokenizer decodes to.

BERT's basic tokenizer splits off every punctuation character, and transformers 5 decodes the
tokens joined by spaces (`clean_up_tokenization_spaces` is off and the Salesforce tokenizer files
do not set it). A model that learnt "a person's hand holding a t-shirt" therefore writes
"a person ' s hand holding a t - shirt", which the PTB tokenizer scores as "person s ... t shirt"
against references tokenised "person 's ... t-shirt": every n-gram across those words is lost.
(The tokenizer's decode already attaches "." and "," to the word before them: "12. 5 oz".)
`tidy_caption` joins back what the split broke apart inside words: contractions and possessives,
hyphens and slashes between word characters, decimal points, thousands separators and clock
times between digits, ampersands in short names (AT&T), dotted initialisms (u.s.), and puts
sentence punctuation back against the word before it (which PTB treats the same either way).
tests/test_text.py measures the round trip on the real sample captions and hard cases.
"""
import re

CONTRACTION = re.compile(r"(\w) ' (s|t|re|ve|ll|d|m|clock)\b")   # person ' s, isn ' t, o ' clock
INSIDE_WORD = re.compile(r"(\w) ([-/&]) (?=\w)")                   # t - shirt, e - mail / im, at & t
BETWEEN_DIGITS = re.compile(r"(\d) ?([.,:]) (?=\d)")               # 12. 5, 1, 000, 3 : 00
INITIALISM = re.compile(r"\b(\w) ?\. (\w) ?\.(?= |$)")              # u. s. -> u.s.
# PTB keeps "AT&T" and "M&M" whole only in capitals (the uncased tokenizer lowercased them): write them so
SHORT_AMPERSAND_NAME = re.compile(r"\b\w{1,2}&\w{1,2}\b")
BEFORE_PUNCTUATION = re.compile(r" ([.,!?;:%)\]}])(?= |$)")        # "water ." -> "water."
AFTER_BRACKET = re.compile(r"([(\[{$#]) (?=\w)")                   # "( 2 )" -> "(2)", "$ 3" -> "$3"


def tidy_caption(text):
    text = " ".join(text.split())
    text = CONTRACTION.sub(r"\1'\2", text)
    text = INSIDE_WORD.sub(r"\1\2", INSIDE_WORD.sub(r"\1\2", text))  # twice: overlapping "a - b - c"
    text = BETWEEN_DIGITS.sub(r"\1\2", BETWEEN_DIGITS.sub(r"\1\2", text))
    text = INITIALISM.sub(r"\1.\2.", text)
    text = SHORT_AMPERSAND_NAME.sub(lambda name: name.group(0).upper(), text)
    text = BEFORE_PUNCTUATION.sub(r"\1", text)
    return AFTER_BRACKET.sub(r"\1", text)
