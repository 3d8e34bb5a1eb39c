"""Issue #12: every bad input to train_glue.py and bert.py is a clear one-line error up front, and
no run is ever lost or mixed. One test per case of the issue, on the tiny random BERT and synthetic
SST-2 of test_train_glue.py (seconds each); the safetensors cases are also checked against the
reference `safetensors` library, which must reject them too.
"""
import dataclasses
import errno
import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import bert
import formats
import rundir
import train_glue as tg
from test_train_glue import tiny_folders, write

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, GLUE folder): test_train_glue's random 2-layer BERT checkpoint and synthetic
    SST-2."""
    return tiny_folders(tmp_path_factory.mktemp("tiny"))


def argv(tiny, out_dir, *extra):
    """A 4-step LoRA² run of the tiny BERT on synthetic SST-2 into out_dir, plus `extra` flags."""
    model_dir, glue = tiny
    return ["--model", str(model_dir), "--data_dir", str(glue), "--no_download",
            "--out_dir", str(out_dir), "--train_size", "0", "--steps", "4", "--batch_size", "8",
            "--lr", "1e-2", "--r", "4", "--k", "4", "--target_rank", "2", "--init_warmup", "0.25",
            "--final_warmup", "0.25", "--mask_interval", "2", "--eval_every", "2",
            "--log_every", "2", "--max_len", "32", "--device", "cpu", "--precision", "fp32",
            *extra]


def error_of(args, capsys=None):
    """The message train_glue.main(args) exits with: one line, `train_glue.py: error: ...`; with
    capsys, also that no training step ran before it."""
    with pytest.raises(SystemExit) as e:
        tg.main(args)
    message = str(e.value.code)
    assert message.startswith("train_glue.py: error: ") and "\n" not in message, message
    if capsys is not None:
        # failed before any training step
        assert not re.search(r"step \d+/", capsys.readouterr().err)
    return message


def files(folder):
    """{name: bytes} of the files in folder (a run's state, to show that nothing changed)."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished run's folder (metrics.json, adapter.pt, train_state.pt), written once; tests copy
    it to change it."""
    out_dir = tmp_path_factory.mktemp("finished") / "run"
    tg.main(argv(tiny, out_dir, "--save_every", "2"))
    return out_dir


def copy_run(finished, tmp_path):
    return Path(shutil.copytree(finished, tmp_path / "run"))


# --------------------------------------------------------------------------------------------------
# silently wrong before: flags out of range, an empty dev set, --eval_only flags that the checkpoint
# contradicts


@pytest.mark.parametrize("flags,message", [
    (["--clip", "-1"], "--clip must be >= 0, got -1.0"),
    (["--eval_size", "-5"], "--eval_size must be >= 0, got -5"),
    (["--train_size", "-5"], "--train_size must be >= 0, got -5"),
    (["--eval_every", "-1"], "--eval_every"),
    (["--save_every", "-2"], "--save_every"),
    (["--log_every", "0"], "--log_every must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--gamma", "nan"], "--gamma must be a finite number, got nan"),  # passed min() before
    (["--cross", "nan"], "--cross must be a finite number, got nan"),
    (["--gamma", "inf"], "--gamma must be a finite number, got inf"),
    (["--epochs", "inf"], "--epochs must be a finite number, got inf"),  # OverflowError before
    (["--warmup", "nan"], "--warmup must be a finite number, got nan"),
    (["--final_warmup", "nan"], "--final_warmup must be a finite number, got nan"),
    (["--seed", "99999999999999999999"], "--seed must be in [0, 2**32), got 99999999999999999999"),
    (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    (["--steps", "3", "--epochs", "0.5"], "give --steps or --epochs, not both"),  # ran 4 steps
    (["--weight_decay", "-0.1"], "--weight_decay"),
    (["--classifier_dropout", "1"], "--classifier_dropout must be in [0, 1), got 1.0"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1), got -0.1"),
    (["--epochs", "-1"], "--epochs must be > 0, got -1.0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--resume", "--overwrite"], "give --resume or --overwrite, not both"),
])
def test_flags_out_of_range_are_refused_naming_the_flag(flags, message):
    assert message in error_of(flags)


def test_lora2s_own_checks_come_before_the_data(tiny, tmp_path, capsys, monkeypatch):
    """--alpha, --r, --k, --init reach lora2.inject, which checks them, before any data is read; the
    run's folder is left as it was (nothing)."""
    monkeypatch.setattr(tg.glue, "load_encoded", lambda *a, **k: pytest.fail("the data was read"))
    for flags, message in ((["--alpha", "0"], "alpha must be > 0 (a number), got 0"),
                           (["--r", "0"], "r and k must be integers >= 1, got r=0, k=4")):
        assert error_of(argv(tiny, tmp_path / "run", *flags), capsys).endswith(message)
        assert not (tmp_path / "run").exists()


def test_clip_0_means_no_clipping(tiny, tmp_path, monkeypatch):
    calls = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda *a, **k: calls.append(a[1]) or clip(*a, **k))
    summary, _ = tg.train(tg.parse_config(argv(tiny, tmp_path / "run", "--clip", "0",
                                               "--steps", "2")))
    # trained, unclipped; before: clipped to 0, learned nothing
    assert calls == [] and 0 <= summary["main_metric"] <= 1
    tg.train(tg.parse_config(argv(tiny, tmp_path / "run2", "--steps", "2")))
    assert calls == [1.0, 1.0]


