"""Caption tokenisation as the coco-caption toolkit does it, with Java (Stanford PTB) or without (spaCy).

The challenge server tokenises with the Stanford PTB tokenizer (CoreNLP 3.4.1, lower-cased), then
drops the tokens in pycocoevalcap's PUNCTUATIONS list. `tokenize(..., use_java=True)` runs that same
jar with the same options, but keeps its console lines ("PTBTokenizer tokenized N tokens at ...") out
of the job's log. Where Java is missing, `python_tokenize` imitates PTB with spaCy's blank English
tokenizer (no model download) and PTB's rules for what spaCy does otherwise: contractions split the
PTB way ("can't" -> "ca n't"), hyphenated and slashed words kept whole ("t-shirt", "e-mail/im"),
symbols split off ("50 % off"), the abbreviations whose period PTB keeps ("etc.", "no. 5"), brackets
written as PTB writes them and then lower-cased ("-lrb-", which pycocoevalcap's upper-case list does
not remove), quotes, the ellipsis and the listed punctuation dropped. tests/test_evaluate.py measures
the agreement.
"""
import functools
import os
import re
import shutil
import subprocess
import tempfile
import unicodedata

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS, copied so that this module imports without the toolkit
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
QUOTES = {"\"": "''", "“": "``", "”": "''", "‘": "`", "’": "'", "«": "``", "»": "''"}
# characters PTB rewrites (dashes, the ellipsis, currency signs, fractions) or cannot tokenise and drops (emoji
# variation selectors; characters beyond U+FFFF are dropped in _separate)
NORMALISE = str.maketrans({"—": " -- ", "–": " -- ", "…": " ... ", "€": "$", "¤": "$",
                           "£": "#", "¢": " cents ", "¼": " 1/4 ", "½": " 1/2 ", "¾": " 3/4 ", "⅓": " 1/3 ",
                           "⅔": " 2/3 ", "\ufe0e": "", "\ufe0f": ""})
# tokens PTB keeps whole and spaCy would split: slashed words ("e-mail/im", "w/o"), capitals joined by "&"
# ("AT&T", not "at&t"), hashtags, "'90s", "'n'"
WHOLE = re.compile(r"[^\W_]+(?:-[^\W\d_]+){0,2}(?:/[^\W_]+(?:-[^\W\d_]+){0,2}){1,2}|[A-Z]+(?:&[A-Z]+)+"
                   r"|#[^\W\d_][^\W_]*|['’][2-9]0s|['’]n['’]?")
# PTB writes a curly apostrophe as ' in the contractions it splits off ("it’s" -> "it 's"), not inside words ("o’clock")
CURLY_CONTRACTION = re.compile(r"’(?:[smdSMD]|re|ve|ll|RE|VE|LL)|[nN]’[tT]")
# abbreviations whose period PTB keeps (measured on CoreNLP 3.4.1): in any case; only capitalised (in lower
# case they are words: "ill.", "mass."); only before a number ("no. 5", but "no." elsewhere)
KEEP_PERIOD = set("""adj adm adv al ala alex apr ariz assn assoc asst atty attys aug ave bancorp bhd bldg blvd brig
    bros calif capt cf cie cmdr co col colo comdr conn corp cos cpl ct dak dec dept det dr drs elec ens esq est etc
    ext feb fla fri ft ga gen gov govs hon inc ind insp intl invt jan jos jr jul jun kan kans ky lieut lt ltd maj mar
    md messrs mfg mich minn mlle mme mo mon mont mr mrs ms msgr mt mtg natl neb nev nov oct okla penn pfc ph plc pres
    prof profs pty pvt rd rep reps rev rt sen sens sep sept seq sfc sgt spc sq sr st ste supt supts sys tel tenn thu
    thurs treas tue tues univ va vs vt wed wis wisc wm wyo""".split())
KEEP_PERIOD_CAPITALISED = set("ark az del ill la mass miss ore pa tex wash".split())
KEEP_PERIOD_BEFORE_NUMBER = set("art ca fig figs no nos op pp prop".split())
# an initial ("vitamin C.") loses its period when one of these words follows, even on the next caption: PTB reads
# the captions as one text
SENTENCE_START = re.compile(r"\s+(?:A(?i:bout|ccording|dditionally|fter|n|s|t)?|B(?i:ut)|E(?i:arlier)|H(?i:e|er|ere|owever)"
                            r"|I(?i:f|n|t)|L(?i:ast)|M(?i:any|ore|r\.|s\.)|N(?i:ow)|O(?i:nce|ne|ther|ur)"
                            r"|S(?i:he|ince|o|ome|uch)|T(?i:hat|he|heir|hen|here|hese|hey|his)|W(?i:e|hen|hile|hat)"
                            r"|Y(?i:et|ou))(?:\s|$)")
