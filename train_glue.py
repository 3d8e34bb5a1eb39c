"""Fine-tune a BERT-style encoder on a GLUE task with LoRA² (or LoRA, AdaLoRA, full fine-tuning) in one flat loop.

    python train_glue.py                            # LoRA² on an SST-2 subset, MiniLM, 3.4-4.8 min on 2 CPU cores
    python train_glue.py --task rte --preset paper  # the authors' RTE hyperparameters (SPEC §5), warm-ups as fractions
    torchrun --nproc_per_node=2 train_glue.py       # DDP: gloo on CPU, nccl on GPU; --batch_size is the global batch

Data: GLUE TSVs from --data_dir (default $GLUE_DIR, else ./glue_data); a missing task is fetched from the GLUE archives.
One optimiser step, in the order of SPEC §4:
    forward → loss = task + γ·R → backward → clip → optimizer.step → scheduler.step → pruner.step(t) → zero_grad
Writes into --out_dir: metrics.json, adapter.pt (best adapter + head, reloadable with --eval_only --load) and, with
--save_every, train_state.pt (resumable with --resume). Only rank 0 prints or writes.
The data order is a pure function of (seed, step), so a resumed run and a DDP run see the same global batches.
"""
import argparse
import contextlib
import csv
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import typing
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import bert
import lora2

# ----------------------------------------------------------------------------------------------------------------------
# configuration


