"""Caption tokenizers on HF `tokenizers`.

`CaptionTokenizer`: byte-level BPE trained on our own captions.
`OpenAITokenizer`: OpenAI CLIP's 49408-token BPE, id-for-id compatible (see below).

CaptionTokenizer id layout (the model relies on it):
  0                      <pad>            (zero padding)
  1 .. V-3               byte-level BPE tokens
  V-2                    <start_of_text>
  V-1                    <end_of_text>    (highest id -> text features pooled at argmax)
"""

from __future__ import annotations

import gzip
import html
import re
import unicodedata
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, SOT, EOT = "<pad>", "<start_of_text>", "<end_of_text>"


class CaptionTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # Captions are data, not markup: never turn a literal "<end_of_text>" in a
        # caption into the EOT id (it would break argmax pooling).
        self.tokenizer.encode_special_tokens = True
        ids = {t: tokenizer.token_to_id(t) for t in (PAD, SOT, EOT)}
        if None in ids.values():
            raise ValueError(f"tokenizer lacks special tokens: {ids}")
        self.pad_id, self.sot_id, self.eot_id = ids[PAD], ids[SOT], ids[EOT]
        v = self.vocab_size
        if (self.pad_id, self.sot_id, self.eot_id) != (0, v - 2, v - 1):
            raise ValueError(f"bad special-token ids {ids} for vocab_size {v}")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CaptionTokenizer":
        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        """Plain BPE ids for one text, without SOT/EOT."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip()

    def __call__(self, texts: str | list[str], context_length: int) -> torch.LongTensor:
        """[N, context_length] = SOT + ids + EOT, zero padded; long texts are cut so EOT survives."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError("context_length must be >= 2 (room for SOT and EOT)")
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        keep = context_length - 2
        for row, enc in zip(out, encodings):
            ids = enc.ids[:keep]
            row[0] = self.sot_id
            row[1 : 1 + len(ids)] = ids
            row[1 + len(ids)] = self.eot_id
        return torch.from_numpy(out)


def _normalizer() -> normalizers.Normalizer:
    # lower-case + collapse whitespace: captions from the web are noisy, and a smaller
    # symbol inventory matters for a small vocabulary.
    return normalizers.Sequence([
        normalizers.NFC(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Strip(),
    ])


def train_caption_tokenizer(captions: Iterable[str], vocab_size: int) -> CaptionTokenizer:
    """Train byte-level BPE on `captions`. The result has at most `vocab_size` ids
    (fewer if the corpus has too few merges to fill it)."""
    n_bytes = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < n_bytes + 3:
        raise ValueError(f"vocab_size must be >= {n_bytes + 3} (bytes + 3 special tokens)")
    tok = Tokenizer(models.BPE())
    tok.normalizer = _normalizer()
    # add_prefix_space: "red" at the start of a caption maps to the same token as " red"
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,  # leave room for SOT/EOT, appended afterwards
        special_tokens=[PAD],  # first special token -> id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(captions, trainer=trainer)
    # Added after training so they take the two highest ids, EOT last.
    tok.add_special_tokens([SOT, EOT])
    return CaptionTokenizer(tok)


# -----------------------------------------------------------------------------
# OpenAI CLIP tokenizer (bpe_simple_vocab_16e6), rebuilt on HF `tokenizers`
#
# Id layout of the OpenAI vocabulary (49408 ids):
#   0 .. 255          the 256 byte symbols (in `_bytes_to_unicode` order)
#   256 .. 511        the same symbols with the end-of-word suffix "</w>"
#   512 .. 49405      one id per merge, in merge-rank order (48894 merges)
#   49406, 49407      <start_of_text>, <end_of_text>
# Padding is 0 (which is also the id of "!"; the model never looks past EOT).

OPENAI_VOCAB_SIZE = 49408
OPENAI_NUM_MERGES = OPENAI_VOCAB_SIZE - 2 * 256 - 2
_EOW = "</w>"

# The reference pre-tokenization pattern (applied case-insensitively to cleaned,
# lower-cased text): contractions, runs of letters, single digits, runs of anything
# else that is not whitespace. Oniguruma (HF `tokenizers`) and the `regex` module
# agree on it for every assigned code point except U+0345 (COMBINING GREEK
# YPOGEGRAMMENI), which `regex` under IGNORECASE matches with none of the branches,
# so the reference drops it like whitespace; we replace it with a space.
_OPENAI_PATTERN = r"(?i)'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_DROPPED_LIKE_SPACE = "\u0345"


def _bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode char table of GPT-2/CLIP byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space,
    NBSP, soft hyphen, ...) map to chr(256), chr(257), ... in byte order. The dict's
    insertion order (printables first, then the rest) is the vocabulary order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def openai_clean(text: str) -> str:
    """The reference text cleaning: ftfy, html-unescape twice, collapse whitespace, lower-case."""
    import ftfy  # local import: only the OpenAI tokenizer needs it

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _is_word_boundary_char(ch: str) -> bool:
    """True if a token of the reference pattern necessarily ends right after `ch`
    (whitespace, a letter or a digit; a punctuation run would extend over a '<')."""
    return ch.isspace() or unicodedata.category(ch)[0] in "LN"


