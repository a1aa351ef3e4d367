"""Text adapters: `text` (one sentence per line) and the paraphrase corpora `mrpc` and `qqp`."""

import pickle
from pathlib import Path

import pytest

from mmkd.data import create_dataset
from mmkd_core.errors import MmkdError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
MRPC_ROWS = [
    '1\t1\t2\tHe said "hi .\tHe said <QUOTE> hello .\n',  # stray quote: must not swallow the next line
    "0\t3\t4\tNot a paraphrase .\tSomething else .\n",
    "1\t5\t6\tThe cat sat .\tA cat was sitting .\n",
    "1\t7\t8\tIt rained .\tThere was rain .\n",
]
QQP_HEADER = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
QQP_ROWS = [
    "0\t1\t2\tHow do I cook rice?\tWhat is the way to cook rice?\t1\n",
    "1\t3\t4\tWhy is the sky blue?\tWho was Napoleon?\t0\n",
    '2\t5\t6\tWhat is "AI"?\tWhat does AI mean?\t1\n',
]


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


# --- text ------------------------------------------------------------------------------------------------


def test_text_file_and_directory(tmp_path):
    f = _write(tmp_path / "corpus" / "s.txt", "  first sentence \n\nsecond one\n   \nthird\n")
    ds = create_dataset("text", str(f))
    assert len(ds) == 3 and ds.text(0) == "first sentence" and ds.text(2) == "third"
    assert ds.modality == "text" and ds.label(0) is None
    fp = ds.fingerprint()
    # unrelated to the content: the file given directly or through its directory, the directory moved
    assert create_dataset("text", str(tmp_path / "corpus")).fingerprint() == fp
    moved = (tmp_path / "corpus").rename(tmp_path / "moved")
    f = moved / "s.txt"
    assert create_dataset("text", str(f)).fingerprint() == fp
    f.write_text(f.read_text().replace("third", "thirD"))  # one byte
    assert create_dataset("text", str(f)).fingerprint() != fp
    assert pickle.loads(pickle.dumps(ds)).text(1) == "second one"


def test_text_errors(tmp_path):
    with pytest.raises(MmkdError, match="missing.txt"):
        create_dataset("text", str(tmp_path / "missing.txt"))
    _write(tmp_path / "a.txt", "x\n")
    _write(tmp_path / "b.txt", "y\n")
    with pytest.raises(MmkdError, match="exactly one"):
        create_dataset("text", str(tmp_path))
    bad = tmp_path / "bad" / "latin.txt"
    bad.parent.mkdir()
    bad.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(MmkdError, match=r"latin\.txt:2"):
        create_dataset("text", str(bad))
    with pytest.raises(MmkdError, match="option"):
        create_dataset("text", str(tmp_path / "a.txt"), lowercase=True)


@pytest.mark.skipif(not (SHARED / "wordnet" / "sentences.txt").exists(), reason="shared data absent")
def test_text_real_wordnet():
    ds = create_dataset("text", str(SHARED / "wordnet" / "sentences.txt"))
    assert len(ds) == 182891


# --- mrpc / qqp ------------------------------------------------------------------------------------------


def test_mrpc_glue_tsv(tmp_path):
    _write(tmp_path / "MRPC" / "train.tsv", MRPC_HEADER + "".join(MRPC_ROWS))
    ds = create_dataset("mrpc", str(tmp_path))
    assert ds.pairs() == [
        ('He said "hi .', "He said <QUOTE> hello ."),
        ("The cat sat .", "A cat was sitting ."),
        ("It rained .", "There was rain ."),
    ]
    assert len(ds) == 6 and ds.text(2) == "The cat sat ." and ds.text(3) == "A cat was sitting ."
    assert ds.modality == "text"
    assert len(create_dataset("mrpc", str(tmp_path), max_pairs=2)) == 4


