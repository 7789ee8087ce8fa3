"""Captions come out as references write them: decode(encode(caption)) gives the caption's own PTB tokens.

With the real Salesforce tokenizer (bert-base-uncased, tests/fixtures/hub_files), every caption of the real
VizWiz sample and the hard cases in tests/data/hard_captions.txt (possessives, contractions, hyphens,
prices, times, brand names) is encoded as training encodes it, decoded as validation and test decode
generated tokens (Family.decode), and both are tokenised by the Java PTB tokenizer the challenge server uses.
"""
import json
import shutil

import pytest
import torch
from transformers import BertTokenizer

from conftest import HUB_BASE, REPO, SAMPLE
from src.base.families.blip import Blip
from src.base.ptb import java_available, tokenize
from src.base.text import tidy_caption, training_caption

# What still differs, and why: BERT's uncased tokenizer strips accents and case, which PTB sometimes needs
KNOWN_DIFFERENCES = {
    "an at & t store receipt",  # PTB splits it, keeps "AT&T" whole; same tokens: decoding writes AT&T (text.py)
}


def sample_captions():
    annotations = json.loads((SAMPLE / "annotations" / "val.json").read_text())["annotations"]
    return sorted({a["caption"] for a in annotations})


def hard_captions():
    lines = (REPO / "tests" / "data" / "hard_captions.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def family_of(tokenizer_dir):
    from transformers import BlipConfig
    tokenizer = BertTokenizer.from_pretrained(tokenizer_dir)
    return Blip(BlipConfig.from_pretrained(HUB_BASE), type("Processor", (), {"tokenizer": tokenizer})())


@pytest.fixture(scope="module")
def blip_family():
    return family_of(HUB_BASE)


def round_trip(family, captions):
    """Each caption through training's tokens and generation's decoding (start and end tokens included)."""
    sequences = family.training_sequences(captions, max_tokens=100)
    return family.decode([ids + [family.pad_id] * 3 for ids in sequences])  # padding after the end token, as generated


def ptb(captions):
    return {i: tokens[0] for i, tokens in tokenize({i: [c] for i, c in enumerate(captions)}, use_java=True).items()}


@pytest.mark.skipif(not java_available(), reason="needs Java for the PTB tokenizer")
def test_decoded_captions_give_the_references_ptb_tokens(blip_family):
    captions = sample_captions() + hard_captions()
    decoded = round_trip(blip_family, captions)
    raw = [blip_family.tokenizer.decode(ids) for ids in blip_family.word_ids(captions)]  # what batch_decode wrote
    expected, ours, before = ptb(captions), ptb(decoded), ptb(raw)
    differ = {captions[i] for i in expected if expected[i] != ours[i]}
    agreement = 1 - len(differ) / len(captions)
    print(f"round-trip agreement: {len(captions) - len(differ)}/{len(captions)} ({agreement:.1%}); "
          f"plain decoding: {sum(expected[i] == before[i] for i in expected)}/{len(captions)}")
    assert not differ & set(sample_captions()), differ  # every real caption comes back as written
    assert differ == KNOWN_DIFFERENCES, "\n".join(f"{captions[i]!r}: {expected[i]!r} vs {ours[i]!r}"
                                                  for i in expected if expected[i] != ours[i])
    assert sum(expected[i] == before[i] for i in expected) < len(captions) - 15  # the tidying is what makes it agree


def test_decode_drops_the_prefix_and_everything_from_the_end_token(blip_family):
    [ids] = blip_family.training_sequences(["a person's t-shirt"], 40)
    after_end = torch.tensor([ids + [2000, blip_family.pad_id]])  # tokens after the end token do not count
    assert blip_family.decode(after_end) == ["a person's t-shirt"]
    no_end = [ids[:-1] + [2001, 2002]]  # cut at the length limit: everything generated counts
    assert blip_family.decode(no_end)[0].startswith("a person's t-shirt ") and len(blip_family.decode(no_end)[0]) > 20


def test_a_tokenizer_saved_by_transformers_4_decodes_the_same(blip_family, tmp_path):
    """transformers 4.x wrote `clean_up_tokenization_spaces: true` into tokenizer_config.json; decoding pins it off."""
    shutil.copytree(HUB_BASE, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    old = family_of(tmp_path)
    assert old.tokenizer.clean_up_tokenization_spaces  # the setting is read: the check below tests the pin
    captions = sample_captions() + hard_captions()
    assert round_trip(old, captions) == round_trip(blip_family, captions)


def test_tidy_caption_joins_only_inside_words():
    assert tidy_caption("a person ' s hand holding a t - shirt .") == "a person's hand holding a t-shirt."
    assert tidy_caption("it isn ' t 3 : 00, it ' s 12. 5 oz") == "it isn't 3:00, it's 12.5 oz"
    assert tidy_caption("the sign says ' open '") == "the sign says ' open '"  # quotes stay apart
    assert tidy_caption("a ' happy birthday ' card") == "a ' happy birthday ' card"
    assert tidy_caption("a can , a box") == "a can, a box"
    assert tidy_caption("l ' oreal and o ' doul ' s") == "l'oreal and o'doul's"
    assert tidy_caption("made in the u. s. a., not the u. k.") == "made in the u.s.a., not the u.k."


def test_a_standing_dash_is_trained_as_one_ptb_drops_and_a_hyphen_as_written():
    assert training_caption("a remote - samsung, 20 - 30 minutes") == "a remote \u2014 samsung, 20 \u2014 30 minutes"
    unchanged = "a t-shirt, 20-30 minutes, -5 degrees -- cold"
    assert training_caption(unchanged) == unchanged