def test_header_only_dev_file_is_an_error_not_nan(tiny, tmp_path, capsys):
    glue = Path(shutil.copytree(tiny[1], tmp_path / "glue"))
    write(glue / "SST-2" / "dev.tsv", ["sentence\tlabel"])
    message = error_of(argv((tiny[0], glue), tmp_path / "run"), capsys)
    assert f"{glue / 'SST-2' / 'dev.tsv'}: no examples (only a header or blank lines)" in message
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_eval_only_refuses_flags_that_contradict_the_checkpoint(finished, capsys):
    adapter = str(finished / "adapter.pt")
    message = error_of(["--eval_only", "--load", adapter, "--task", "cola", "--r", "2"])
    assert (f"--eval_only takes the settings from {adapter}, and --r 2 contradicts its r 4, "
            f"--task cola contradicts its task sst2; drop those flags" in message)
    export = ["--eval_only", "--load", adapter, "--export_peft", "x"]  # a mean-pooled run's
    assert "--export_peft needs --pooling cls" in error_of(export)
    # agreeing flags: fine
    tg.main(["--eval_only", "--load", adapter, "--task", "sst2", "--r", "4", "--device", "cpu"])
    assert "SST-2 lora2 (step" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# runs lost or mixed before: one folder, one run


def test_a_second_run_into_a_locked_folder_is_refused(tiny, tmp_path):
    out_dir = tmp_path / "run"
    holder = subprocess.Popen(  # another process holds the folder, as a running train_glue.py does
        [sys.executable, "-c", "import rundir, sys, time, types\n"
         "with rundir.claim(sys.argv[1]):\n"
         "    print('claimed', flush=True)\n    time.sleep(60)", str(out_dir)],
        cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "claimed\n"
        message = error_of(argv(tiny, out_dir))
        assert message.endswith(f"--out_dir {out_dir} is in use by another run (pid "
                                f"{holder.pid}); wait for it to end or choose another --out_dir")
    finally:
        holder.kill()  # kill -9: the kernel drops its lock, nothing stale is left behind
        holder.wait()
    with rundir.claim(out_dir):
        with pytest.raises(ValueError, match="is in use by another run"):  # also within one process
            with rundir.claim(out_dir):
                pass


def test_a_new_run_into_a_finished_runs_folder_refuses_unless_resume_or_overwrite(finished, tiny,
                                                                                  tmp_path, capsys):
    out_dir = copy_run(finished, tmp_path)
    before = files(out_dir)
    message = error_of(argv(tiny, out_dir, "--save_every", "2", "--seed", "1"), capsys)
    assert message.endswith(f"--out_dir {out_dir} already holds a run (metrics.json, adapter.pt, "
                            f"train_state.pt); pass --resume to continue it, --overwrite to "
                            f"replace it, or choose another --out_dir")
    assert files(out_dir) == before  # untouched
    assert "--max_len 1000 exceeds" in error_of(argv(tiny, out_dir, "--overwrite", "--max_len",
                                                     "1000"), capsys)
    # --overwrite deletes the old run only once every check has passed
    assert files(out_dir) == before
    # replaces the whole run: no train_state.pt left over
    tg.main(argv(tiny, out_dir, "--seed", "1", "--overwrite"))
    assert ("--overwrite: deleted the previous run's metrics.json, adapter.pt, train_state.pt"
            in capsys.readouterr().err)
    assert not (out_dir / "train_state.pt").exists()
    assert json.loads((out_dir / "metrics.json").read_text())["seed"] == 1
    assert torch.load(out_dir / "adapter.pt", weights_only=True)["config"]["seed"] == 1
    message = error_of(argv(tiny, out_dir, "--seed", "1", "--resume"), capsys)
    assert ("--resume: " in message
            and "holds a run (metrics.json, adapter.pt) but no train_state.pt to continue from"
            in message)


def test_resume_into_a_finished_run_with_other_settings_is_refused(finished, tiny, tmp_path,
                                                                   capsys):
    out_dir = copy_run(finished, tmp_path)
    message = error_of(argv(tiny, out_dir, "--save_every", "2", "--resume", "--lr", "2e-2"), capsys)
    assert ("other settings: --lr 0.01 (now 0.02); rerun with those, or pass --overwrite to "
            "start over" in message)


def test_stale_temporary_files_are_cleaned(tmp_path):
    """The temporary files of interrupted saves (atomic_write names them) go; the user's stay."""
    out_dir = tmp_path / "run"
    for name in (".train_state.pt.4242.0badf00d.tmp", ".adapter.pt.4242.0badf00e.tmp", "notes.tmp",
                 ".notes.tmp"):
        write(out_dir / name, ["half a file"])
    with rundir.claim(out_dir):
        assert sorted(p.name for p in out_dir.iterdir()) == [".lock", ".notes.tmp", "notes.tmp"]


def test_a_failed_run_leaves_nothing_behind(tiny, tmp_path, monkeypatch, capsys):
    """Issue 19: a run that fails before it starts leaves no run folder, no lock, no empty data
    folder, and nothing outside the clone (GLUE_DIR names a folder that does not exist; the GLUE
    archives are unreachable). The model and the checkpoint are checked before any data is read or
    fetched."""
    clone = tmp_path / "clone"
    clone.mkdir()
    monkeypatch.chdir(clone)
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "shared" / "glue"))
    with socket.socket() as s:  # a port with nothing behind it
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("GLUE_BASE_URL", f"http://127.0.0.1:{s.getsockname()[1]}")
    cases = [(["--model", "/nonexistent/dir", "--task", "rte"],
              "/nonexistent/dir: not a BERT checkpoint folder"),
             (["--model", str(tiny[0]), "--task", "rte", "--max_len", "32"],
              "fetching http://127.0.0.1:"),
             (["--eval_only", "--load", "/nonexistent/adapter.pt"],
              "/nonexistent/adapter.pt: no such checkpoint")]
    for args, message in cases:
        assert message in error_of(args + ["--device", "cpu"], capsys)
        # not runs/, glue_data/, shared/glue, nor a lock
        assert sorted(tmp_path.rglob("*")) == [clone], args


