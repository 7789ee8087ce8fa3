"""Caption tokenisation as the coco-caption toolkit does it, with Java (Stanford PTB) or without (spaCy).

The challenge server tokenises with the Stanford PTB tokenizer (lower-cased), then drops the
tokens in pycocoevalcap's PUNCTUATIONS list. Where Java is missing, `python_tokenize` imitates
it with spaCy's blank English tokenizer (no model download): contractions split the PTB way
("don't" -> "do n't"), hyphenated words kept whole ("t-shirt"), brackets written as PTB writes
them and then lower-cased ("-lrb-", which pycocoevalcap's upper-case list does not remove),
quotes and the listed punctuation dropped. tests/test_evaluate.py measures the agreement.
"""
import functools
import shutil
import subprocess

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, copied so that this module imports without the toolkit
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
QUOTES = {"\"": "''", "“": "``", "”": "''", "‘": "`", "’": "'", "«": "``", "»": "''"}
NORMALISE = str.maketrans({"’": "'", "‘": "'", "—": " -- ", "–": " -- "})


@functools.lru_cache(maxsize=1)
def java_available():
    """True when a working `java` is on PATH (the PTB tokenizer, METEOR and SPICE need it)."""
    if shutil.which("java") is None:
        return False
    try:
        return subprocess.run(["java", "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.lru_cache(maxsize=1)
def _spacy_tokenizer():
    import spacy
    from spacy.util import compile_infix_regex, compile_suffix_regex

    nlp = spacy.blank("en")
    # PTB keeps "t-shirt" and "20-30" whole: drop spaCy's hyphen and arithmetic infixes
    infixes = [p for p in nlp.Defaults.infixes if not ("-|–|—" in p or r"[+\-\*^]" in p)]
    # PTB keeps "500mg" whole but splits "50%": replace spaCy's number+unit suffix by number+%
    suffixes = [r"(?<=[0-9])%" if "|mg|" in p else p for p in nlp.Defaults.suffixes]
    nlp.tokenizer.infix_finditer = compile_infix_regex(infixes).finditer
    nlp.tokenizer.suffix_search = compile_suffix_regex(suffixes).search
    return nlp.tokenizer


def python_tokenize(caption):
    """One caption -> space-separated tokens, as PTBTokenizer + pycocoevalcap's punctuation filter would give."""
    tokens = []
    for token in _spacy_tokenizer()(caption.replace("\n", " ").translate(NORMALISE)):
        text = token.text.strip()
        if not text:
            continue
        text = BRACKETS.get(text, QUOTES.get(text, text)).lower()
        if text not in PUNCTUATIONS:
            tokens.append(text)
    return " ".join(tokens)


def tokenize(captions_for_image, use_java):
    """{image_id: [caption, ...]} -> {image_id: [tokenised caption, ...]}, with the PTB tokenizer or without Java."""
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        return PTBTokenizer().tokenize({i: [{"caption": c} for c in captions] for i, captions in captions_for_image.items()})
    return {i: [python_tokenize(c) for c in captions] for i, captions in captions_for_image.items()}
