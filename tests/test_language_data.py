"""Text data for task=language_modeling: packing into blocks, the embedded pydoc_topics corpus
(split by document, the fixed test split, batches of next-token targets), local .txt/.jsonl
files and their errors, and a local Hugging Face tokenizer built here (nothing downloaded)."""

import json
import re
from collections import Counter

import pytest
import torch

from distill_zoo.data.text import (
    BYTE_VOCABULARY,
    END_OF_DOCUMENT_BYTE,
    ByteTokenizer,
    TextDataModule,
    pack,
    pydoc_topics,
    read_documents,
)

BLOCK = 16


def stream_of(blocks: torch.Tensor) -> list[int]:
    """The token stream packed into ``blocks`` (windows overlapping by one token): the first
    window whole, then every later window without its first token."""
    if not len(blocks):
        return []
    return blocks[0].tolist() + blocks[1:, 1:].reshape(-1).tolist()


def documents_of(stream: list[int], end: int) -> tuple[list[list[int]], list[int]]:
    """The complete documents of a stream (each closed by ``end``, which is dropped) and the
    unfinished rest (a document whose end fell into the dropped tail)."""
    documents, current = [], []
    for token in stream:
        if token == end:
            documents.append(current)
            current = []
        else:
            current.append(token)
    return documents, current


def split_documents(dm: TextDataModule, documents: list[list[int]]) -> dict[str, list[tuple]]:
    """The documents (token tuples without the end token) each split holds, in stream order,
    found from the split's packed blocks alone; each must be one of ``documents``."""
    end = dm.tokenizer.end_of_document
    known = {tuple(d) for d in documents}
    found = {}
    for name in ("train", "val", "test"):
        complete, rest = documents_of(stream_of(dm.splits[name]["blocks"]), end)
        held = [tuple(tokens) for tokens in complete]
        assert all(tokens in known for tokens in held)
        if rest:  # the last document's end lies in the dropped tail: a prefix of one document
            (match,) = {d for d in known if d[: len(rest)] == tuple(rest)}
            held.append(match)
        found[name] = held
    return found


# --- pack ----------------------------------------------------------------------------------------


def test_pack_hand_example():
    # Stream 1 2 3 4 5 (5 tokens), block 2: (5 - 1) // 2 = 2 windows of 3 tokens starting at
    # 0 and 2, overlapping by one token.
    blocks = pack([[1, 2, 3], [4, 5]], 2)
    assert blocks.dtype == torch.int64
    assert blocks.tolist() == [[1, 2, 3], [3, 4, 5]]


def test_pack_drops_the_incomplete_tail():
    # Stream 1..8 (8 tokens), block 3: (8 - 1) // 3 = 2 windows [1 2 3 4], [4 5 6 7]; token 8
    # would need a third window of 4 tokens and is dropped.
    assert pack([[1, 2, 3, 4, 5], [6, 7, 8]], 3).tolist() == [[1, 2, 3, 4], [4, 5, 6, 7]]
    # Stream 1..6, block 2: (6 - 1) // 2 = 2 windows; token 6 is dropped.
    assert pack([[1, 2, 3, 4, 5, 6]], 2).tolist() == [[1, 2, 3], [3, 4, 5]]


def test_pack_too_few_tokens_gives_no_block():
    # Two tokens hold one prediction, a block of 2 needs 3 tokens: (2 - 1) // 2 = 0 windows.
    empty = pack([[1], [2]], 2)
    assert empty.shape == (0, 3) and empty.dtype == torch.int64
    assert pack([], 4).shape == (0, 5)


# --- the embedded corpus -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def topics() -> list[str]:
    return pydoc_topics()


@pytest.fixture(scope="module")
def pydoc_dm() -> TextDataModule:
    dm = TextDataModule(block_size=BLOCK, batch_size=64)
    dm.setup()
    return dm


def byte_documents(topics: list[str]) -> list[list[int]]:
    return [list(text.encode("utf-8")) for text in topics]


def test_pydoc_topics_are_bytes_with_a_vocabulary_of_256(pydoc_dm, topics):
    assert pydoc_dm.num_classes == BYTE_VOCABULARY == 256
    assert pydoc_dm.input_shape == (BLOCK,)
    # No reference text holds a NUL byte, so NUL can close every document.
    assert all("\x00" not in text for text in topics)
    for name in ("train", "val", "test"):
        blocks = pydoc_dm.splits[name]["blocks"]
        assert blocks.dtype == torch.int64 and blocks.shape[1] == BLOCK + 1
        assert int(blocks.min()) >= 0 and int(blocks.max()) < 256