def test_max_len_beyond_the_model_positions_fails_before_training(tiny, tmp_path, capsys):
    # the tiny BERT has 128 positions
    message = error_of(argv(tiny, tmp_path / "run", "--max_len", "1000"), capsys)
    assert message.endswith(f"--max_len 1000 exceeds the 128 positions of the model ({tiny[0]}); "
                            f"use --max_len 128 or less")


def test_unwritable_out_dir_fails_before_training(tiny, tmp_path, capsys, monkeypatch):
    write(tmp_path / "a_file", ["x"])
    message = error_of(argv(tiny, tmp_path / "a_file" / "run"), capsys)
    assert f"--out_dir {tmp_path / 'a_file' / 'run'}: cannot create or write to it (" in message
    assert message.endswith("); choose a writable folder")

    def denied(*args, **kwargs):  # tests run as root, which chmod cannot stop
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(Path, "mkdir", denied)
    message = error_of(argv(tiny, tmp_path / "run"), capsys)
    assert message.endswith(f"--out_dir {tmp_path / 'run'}: cannot create or write to it "
                            f"(Permission denied); choose a writable folder")


def test_export_peft_at_a_file_fails_before_training(tiny, tmp_path, capsys):
    write(tmp_path / "peft", ["x"])
    for target in (tmp_path / "peft", tmp_path / "peft" / "sub"):
        args = argv(tiny, tmp_path / "run", "--pooling", "cls", "--export_peft", str(target))
        message = error_of(args, capsys)
        assert f"--export_peft {target}: {tmp_path / 'peft'} is a file, not a folder" in message


