"""Text for causal language modelling: documents -> tokens -> packed fixed-length blocks.

The default corpus ships inside every Python: ``pydoc_data.topics``, the 79 topics of the
language reference that ``help()`` shows (about 465 KB of English prose and code). Real
corpora come from local plain-text files (one document per file) or JSONL files (one document
per line, its ``text_key`` field), tokenized by a tokenizer loaded from a local folder
(``transformers.AutoTokenizer``); without one, text is UTF-8 bytes (vocabulary 256).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from distill_zoo.data.augment import CropFlip
from distill_zoo.data.base import split_indices
from distill_zoo.data.dense_device import InMemoryDenseDataModule, Split
from distill_zoo.losses.language import IGNORE_INDEX

SOURCES = ("pydoc_topics", "files")
BYTE_VOCABULARY = 256
END_OF_DOCUMENT_BYTE = 0
"""Closes every document in byte-level text (the reference text holds no NUL byte)."""
TEST_SEED = 0  # the test documents are fixed, like an official split, whatever the run's seed


def pydoc_topics() -> list[str]:
    """The documents of ``pydoc_data.topics``, in the order of their names."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def read_documents(files: Sequence[str | Path], text_key: str = "text") -> list[str]:
    """Documents of local files: a ``.jsonl`` file gives one per line (its ``text_key``
    field), any other file is one document (UTF-8 text)."""
    if not files:
        raise ValueError("data.source=files needs data.files=[<file>, ...] (txt or jsonl)")
    documents: list[str] = []
    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"text file {path} does not exist: data.files lists local .txt or .jsonl files"
            )
        if path.suffix != ".jsonl":
            documents.append(path.read_text(encoding="utf-8"))
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not JSON ({error.msg})") from error
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise ValueError(
                    f"{path}:{number} has no string field {text_key!r}: set "
                    "data.text_key to the field that holds the text"
                )
            documents.append(record[text_key])
    return documents


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; documents end with the NUL byte."""

    vocab_size = BYTE_VOCABULARY
    end_of_document = END_OF_DOCUMENT_BYTE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if i != END_OF_DOCUMENT_BYTE).decode(
            "utf-8", errors="replace"
        )


class PretrainedTokenizer:
    """A Hugging Face tokenizer from a local folder (``AutoTokenizer.from_pretrained``);
    documents end with its end-of-sequence token where it has one."""

    def __init__(self, path: str | Path) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "data.tokenizer needs Hugging Face transformers: pip install -e '.[text]'"
            ) from error
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"data.tokenizer={path} is not a folder: give a local folder written by "
                "tokenizer.save_pretrained(folder), or data.tokenizer=null for bytes"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.vocab_size = len(self.tokenizer)
        self.end_of_document = self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def pack(token_lists: Sequence[Sequence[int]], block_size: int) -> Tensor:
    """Concatenates the documents' tokens and cuts them into ``[N, block_size + 1]`` windows
    that overlap by one token (each block's inputs are its first ``block_size`` tokens, its
    targets its last ``block_size``), dropping the incomplete tail."""
    stream = np.fromiter((t for tokens in token_lists for t in tokens), dtype=np.int64)
    count = (len(stream) - 1) // block_size
    if count < 1:
        return torch.zeros(0, block_size + 1, dtype=torch.int64)
    starts = np.arange(count) * block_size
    windows = stream[starts[:, None] + np.arange(block_size + 1)[None, :]]
    return torch.from_numpy(windows)


class TextDataModule(InMemoryDenseDataModule):
    """Causal language modelling on a corpus split by document into train/val/test, each
    split's documents concatenated and packed into blocks of ``block_size`` next-token
    predictions.

    A fixed share ``test_fraction`` of the documents is the test split (seed 0, whatever the
    run's seed); ``val_fraction`` of the rest is held out for validation with ``seed``. A text
    that appears twice is kept once (two of the 79 pydoc topics, ``else`` and ``if``, share
    one). With the defaults on ``pydoc_topics`` (78 distinct documents, byte tokens) that is
    63 / 7 / 8 documents.

    Batches: ``(inputs int64 [B, L], targets int64 [B, L], indices int64 [B])`` with
    ``targets[:, i] = inputs[:, i + 1]`` inside the block (training batches end with
    augmentation keys of 0: text is not augmented). ``num_classes`` is the vocabulary size.

    Args:
        source: ``pydoc_topics`` (the embedded corpus) or ``files``.
        files: Local ``.txt`` / ``.jsonl`` files (``source=files``).
        text_key: The text field of JSONL records.
        tokenizer: A local Hugging Face tokenizer folder; ``None``: UTF-8 bytes.
        block_size: Tokens per training sequence ``L``.
        val_fraction: Share of the non-test documents held out for validation, in (0, 1).
        test_fraction: Share of the documents in the fixed test split, in (0, 1).
        seed: Seed of the validation split.
        batch_size: Sequences per batch.
        num_workers: Unused (batches are gathered from memory).
        drop_last: Whether the training loader drops the last incomplete batch.
        on_device: Keep the tokens on the training device and build batches there.
        shuffle_seed: Seed of the order.
        augment_rounds: Accepted for the shared interface; it changes nothing.
    """

    task = "language_modeling"
    ignore_index = IGNORE_INDEX
    image_size = None
    in_channels = 0
    input_dtype = torch.int64

    def __init__(
        self,
        *,
        source: str = "pydoc_topics",
        files: Sequence[str] | None = None,
        text_key: str = "text",
        tokenizer: str | None = None,
        block_size: int = 128,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        drop_last: bool = False,
        on_device: bool = True,
        shuffle_seed: int = 0,
        augment_rounds: int | None = None,
    ) -> None:
        super().__init__(
            val_fraction=val_fraction,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
            drop_last=drop_last,
            on_device=on_device,
            shuffle_seed=shuffle_seed,
            augment_rounds=augment_rounds,
        )
        if source not in SOURCES:
            raise ValueError(f"data.source={source!r} is not one of {SOURCES}")
        if source != "files" and files:
            raise ValueError(
                f"data.files is set but data.source={source}: the files would be ignored; "
                "set data.source=files"
            )
        if block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {block_size}")
        if not 0 < test_fraction < 1:
            raise ValueError(
                f"test_fraction must lie strictly between 0 and 1, got {test_fraction}"
            )
        self.source = source
        self.files = list(files or [])
        self.text_key = text_key
        self.tokenizer = PretrainedTokenizer(tokenizer) if tokenizer else ByteTokenizer()
        self.block_size = block_size
        self.test_fraction = test_fraction
        self.num_classes = self.tokenizer.vocab_size
        self.input_shape = (block_size,)
        self.train_augmentation = CropFlip()
        self.documents_per_split: dict[str, int] = {}
        self.tokens_per_split: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def _documents(self) -> list[str]:
        if self.source == "pydoc_topics":
            return pydoc_topics()
        return read_documents(self.files, self.text_key)

    def make_splits(self) -> dict[str, Split]:
        # Each text once: pydoc_topics holds "else" and "if" as one text, which would otherwise
        # sit in the test and the train split.
        documents = list(dict.fromkeys(d for d in self._documents() if d.strip()))
        if len(documents) < 3:
            raise ValueError(
                f"the corpus has {len(documents)} non-empty documents: splitting by document "
                "needs at least 3 (train, val, test); split a long text into several files or "
                "JSONL lines"
            )
        ids = np.arange(len(documents))  # unique labels: uniform, not stratified
        count = len(documents)
        if not 0 < round(self.test_fraction * count) < count:
            raise ValueError(
                f"data.test_fraction={self.test_fraction} of {count} documents leaves the test "
                "split or the rest empty: change data.test_fraction or give more documents"
            )
        pool, test = split_indices(ids, self.test_fraction, TEST_SEED)
        if not 0 < round(self.val_fraction * len(pool)) < len(pool):
            raise ValueError(
                f"data.val_fraction={self.val_fraction} of the {len(pool)} non-test documents "
                "leaves the val or the train split empty: change data.val_fraction or give more "
                "documents"
            )
        train, val = split_indices(ids[pool], self.val_fraction, self.seed)
        positions = {"train": pool[train], "val": pool[val], "test": test}
        end = self.tokenizer.end_of_document
        splits: dict[str, Split] = {}
        for name, rows in positions.items():
            tokens = [self.encode(documents[i]) + ([end] if end is not None else []) for i in rows]
            blocks = pack(tokens, self.block_size)
            if not len(blocks):
                raise ValueError(
                    f"the {name} split has {sum(map(len, tokens))} tokens, fewer than one block "
                    f"of {self.block_size}: lower data.block_size or give more text"
                )
            self.documents_per_split[name] = len(rows)
            self.tokens_per_split[name] = sum(map(len, tokens))
            splits[name] = {"blocks": blocks}
        return splits

    def make_batch(self, split: Split, rows: Tensor, keys: Tensor | None) -> tuple[Tensor, Tensor]:
        blocks = split["blocks"][rows]
        return blocks[:, :-1], blocks[:, 1:]