def test_mrpc_original_txt_with_bom(tmp_path):
    # The real file's header starts with a BOM that was re-encoded as UTF-8 ("ï»¿"); a plain BOM too.
    for i, bom in enumerate(("\ufeff", "\u00ef\u00bb\u00bf")):
        f = _write(tmp_path / str(i) / "msr_paraphrase_train.txt", bom + MRPC_HEADER + "".join(MRPC_ROWS))
        assert len(create_dataset("mrpc", str(f.parent)).pairs()) == 3
    f = _write(tmp_path / "t" / "msr_paraphrase_test.txt", MRPC_HEADER + MRPC_ROWS[2])
    ds = create_dataset("mrpc", str(f.parent), split="test")
    assert ds.split == "test" and ds.pairs() == [("The cat sat .", "A cat was sitting .")]


def test_mrpc_fingerprint_changes(tmp_path):
    f = _write(tmp_path / "a" / "train.tsv", MRPC_HEADER + "".join(MRPC_ROWS))
    fp = create_dataset("mrpc", str(f)).fingerprint()
    assert create_dataset("mrpc", str(f), max_pairs=2).fingerprint() != fp
    f = f.parent.rename(tmp_path / "b") / "train.tsv"
    assert create_dataset("mrpc", str(f)).fingerprint() == fp  # moved: the same content
    _write(f, MRPC_HEADER + "".join(MRPC_ROWS).replace("It rained", "It Rained"))  # one byte of one pair
    assert create_dataset("mrpc", str(f)).fingerprint() != fp
    _write(f, MRPC_HEADER + "".join(MRPC_ROWS[:3]))  # one pair fewer
    assert create_dataset("mrpc", str(f)).fingerprint() != fp


def test_paraphrase_errors(tmp_path):
    with pytest.raises(MmkdError, match=r"dev\.tsv"):
        create_dataset("mrpc", str(tmp_path), split="dev")
    with pytest.raises(MmkdError, match=r"msr_paraphrase_train\.txt"):
        create_dataset("mrpc", str(tmp_path))
    f = _write(tmp_path / "train.tsv", MRPC_HEADER + MRPC_ROWS[0] + "1\tonly three\tfields\n")
    with pytest.raises(MmkdError, match=r"train\.tsv:3"):
        create_dataset("mrpc", str(tmp_path))
    assert len(create_dataset("mrpc", str(f), strict=False).pairs()) == 1
    _write(f, MRPC_HEADER + "x\t1\t2\ta\tb\n")
    with pytest.raises(MmkdError, match=r"train\.tsv:2.*label"):
        create_dataset("mrpc", str(f))
    # GLUE test files have no label column.
    _write(tmp_path / "test.tsv", "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\ta\tb\n")
    with pytest.raises(MmkdError, match=r"test\.tsv:1.*quality"):
        create_dataset("mrpc", str(tmp_path), split="test")
    with pytest.raises(MmkdError, match="split"):
        create_dataset("mrpc", str(tmp_path), split="holdout")


def test_qqp(tmp_path):
    _write(tmp_path / "QQP" / "dev.tsv", QQP_HEADER + "".join(QQP_ROWS))
    ds = create_dataset("qqp", str(tmp_path), split="validation")
    assert ds.split == "dev" and ds.name == "qqp"
    assert ds.pairs() == [
        ("How do I cook rice?", "What is the way to cook rice?"),
        ('What is "AI"?', "What does AI mean?"),
    ]
    assert ds.describe()["num_pairs"] == 2
    assert pickle.loads(pickle.dumps(ds)).text(3) == "What does AI mean?"


@pytest.mark.skipif(not (SHARED / "mrpc" / "msr_paraphrase_train.txt").exists(), reason="shared data absent")
def test_mrpc_real_train_file():
    ds = create_dataset("mrpc", str(SHARED / "mrpc"))
    pairs = ds.pairs()
    assert len(pairs) == 2753 and len(ds) == 5506
    assert pairs[0][0].startswith("Amrozi accused his brother")
    assert pairs[0][1].startswith("Referring to him as only")