# --------------------------------------------------------------------------------------------------
# tracebacks before: bad files and failed writes


def test_hf_path_that_does_not_exist(tiny, tmp_path, capsys):
    pytest.importorskip("transformers")
    args = argv(tiny, tmp_path / "run", "--hf", "/nonexistent")
    del args[args.index("--model"):args.index("--model") + 2]
    message = error_of(args, capsys)
    assert message.endswith("--hf /nonexistent: no such folder; pass a transformers model folder "
                            "or a model name")


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_corrupt_checkpoints_are_named_as_corrupt(finished, tiny, tmp_path, damage, capsys):
    out_dir = copy_run(finished, tmp_path)
    for name in ("adapter.pt", "train_state.pt"):
        raw = (out_dir / name).read_bytes()
        (out_dir / name).write_bytes({"truncated": raw[:len(raw) // 2], "empty": b"",
                                      "random": bytes((97 * i + 13) % 256
                                                      for i in range(999))}[damage])
    message = error_of(["--eval_only", "--load", str(out_dir / "adapter.pt")])
    assert message.startswith(f"train_glue.py: error: {out_dir / 'adapter.pt'}: not a readable "
                              f"checkpoint (corrupt or truncated: ")
    assert "weights_only" not in message
    message = error_of(argv(tiny, out_dir, "--save_every", "2", "--resume"), capsys)
    assert (f"{out_dir / 'train_state.pt'}: not a readable checkpoint (corrupt or truncated: "
            in message)


def test_checkpoint_of_the_wrong_kind_or_shape(finished, tmp_path):
    message = error_of(["--eval_only", "--load", str(finished / "train_state.pt")])
    assert message.endswith(f"{finished / 'train_state.pt'} is a train_state.pt; expected an "
                            f"adapter.pt (best adapter + head, for --eval_only --load)")
    ck = torch.load(finished / "adapter.pt", weights_only=True)
    ck["adapter"]["classifier.weight"] = torch.zeros(3, 32)  # a head of 3 classes for SST-2's 2
    torch.save(ck, tmp_path / "adapter.pt")
    message = error_of(["--eval_only", "--load", str(tmp_path / "adapter.pt"), "--device", "cpu"])
    assert message.endswith(f"{tmp_path / 'adapter.pt'} does not fit the model built from its "
                            f"settings: load_adapter_state_dict: classifier.weight has shape "
                            f"(2, 32), the saved one (3, 32)")
    assert "no such checkpoint" in error_of(["--eval_only", "--load", str(tmp_path / "missing.pt")])


def test_non_utf8_bytes_in_a_tsv_name_the_file_and_line(tiny, tmp_path, capsys):
    glue = Path(shutil.copytree(tiny[1], tmp_path / "glue"))
    train = glue / "SST-2" / "train.tsv"
    lines = train.read_bytes().split(b"\n")
    lines[4] = b"caf\xe9 latin-1 \t1"
    train.write_bytes(b"\n".join(lines))
    message = error_of(argv((tiny[0], glue), tmp_path / "run"), capsys)
    assert f"{train}:5: not UTF-8 text (b'caf\\xe9 latin-1 \\t1'); GLUE files are UTF-8" in message


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError("[enforce fail at inline_container.cc:603] . "
                                                  "unexpected pos 64")])