def test_pydoc_split_is_by_document_and_complete(pydoc_dm, topics):
    found = split_documents(pydoc_dm, byte_documents(topics))
    # Every document found in a split's blocks is one whole topic (split_documents checks
    # that), the splits together hold every topic, and each split holds as many as it says.
    held = Counter(found["train"]) + Counter(found["val"]) + Counter(found["test"])
    assert set(held) == {tuple(d) for d in byte_documents(topics)}
    assert {name: len(docs) for name, docs in found.items()} == pydoc_dm.documents_per_split
    # No topic twice within a split.
    assert all(len(set(docs)) == len(docs) for docs in found.values())


def test_pydoc_topics_hold_one_text_twice(topics):
    # Why the data keep each text once: the topics "else" and "if" are the same text (the if
    # statement's section of the reference), so 79 topics hold 78 distinct texts.
    from pydoc_data.topics import topics as by_name

    assert by_name["else"] == by_name["if"]
    assert len(set(topics)) == len(topics) - 1 == 78


def test_pydoc_no_document_text_is_in_two_splits(pydoc_dm, topics):
    found = split_documents(pydoc_dm, byte_documents(topics))
    train, val, test = (set(found[name]) for name in ("train", "val", "test"))
    assert not train & val
    assert not train & test
    assert not val & test


def test_pydoc_default_split_counts(pydoc_dm, topics):
    # 78 distinct documents; test: round(0.1 * 78) = round(7.8) = 8; val: round(0.1 * 70) = 7
    # of the other 70; train: 70 - 7 = 63.
    assert len(set(topics)) == 78
    assert pydoc_dm.documents_per_split == {"train": 63, "val": 7, "test": 8}


def test_pydoc_split_counts_match_the_docstring(pydoc_dm):
    documented = re.search(r"that is\s+(\d+) / (\d+) / (\d+)", TextDataModule.__doc__)
    counts = pydoc_dm.documents_per_split
    assert tuple(map(int, documented.groups())) == (counts["train"], counts["val"], counts["test"])


def test_pydoc_token_counts_and_blocks(pydoc_dm, topics):
    # Every distinct document's bytes plus its closing NUL, over the three splits.
    total = sum(len(text.encode("utf-8")) + 1 for text in set(topics))
    assert sum(pydoc_dm.tokens_per_split.values()) == total
    for name, tokens in pydoc_dm.tokens_per_split.items():
        # A split of n tokens holds (n - 1) // L blocks (L next-token predictions each).
        assert len(pydoc_dm.splits[name]["blocks"]) == (tokens - 1) // BLOCK


def test_pydoc_test_documents_do_not_change_with_the_seed(pydoc_dm, topics):
    other = TextDataModule(block_size=BLOCK, batch_size=64, seed=1)
    other.setup()
    documents = byte_documents(topics)
    first, second = split_documents(pydoc_dm, documents), split_documents(other, documents)
    assert first["test"] == second["test"]
    assert torch.equal(pydoc_dm.splits["test"]["blocks"], other.splits["test"]["blocks"])
    assert set(first["val"]) != set(second["val"])
    rest = Counter(first["train"]) + Counter(first["val"])
    assert rest == Counter(second["train"]) + Counter(second["val"])


