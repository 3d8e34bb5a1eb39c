"""Tests of glue.py: the readers of the nine GLUE formats, the shipped SST-2, fetching from the
archives, dev splits, metrics."""
import hashlib
import http.server
import io
import lzma
import re
import socket
import threading
import zipfile

import pytest
import torch

import glue


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# readers


FIXTURES = {  # task: (file name, lines, expected first example)
    "cola": ("dev.tsv", ["gj04\t1\t\tThe sailors rode the breeze clear of the rocks.",
                         "gj04\t0\t*\tHe said \"hi."],
             ("He said \"hi.", None, 0)),
    "sst2": ("dev.tsv", ["sentence\tlabel", "it 's a charming journey . \t1"],
             ("it 's a charming journey . ", None, 1)),
    "mrpc": ("dev.tsv", ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                         "1\t1355540\t1355592\tHe said \"so.\tHe did."],
             ("He said \"so.", "He did.", 1)),
    "qqp": ("dev.tsv", ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                        "5\t11\t12\tWhy \"x\"?\tWhy x?\t1"],
            ("Why \"x\"?", "Why x?", 1)),
    "stsb": ("dev.tsv", ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
                         "sentence2\tscore",
                         "0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man.\tA person.\t"
                         "4.250"],
             ("A man.", "A person.", 4.25)),
    "mnli": ("dev_mismatched.tsv",
             ["index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
              "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\t"
              "label4\tlabel5\tgold_label",
              "0\t63735\t63735n\tslate\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tThe new rights.\t"
              "Everyone likes.\tneutral\tneutral\tneutral\tneutral\tneutral\tneutral"],
             ("The new rights.", "Everyone likes.", 2)),
    "qnli": ("dev.tsv", ["index\tquestion\tsentence\tlabel",
                         "0\tWhat came?\tAs of that day.\tnot_entailment"],
             ("What came?", "As of that day.", 1)),
    "rte": ("dev.tsv", ["index\tsentence1\tsentence2\tlabel",
                        "0\tDana died.\tReeve had an accident.\tentailment"],
            ("Dana died.", "Reeve had an accident.", 0)),
    "wnli": ("dev.tsv", ["index\tsentence1\tsentence2\tlabel",
                         "0\tThe drain is clogged.\tThe hair.\t0"],
             ("The drain is clogged.", "The hair.", 0)),
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_reader_each_format(tmp_path, name):
    file_name, lines, expected = FIXTURES[name]
    examples = glue.read_tsv(write(tmp_path / file_name, lines), glue.TASKS[name])
    # quotes kept verbatim (QUOTE_NONE), BOM stripped, labels mapped to class indices
    assert examples[-1] == expected


def test_mnli_train_format_and_both_dev_sets(tmp_path):
    header = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
              "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")
    write(tmp_path / "MNLI" / "train.tsv",
          [header, "0\t1\t1e\tgov\t(a)\t(b)\t(A)\t(B)\tIt is.\tIt was.\tentailment\tentailment"])
    for split in ("dev_matched", "dev_mismatched"):
        write(tmp_path / "MNLI" / f"{split}.tsv", FIXTURES["mnli"][1])
    data = glue.load_task("mnli", tmp_path, fetch=False)
    assert (data.train == [("It is.", "It was.", 1)]
            and sorted(data.dev) == ["dev_matched", "dev_mismatched"])
    assert not data.non_standard and data.source == tmp_path / "MNLI"


def test_malformed_rows_name_file_and_line(tmp_path):
    path = write(tmp_path / "dev.tsv", ["sentence\tlabel", "fine \t1", "no tab here"])
    with pytest.raises(ValueError,
                       match=r"dev\.tsv:3: expected 2 tab-separated columns, found 1"):
        glue.read_tsv(path, glue.TASKS["sst2"])
    path = write(tmp_path / "rte.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment",
                                        "1\ta\tb\tmaybe"])
    with pytest.raises(ValueError, match=r"rte\.tsv:3: label 'maybe' is not one of "
                                         r"\('entailment', 'not_entailment'\)"):
        glue.read_tsv(path, glue.TASKS["rte"])
    path = write(tmp_path / "sts.tsv", [FIXTURES["stsb"][1][0],
                                        FIXTURES["stsb"][1][1].replace("4.250", "high")])
    with pytest.raises(ValueError, match=r"sts\.tsv:2: score 'high' is not a number"):
        glue.read_tsv(path, glue.TASKS["stsb"])


# --------------------------------------------------------------------------------------------------
# the SST-2 that ships with the repository (data/)