def test_a_full_disk_keeps_the_previous_file_and_says_so(tiny, tmp_path, monkeypatch, failure,
                                                         capsys):
    path = tmp_path / "adapter.pt"
    rundir.torch_save({"kind": "adapter", "step": 1}, path)
    before = path.read_bytes()
    save = torch.save

    def full(obj, f):
        save(obj, f)          # most of the file is written, then the disk is full
        raise failure
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as e:
        rundir.torch_save({"kind": "adapter", "step": 2}, path)
    reason = ("No space left on device" if isinstance(failure, OSError)
              else "the write failed; is the disk full?")
    assert str(e.value) == (f"could not write {path} ({reason}); adapter.pt is unchanged (the "
                            f"previous version, if any, is intact): free disk space or fix "
                            f"permissions, then run again (--resume continues from the last "
                            f"train_state.pt)")
    assert (path.read_bytes() == before
            and [p.name for p in tmp_path.iterdir()] == ["adapter.pt"])  # no .tmp left
    message = error_of(argv(tiny, tmp_path / "run"))  # a run that hits it: one line, no half file
    assert "could not write" in message and "inline_container" not in message
    assert not (tmp_path / "run").exists()  # it wrote nothing: its folder and lock are gone


def test_config_json_errors_name_the_file_and_key(tiny, tmp_path, capsys):
    model_dir = Path(shutil.copytree(tiny[0], tmp_path / "bert"))
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "hidden_size": "32",
                                                       "layer_norm_eps": None}))
    message = error_of(argv((model_dir, tiny[1]), tmp_path / "run"), capsys)
    assert message.endswith(f"{model_dir / 'config.json'}: wrong type for hidden_size='32' "
                            f"(expected int), layer_norm_eps=None (expected float); fix the file "
                            f"or use another checkpoint")
    (model_dir / "config.json").write_text('{"hidden_size": 32,')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \(Expecting property name "
                                         r"enclosed in double quotes: line 1 column 20"):
        bert.BertConfig.from_json(model_dir / "config.json")
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "vocab.txt").write_bytes(b"[PAD]\n\xff\n")
    with pytest.raises(ValueError, match=r"vocab.txt: not UTF-8 text \(byte 6\)"):
        bert.from_pretrained(model_dir, 2)
    (model_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError,
                       match="not a BERT checkpoint folder \\(no config.json\\)"):
        bert.from_pretrained(model_dir, 2)
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="pytorch_model.bin: not a readable PyTorch checkpoint"):
        bert.read_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------------
# issue 27: a run that cannot be right says so (up front where the flags alone decide it)


@pytest.fixture
def no_data(monkeypatch):
    """Reading the data fails the test: what follows must be refused before."""
    def read(*args):
        raise AssertionError("the data was read")
    monkeypatch.setattr(tg.glue, "load_encoded", read)


def test_export_peft_of_a_mean_pooled_classifier_is_refused_up_front(tiny, tmp_path, no_data):
    """PEFT loads the adapter onto AutoModelForSequenceClassification, which reads the [CLS]
    pooler; a classifier on mean pooling would predict differently there (27 % of the predictions
    agreed before)."""
    message = error_of(argv(tiny, tmp_path / "run", "--export_peft", str(tmp_path / "peft")))
    assert message.endswith(
        "--export_peft needs --pooling cls: PEFT loads the adapter onto transformers' "
        "AutoModelForSequenceClassification, which classifies from the [CLS] pooler, so a "
        "classifier on --pooling mean (the default without --hf) would predict differently there; "
        "train with --pooling cls to export")
    assert not (tmp_path / "run").exists() and not (tmp_path / "peft").exists()
    for given in (dict(pooling="cls"), dict(hf="bert-base-uncased"), dict(hf="x", pooling="cls")):
        tg.Config(export_peft=str(tmp_path / "peft"), **given)  # exports exactly: allowed
    with pytest.raises(ValueError, match="--export_peft needs --pooling cls"):
        tg.Config(export_peft=str(tmp_path / "peft"), hf="x", pooling="mean")