def test_training_batches_hold_next_token_targets(pydoc_dm):
    blocks = pydoc_dm.splits["train"]["blocks"]
    batches = pydoc_dm.batches("train")
    count = len(blocks)  # (tokens - 1) // 16, see test_pydoc_token_counts_and_blocks
    assert len(batches) == -(-count // 64)  # ceil: drop_last is false
    inputs, targets, indices, keys = batches[0]
    assert inputs.shape == targets.shape == (64, BLOCK)
    assert indices.shape == keys.shape == (64,)
    for tensor in (inputs, targets, indices, keys):
        assert tensor.dtype == torch.int64
    assert torch.equal(targets[:, :-1], inputs[:, 1:])  # targets[:, i] == inputs[:, i + 1]
    assert torch.equal(inputs, blocks[indices, :-1])
    assert torch.equal(targets, blocks[indices, 1:])
    assert not keys.any()  # text is not augmented: every key is 0
    assert batches[-1][0].shape == (count - 64 * (len(batches) - 1), BLOCK)
    # One epoch visits every block once, in a shuffled order.
    seen = torch.cat([batch[2] for batch in batches])
    assert torch.equal(seen.sort().values, torch.arange(count))
    assert not torch.equal(seen, torch.arange(count))


def test_validation_batches_are_in_order_without_keys(pydoc_dm):
    blocks = pydoc_dm.splits["val"]["blocks"]
    batches = pydoc_dm.batches("val")
    assert all(len(batch) == 3 for batch in batches)  # (inputs, targets, indices)
    inputs, targets, indices = batches[0]
    assert torch.equal(indices, torch.arange(64))
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert torch.equal(inputs, blocks[:64, :-1]) and torch.equal(targets, blocks[:64, 1:])
    # Consecutive blocks overlap by one token: the next block starts with this one's last
    # target.
    assert torch.equal(blocks[1:, 0], blocks[:-1, -1])
    last = len(blocks) - 64 * (len(batches) - 1)
    assert batches[-1][0].shape == batches[-1][1].shape == (last, BLOCK)


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    # "é" is two UTF-8 bytes, 0xC3 0xA9 = 195 169.
    assert tokenizer.encode("aé") == [97, 195, 169]
    assert tokenizer.decode([97, 195, 169, END_OF_DOCUMENT_BYTE]) == "aé"


# --- local files ---------------------------------------------------------------------------------


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_read_documents_of_txt_and_jsonl(tmp_path):
    txt = tmp_path / "essay.txt"
    txt.write_text("line one\nline two\n", encoding="utf-8")
    jsonl = tmp_path / "corpus.jsonl"
    # A blank line between records is skipped; other fields are ignored.
    jsonl.write_text(
        json.dumps({"text": "first", "id": 1}) + "\n\n" + json.dumps({"text": "zweite ü"}) + "\n",
        encoding="utf-8",
    )
    assert read_documents([str(txt), jsonl]) == ["line one\nline two\n", "first", "zweite ü"]
    other = write_jsonl(tmp_path / "other.jsonl", [{"body": "a"}, {"body": "b"}])
    assert read_documents([other], text_key="body") == ["a", "b"]


def test_jsonl_without_the_text_key_names_the_line_and_the_setting(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "fine"}, {"body": "no text"}])
    with pytest.raises(ValueError, match="has no string field") as error:
        read_documents([path])
    assert f"{path}:2" in str(error.value) and "data.text_key" in str(error.value)


def test_jsonl_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2 is not JSON")):
        read_documents([path])


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        read_documents([str(missing)])
    dm = TextDataModule(source="files", files=[str(missing)], block_size=2)
    with pytest.raises(FileNotFoundError, match="data.files"):
        dm.setup()


def test_source_files_without_files_fails_at_setup():
    for files in (None, []):
        dm = TextDataModule(source="files", files=files)  # conf/data/text_files.yaml as is
        with pytest.raises(ValueError, match=re.escape("data.source=files needs data.files")):
            dm.setup()
    with pytest.raises(ValueError, match="needs data.files"):
        read_documents([])


def test_files_with_source_pydoc_topics_fails(tmp_path):
    with pytest.raises(ValueError, match="set data.source=files"):
        TextDataModule(source="pydoc_topics", files=[str(tmp_path / "a.txt")])


def test_unknown_source_fails():
    with pytest.raises(ValueError, match="data.source='web' is not one of"):
        TextDataModule(source="web")


def test_fewer_than_three_documents_fail(tmp_path):
    # Two files, and one JSONL record that is only blank: 2 non-empty documents.
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("some text here", encoding="utf-8")
    b.write_text("more text there", encoding="utf-8")
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": "  \n"}])
    dm = TextDataModule(source="files", files=[str(a), str(b), blank], block_size=2)
    with pytest.raises(ValueError, match="has 2 non-empty documents.*at least 3"):
        dm.setup()


def test_too_few_documents_for_the_test_fraction_name_it(tmp_path):
    path = write_jsonl(tmp_path / "three.jsonl", [{"text": t} for t in ("a b", "c d", "e f")])
    dm = TextDataModule(source="files", files=[path], block_size=2)
    with pytest.raises(ValueError, match="data.test_fraction"):
        dm.setup()


def test_byte_files_split_with_their_own_fractions(tmp_path):
    texts = ["alpha beta", "gamma delta", "epsilon"]
    path = write_jsonl(tmp_path / "three.jsonl", [{"text": t} for t in texts])
    # test: round(0.34 * 3) = 1; val: round(0.5 * 2) = 1 (1.0); train: 1.
    dm = TextDataModule(
        source="files", files=[path], block_size=2, test_fraction=0.34, val_fraction=0.5
    )
    dm.setup()
    assert dm.documents_per_split == {"train": 1, "val": 1, "test": 1}
    assert dm.num_classes == 256
    found = split_documents(dm, [list(t.encode()) for t in texts])
    assert sorted(bytes(docs[0]).decode() for docs in found.values()) == sorted(texts)
    # Each split holds its one document's bytes plus the closing NUL.
    for name, (document,) in found.items():
        assert dm.tokens_per_split[name] == len(document) + 1