class OpenAITokenizer:
    """Id-for-id reimplementation of OpenAI CLIP's `SimpleTokenizer` (as shipped by
    open_clip, clean="lower") on a HF `tokenizers` BPE model.

    Build it from the gzipped merges file: ``OpenAITokenizer.from_bpe_file(path)``.
    ``tok(texts, context_length=77)`` returns ``[N, 77]`` SOT + ids + EOT, zero padded;
    over-long texts are cut so that EOT stays the last token.

    Like the reference, a literal ``<start_of_text>`` / ``<end_of_text>`` in a caption
    is encoded as that special id wherever the reference regex would match it (at the
    start, or after whitespace/a letter/a digit/another special token)."""

    SOT, EOT = "<start_of_text>", "<end_of_text>"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.sot_id = tokenizer.token_to_id(self.SOT)
        self.eot_id = tokenizer.token_to_id(self.EOT)
        self.pad_id = 0
        if (self.sot_id, self.eot_id) != (self.vocab_size - 2, self.vocab_size - 1):
            raise ValueError(f"bad special-token ids {self.sot_id}, {self.eot_id} "
                             f"for vocab_size {self.vocab_size}")
        self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        self._special_re = re.compile(f"{re.escape(self.SOT)}|{re.escape(self.EOT)}")

    @classmethod
    def from_bpe_file(cls, path: str | Path, num_merges: int = OPENAI_NUM_MERGES) -> "OpenAITokenizer":
        """Build from ``bpe_simple_vocab_16e6.txt.gz`` (a version header line, then one
        space-separated merge per line, best rank first). Reads only the local file."""
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + num_merges]]
        if len(merges) != num_merges or any(len(m) != 2 for m in merges):
            raise ValueError(f"{path}: expected {num_merges} merges of two symbols each")
        symbols = list(_bytes_to_unicode().values())
        vocab_list = symbols + [s + _EOW for s in symbols] + ["".join(m) for m in merges]
        vocab = {tok: i for i, tok in enumerate(vocab_list)}
        if len(vocab) != len(vocab_list):
            raise ValueError(f"{path}: merges produce duplicate tokens")
        model = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=_EOW)
        tok = Tokenizer(model)
        # Cleaning (ftfy, html) happens in Python; the tokenizer sees cleaned text.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            # keep only the pattern's matches, like re.findall
            pre_tokenizers.Split(Regex(_OPENAI_PATTERN), behavior="removed", invert=True),
            # utf-8 bytes -> the printable symbols above; no prefix space, no GPT-2 regex
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.add_special_tokens([cls.SOT, cls.EOT])  # ids 49406, 49407
        # Specials inside captions are resolved in `_segments`, never by HF matching.
        tok.encode_special_tokens = True
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _segments(self, clean: str) -> list[str | int]:
        """Split cleaned text into plain-text pieces and special ids where the
        reference regex would match a literal special token."""
        out: list[str | int] = []
        start = last_special_end = 0
        for m in self._special_re.finditer(clean):
            p = m.start()
            if p == 0 or p == last_special_end or _is_word_boundary_char(clean[p - 1]):
                out.append(clean[start:p])
                out.append(self.sot_id if m.group() == self.SOT else self.eot_id)
                start = last_special_end = m.end()
        out.append(clean[start:])
        return out

    def _encode_clean(self, cleaned: list[str]) -> list[list[int]]:
        plain = [i for i, t in enumerate(cleaned) if "_of_text>" not in t]
        result: list[list[int]] = [[] for _ in cleaned]
        encs = self.tokenizer.encode_batch([cleaned[i] for i in plain], add_special_tokens=False)
        for i, enc in zip(plain, encs):
            result[i] = enc.ids
        for i in set(range(len(cleaned))) - set(plain):  # rare: literal special tokens
            ids: list[int] = []
            for seg in self._segments(cleaned[i]):
                if isinstance(seg, int):
                    ids.append(seg)
                elif seg:
                    ids.extend(self.tokenizer.encode(seg, add_special_tokens=False).ids)
            result[i] = ids
        return result

    def _clean(self, text: str) -> str:
        return openai_clean(text).replace(_DROPPED_LIKE_SPACE, " ")

    def encode(self, text: str) -> list[int]:
        """BPE ids for one text (cleaned like the reference), without SOT/EOT."""
        return self._encode_clean([self._clean(text)])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._encode_clean([self._clean(t) for t in texts])

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of the byte mapping; "</w>" becomes a space, SOT/EOT/padding are dropped."""
        ids = [int(i) for i in ids]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        syms = "".join(self.tokenizer.id_to_token(i) for i in ids if i != self.sot_id)
        raw = bytearray(self._byte_decoder[c] for c in syms)
        return raw.decode("utf-8", errors="replace").replace(_EOW, " ").strip()

    def __call__(self, texts: str | list[str], context_length: int = 77) -> torch.LongTensor:
        """[N, context_length] = SOT + ids + EOT, zero padded; long texts are cut so EOT survives."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError("context_length must be >= 2 (room for SOT and EOT)")
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        keep = context_length - 2
        for row, ids in zip(out, self.encode_batch(list(texts))):
            ids = ids[:keep]
            row[0] = self.sot_id
            row[1 : 1 + len(ids)] = ids
            row[1 + len(ids)] = self.eot_id
        return torch.from_numpy(out)


