"""Caption tokenizer: byte-level BPE trained on our own captions with HF `tokenizers`.

Id layout (the model relies on it):
  0                      <pad>            (zero padding)
  1 .. V-3               byte-level BPE tokens
  V-2                    <start_of_text>
  V-1                    <end_of_text>    (highest id -> text features pooled at argmax)
"""

from __future__ import annotations

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