def test_a_split_shorter_than_one_block_fails(tmp_path):
    path = write_jsonl(tmp_path / "short.jsonl", [{"text": t} for t in ("ab", "cd", "ef")])
    dm = TextDataModule(
        source="files", files=[path], block_size=8, test_fraction=0.34, val_fraction=0.5
    )
    # Each split: 2 bytes + NUL = 3 tokens, fewer than the 9 of one block of 8.
    with pytest.raises(ValueError, match="fewer than one block of 8.*data.block_size"):
        dm.setup()


# --- a local Hugging Face tokenizer --------------------------------------------------------------

VOCAB = ["[UNK]", "[EOS]", "the", "cat", "dog", "sat", "ran", "on", "a", "mat", "big", "red"]
# Five documents, each an even number of words: with the end token every document has an odd
# number of tokens, so each split (3, 1 and 1 documents, see below) has an odd total n, and
# blocks of 2 take all of it: (n - 1) is even, nothing is dropped.
WORD_DOCUMENTS = [
    "the cat sat on a mat",
    "a big dog ran",
    "the big red dog",
    "a cat",
    "the dog sat on the big red mat",
]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    model = tokenizers.models.WordLevel(
        vocab={word: i for i, word in enumerate(VOCAB)}, unk_token="[UNK]"
    )
    core = tokenizers.Tokenizer(model)
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", eos_token="[EOS]"
    )
    folder = tmp_path_factory.mktemp("word_tokenizer")
    fast.save_pretrained(folder)
    return folder, fast


@pytest.fixture(scope="module")
def word_dm(tokenizer_folder, tmp_path_factory):
    folder, _ = tokenizer_folder
    root = tmp_path_factory.mktemp("word_corpus")
    first = root / "first.txt"
    first.write_text(WORD_DOCUMENTS[0], encoding="utf-8")
    rest = write_jsonl(root / "rest.jsonl", [{"text": t} for t in WORD_DOCUMENTS[1:]])
    # 5 documents: test round(0.2 * 5) = 1; val round(0.25 * 4) = 1; train 3.
    dm = TextDataModule(
        source="files",
        files=[str(first), rest],
        tokenizer=str(folder),
        block_size=2,
        test_fraction=0.2,
        val_fraction=0.25,
        batch_size=2,
    )
    dm.setup()
    return dm


def test_tokenizer_sets_the_vocabulary(word_dm, tokenizer_folder):
    _, fast = tokenizer_folder
    assert word_dm.num_classes == len(fast) == len(VOCAB) == 12
    assert word_dm.tokenizer.end_of_document == fast.eos_token_id == VOCAB.index("[EOS]") == 1


def test_tokens_match_the_tokenizer_and_documents_end_with_eos(word_dm, tokenizer_folder):
    _, fast = tokenizer_folder
    # "the cat sat on a mat" -> ids of the words in VOCAB, by hand: 2 3 5 7 8 9.
    assert word_dm.encode(WORD_DOCUMENTS[0]) == [2, 3, 5, 7, 8, 9]
    assert word_dm.encode(WORD_DOCUMENTS[0]) == fast.encode(
        WORD_DOCUMENTS[0], add_special_tokens=False
    )
    expected = [fast.encode(t, add_special_tokens=False) for t in WORD_DOCUMENTS]
    assert word_dm.documents_per_split == {"train": 3, "val": 1, "test": 1}
    found = {}
    for name in ("train", "val", "test"):
        stream = stream_of(word_dm.splits[name]["blocks"])
        assert stream[-1] == 1  # nothing dropped: the split's last document's [EOS] is there
        complete, rest = documents_of(stream, 1)
        assert rest == []
        found[name] = [expected.index(tokens) for tokens in complete]
        assert found[name] == sorted(found[name])  # documents keep their corpus order
        assert word_dm.tokens_per_split[name] == len(stream)
    assert sorted(sum(found.values(), [])) == [0, 1, 2, 3, 4]


def test_tokenizer_decode_round_trips(word_dm):
    for text in WORD_DOCUMENTS:
        ids = word_dm.encode(text)
        assert word_dm.decode(ids) == text
        assert word_dm.decode([*ids, 1]) == text  # the end token is not text


def test_tokenizer_batches(word_dm):
    inputs, targets, indices = word_dm.batches("val")[0]
    assert inputs.shape == targets.shape and inputs.shape[1] == 2
    assert inputs.dtype == targets.dtype == indices.dtype == torch.int64
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert int(torch.cat([inputs, targets]).max()) < 12


def test_tokenizer_folder_that_does_not_exist_fails(tmp_path):
    missing = tmp_path / "no_tokenizer"
    with pytest.raises(FileNotFoundError, match=re.escape(f"data.tokenizer={missing}")) as error:
        TextDataModule(source="files", files=["a.txt"], tokenizer=str(missing))
    assert "save_pretrained" in str(error.value)