def test_shipped_sst2_is_the_glue_release_byte_for_byte():
    """data/SST-2/*.tsv.xz decompress to the GLUE files whose digests data/README.md states, with
    its row counts."""
    readme = (glue.SHIPPED / "README.md").read_text(encoding="utf-8")
    for split, rows in (("train", 67349), ("dev", 872)):
        raw = lzma.decompress((glue.SHIPPED / "SST-2" / f"{split}.tsv.xz").read_bytes())
        digest = re.search(rf"`SST-2/{split}\.tsv\.xz`.*`([0-9a-f]{{64}})`", readme).group(1)
        assert hashlib.sha256(raw).hexdigest() == digest
        examples = glue.read_tsv(glue.SHIPPED / "SST-2" / f"{split}.tsv.xz", glue.TASKS["sst2"])
        # every line but the header is one example
        assert len(examples) == rows == raw.count(b"\n") - 1
    # dev.tsv's first row
    assert examples[0] == ("it 's a charming and often affecting journey . ", None, 1)


def test_shipped_sst2_is_read_when_no_glue_folder_has_it(tmp_path, monkeypatch):
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./glue_data here
    data = glue.load_task("sst2", fetch=False)
    assert (data.source == glue.SHIPPED / "SST-2" and len(data.train) == 67349
            and len(data.dev["dev"]) == 872)
    assert list(tmp_path.iterdir()) == []  # nothing created
    # a GLUE folder comes first
    write(tmp_path / "mine" / "SST-2" / "train.tsv", ["sentence\tlabel", "a \t1"])
    write(tmp_path / "mine" / "SST-2" / "dev.tsv", ["sentence\tlabel", "b \t0"])
    data = glue.load_task("sst2", tmp_path / "mine", fetch=False)
    assert data.source == tmp_path / "mine" / "SST-2" and data.train == [("a ", None, 1)]
    # other tasks are not shipped
    with pytest.raises(FileNotFoundError, match="GLUE RTE not found"):
        glue.load_task("rte", tmp_path / "mine", fetch=False)


def test_a_named_folder_without_the_task_is_an_error_not_the_shipped_copy(tmp_path, monkeypatch):
    """--data_dir or GLUE_DIR that does not hold the task (a file, a typo, a folder without dev.tsv)
    is an error saying what is missing, for SST-2 as for RTE; the shipped SST-2 is read only when no
    folder was named. Before: SST-2 came from data/ without a word."""
    monkeypatch.delenv("GLUE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./glue_data here
    a_file, typo = write(tmp_path / "a_file", ["x"]), tmp_path / "typo"
    half = tmp_path / "half"
    write(half / "SST-2" / "train.tsv", ["sentence\tlabel", "a \t1"])
    for name in ("sst2", "rte"):
        with pytest.raises(NotADirectoryError) as e:
            glue.load_task(name, a_file, fetch=False)
        assert str(e.value).startswith(f"--data_dir {a_file} is a file, not a folder; give the")
        with pytest.raises(FileNotFoundError) as e:
            glue.load_task(name, typo, fetch=False)
        task = glue.TASKS[name].dir
        assert str(e.value).startswith(f"GLUE {task} not found in --data_dir {typo}: looked for "
                                       f"{typo / task / 'dev.tsv'}")
    with pytest.raises(FileNotFoundError) as e:
        glue.load_task("sst2", half)  # before any fetch
    assert str(e.value) == (f"--data_dir {half}: {half / 'SST-2'} has no dev.tsv; complete it "
                            f"(GLUE SST-2 has train.tsv, dev.tsv) or remove it to fetch the task")
    monkeypatch.setenv("GLUE_DIR", str(typo))
    with pytest.raises(FileNotFoundError, match=f"GLUE SST-2 not found in GLUE_DIR={typo}: "):
        glue.load_task("sst2", fetch=False)
    monkeypatch.delenv("GLUE_DIR")
    assert glue.task_files("sst2", fetch=False) == (glue.SHIPPED / "SST-2", ".tsv.xz")  # none named
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "half"]  # nothing created


def test_mrpc_missing_says_how_to_get_it_even_with_no_download(tmp_path):
    """MRPC is in no GLUE archive: dropping --no_download would not help; the error says how to
    get it."""
    with pytest.raises(FileNotFoundError) as e:
        glue.load_task("mrpc", tmp_path, fetch=False)
    assert str(e.value).startswith(f"{tmp_path / 'MRPC' / 'dev.tsv'} not found, and MRPC is not in "
                                   f"the GLUE archives (licence). Run the GLUE download script")
    assert "--no_download" not in str(e.value) and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# fetching


