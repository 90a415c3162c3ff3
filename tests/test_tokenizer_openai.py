"""The HF-`tokenizers` OpenAI CLIP tokenizer must give the same ids as open_clip's reference."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from clip import OpenAITokenizer, load_openai_tokenizer

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
BPE_PATH = Path(open_clip_tokenizer.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
if not BPE_PATH.is_file():
    pytest.skip(f"{BPE_PATH} missing", allow_module_level=True)

N_CAPTIONS = 12_000

WORDS = ("a photo of the cat dog man woman child car street house tree sky red blue green "
         "small big old new running sitting on in with at near under beautiful sunset beach "
         "mountain river city night day portrait close-up view painting drawing illustration "
         "vintage modern black white colorful group people playing football guitar coffee "
         "table kitchen bedroom window snow rain forest flower bird horse boat train plane").split()
CONTRACTIONS = ["don't", "it's", "we're", "they've", "I'm", "we'll", "he'd", "can't", "IT'S",
                "O'Neil", "rock'n'roll", "'quoted'", "''s", "dogs'"]
FOREIGN = ["café", "naïve", "crème brûlée", "São Paulo", "Zürich", "Ångström", "façade", "jalapeño",
           "Ελληνικά", "Straße", "İstanbul", "ǅemal", "ﬁne ﬂower", "Ⅻ ⅷ", "①②③", "½ ¾ ²³",
           "東京タワー", "北京烤鸭", "서울의 밤", "ひらがな カタカナ", "Привет мир", "Москва",
           "ЁЛКА", "مرحبا بالعالم", "שלום", "हिन्दी", "ภาษาไทย", "ქართული", "Ꭰ ꭰ", "ſs 'ſ",
           "\u0345a\u0345b", "e\u0301", "\u200bzero\u200dwidth", "tab\there", "x\u00ady"]
EMOJI = ["🐱", "🐶", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "❤️", "😀😃😄", "🎉🎉", "©®™", "☕", "✨", "🏳️‍🌈"]
ENTITIES = ["&amp;", "&#39;", "&quot;", "&lt;b&gt;", "&nbsp;", "&#x27;", "&amp;amp;", "&amp;#39;",
            "&eacute;", "&hellip;", "&mdash;", "&copy;", "&#8217;", "&bogus;", "& ;", "&#0;"]
MOJIBAKE = ["Ã©tÃ©", "cafÃ©", "â€œquotedâ€\x9d", "donâ€™t", "Ã¼ber", "â€”dashâ€“", "Ã\xa0 la",
            "Ð\x9fÑ€Ð¸Ð²ÐµÑ‚", "æ\x9d±äº¬", "ðŸ˜€", "Â£100", "Ã…ngstrÃ¶m"]
PUNCT = ["12345", "3.14159", "$1,000,000", "50%", "#hashtag", "@user", "http://example.com/a?b=c&d=e",
         "e-mail", "...", "!!!", "?!", "(parens)", "[brackets]", "{braces}", "--", "___", "~~", "^_^",
         ":-)", "<3", "a/b\\c", "\"double\"", "«guillemets»", "“smart”", "‘single’", "2024-01-31",
         "10:30pm", "1st 2nd 3rd", "x²+y²", "№7", "°C", "±5", "∑∞", "→", "•", "…", "—", "¡hola!", "¿qué?"]
SPACES = ["", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2009", "\u2028", "\x1c", " \t\n "]
SPECIALS = ["<start_of_text>", "<end_of_text>", "<END_OF_TEXT>", "x<end_of_text>", "!<end_of_text>",
            "<end_of_text><end_of_text>", "1<start_of_text>", "<<end_of_text>>", "<end_of_text",
            "'s<end_of_text>", "é<start_of_text>"]
UNICODE_RANGES = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
                  (0x900, 0x97F), (0x1E00, 0x1EFF), (0x2000, 0x206F), (0x2100, 0x22FF),
                  (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xACFF), (0xFF00, 0xFFEF),
                  (0x1F300, 0x1F6FF), (0x1D400, 0x1D4FF), (0x0, 0x1F)]


def _piece(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        w = rng.choice(WORDS)
        return w.capitalize() if rng.random() < 0.2 else (w.upper() if rng.random() < 0.05 else w)
    pools = [CONTRACTIONS, FOREIGN, EMOJI, ENTITIES, MOJIBAKE, PUNCT, SPECIALS]
    weights = [6, 14, 8, 8, 6, 14, 1]
    if kind < 0.93:
        return rng.choice(rng.choices(pools, weights)[0])
    lo, hi = rng.choice(UNICODE_RANGES)
    return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 6)))


def _captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    caps = [s for s in SPACES]
    caps += [" ".join(WORDS[i : i + 100]) * 3 for i in range(0, 40, 7)]  # long, > 77 tokens
    caps += SPECIALS + FOREIGN + EMOJI + ENTITIES + MOJIBAKE + PUNCT + CONTRACTIONS
    while len(caps) < n:
        r = rng.random()
        length = rng.randint(1, 12) if r < 0.8 else rng.randint(40, 120)  # ~20% long
        parts = []
        for _ in range(length):
            parts.append(_piece(rng))
            parts.append(rng.choice(SPACES[1:]) if rng.random() < 0.1 else ("" if rng.random() < 0.15 else " "))
        cap = "".join(parts)
        if rng.random() < 0.05:
            cap = rng.choice(SPACES) + cap + rng.choice(SPACES)
        caps.append(cap)
    return caps[:n]


@pytest.fixture(scope="module")
def tok() -> OpenAITokenizer:
    return load_openai_tokenizer(BPE_PATH)


@pytest.fixture(scope="module")
def ref():
    return open_clip_tokenizer.SimpleTokenizer(str(BPE_PATH))


def test_sizes_and_special_ids(tok, ref):
    assert (tok.sot_id, tok.eot_id, tok.vocab_size) == (49406, 49407, 49408)
    assert (ref.sot_token_id, ref.eot_token_id, ref.vocab_size) == (49406, 49407, 49408)
    assert tok.tokenizer.get_vocab(with_added_tokens=True) == ref.encoder
    assert OpenAITokenizer.from_bpe_file(BPE_PATH).vocab_size == 49408


def test_ids_match_open_clip_reference(tok, ref):
    captions = _captions(N_CAPTIONS)
    assert len(captions) == N_CAPTIONS and len(set(captions)) > 0.9 * N_CAPTIONS
    ours = tok(captions, context_length=77)
    theirs = ref(captions, context_length=77)
    assert ours.shape == theirs.shape == (N_CAPTIONS, 77) and ours.dtype == torch.long
    bad = [i for i in range(N_CAPTIONS) if not torch.equal(ours[i], theirs[i])]
    assert not bad, [(captions[i], ours[i].tolist(), theirs[i].tolist()) for i in bad[:3]]
    # the comparison must have covered truncation, empty captions and specials-in-text
    n_ids = (theirs != 0).sum(1)
    assert (n_ids == 77).sum() > 500 and (n_ids == 2).sum() >= 5
    assert ((theirs[:, 1:-1] == 49407) & (theirs[:, 2:] != 0)).any()
    # ftfy really repaired mojibake somewhere (same fixes on both sides)
    assert tok.encode("cafÃ©") == tok.encode("café")
    # encode() agrees with the reference's encode() too
    for cap in captions[:300]:
        assert tok.encode(cap) == ref.encode(cap)


def test_open_clip_tokenize_function(tok):
    caps = ["a diagram", "a dog", "a cat", "", "Ünïcödé &amp; 🐱"]
    assert torch.equal(tok(caps), open_clip_tokenizer.tokenize(caps))


@pytest.mark.parametrize("context_length", [2, 5, 77])
def test_truncation_keeps_eot(tok, ref, context_length):
    long = " ".join(["a photo of a very long caption"] * 40)
    out = tok([long, "hi"], context_length=context_length)
    assert out.shape == (2, context_length)
    assert out[0, 0] == tok.sot_id and out[0, -1] == tok.eot_id
    assert (out[0] == tok.eot_id).sum() == 1
    assert torch.equal(out, ref([long, "hi"], context_length=context_length))
    with pytest.raises(ValueError):
        tok("x", context_length=1)


def test_single_string_and_decode(tok):
    out = tok("A Photo of a CAT &amp; a dog!")
    assert out.shape == (1, 77)
    assert tok.decode(out[0]) == "a photo of a cat & a dog !"
    assert tok.decode(tok.encode("東京 café 🐱")) == "東京 café 🐱"