def load_openai_tokenizer(bpe_path: str | Path) -> OpenAITokenizer:
    """OpenAI CLIP tokenizer from a local ``bpe_simple_vocab_16e6.txt.gz``."""
    return OpenAITokenizer.from_bpe_file(bpe_path)


# -----------------------------------------------------------------------------
# Which tokenizer a model directory carries
#
# A model directory (train stage output, an imported checkpoint, the bundle inside a logged
# pyfunc) holds model.safetensors + config.json and one tokenizer file:
#   tokenizer.json                  witclip's own byte-level BPE (CaptionTokenizer)
#   bpe_simple_vocab_16e6.txt.gz    OpenAI's merges file (OpenAITokenizer), for imported OpenAI weights
# When both are present, tokenizer.json wins.

TOKENIZER_FILE = "tokenizer.json"
OPENAI_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
TOKENIZER_FILES = (TOKENIZER_FILE, OPENAI_VOCAB_FILE)


def find_tokenizer_file(model_dir: str | Path) -> Path | None:
    """The tokenizer file of a model directory (see above), or None when it has neither."""
    for name in TOKENIZER_FILES:
        path = Path(model_dir) / name
        if path.is_file():
            return path
    return None


def load_tokenizer(model_dir: str | Path) -> CaptionTokenizer | OpenAITokenizer:
    """The tokenizer a model directory carries: CaptionTokenizer from tokenizer.json, else
    OpenAITokenizer from bpe_simple_vocab_16e6.txt.gz; FileNotFoundError naming both when neither."""
    path = find_tokenizer_file(model_dir)
    if path is None:
        raise FileNotFoundError(
            f"{model_dir}: no tokenizer; expected {TOKENIZER_FILE} (witclip's trained tokenizer) "
            f"or {OPENAI_VOCAB_FILE} (OpenAI's vocab)")
    if path.name == TOKENIZER_FILE:
        return CaptionTokenizer.load(path)
    return load_openai_tokenizer(path)