def test_a_diverged_run_stops_and_keeps_no_checkpoint_of_it(tiny, tmp_path):
    """--lr 50 without clipping: the loss is nan from step 2. The run stops at the check of step 2
    (an evaluation) with one line; of its checkpoints only step 1's train_state.pt, all finite, is
    left. Before: exit 0, a dev accuracy, and an adapter.pt of nan weights. A masking step before
    any check finds the scores non-finite: lora2.Pruner's error, one line too."""
    out_dir = tmp_path / "run"
    flags = ("--lr", "50", "--clip", "0", "--save_every", "1", "--log_every", "4")
    message = error_of(argv(tiny, out_dir, *flags))
    assert message.endswith("the run diverged: the task loss became nan in steps 1-2; lower --lr "
                            "(now 50) or try --clip 1 (now 0: no clipping); no checkpoint of the "
                            "diverged state was written")
    assert sorted(p.name for p in out_dir.iterdir()) == ["train_state.pt"]
    state = torch.load(out_dir / "train_state.pt", weights_only=True)
    assert state["global_step"] == 1
    assert all(v.isfinite().all() for part in state["model"].values() for v in part.values())
    no_checks = ("--eval_every", "0", "--log_every", "100", "--save_every", "0",
                 "--mask_interval", "1")  # the Pruner's masking of step 3 comes first
    message = error_of(argv(tiny, tmp_path / "run2", *flags, *no_checks))
    assert "importance scores are not finite" in message and not (tmp_path / "run2").exists()
    nan_state = {"adapter": {"layer.lambda_": torch.tensor([1.0, float("nan")])}, "head": {}}
    with pytest.raises(ValueError, match=r"^the run diverged: layer\.lambda_ holds non-finite "
                                         r"values at step 3; lower --lr \(now 0\.005\) or try a "
                                         r"smaller --clip \(now 1\)"):  # finite loss, nan update
        rundir.save_adapter(tmp_path / "adapter.pt", dataclasses.asdict(tg.Config()), 3, {},
                            nan_state)
    assert not (tmp_path / "adapter.pt").exists()


def test_warmups_that_leave_no_pruning_phase_are_refused_in_flag_names(tiny, tmp_path, monkeypatch,
                                                                       capsys):
    """T > t_i + t_f (L7) in the run's steps: from --steps before the data is read, from --epochs
    once the training set's size is known, before training. Before: the Pruner's internal names,
    after the data loaded."""
    args = argv(tiny, tmp_path / "run", "--init_warmup", "0.5", "--final_warmup", "0.49")
    i = args.index("--steps")
    with monkeypatch.context() as m:
        m.setattr(tg.glue, "load_encoded", lambda *a, **k: pytest.fail("the data was read"))
        message = error_of(args[:i] + ["--steps", "3"] + args[i + 2:])
    assert message.endswith("--init_warmup 0.5 and --final_warmup 0.49 of 3 steps (--steps) round "
                            "to 2 + 1 steps, leaving no pruning phase: give more steps or smaller "
                            "warm-ups")
    message = error_of(args[:i] + ["--epochs", "0.5"] + args[i + 2:], capsys)  # 64 / 8 / 2 steps
    assert message.endswith("--init_warmup 0.5 and --final_warmup 0.49 of 4 steps (--epochs 0.5) "
                            "round to 2 + 2 steps, leaving no pruning phase: give more steps or "
                            "smaller warm-ups")