ASSIMILATIONS = {"cannot": 3, "gonna": 2, "gotta": 2, "wanna": 2, "lemme": 2, "gimme": 2}  # word: letters split off
FRACTION = re.compile(r"\d{1,4}/\d{1,4}")


@functools.lru_cache(maxsize=1)
def java_available():
    """True when a working `java` is on PATH (the PTB tokenizer, METEOR and SPICE need it)."""
    if shutil.which("java") is None:
        return False
    try:
        return subprocess.run(["java", "-version"], capture_output=True, timeout=30,
                              start_new_session=True).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.lru_cache(maxsize=1)
def _spacy_tokenizer():
    import spacy
    from spacy.symbols import ORTH
    from spacy.util import compile_infix_regex, compile_prefix_regex, compile_suffix_regex

    nlp = spacy.blank("en")
    # PTB keeps "t-shirt", "20-30" and "table.the" (a missing space) whole: drop spaCy's hyphen, arithmetic and
    # lower.Upper infixes; it splits "procter&gamble"
    infixes = [p for p in nlp.Defaults.infixes if not ("-|–|—" in p or r"[+\-\*^]" in p or r"\.(?=[A-Z" in p)]
    infixes.append(r"(?<=[^\W_])&(?=[^\W_])")
    # PTB keeps "500mg" whole but splits "50%": replace spaCy's number+unit suffix by number+%
    suffixes = [r"(?<=[0-9])%" if "|mg|" in p else p for p in nlp.Defaults.suffixes]
    # PTB keeps "!!!" and "?!" as one token (not in PUNCTUATIONS) and splits "w/ a" into "w / a"
    prefixes = [r"[!?]{2,}", "/"] + list(nlp.Defaults.prefixes)
    suffixes = [r"[!?]{2,}", "/"] + suffixes
    nlp.tokenizer.infix_finditer = compile_infix_regex(infixes).finditer
    nlp.tokenizer.suffix_search = compile_suffix_regex(suffixes).search
    nlp.tokenizer.prefix_search = compile_prefix_regex(prefixes).search
    nlp.tokenizer.token_match = WHOLE.fullmatch
    # of spaCy's special cases, PTB shares the contractions with an apostrophe ("don't") and the abbreviations
    # ("Mr."), not "dont" -> "do nt", "3pm" -> "3 pm", "w/" or emoticons; it has its own "cannot" -> "can not"
    rules = {text: case for text, case in nlp.tokenizer.rules.items()
             if ("'" in text[1:-1] or "’" in text[1:-1] or "." in text) and not re.fullmatch(r"\d+[ap]\.?m\.?", text)}
    for word, cut in ASSIMILATIONS.items():
        for variant in (word, word.capitalize(), word.upper()):
            rules[variant] = [{ORTH: variant[:-cut]}, {ORTH: variant[-cut:]}]
    nlp.tokenizer.rules = rules
    return nlp.tokenizer


@functools.lru_cache(maxsize=1)
def _separate():
    """(pattern, replacement) pairs that put spaces where PTB splits and spaCy would not."""
    # symbols and punctuation beyond ASCII, but not hyphens ("‐" joins words) or the apostrophe of "o’clock"
    symbols = re.escape("".join(chr(c) for c in range(0xA0, 0x10000) if chr(c) != "’"
                                and unicodedata.category(chr(c))[0] in "SP" and unicodedata.category(chr(c)) != "Pd"))
    return [(re.compile("[\U00010000-\U0010FFFF]"), ""),  # PTB 3.4.1 cannot tokenise emoji & co: dropped
            (re.compile(f"([%|~^\\\\=;\"`{symbols}]|(?<!\\+)\\+(?![+\\d]))"), r" \1 "),  # "50 % off", "| | |", "a +"
            (re.compile(r"(?<=[^\W_])\+(?=\d)"), " +"),  # "5 +5": a signed number
            (re.compile(r"(\d[.:,]\d+)(?=[^\W\d_])"), r"\1 "),  # "10:30am", "3.5oz": the number ends before letters
            (re.compile(r"(['’][^\W_]*)-"), r"\1 - ")]  # "can't-miss": a hyphenated word holds no apostrophe