@pytest.fixture
def glue_server(tmp_path):
    """A local HTTP server (127.0.0.1, free port) serving a synthetic WNLI.zip in the GLUE archive
    layout."""
    served = tmp_path / "served"
    served.mkdir()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("WNLI/train.tsv",
                   "index\tsentence1\tsentence2\tlabel\n0\tA b.\tA.\t1\n1\tC d.\tD.\t0\n")
        z.writestr("WNLI/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tE f.\tE.\t1\n")
    (served / "WNLI.zip").write_bytes(buf.getvalue())
    quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a: quiet(*a, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_missing_task_is_fetched_from_the_archive(tmp_path, glue_server, monkeypatch, capsys):
    monkeypatch.setenv("GLUE_BASE_URL", glue_server)
    data = tmp_path / "data"
    fetched = glue.load_task("wnli", data)
    assert (fetched.train == [("A b.", "A.", 1), ("C d.", "D.", 0)]
            and fetched.dev == {"dev": [("E f.", "E.", 1)]})
    # unzipped aside, renamed into place, nothing left over
    assert sorted(p.name for p in data.iterdir()) == ["WNLI"]
    assert f"fetching {glue_server}/WNLI.zip" in capsys.readouterr().err
    assert glue.load_task("wnli", data, fetch=False).train == fetched.train  # now local


def test_no_download_and_failed_fetch_say_where_and_how(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        glue.load_task("rte", tmp_path, fetch=False)
    assert str(tmp_path / "RTE" / "dev.tsv") in str(e.value) and "--no_download" in str(e.value)
    with socket.socket() as s:  # a port with nothing behind it
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("GLUE_BASE_URL", f"http://127.0.0.1:{s.getsockname()[1]}")
    with pytest.raises(FileNotFoundError, match=r"fetching http://127\.0\.0\.1:\d+/RTE\.zip failed "
                                                r".*Download RTE\.zip"):
        glue.load_task("rte", tmp_path / "new" / "glue")
    # no partial download, not even the folders it would have gone into
    assert list(tmp_path.iterdir()) == []


def test_dev_split_is_deterministic_disjoint_and_marked(tmp_path):
    rows = (["index\tquestion\tsentence\tlabel"]
            + [f"{i}\tq{i}?\ts{i}.\tentailment" for i in range(20)])
    write(tmp_path / "QNLI" / "dev.tsv", rows)
    with pytest.raises(FileNotFoundError, match="--dev_split"):
        glue.load_task("qnli", tmp_path, fetch=False)
    data = glue.load_task("qnli", tmp_path, dev_split=0.25, fetch=False)
    train, dev = data.train, data.dev
    torch.manual_seed(7)
    # fixed seed 0, whatever the global RNG
    again = glue.load_task("qnli", tmp_path, dev_split=0.25, fetch=False)
    assert data.non_standard and (train, dev) == (again.train, again.dev)
    assert len(train) == 15 and len(dev["dev"]) == 5 and not set(train) & set(dev["dev"])
    assert sorted(train + dev["dev"], key=lambda e: int(e[0][1:-1])) == glue.read_tsv(
        tmp_path / "QNLI" / "dev.tsv", glue.TASKS["qnli"])


# --------------------------------------------------------------------------------------------------
# metrics (hand-computed)


def test_metrics_against_hand_computed_values():
    assert glue.accuracy([1, 0, 1, 1], [1, 0, 0, 1]) == 0.75
    pred, gold = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # TP 2, FP 1, FN 1, TN 1
    assert glue.f1_score(pred, gold) == pytest.approx(4 / 6)
    assert glue.matthews_corrcoef(pred, gold) == pytest.approx(
        (2 * 1 - 1 * 1) / (3 * 3 * 2 * 2) ** 0.5)
    assert glue.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # a zero factor in the denominator
    assert glue.pearson([1, 2, 3], [1, 2, 5]) == pytest.approx(4 / (2 * 78 / 9) ** 0.5)
    assert glue.average_ranks([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]: covariance sum 4.5, squared deviations 4.5 and 5
    assert glue.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert glue.task_metrics(glue.TASKS["mrpc"], pred, gold) == {"accuracy": 0.6,
                                                                 "f1": pytest.approx(4 / 6)}


def test_compiled_batches_pad_to_a_few_lengths():
    """--compile pads each batch up to the next bucket length, so a run records a handful of CUDA
    graphs."""
    assert (glue.length_buckets(64) == [16, 32, 48, 64]
            and glue.length_buckets(128) == [32, 64, 96, 128])
    assert (glue.length_buckets(20) == [8, 16, 20]
            and glue.length_buckets(320) == [80, 160, 240, 320])
    encoded = [([2, 7, 3], [0, 0, 0]), ([2, 7, 8, 9, 3], [0, 0, 0, 1, 1])]
    plain = glue.collate(encoded, [0, 1], 0, torch.device("cpu"))
    padded = glue.collate(encoded, [0, 1], 0, torch.device("cpu"), glue.length_buckets(64))
    assert plain["input_ids"].shape == (2, 5) and padded["input_ids"].shape == (2, 16)
    for key in plain:  # the same batch, longer padding: ids pad_id, mask and token types 0
        assert torch.equal(padded[key][:, :5], plain[key]) and not padded[key][:, 5:].any()