def test_export_peft_unwritable_or_with_nothing_to_export_is_refused_up_front(tiny, tmp_path,
                                                                              monkeypatch, no_data):
    """Found only after the whole run before, and the metric and rank pattern went unprinted."""
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    access = rundir.os.access  # root, running the tests, writes through chmod: os.access says no
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: Path(path) != read_only
                        and access(path, mode))
    peft = read_only / "peft"
    message = error_of(argv(tiny, tmp_path / "run", "--pooling", "cls", "--export_peft", str(peft)))
    assert message.endswith(f"--export_peft {peft}: {read_only} is not writable; choose a writable "
                            f"folder")
    message = error_of(argv(tiny, tmp_path / "run", "--pooling", "cls", "--target_rank", "0",
                            "--export_peft", str(tmp_path / "peft")))
    assert message.endswith("--export_peft with --target_rank 0: pruning keeps no singular value, "
                            "so there is no adapter to export; pass --target_rank 1 or more, or "
                            "drop --export_peft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["read_only"]


def test_out_dir_under_an_unreadable_folder_names_the_flag(tiny, tmp_path, monkeypatch, no_data):
    locked = tmp_path / "locked"
    exists = Path.exists

    def stat(path):  # os.stat under a folder without search permission (root has it)
        if locked in path.parents:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return exists(path)
    monkeypatch.setattr(Path, "exists", stat)
    message = error_of(argv(tiny, locked / "run"))  # before: "[Errno 13] Permission denied: ..."
    assert message.endswith(f"--out_dir {locked / 'run'}: cannot create or write to it (Permission "
                            f"denied); choose a writable folder")
    peft = locked / "peft"
    message = error_of(argv(tiny, tmp_path / "run", "--pooling", "cls", "--export_peft", str(peft)))
    assert message.endswith(f"--export_peft {peft}: cannot reach it (Permission denied); choose a "
                            f"writable folder")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# the safetensors reader checks the header as the format requires


def raw_safetensors(path, header, data, n=None):
    """A file with this header (a dict, written as JSON) and data bytes; n overrides the stated
    header length."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if n is None else n) + blob + data)
    return path


F32 = struct.pack("<3f", 1, 2, 3)
BAD_SAFETENSORS = {  # name: (header, data, stated header length or None, message)
    "negative begin": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}},
                       F32[:4], None,
                       "tensor 'w': shape [1] and data_offsets [-4, 0] must be lists of "
                       "non-negative integers"),
    "float offsets": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}},
                      F32[:4], None,
                      "tensor 'w': shape [1] and data_offsets [0.0, 4.0] must be lists of "
                      "non-negative integers"),
    "missing dtype": ({"w": {"shape": [1], "data_offsets": [0, 4]}}, F32[:4], None,
                      "tensor 'w' needs dtype, shape and data_offsets"),
    "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, F32, None,
                "tensor 'b' starts at byte 4 of the data, the previous tensor ends at 8 "
                "(they overlap)"),
    "gap": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
             "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, F32, None,
            "tensor 'b' starts at byte 8 of the data, the previous tensor ends at 4 (a gap)"),
    "1 TB claim": ({"w": {"dtype": "F32", "shape": [2 ** 38], "data_offsets": [0, 2 ** 40]}},
                   F32, None,
                   f"the tensors cover {2 ** 40} bytes, the data section has 12; the file is "
                   f"truncated"),
    "trailing bytes": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, F32, None,
                       "the tensors cover 8 bytes, the data section has 12; the file is corrupt "
                       "(trailing bytes)"),
    "header past the end": ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}},
                            F32, 10 ** 6,
                            "not a safetensors file (header size 1000000 in a file of"),
    "metadata not text": ({"__metadata__": {"step": 3},
                           "w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}},
                          F32, None, "__metadata__ must map strings to strings"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_safetensors_header_is_validated(tmp_path, case):
    header, data, n, message = BAD_SAFETENSORS[case]
    path = raw_safetensors(tmp_path / "model.safetensors", header, data, n)
    with pytest.raises(ValueError) as e:
        formats.load_safetensors(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    reference = pytest.importorskip("safetensors.torch")
    with pytest.raises(Exception):  # the reference library rejects it too
        reference.load_file(path)


def test_safetensors_header_cut_short(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}
    good = raw_safetensors(tmp_path / "good.safetensors", header, F32)
    assert formats.load_safetensors(good)["w"].tolist() == [1, 2, 3]
    raw = good.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    (tmp_path / "cut.safetensors").write_bytes(raw[:8 + n // 2])
    with pytest.raises(ValueError, match=r"cut.safetensors: not a safetensors file \(header size "
                                         r"\d+ in a file of"):
        formats.load_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "garbled.safetensors").write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
    with pytest.raises(ValueError,
                       match="garbled.safetensors: the safetensors header is not valid JSON"):
        formats.load_safetensors(tmp_path / "garbled.safetensors")


# --------------------------------------------------------------------------------------------------
# the command line itself: one line on stderr, no traceback


@pytest.mark.parametrize("args,message", [
    (["--log_every", "0"], "train_glue.py: error: --log_every must be >= 1, got 0"),
    (["--eval_only", "--load", "nonexistent/adapter.pt"],
     "train_glue.py: error: nonexistent/adapter.pt: no such checkpoint; pass an adapter.pt "
     "written by train_glue.py"),
])
def test_command_line_errors_are_one_line_without_traceback(args, message):
    result = subprocess.run([sys.executable, "train_glue.py", *args], cwd=HERE, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and result.stderr == message + "\n" and result.stdout == ""
