"""Caption text as reference captions write it, from the text a WordPiece (BERT) tokenizer decodes to.

BERT's basic tokenizer splits off every punctuation character, and transformers 5 decodes the
tokens joined by spaces (`clean_up_tokenization_spaces` is off and the Salesforce tokenizer files
do not set it). A model that learnt "a person's hand holding a t-shirt" therefore writes
"a person ' s hand holding a t - shirt", which the PTB tokenizer scores as "person s ... t shirt"
against references tokenised "person 's ... t-shirt": every n-gram across those words is lost.
(The tokenizer's decode already attaches "." and "," to the word before them: "12. 5 oz".)
`tidy_caption` joins back what the split broke apart inside words: contractions and possessives,
apostrophes in names (l'oreal), hyphens and slashes between word characters, decimal points, thousands
separators and clock times between digits, ampersands in short names (AT&T), dotted initialisms (u.s.a.),
and puts sentence punctuation back against the word before it (which PTB treats the same either way).
What the tokens cannot tell apart, `training_caption` keeps apart in the text the model learns from.
tests/test_text.py measures the round trip on the real sample captions and hard cases.
"""
import re

CONTRACTION = re.compile(r"(\w) ' (s|t|re|ve|ll|d|m|clock)\b")   # person ' s, isn ' t, o ' clock
# a name's elided article or O' (l ' oreal, o ' doul): one letter, but not the words "a" and "i", which a quote
# follows ("a ' happy birthday ' card")
NAME_APOSTROPHE = re.compile(r"\b([b-hj-z]) ' (?=\w)")
INSIDE_WORD = re.compile(r"(\w) ([-/&]) (?=\w)")                   # t - shirt, e - mail / im, at & t
BETWEEN_DIGITS = re.compile(r"(\d) ?([.,:]) (?=\d)")               # 12. 5, 1, 000, 3 : 00
INITIALISM = re.compile(r"\b\w ?\.(?: \w ?\.)+(?!\w)")             # u. s. a. -> u.s.a.
# PTB keeps "AT&T" and "M&M" whole only in capitals and splits "at&t", "at & t" and "AT & T", which the uncased
# tokens cannot tell apart: written in capitals, as the brands print them and references name brands (capitalised),
# so a reference written "AT&T" is matched and one written "at & t" is not
SHORT_AMPERSAND_NAME = re.compile(r"\b\w{1,2}&\w{1,2}\b")
BEFORE_PUNCTUATION = re.compile(r" ([.,!?;:%)\]}])(?= |$)")        # "water ." -> "water."
AFTER_BRACKET = re.compile(r"([(\[{$#]) (?=\w)")                   # "( 2 )" -> "(2)", "$ 3" -> "$3"


def tidy_caption(text):
    text = " ".join(text.split())
    text = CONTRACTION.sub(r"\1'\2", text)
    text = NAME_APOSTROPHE.sub(r"\1'", text)
    text = INSIDE_WORD.sub(r"\1\2", INSIDE_WORD.sub(r"\1\2", text))  # twice: overlapping "a - b - c"
    text = BETWEEN_DIGITS.sub(r"\1\2", BETWEEN_DIGITS.sub(r"\1\2", text))
    text = INITIALISM.sub(lambda initials: initials.group(0).replace(" ", ""), text)
    text = SHORT_AMPERSAND_NAME.sub(lambda name: name.group(0).upper(), text)
    text = BEFORE_PUNCTUATION.sub(r"\1", text)
    return AFTER_BRACKET.sub(r"\1", text)


# A dash standing between words or numbers ("remote control - samsung", "20 - 30") and a hyphen inside one
# ("control-samsung", "20-30") give the same tokens, but PTB drops the first ("control samsung", "20 30") and keeps
# the second in its word. tidy_caption joins them, as "t-shirt" needs; the standing dash is written as an em dash
# for training, which PTB drops as well ("--"), so a model trained on it writes the two apart.
STANDING_DASH = re.compile(r"(?<!\S)-(?!\S)")


def training_caption(caption):
    """A reference caption as the model learns it: what tidy_caption could not tell apart once tokenised, written
    apart, with the same PTB tokens."""
    return STANDING_DASH.sub("\u2014", caption)  # em dash