def _keeps_period(word, after):
    """Whether PTB keeps the period of `word.`, given the text after it (the caption's rest, then the next ones)."""
    lower = word.lower()
    if len(word) == 1:
        return not SENTENCE_START.match(after)
    return (lower in KEEP_PERIOD or lower in KEEP_PERIOD_CAPITALISED and word[0].isupper()
            or lower in KEEP_PERIOD_BEFORE_NUMBER and re.match(r"\s?\d", after) is not None)


def _ptb_words(doc, text):
    """spaCy's tokens with PTB's abbreviation periods ("etc." kept, "oz." not) and fractions ("10\xa03/4");
    `text`: what PTB reads from the first token on (the caption, then the following ones)."""
    tokens, words, i = list(doc), [], 0
    while i < len(tokens):
        word, after = tokens[i].text, tokens[i + 1].text if i + 1 < len(tokens) else ""
        if word.isalpha() and after == "." and not tokens[i].whitespace_:  # spaCy split "etc." into "etc" "."
            i += 1
            word += "." if _keeps_period(word, text[tokens[i].idx + 1:]) else ""
        elif word[:-1].isalpha() and word.endswith("."):  # spaCy kept "Mr." whole
            word = word if _keeps_period(word[:-1], text[tokens[i].idx + len(word):]) else word[:-1]
        elif word.isdigit() and len(word) <= 4 and tokens[i].whitespace_ == " " and FRACTION.fullmatch(after):
            word, i = f"{word}\xa0{after}", i + 1
        words.append(word)
        i += 1
    return words


def python_tokenize(caption, following=""):
    """One caption -> space-separated tokens, as PTBTokenizer + pycocoevalcap's punctuation filter would give.

    `following`: the captions tokenised after this one, one a line (PTB decides some periods by what follows).
    """
    text = caption.replace("\n", " ").translate(NORMALISE)
    for pattern, replacement in _separate():
        text = pattern.sub(replacement, text)
    tokens = []
    for word in _ptb_words(_spacy_tokenizer()(text), text + "\n" + following):
        word = word.strip()
        if not word:
            continue
        if CURLY_CONTRACTION.fullmatch(word):
            word = word.replace("’", "'")
        word = BRACKETS.get(word, QUOTES.get(word, word)).lower()
        if word not in PUNCTUATIONS:
            tokens.append(word)
    return " ".join(tokens)


def java_tokenize(captions):
    """[caption, ...] -> [tokenised caption, ...] exactly as pycocoevalcap's PTBTokenizer does it, with the
    jar's console lines captured instead of printed."""
    from pycocoevalcap.tokenizer import ptbtokenizer
    jar_dir = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write("\n".join(c.replace("\n", " ") for c in captions).encode())
    try:
        result = subprocess.run(["java", "-cp", ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR,
                                 "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", f.name],
                                cwd=jar_dir, capture_output=True,
                                start_new_session=True)  # the job's group signals are the run's to handle
    finally:
        os.remove(f.name)
    if result.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer (Java) failed: {result.stderr.decode(errors='replace').strip()[-500:]}")
    lines = result.stdout.decode().split("\n")[:len(captions)]
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS) for line in lines]


def _following_lines(captions):
    """For each caption, the ones after it up to the next that is not blank, one a line (what PTB looks ahead to)."""
    following, after = [], ""
    for caption in reversed(captions):
        following.append(after)
        after = caption.replace("\n", " ") + ("\n" + after if not caption.strip() else "")
    return following[::-1]


def tokenize(captions_for_image, use_java):
    """{image_id: [caption, ...]} -> {image_id: [tokenised caption, ...]}, with the PTB tokenizer or without Java."""
    flat = [c for captions in captions_for_image.values() for c in captions]
    if use_java:
        tokens = iter(java_tokenize(flat))
    else:
        tokens = iter(python_tokenize(c, following) for c, following in zip(flat, _following_lines(flat)))
    return {i: [next(tokens) for _ in captions] for i, captions in captions_for_image.items() if captions}