def _opt(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # data
    task: str = _opt("sst2", "GLUE task", ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"))
    data_dir: typing.Optional[str] = _opt(None, "GLUE folder (default: $GLUE_DIR, else ./glue_data)")
    no_download: bool = _opt(False, "never fetch a missing task from the GLUE archives")
    train_size: typing.Optional[int] = _opt(20000, "train on a fixed random subset of N examples (seed 0); 0 = all")
    eval_size: typing.Optional[int] = _opt(None, "evaluate on a fixed random subset of N dev examples (seed 0)")
    dev_split: typing.Optional[float] = _opt(None, "no train.tsv (QNLI here): this fraction of dev.tsv is the eval "
                                                   "set, the rest the train set (fixed seed 0; non-standard)")
    max_len: int = _opt(64, "maximum tokens per example (batches are padded to their longest example)")
    length_groups: int = _opt(64, "sort runs of this many shuffled batches by length, to pad less (1: plain shuffle)")
    # model
    model: typing.Optional[str] = _opt(None, "BERT checkpoint folder (default: the packaged all-MiniLM-L6-v2)")
    hf: typing.Optional[str] = _opt(None, "a transformers model name or path instead of --model (needs transformers)")
    method: str = _opt("lora2", "what to train", ("lora2", "lora", "adalora", "full"))
    r: int = _opt(8, "singular values per matrix (LoRA², AdaLoRA init_r) or LoRA rank")
    k: int = _opt(8, "LoRA² inner width")
    alpha: int = _opt(16, "scaling s = alpha / r")
    target_rank: int = _opt(2, "average rank kept after pruning (LoRA², AdaLoRA target_r)")
    init: str = _opt("orthogonal", "LoRA² factor initialisation (SPEC §1)", ("orthogonal", "paper"))
    gamma: float = _opt(0.1, "weight γ of the orthogonality regulariser (L3; AdaLoRA's orth_reg_weight)")
    cross: float = _opt(0.0, "weight of the cross-plane term (L4), relative to γ")
    scored: str = _opt("inner", "LoRA² importance on the inner factors (L5) or on all, AdaLoRA-style", ("inner", "all"))
    init_warmup: float = _opt(0.1, "t_i as a fraction of the steps (L7)")
    final_warmup: float = _opt(0.3, "t_f as a fraction of the steps (L7)")
    mask_interval: int = _opt(10, "mask every N steps in the cubic phase (L7, L8)")
    classifier_dropout: typing.Optional[float] = _opt(None, "dropout before the classifier (default: the model's)")
    # optimisation
    lr: float = _opt(5e-3, "peak learning rate (AdamW; full fine-tuning wants about 5e-5)")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    batch_size: int = _opt(16, "global batch size (split over DDP ranks)")
    steps: typing.Optional[int] = _opt(1200, "optimiser steps")
    epochs: typing.Optional[float] = _opt(None, "set the steps from epochs over the training set instead")
    warmup: float = _opt(0.06, "linear lr warm-up, fraction of the steps; then linear decay to 0")
    clip: float = _opt(1.0, "gradient-norm clipping")
    seed: int = _opt(0, "seed of initialisation, dropout and data order")
    # run
    eval_every: int = _opt(0, "evaluate every N steps (0: only at the end)")
    log_every: int = _opt(100, "progress line every N steps")
    out_dir: typing.Optional[str] = _opt(None, "output folder (default runs/<task>-<method>-s<seed>)")
    save_every: int = _opt(0, "write a resumable training checkpoint every N steps")
    resume: bool = _opt(False, "continue from <out_dir>/train_state.pt if it exists")
    eval_only: bool = _opt(False, "only evaluate the adapter + head of --load")
    load: typing.Optional[str] = _opt(None, "adapter.pt written by a training run (with --eval_only)")
    export_peft: typing.Optional[str] = _opt(None, "also write the adapter as a PEFT LoRA adapter into this folder")
    preset: typing.Optional[str] = _opt(None, "the authors' per-task hyperparameters (SPEC §5)", ("paper",))
    plot: bool = _opt(False, "write rank_pattern.png (needs matplotlib)")
    device: str = _opt("auto", "auto = cuda when available (bf16 autocast), else cpu", ("auto", "cpu", "cuda"))

    def __post_init__(self):
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"--{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        checks = [
            (self.r >= 1 and self.k >= 1, f"--r and --k must be >= 1, got r={self.r}, k={self.k}"),
            (0 <= self.target_rank <= self.r or self.method in ("lora", "full"),
             f"--target_rank must be in [0, r={self.r}], got {self.target_rank}"),
            (self.init_warmup >= 0 and self.final_warmup >= 0 and self.init_warmup + self.final_warmup < 1,
             f"--init_warmup + --final_warmup must be fractions summing below 1, got {self.init_warmup} + "
             f"{self.final_warmup} = {self.init_warmup + self.final_warmup}"),
            (0 <= self.warmup < 1, f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}"),
            (min(self.batch_size, self.mask_interval, self.length_groups) >= 1,
             "--batch_size, --mask_interval and --length_groups must be >= 1"),
            ((self.steps or 0) >= 1 or (self.epochs or 0) > 0, f"--steps must be >= 1, got {self.steps}"),
            (self.dev_split is None or 0 < self.dev_split < 1, f"--dev_split must be in (0, 1), got {self.dev_split}"),
            (self.max_len >= 8, f"--max_len must be >= 8, got {self.max_len}"),
            (not self.eval_only or self.load, "--eval_only needs --load PATH (an adapter.pt)"),
            (not (self.export_peft and self.method == "full"), "--export_peft needs an adapter method, not full"),
            (not (self.model and self.hf), "give --model or --hf, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# The authors' scripts (SPEC §5, DeBERTaV3-base, batch 32, k = 8). t_i, t_f and warm-up are in steps of the full
# training set; --preset paper turns them into fractions of the steps (warm-up 0.1 for MRPC is already a fraction).
PAPER = {  # task: lr, epochs, max_len, r, target_rank, alpha, t_i, t_f, mask_interval, gamma, warmup, cls dropout, wd
    "cola": (8e-4, 25, 64, 4, 3, 32, 800, 3500, 10, 0.1, 100, 0.10, 0.0),
    "mnli": (5e-4, 7, 256, 8, 3, 16, 8000, 50000, 100, 0.1, 1000, 0.15, 0.0),
    "mrpc": (1e-3, 30, 320, 8, 1, 32, 600, 1800, 1, 0.1, 0.1, 0.0, 0.01),
    "qnli": (1.2e-3, 5, 512, 8, 2, 32, 2000, 8000, 100, 0.1, 500, 0.1, 0.01),
    "qqp": (8e-4, 20, 320, 8, 3, 16, 8000, 25000, 100, 0.1, 2000, 0.15, 0.01),
    "rte": (1.2e-3, 50, 320, 4, 3, 32, 600, 1800, 1, 0.3, 200, 0.20, 0.01),
    "sst2": (8e-4, 24, 128, 8, 2, 16, 6000, 22000, 100, 0.1, 1000, 0.0, 0.01),
    "stsb": (2.2e-3, 25, 128, 4, 1, 32, 800, 2000, 10, 0.3, 100, 0.2, 0.1),
}
FULL_TRAIN_SIZE = {"cola": 8551, "mnli": 392702, "mrpc": 3668, "qnli": 104743, "qqp": 363846, "rte": 2490,
                   "sst2": 67349, "stsb": 5749}


def paper_preset(task):
    """SPEC §5 for `task` as Config values: full training set, the paper's epochs, warm-ups as fractions of T."""
    if task not in PAPER:
        raise ValueError(f"--preset paper has no hyperparameters for {task!r} (the paper covers {sorted(PAPER)})")
    lr, epochs, max_len, r, target, alpha, t_i, t_f, interval, gamma, warmup, dropout, wd = PAPER[task]
    T_paper = epochs * math.ceil(FULL_TRAIN_SIZE[task] / 32)
    return dict(lr=lr, epochs=epochs, steps=None, train_size=None, max_len=max_len, r=r, k=8, target_rank=target,
                alpha=alpha, init_warmup=t_i / T_paper, final_warmup=t_f / T_paper, mask_interval=interval,
                gamma=gamma, warmup=warmup if warmup < 1 else warmup / T_paper, classifier_dropout=dropout,
                weight_decay=wd, batch_size=32)


def build_parser():
    """argparse from the Config fields; unset flags are left out of the namespace so presets can fill them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS)
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        tp = hints[f.name]
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)  # Optional[int] -> int
        help_text = f.metadata["help"] + ("" if "default" in f.metadata["help"] else f" (default: {f.default})")
        if tp is bool:
            p.add_argument(f"--{f.name}", action="store_true", help=help_text)
        else:
            p.add_argument(f"--{f.name}", type=tp, choices=f.metadata["choices"], help=help_text)
    return p


def parse_config(argv=None):
    """Config from the command line: defaults, then --preset (if any), then the flags given explicitly."""
    given = vars(build_parser().parse_args(argv))
    values = paper_preset(given.get("task", Config.task)) if given.get("preset") == "paper" else {}
    return Config(**{**values, **given})


# ----------------------------------------------------------------------------------------------------------------------
# data

GLUE_BASE_URL = "https://dl.fbaipublicfiles.com/glue/data"  # the GLUE download script's archives; env GLUE_BASE_URL


@dataclass(frozen=True)
class Task:
    dir: str                    # folder in the GLUE layout
    text_a: typing.Any          # column name (index for header-less CoLA)
    text_b: typing.Any          # None for single sentences
    label: typing.Any
    labels: typing.Optional[tuple]  # label strings, in class order; None = regression (STS-B)
    metrics: tuple              # the first is the main metric
    archive: typing.Optional[str]   # file under GLUE_BASE_URL
    dev: tuple = ("dev",)
    ncols: typing.Optional[int] = None  # header-less files: the number of columns


TASKS = {
    "cola": Task("CoLA", 3, None, 1, ("0", "1"), ("mcc", "accuracy"), "CoLA.zip", ncols=4),
    "sst2": Task("SST-2", "sentence", None, "label", ("0", "1"), ("accuracy",), "SST-2.zip"),
    "mrpc": Task("MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("accuracy", "f1"), None),
    "qqp": Task("QQP", "question1", "question2", "is_duplicate", ("0", "1"), ("accuracy", "f1"), "QQP-clean.zip"),
    "stsb": Task("STS-B", "sentence1", "sentence2", "score", None, ("pearson", "spearman"), "STS-B.zip"),
    "mnli": Task("MNLI", "sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral"),
                 ("accuracy",), "MNLI.zip", dev=("dev_matched", "dev_mismatched")),
    "qnli": Task("QNLI", "question", "sentence", "label", ("entailment", "not_entailment"), ("accuracy",),
                 "QNLIv2.zip"),
    "rte": Task("RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment"), ("accuracy",), "RTE.zip"),
    "wnli": Task("WNLI", "sentence1", "sentence2", "label", ("0", "1"), ("accuracy",), "WNLI.zip"),
}


def read_tsv(path, task):
    """[(text_a, text_b or None, label)] from one GLUE TSV; label is a class index, or a float for STS-B.

    Read with csv.QUOTE_NONE (GLUE text contains stray quotes); a row with the wrong number of columns or an unknown
    label raises ValueError naming the file and line.
    """
    examples = []
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: MRPC files start with a byte-order mark
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if task.ncols is None:
            header = next(rows, None)
            if header is None:
                raise ValueError(f"{path}: empty file, expected a header row")
            wanted = [c for c in (task.text_a, task.text_b, task.label) if c is not None]
            if any(c not in header for c in wanted):
                raise ValueError(f"{path}:1: header {header} lacks column(s) {[c for c in wanted if c not in header]}")
            ncols, (ia, ib, il) = len(header), [header.index(c) if c is not None else None
                                                for c in (task.text_a, task.text_b, task.label)]
        else:
            ncols, ia, ib, il = task.ncols, task.text_a, task.text_b, task.label
        for row in rows:
            if not row:
                continue  # blank line
            where = f"{path}:{rows.line_num}"
            if len(row) != ncols:
                raise ValueError(f"{where}: expected {ncols} tab-separated columns, found {len(row)}: {row[:3]}...")
            raw = row[il]
            if task.labels is None:
                try:
                    label = float(raw)
                except ValueError:
                    raise ValueError(f"{where}: score {raw!r} is not a number") from None
            elif raw in task.labels:
                label = task.labels.index(raw)
            else:
                raise ValueError(f"{where}: label {raw!r} is not one of {task.labels}")
            examples.append((row[ia], None if ib is None else row[ib], label))
    return examples


def fetch_task(data_dir, name):
    """Download and unzip a GLUE task into data_dir/<Task> (atomically: unzip aside, then rename), saying so."""
    task, data_dir = TASKS[name], Path(data_dir)
    dev_path = data_dir / task.dir / f"{task.dev[0]}.tsv"
    if task.archive is None:
        raise FileNotFoundError(
            f"{dev_path} not found, and MRPC is not in the GLUE archives (licence). Run the GLUE download script "
            f"(github.com/nyu-mll/GLUE-baselines, download_glue_data.py --tasks MRPC) and put MRPC/train.tsv and "
            f"MRPC/dev.tsv into {data_dir}, or point --data_dir / GLUE_DIR at a folder that has them")
    url = f"{os.environ.get('GLUE_BASE_URL', GLUE_BASE_URL).rstrip('/')}/{task.archive}"
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"{dev_path} not found: fetching {url} into {data_dir / task.dir}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".fetch-") as tmp:
        archive = Path(tmp) / task.archive
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
            with zipfile.ZipFile(archive) as z:
                z.extractall(Path(tmp) / "unzipped")
        except (OSError, zipfile.BadZipFile) as e:  # URLError and timeouts are OSErrors
            raise FileNotFoundError(
                f"{dev_path} not found and fetching {url} failed ({e}). Download {task.archive} by hand and unzip it "
                f"into {data_dir} (giving {task.dir}/train.tsv, {task.dir}/{task.dev[0]}.tsv), or point --data_dir / "
                f"GLUE_DIR at a folder with the GLUE data") from e
        found = sorted((Path(tmp) / "unzipped").rglob(f"{task.dev[0]}.tsv"))
        if not found:
            raise FileNotFoundError(f"{url} unpacked without a {task.dev[0]}.tsv; expected the GLUE {task.dir} layout")
        if (data_dir / task.dir).exists():
            raise FileNotFoundError(f"{data_dir / task.dir} exists but has no {dev_path.name}; remove it or complete it")
        os.replace(found[0].parent, data_dir / task.dir)
    print(f"fetched GLUE {task.dir} ({archive.stat().st_size if archive.exists() else 0} bytes) into {data_dir}",
          file=sys.stderr)


def subset(examples, n, seed=0):
    """A fixed random subset of n examples (original order kept); None, 0 or n >= len: all of them."""
    if not n or n >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:n])
    return [examples[i] for i in keep]


def split_dev(examples, eval_fraction):
    """Deterministic (seed 0, independent of --seed) split of a dev set into (train, eval); non-standard."""
    n_eval = round(eval_fraction * len(examples))
    if not 0 < n_eval < len(examples):
        raise ValueError(f"--dev_split {eval_fraction} of {len(examples)} dev examples gives {n_eval} eval examples")
    perm = np.random.default_rng(0).permutation(len(examples))
    return [examples[i] for i in np.sort(perm[n_eval:])], [examples[i] for i in np.sort(perm[:n_eval])]


def data_dir_of(cfg):
    return Path(cfg.data_dir or os.environ.get("GLUE_DIR") or "glue_data")


def load_task(cfg, fetch=True):
    """(train examples, {dev split: examples}, non_standard) for cfg.task, fetching the task if allowed."""
    task, root = TASKS[cfg.task], data_dir_of(cfg)
    folder = root / task.dir
    if not all((folder / f"{split}.tsv").exists() for split in task.dev):
        if cfg.no_download or not fetch:
            raise FileNotFoundError(
                f"GLUE {task.dir} not found: looked for {folder / (task.dev[0] + '.tsv')}. Drop --no_download to fetch "
                f"it, or put the GLUE files there ({task.dir}/train.tsv, {task.dir}/{task.dev[0]}.tsv as written by the "
                f"GLUE download script), or point --data_dir / GLUE_DIR at a folder that has them")
        fetch_task(root, cfg.task)
    dev = {split: read_tsv(folder / f"{split}.tsv", task) for split in task.dev}
    if cfg.dev_split is not None:
        if len(task.dev) > 1:
            raise ValueError(f"--dev_split is for tasks with one dev file, {task.dir} has {task.dev}")
        train, dev[task.dev[0]] = split_dev(dev[task.dev[0]], cfg.dev_split)
        return train, dev, True
    if not (folder / "train.tsv").exists():
        raise FileNotFoundError(f"{folder / 'train.tsv'} not found (this copy of {task.dir} has only dev data): pass "
                                f"--dev_split 0.5 to split {task.dev[0]}.tsv into train and eval halves (non-standard), "
                                f"or put the full task there")
    return read_tsv(folder / "train.tsv", task), dev, False


def encode(tokenizer, examples, max_len, hf):
    """[(input_ids, token_type_ids)] for the examples: [CLS] a [SEP] (b [SEP]), truncated to max_len."""
    out = []
    for a, b, _ in examples:
        if hf:
            enc = tokenizer(a, b, truncation=True, max_length=max_len)
            out.append((enc["input_ids"], enc.get("token_type_ids") or [0] * len(enc["input_ids"])))
        else:
            out.append(tokenizer.encode(a, b, max_length=max_len))
    return out


def collate(encoded, index, pad_id, device):
    """Pad the chosen examples to the longest one: input_ids, attention_mask, token_type_ids, each (B, L)."""
    seqs = [encoded[i] for i in index]
    L = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    types = torch.zeros((len(seqs), L), dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for j, (a, t) in enumerate(seqs):
        ids[j, :len(a)], types[j, :len(t)], mask[j, :len(a)] = torch.tensor(a), torch.tensor(t), 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "token_type_ids": types.to(device)}


@functools.lru_cache(maxsize=2)
def epoch_batches(lengths, batch_size, seed, epoch, groups):
    """The global batches of one epoch, a pure function of its arguments (resumed and DDP runs see the same ones).

    Shuffle (seed, epoch), drop the last partial batch, sort each run of `groups` batches by length so a batch pads
    little (groups=1: plain shuffling), then shuffle the batches. `lengths` is a tuple of token counts.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    n = len(lengths) // batch_size * batch_size
    order = torch.randperm(len(lengths), generator=g)[:n].tolist()
    chunk = batch_size * groups
    order = [i for s in range(0, n, chunk) for i in sorted(order[s:s + chunk], key=lambda j: lengths[j])]
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def batch_index(step, lengths, batch_size, seed, groups):
    """The global batch of optimiser step `step`."""
    epoch, i = divmod(step, len(lengths) // batch_size)
    return epoch_batches(lengths, batch_size, seed, epoch, groups)[i]


# ----------------------------------------------------------------------------------------------------------------------
# metrics (numpy)


def accuracy(pred, gold):
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def f1_score(pred, gold):
    """F1 of the positive class (1): 2·TP / (2·TP + FP + FN); 0 when there is no positive at all."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp, fp, fn = np.sum((pred == 1) & (gold == 1)), np.sum((pred == 1) & (gold == 0)), np.sum((pred == 0) & (gold == 1))
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def matthews_corrcoef(pred, gold):
    """(TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0 when a factor is 0 (CoLA's metric)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp, tn = float(np.sum((pred == 1) & (gold == 1))), float(np.sum((pred == 0) & (gold == 0)))
    fp, fn = float(np.sum((pred == 1) & (gold == 0))), float(np.sum((pred == 0) & (gold == 1)))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    return float(x @ y) / denominator if denominator else 0.0


def average_ranks(x):
    """1-based ranks; tied values share the average of their positions (as scipy.stats.rankdata)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[True, xs[1:] != xs[:-1]]                  # first position of each run of equal values
    group = np.cumsum(starts) - 1                            # (n,) run index of each sorted position
    bounds = np.r_[np.flatnonzero(starts), len(x)]           # run start positions, then n
    ranks = np.empty(len(x))
    ranks[order] = ((bounds[:-1] + bounds[1:] - 1) / 2 + 1)[group]
    return ranks


def spearman(x, y):
    return pearson(average_ranks(x), average_ranks(y))


METRICS = {"accuracy": accuracy, "f1": f1_score, "mcc": matthews_corrcoef, "pearson": pearson, "spearman": spearman}


def task_metrics(task, pred, gold):
    return {name: METRICS[name](pred, gold) for name in task.metrics}


# ----------------------------------------------------------------------------------------------------------------------
# model per method

BERT_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
HF_TARGETS = {"bert": BERT_TARGETS, "roberta": BERT_TARGETS, "xlm-roberta": BERT_TARGETS,
              "deberta-v2": ("query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
                             "output.dense")}


def is_head(name):
    """The classification head: classifier and pooler (counted and saved apart from the adapter)."""
    return any(part in ("classifier", "pooler") for part in name.split("."))


def build_model(cfg, num_labels, total_steps=None):
    """(model, tokenizer, pruner or None) for cfg.method; the pruner only when total_steps is given (training)."""
    if cfg.hf:
        try:
            import transformers
        except ImportError:
            raise ImportError("--hf needs transformers: pip install transformers") from None
        extra = {}
        if cfg.classifier_dropout is not None:
            model_type = transformers.AutoConfig.from_pretrained(cfg.hf).model_type
            extra = {"cls_dropout" if model_type == "deberta-v2" else "classifier_dropout": cfg.classifier_dropout}
        model = transformers.AutoModelForSequenceClassification.from_pretrained(cfg.hf, num_labels=num_labels, **extra)
        tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.hf)
        if model.config.model_type not in HF_TARGETS:
            raise ValueError(f"--hf: no default target modules for model_type {model.config.model_type!r}; "
                             f"known: {sorted(HF_TARGETS)}")
        targets = HF_TARGETS[model.config.model_type]
    else:
        model_dir = Path(cfg.model) if cfg.model else bert.default_model_dir()
        model, tokenizer = bert.from_pretrained(model_dir, num_labels, classifier_dropout=cfg.classifier_dropout)
        targets = BERT_TARGETS
    pruner = None
    t_i, t_f = (round(cfg.init_warmup * total_steps), round(cfg.final_warmup * total_steps)) if total_steps else (0, 0)
    if cfg.method == "lora2":
        lora2.inject(model, targets, r=cfg.r, k=cfg.k, alpha=cfg.alpha, init=cfg.init)
        if total_steps:
            pruner = lora2.Pruner(model, cfg.target_rank, total_steps, t_i, t_f, cfg.mask_interval, scored=cfg.scored)
    elif cfg.method in ("lora", "adalora"):
        try:
            import peft
        except ImportError:
            raise ImportError(f"--method {cfg.method} uses PEFT's implementation: pip install peft") from None
        if cfg.method == "lora":
            config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=list(targets), lora_dropout=0.0)
        else:  # AdaLoRA at a budget matched to LoRA² (init_r = r, target_r = target_rank), same schedule (L7)
            config = peft.AdaLoraConfig(init_r=cfg.r, target_r=cfg.target_rank, lora_alpha=cfg.alpha,
                                        target_modules=list(targets), lora_dropout=0.0, tinit=t_i, tfinal=t_f,
                                        deltaT=cfg.mask_interval, beta1=0.85, beta2=0.85, orth_reg_weight=cfg.gamma,
                                        total_step=total_steps or cfg.steps)
        model = peft.get_peft_model(model, config)
        for name, p in model.named_parameters():
            if is_head(name):
                p.requires_grad_(True)
    else:  # full fine-tuning
        model.requires_grad_(True)
    return model, tokenizer, pruner


def adalora_orth_reg(model):
    """PEFT AdaLoRA's regulariser (AdaLoRA eq. 4, un-squared Frobenius norms, mean over P and Q matrices); PEFT adds it
    only to outputs that carry a .loss, so the loop adds it itself, as γ·R like LoRA²'s."""
    terms = []
    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            gram = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=p.device)))
    return torch.stack(terms).mean()


def regularizer(model, cfg):
    """R of loss = task + γ·R: LoRA²'s (L3, + cross × L4), AdaLoRA's, or None for LoRA and full fine-tuning."""
    if cfg.method == "lora2":
        return lora2.orthogonal_regularizer(model, cross=cfg.cross)
    if cfg.method == "adalora":
        return adalora_orth_reg(model)
    return None


def budget(model, pruner, cfg, step):
    """b(t), the singular values kept (L7), for the progress line; None for methods that do not prune."""
    if pruner is not None:
        return pruner.budget(step)
    if cfg.method == "adalora":
        return model.base_model.rankallocator.budget_schedule(step)[0]
    return None


def count_params(model):
    """{adapter, head, trainable, total}: counted the same way for every method (full: the adapter is the backbone)."""
    counts = {"adapter": 0, "head": 0, "total": 0}
    for name, p in model.named_parameters():
        counts["total"] += p.numel()
        if p.requires_grad:
            counts["head" if is_head(name) else "adapter"] += p.numel()
    counts["trainable"] = counts["adapter"] + counts["head"]
    return counts


def trained_state(model, cfg):
    """What adapter.pt stores: {"adapter": ..., "head": ...} (LoRA²: lora2.adapter_state_dict, masks included)."""
    state = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n: v.detach().clone() for n, v in state.items() if is_head(n) and (n in trainable or "lora_" in n)}
    if cfg.method == "lora2":
        adapter = lora2.adapter_state_dict(model)
    else:  # PEFT's lora_* tensors and AdaLoRA's ranknum; full: the whole backbone
        adapter = {n: v.detach().clone() for n, v in state.items()
                   if not is_head(n) and (n in trainable or "lora_" in n or "ranknum" in n)}
    return {"adapter": adapter, "head": head}


def load_trained_state(model, cfg, state):
    if cfg.method == "lora2":
        lora2.load_adapter_state_dict(model, state["adapter"])
        rest = state["head"]
    else:
        rest = {**state["adapter"], **state["head"]}
    unexpected = model.load_state_dict(rest, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"checkpoint does not fit the model: unexpected keys {unexpected[:6]}")


def rank_pattern(model, cfg):
    """{matrix name: [kept singular value i]}: LoRA²'s λ masks, AdaLoRA's non-zero E, LoRA's full r; {} for full."""
    if cfg.method == "lora2":
        return {name: m.lambda_mask.tolist() for name, m in lora2.lora2_modules(model).items()}
    pattern = {}
    for name, p in model.named_parameters():
        if cfg.method == "adalora" and ".lora_E." in name:
            pattern[name.split(".lora_E.")[0].removeprefix("base_model.model.")] = (p.detach() != 0).flatten().tolist()
        elif cfg.method == "lora" and ".lora_A." in name:
            pattern[name.split(".lora_A.")[0].removeprefix("base_model.model.")] = [True] * p.shape[0]
    return pattern


# ----------------------------------------------------------------------------------------------------------------------
# training


def setup_distributed(device_choice):
    """(rank, world size, device, whether this call started the process group); DDP when WORLD_SIZE > 1."""
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
        started = True
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return rank, world, device, started


def autocast(device):
    """bf16 autocast on CUDA; fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def logits_of(output):
    return output.logits if hasattr(output, "logits") else output  # transformers returns an object


def task_loss(logits, labels, regression):
    logits = logits.float()
    return F.mse_loss(logits.squeeze(-1), labels) if regression else F.cross_entropy(logits, labels)


def atomic_save(obj, path):
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text, path):
    tmp = f"{path}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


RUN_CONTROL = {"data_dir", "no_download", "out_dir", "save_every", "resume", "log_every", "export_peft", "plot", "device"}


def train(cfg, stop_at=None):
    """Train per cfg; return (summary dict as in metrics.json, model). stop_at: return early once global_step reaches
    it, without the final evaluation (a stand-in for a killed run in tests)."""
    rank, world, device, started = setup_distributed(cfg.device)
    try:
        return _train(cfg, rank, world, device, stop_at)
    finally:
        if started:
            dist.destroy_process_group()


def _train(cfg, rank, world, device, stop_at):
    say = functools.partial(print, file=sys.stderr, flush=True) if rank == 0 else (lambda *a, **k: None)
    out_dir = Path(cfg.out_dir or f"runs/{cfg.task}-{cfg.method}-s{cfg.seed}")
    if cfg.batch_size % world:
        raise ValueError(f"--batch_size {cfg.batch_size} is the global batch; it must divide by the {world} ranks")
    task = TASKS[cfg.task]
    regression = task.labels is None
    torch.manual_seed(cfg.seed)

    # data: rank 0 fetches a missing task, the others wait for it
    if rank == 0:
        train_ex, dev, non_standard = load_task(cfg)
    if world > 1:
        dist.barrier()
    if rank != 0:
        train_ex, dev, non_standard = load_task(cfg, fetch=False)
    train_ex = subset(train_ex, cfg.train_size)
    dev = {split: subset(ex, cfg.eval_size) for split, ex in dev.items()}
    if len(train_ex) < cfg.batch_size:
        raise ValueError(f"{len(train_ex)} training examples are fewer than one batch of {cfg.batch_size}")
    steps = cfg.steps if cfg.epochs is None else math.ceil(cfg.epochs * (len(train_ex) // cfg.batch_size))
    cfg = dataclasses.replace(cfg, steps=steps, epochs=None)  # resolved; saved with every checkpoint

    # model
    num_labels = 1 if regression else len(task.labels)
    model, tokenizer, pruner = build_model(cfg, num_labels, steps)
    model.to(device)
    pad_id = tokenizer.pad_token_id if cfg.hf else tokenizer.pad_id
    train_enc = encode(tokenizer, train_ex, cfg.max_len, cfg.hf)
    lengths = tuple(len(ids) for ids, _ in train_enc)
    train_y = torch.tensor([y for _, _, y in train_ex], dtype=torch.float if regression else torch.long)
    dev_data = {split: (encode(tokenizer, ex, cfg.max_len, cfg.hf), [y for _, _, y in ex]) for split, ex in dev.items()}
    counts = count_params(model)
    say(f"{task.dir}: {len(train_ex)} train, " + ", ".join(f"{len(ex)} {s}" for s, ex in dev.items())
        + (" (NON-STANDARD: train and eval are a split of dev.tsv)" if non_standard else "")
        + f" | {cfg.method}: {counts['adapter']:,} adapter + {counts['head']:,} head parameters trainable"
        + f" | {steps} steps of {cfg.batch_size} on {world}×{device.type}")

    # optimiser: AdamW, no decay on biases and LayerNorm; linear warm-up then linear decay
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for n, p in params if n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n]
    decay = [p for n, p in params if not (n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=True)
    warm = round(cfg.warmup * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: t / warm if t < warm else max(0.0, (steps - t) / max(1, steps - warm)))
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    # state that a checkpoint carries
    global_step, elapsed, best, last_metrics = 0, 0.0, None, None
    state_path = out_dir / "train_state.pt"
    if cfg.resume and state_path.exists():
        ck = torch.load(state_path, map_location=device, weights_only=True)
        changed = {k for k, v in dataclasses.asdict(cfg).items() if k not in RUN_CONTROL and ck["config"][k] != v}
        if changed:
            raise ValueError(f"--resume: {state_path} was written with other settings: "
                             + ", ".join(f"--{k} {ck['config'][k]} (now {getattr(cfg, k)})" for k in sorted(changed)))
        load_trained_state(model, cfg, ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if pruner is not None:
            pruner.load_state_dict(ck["pruner"])
        elif cfg.method == "adalora":
            allocator = model.base_model.rankallocator
            for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
                setattr(allocator, key, ck["pruner"][key])
            model.peft_config["default"].rank_pattern = ck["pruner"]["rank_pattern"]
        torch.set_rng_state(ck["rng"]["torch"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(ck["rng"]["cuda"], device)
        global_step, elapsed, best, last_metrics = ck["global_step"], ck["elapsed"], ck["best"], ck["last_metrics"]
        say(f"resumed from {state_path} at step {global_step}")

    def save_train_state(elapsed_s):
        if cfg.method == "adalora":
            allocator = model.base_model.rankallocator
            pruner_state = {key: getattr(allocator, key) for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")}
            pruner_state["rank_pattern"] = model.peft_config["default"].rank_pattern
        else:
            pruner_state = pruner.state_dict() if pruner is not None else None
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        atomic_save({"config": dataclasses.asdict(cfg), "global_step": global_step, "elapsed": elapsed_s,
                     "model": trained_state(model, cfg), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "pruner": pruner_state, "rng": rng, "best": best,
                     "last_metrics": last_metrics}, state_path)

    # the best checkpoint is chosen among evaluations at the final budget (t >= T - t_f for pruning methods), so the
    # reported adapter always has the target number of singular values
    selectable_from = steps - round(cfg.final_warmup * steps) if cfg.method in ("lora2", "adalora") else 0
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    model.train()
    t0, start_step, loss_sum, reg_sum, n_sum = time.time(), global_step, 0.0, 0.0, 0
    while global_step < steps:
        if stop_at is not None and global_step >= stop_at:
            return {"stopped_at": global_step}, model
        index = batch_index(global_step, lengths, cfg.batch_size, cfg.seed, cfg.length_groups)[rank::world]
        batch, labels = collate(train_enc, index, pad_id, device), train_y[index].to(device)
        with autocast(device):
            logits = logits_of(net(**batch))                     # (B/world, num_labels)
        loss_task = task_loss(logits, labels, regression)
        reg = regularizer(model, cfg)
        loss = loss_task if reg is None else loss_task + cfg.gamma * reg
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.clip)
        optimizer.step()
        scheduler.step()
        if pruner is not None:
            pruner.step(global_step)                             # (L5)-(L8), reads this step's .grad
        elif cfg.method == "adalora":
            model.base_model.update_and_allocate(global_step)    # PEFT AdaLoRA's allocator, at the same place
        optimizer.zero_grad(set_to_none=True)
        global_step += 1

        loss_sum += loss_task.detach()                           # summed on the device: no sync per step
        reg_sum += 0.0 if reg is None else reg.detach()
        n_sum += 1
        if global_step % cfg.log_every == 0 or global_step == steps:
            spent = time.time() - t0
            rate = (global_step - start_step) / spent
            b = budget(model, pruner, cfg, global_step - 1)
            say(f"step {global_step:>{len(str(steps))}}/{steps} | loss {float(loss_sum) / n_sum:.4f}"
                f" | R {float(reg_sum) / n_sum:.4f}"
                f" | lr {scheduler.get_last_lr()[0]:.2e} | b(t) {'-' if b is None else b}"
                f" | {rate * cfg.batch_size:.0f} ex/s | ETA {fmt_time((steps - global_step) / rate)}")
            loss_sum, reg_sum, n_sum = 0.0, 0.0, 0
        if global_step == steps or (cfg.eval_every and global_step % cfg.eval_every == 0):
            eval_start = time.time()
            last_metrics = evaluate(model, dev_data, task, pad_id, device)
            main = last_metrics[task.metrics[0]]
            is_best = global_step >= selectable_from and (best is None or main > best["metrics"][task.metrics[0]])
            if is_best:
                best = {"step": global_step, "metrics": last_metrics, "state": trained_state(model, cfg)}
                if rank == 0:
                    atomic_save({"config": dataclasses.asdict(cfg), "step": global_step, "metrics": last_metrics,
                                 **best["state"]}, out_dir / "adapter.pt")
            say(f"eval at step {global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_metrics.items())
                + (" (best)" if is_best else ""))
            t0 += time.time() - eval_start                        # evaluation time is not training time
        if cfg.save_every and global_step % cfg.save_every == 0 and global_step < steps and rank == 0:
            save_train_state(elapsed + time.time() - t0)
    elapsed += time.time() - t0
    if cfg.save_every and rank == 0:
        save_train_state(elapsed)  # the finished state: a --resume now only reports again

    # report the best checkpoint: its metrics, its rank pattern, its export
    load_trained_state(model, cfg, best["state"])
    summary = report(cfg, model, pruner, best, last_metrics, counts, non_standard, elapsed, steps, world, device,
                     len(train_ex), {s: len(ex) for s, ex in dev.items()}, rank == 0, out_dir)
    return summary, model


# ----------------------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model, dev_data, task, pad_id, device, batch_size=128):
    """Metrics on every dev split; the first split's names are plain, the others get a _<split> suffix (MNLI mm)."""
    model.eval()
    metrics = {}
    for i, (split, (encoded, gold)) in enumerate(dev_data.items()):
        order = sorted(range(len(encoded)), key=lambda j: len(encoded[j][0]))  # similar lengths batch together
        pred = np.empty(len(encoded))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            with autocast(device):
                logits = logits_of(model(**collate(encoded, index, pad_id, device))).float()
            pred[index] = (logits.squeeze(-1) if task.labels is None else logits.argmax(-1)).cpu().numpy()
        suffix = "" if i == 0 else f"_{split}"
        metrics.update({f"{k}{suffix}": v for k, v in task_metrics(task, pred, np.asarray(gold)).items()})
    model.train()
    return metrics


def evaluate_checkpoint(cfg):
    """--eval_only --load PATH: rebuild the model of the saved run, load adapter + head, evaluate on the same data."""
    ck = torch.load(cfg.load, map_location="cpu", weights_only=True)
    saved = Config(**{**ck["config"], "data_dir": cfg.data_dir or ck["config"]["data_dir"],
                      "no_download": cfg.no_download, "device": cfg.device})
    _, _, device, _ = setup_distributed(saved.device)
    task = TASKS[saved.task]
    _, dev, _ = load_task(saved)
    dev = {split: subset(ex, saved.eval_size) for split, ex in dev.items()}
    model, tokenizer, _ = build_model(saved, 1 if task.labels is None else len(task.labels))
    load_trained_state(model, saved, ck)
    model.to(device)
    pad_id = tokenizer.pad_token_id if saved.hf else tokenizer.pad_id
    data = {s: (encode(tokenizer, ex, saved.max_len, saved.hf), [y for _, _, y in ex]) for s, ex in dev.items()}
    metrics = evaluate(model, data, task, pad_id, device)
    print(f"{task.dir} {saved.method} (step {ck['step']} of {cfg.load}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# reporting

SHORT = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
         "attention.self.query_proj": "query", "attention.self.key_proj": "key", "attention.self.value_proj": "value",
         "attention.output.dense": "attn.out", "intermediate.dense": "inter", "output.dense": "output"}
SHADES = " ░▒▓█"


def rank_heatmap(pattern, r):
    """The rank pattern as text: one row per layer, one column per module type, cells = kept singular values."""
    cells, columns = {}, []
    for name, kept in pattern.items():
        m = re.search(r"(?:^|\.)(\d+)\.(.+)$", name)  # the first numeric component is the layer
        layer, module = (int(m.group(1)), m.group(2)) if m else (-1, name)
        column = SHORT.get(module, module)
        if column not in columns:
            columns.append(column)
        cells[layer, column] = sum(kept)
    width = max(4, *(len(c) for c in columns))
    lines = ["layer " + " ".join(f"{c:>{width}}" for c in columns)]
    for layer in sorted({layer for layer, _ in cells}):
        row = []
        for c in columns:
            rank = cells.get((layer, c))
            row.append(" " * width if rank is None else
                       f"{SHADES[min(4, math.ceil(4 * rank / r))]}{rank:>{width - 1}}")
        lines.append(f"{'L' + str(layer) if layer >= 0 else '-':>5} " + " ".join(row))
    return "\n".join(lines)


def plot_rank_pattern(pattern, r, path, title):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); skipped the PNG", file=sys.stderr)
        return None
    rows = {}
    for name, kept in pattern.items():
        m = re.search(r"(?:^|\.)(\d+)\.(.+)$", name)
        layer, module = (int(m.group(1)), m.group(2)) if m else (-1, name)
        rows.setdefault(layer, {})[SHORT.get(module, module)] = sum(kept)
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    layers = sorted(rows)
    grid = np.array([[rows[layer].get(c, np.nan) for c in columns] for layer in layers], dtype=float)
    fig, ax = plt.subplots(figsize=(1 + 0.9 * len(columns), 1 + 0.45 * len(layers)))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=r, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, int(value), ha="center", va="center", color="w" if value < r / 2 else "k")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="kept singular values")
    fig.tight_layout()
    tmp = f"{path}.tmp"
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def report(cfg, model, pruner, best, last_metrics, counts, non_standard, elapsed, steps, world, device, n_train,
           n_eval, is_rank0, out_dir):
    """Build the summary (metrics.json); on rank 0 print it, write metrics.json, the PNG and the PEFT export."""
    task = TASKS[cfg.task]
    pattern = rank_pattern(model, cfg)
    stats = pruner.stats() if pruner is not None else None
    main_name = task.metrics[0]
    summary = {
        "task": cfg.task, "method": cfg.method, "seed": cfg.seed, "metrics": best["metrics"],
        "main_metric": best["metrics"][main_name], "main_metric_name": main_name, "best_step": best["step"],
        "final_metrics": last_metrics, "steps": steps, "adapter_params": counts["adapter"],
        "head_params": counts["head"], "trainable_params": counts["trainable"], "total_params": counts["total"],
        "rank_pattern": pattern, "kept_singular_values": sum(sum(k) for k in pattern.values()),
        "scored_ratio": stats["scored_ratio"] if stats else None, "wall_s": round(elapsed, 2),
        "examples_per_s": round(steps * cfg.batch_size / elapsed, 1) if elapsed else None,
        "non_standard_split": non_standard, "train_size": n_train, "eval_size": n_eval, "world_size": world,
        "device": device.type, "args": dataclasses.asdict(cfg),
    }
    if not is_rank0:
        return summary
    atomic_write_text(json.dumps(summary, indent=1) + "\n", out_dir / "metrics.json")
    lines = [f"{task.dir} dev {main_name}: {summary['main_metric']:.4f} at step {best['step']} of {steps} "
             f"(" + ", ".join(f"{k} {v:.4f}" for k, v in best["metrics"].items()) + ")"
             + ("  [NON-STANDARD: train/eval split of dev.tsv]" if non_standard else ""),
             f"parameters: {counts['trainable']:,} trainable ({counts['adapter']:,} adapter + {counts['head']:,} head)"
             f" of {counts['total']:,} ({100 * counts['trainable'] / counts['total']:.2f} %)",
             f"training time {fmt_time(elapsed)} on {world}×{device.type}"]
    if pattern and cfg.method != "lora":
        lines += [f"rank pattern (kept singular values of r={cfg.r}; {summary['kept_singular_values']} of "
                  f"{cfg.r * len(pattern)} in {len(pattern)} matrices):", rank_heatmap(pattern, cfg.r)]
    if stats:
        lines.append(f"importance scores kept for {stats['scored']:,} of {stats['adapter']:,} adapter entries "
                     f"({100 * stats['scored_ratio']:.2f} %; AdaLoRA would score {stats['adalora_scored']:,})")
    if cfg.plot and pattern:
        png = plot_rank_pattern(pattern, cfg.r, out_dir / "rank_pattern.png", f"{task.dir} {cfg.method} rank pattern")
        if png:
            lines.append(f"wrote {png}")
    if cfg.export_peft:
        if cfg.method == "lora2":
            lora2.save_peft(model, cfg.export_peft, base_model_name_or_path=cfg.hf or cfg.model or
                            str(bert.default_model_dir(install=False)))
        else:
            model.save_pretrained(cfg.export_peft)
        lines.append(f"wrote a PEFT LoRA adapter to {cfg.export_peft}")
    lines.append(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'adapter.pt'} "
                 f"(python train_glue.py --eval_only --load {out_dir / 'adapter.pt'})")
    print("\n".join(lines), flush=True)
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# main


def main(argv=None):
    try:
        cfg = parse_config(argv)
        if cfg.eval_only:
            evaluate_checkpoint(cfg)
        else:
            train(cfg)
    except (ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"train_glue.py: error: {e}")


if __name__ == "__main__":
    main()
