"""GLUE for train_glue.py: the nine tasks, their TSV readers, fetching, batching, metrics (numpy).

Reference: Wang et al., "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language
Understanding", ICLR 2019; the files in the layout of its download script (<Task>/train.tsv,
<Task>/dev.tsv).
Not here: the test sets (GLUE scores them on its server), tokenisation (bert.py), the model and the
loop (train_glue.py). The data order is a pure function of (seed, step), so resumed and DDP runs see
the same batches.
"""
import csv
import functools
import lzma
import math
import os
import shutil
import sys
import tempfile
import typing
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# tasks and readers

# the GLUE download script's archives; env GLUE_BASE_URL
GLUE_BASE_URL = "https://dl.fbaipublicfiles.com/glue/data"
# tasks that ship with the repository, as .tsv.xz (data/README.md)
SHIPPED = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Task:
    dir: str                    # folder in the GLUE layout
    text_a: typing.Any          # column name (index for header-less CoLA)
    text_b: typing.Any          # None for single sentences
    label: typing.Any
    labels: typing.Optional[tuple]  # label strings, in class order; None = regression (STS-B)
    metrics: tuple              # the first is the main metric
    archive: typing.Optional[str]   # file under GLUE_BASE_URL
    train_size: int = 0  # rows of the full train.tsv (the paper's schedules are in steps of it)
    dev: tuple = ("dev",)
    ncols: typing.Optional[int] = None  # header-less files: the number of columns

    @property
    def num_labels(self):
        # one output for the regression task (STS-B)
        return 1 if self.labels is None else len(self.labels)


TASKS = {
    "cola": Task("CoLA", 3, None, 1, ("0", "1"), ("mcc", "accuracy"), "CoLA.zip", 8551, ncols=4),
    "sst2": Task("SST-2", "sentence", None, "label", ("0", "1"), ("accuracy",), "SST-2.zip", 67349),
    "mrpc": Task("MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("accuracy", "f1"), None,
                 3668),
    "qqp": Task("QQP", "question1", "question2", "is_duplicate", ("0", "1"), ("accuracy", "f1"),
                "QQP-clean.zip", 363846),
    "stsb": Task("STS-B", "sentence1", "sentence2", "score", None, ("pearson", "spearman"),
                 "STS-B.zip", 5749),
    "mnli": Task("MNLI", "sentence1", "sentence2", "gold_label",
                 ("contradiction", "entailment", "neutral"), ("accuracy",), "MNLI.zip", 392702,
                 dev=("dev_matched", "dev_mismatched")),
    "qnli": Task("QNLI", "question", "sentence", "label", ("entailment", "not_entailment"),
                 ("accuracy",), "QNLIv2.zip", 104743),
    "rte": Task("RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment"),
                ("accuracy",), "RTE.zip", 2490),
    "wnli": Task("WNLI", "sentence1", "sentence2", "label", ("0", "1"), ("accuracy",), "WNLI.zip",
                 635),
}


def read_tsv(path, task):
    """[(text_a, text_b or None, label)] from one GLUE TSV; label is a class index, or a float for
    STS-B.

    Read with csv.QUOTE_NONE (GLUE text contains stray quotes); bytes that are not UTF-8, a row
    with the wrong number of columns or an unknown label raise ValueError naming the file and line,
    and so does a file without examples.
    """
    try:
        examples = _read_rows(path, task)
    except UnicodeDecodeError:
        with _open(path, "rb") as f:  # the decoder reads ahead: find the line in the raw bytes
            number, line = next((i, line) for i, line in enumerate(f, 1) if not _is_utf8(line))
        raise ValueError(f"{path}:{number}: not UTF-8 text ({line.rstrip()[:60]!r}); GLUE files "
                         f"are UTF-8: re-download or re-encode it (iconv -t utf-8)") from None
    if not examples:
        raise ValueError(f"{path}: no examples (only a header or blank lines); the file is "
                         f"truncated, restore it")
    return examples


def _is_utf8(raw):
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _open(path, mode="rt", **kwargs):
    """open(), or lzma.open() for a .xz file (the shipped data)."""
    return (lzma.open if str(path).endswith(".xz") else open)(path, mode, **kwargs)


def _read_rows(path, task):
    examples = []
    # -sig: MRPC files start with a byte-order mark
    with _open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if task.ncols is None:
            header = next(rows, None)
            if header is None:
                raise ValueError(f"{path}: empty file, expected a header row")
            wanted = [c for c in (task.text_a, task.text_b, task.label) if c is not None]
            if any(c not in header for c in wanted):
                raise ValueError(f"{path}:1: header {header} lacks column(s) "
                                 f"{[c for c in wanted if c not in header]}")
            ncols, (ia, ib, il) = len(header), [header.index(c) if c is not None else None
                                                for c in (task.text_a, task.text_b, task.label)]
        else:
            ncols, ia, ib, il = task.ncols, task.text_a, task.text_b, task.label
        for row in rows:
            if not row:
                continue  # blank line
            where = f"{path}:{rows.line_num}"
            if len(row) != ncols:
                raise ValueError(f"{where}: expected {ncols} tab-separated columns, found "
                                 f"{len(row)}: {row[:3]}...")
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


# --------------------------------------------------------------------------------------------------
# fetching, subsets, batches


def fetch_task(data_dir, name):
    """Download and unzip a GLUE task into data_dir/<Task>, saying so. The archive is fetched and
    unpacked in a temporary folder of the system's; data_dir is created, and the task moved into it,
    only once that worked, so a failed fetch leaves nothing behind."""
    task, data_dir = TASKS[name], Path(data_dir)
    dev_path = data_dir / task.dir / f"{task.dev[0]}.tsv"
    if task.archive is None:
        raise FileNotFoundError(
            f"{dev_path} not found, and MRPC is not in the GLUE archives (licence). Run the GLUE "
            f"download script (github.com/nyu-mll/GLUE-baselines, download_glue_data.py --tasks "
            f"MRPC) and put MRPC/train.tsv and MRPC/dev.tsv into {data_dir}, or point --data_dir / "
            f"GLUE_DIR at a folder that has them")
    if (data_dir / task.dir).exists():
        raise FileNotFoundError(f"{data_dir / task.dir} exists but has no {dev_path.name}; remove "
                                f"it or complete it")
    url = f"{os.environ.get('GLUE_BASE_URL', GLUE_BASE_URL).rstrip('/')}/{task.archive}"
    print(f"{dev_path} not found: fetching {url} into {data_dir / task.dir}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="glue-fetch-") as tmp:
        archive = Path(tmp) / task.archive
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as f:
                shutil.copyfileobj(response, f)
            with zipfile.ZipFile(archive) as z:
                z.extractall(Path(tmp) / "unzipped")
        except (OSError, zipfile.BadZipFile) as e:  # URLError and timeouts are OSErrors
            raise FileNotFoundError(
                f"{dev_path} not found and fetching {url} failed ({e}). Download {task.archive} by "
                f"hand and unzip it into {data_dir} (giving {task.dir}/train.tsv, {task.dir}/"
                f"{task.dev[0]}.tsv), or point --data_dir / GLUE_DIR at a folder with the GLUE "
                f"data") from e
        found = sorted((Path(tmp) / "unzipped").rglob(f"{task.dev[0]}.tsv"))
        if not found:
            raise FileNotFoundError(f"{url} unpacked without a {task.dev[0]}.tsv; expected the "
                                    f"GLUE {task.dir} layout")
        data_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(str(found[0].parent), str(data_dir / task.dir))
        size = archive.stat().st_size
    print(f"fetched GLUE {task.dir} ({size:,} bytes) into {data_dir}", file=sys.stderr)


def subset(examples, n, seed=0):
    """A fixed random subset of n examples (original order kept); None, 0 or n >= len: all of
    them."""
    if not n or n >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(seed).permutation(len(examples))[:n])
    return [examples[i] for i in keep]


def split_dev(examples, eval_fraction):
    """Deterministic (seed 0, independent of --seed) split of a dev set into (train, eval);
    non-standard."""
    n_eval = round(eval_fraction * len(examples))
    if not 0 < n_eval < len(examples):
        raise ValueError(f"--dev_split {eval_fraction} of {len(examples)} dev examples gives "
                         f"{n_eval} eval examples")
    perm = np.random.default_rng(0).permutation(len(examples))
    return ([examples[i] for i in np.sort(perm[n_eval:])],
            [examples[i] for i in np.sort(perm[:n_eval])])


def data_dir_of(data_dir):
    """--data_dir, else $GLUE_DIR, else ./glue_data."""
    return Path(data_dir or os.environ.get("GLUE_DIR") or "glue_data")


@dataclass
class Data:
    train: list                 # [(text_a, text_b or None, label)]
    dev: dict                   # {dev split: examples}
    non_standard: bool          # train and eval are a split of dev.tsv (--dev_split)
    source: Path                # the folder the files were read from


def task_files(name, data_dir=None, fetch=True):
    """(the folder holding task `name`'s files, their suffix): the GLUE folder (--data_dir,
    $GLUE_DIR or ./glue_data) if it has the task; else, when no folder was named, the copy shipped
    in data/ (SST-2); else the folder after fetching the task into it, if `fetch` allows. A data
    folder that is a file, or a task folder without its dev files, is an error saying what is
    missing."""
    task, root = TASKS[name], data_dir_of(data_dir)
    folder, named = root / task.dir, data_dir or os.environ.get("GLUE_DIR")
    dev = [folder / f"{split}.tsv" for split in task.dev]
    if all(path.exists() for path in dev):
        return folder, ".tsv"
    shipped = SHIPPED / task.dir
    if not named and all((shipped / f"{split}.tsv.xz").exists() for split in ("train", *task.dev)):
        return shipped, ".tsv.xz"
    where = (f"--data_dir {root}" if data_dir else f"GLUE_DIR={root}" if named
             else f"the data folder {root}")
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{where} is a file, not a folder; give the GLUE folder (holding "
                                 f"{task.dir}/train.tsv, {task.dir}/{task.dev[0]}.tsv)")
    if folder.exists():
        missing = ", ".join(path.name for path in dev if not path.exists())
        raise FileNotFoundError(f"{where}: {folder} has no {missing}; complete it (GLUE {task.dir} "
                                f"has train.tsv, {', '.join(p.name for p in dev)}) or remove it to "
                                f"fetch the task")
    if not fetch and task.archive:
        raise FileNotFoundError(
            f"GLUE {task.dir} not found in {where}: looked for {dev[0]}. Drop --no_download to "
            f"fetch it, or put the GLUE files there ({task.dir}/train.tsv, {task.dir}/"
            f"{task.dev[0]}.tsv as written by the GLUE download script), or point --data_dir / "
            f"GLUE_DIR at a folder that has them")
    fetch_task(root, name)  # MRPC, which no archive holds: an error saying how to get it
    return folder, ".tsv"


def load_task(name, data_dir=None, dev_split=None, fetch=True):
    """Data(train examples, {dev split: examples}, non_standard, source folder) for task `name`
    (task_files)."""
    task = TASKS[name]
    folder, suffix = task_files(name, data_dir, fetch)
    dev = {split: read_tsv(folder / f"{split}{suffix}", task) for split in task.dev}
    if dev_split is not None:
        if len(task.dev) > 1:
            raise ValueError(f"--dev_split is for tasks with one dev file, {task.dir} has "
                             f"{task.dev}")
        train, dev[task.dev[0]] = split_dev(dev[task.dev[0]], dev_split)
        return Data(train, dev, True, folder)
    if not (folder / f"train{suffix}").exists():
        raise FileNotFoundError(f"{folder / 'train.tsv'} not found (this copy of {task.dir} has "
                                f"only dev data): pass --dev_split 0.5 to split {task.dev[0]}.tsv "
                                f"into train and eval halves (non-standard), or put the full task "
                                f"there")
    return Data(read_tsv(folder / f"train{suffix}", task), dev, False, folder)


def load(name, data_dir=None, dev_split=None, train_size=None, eval_size=None, fetch=False):
    """load_task, then the fixed random subsets of --train_size and --eval_size (seed 0)."""
    data = load_task(name, data_dir, dev_split, fetch)
    return Data(subset(data.train, train_size),
                {split: subset(ex, eval_size) for split, ex in data.dev.items()},
                data.non_standard, data.source)


def load_encoded(name, tokenize, max_len, batch_size, data_dir=None, dev_split=None,
                 train_size=None, eval_size=None, fetch=False, rank=0, world=1):
    """(Task, Data, train encodings, train labels as a tensor, {dev split: (encodings, labels)}) of
    task `name` (load, then encode). Under DDP (world > 1) rank 0 reads, or fetches a missing task,
    while the other ranks wait for it, then read."""
    if rank:
        torch.distributed.barrier()
    data = load(name, data_dir, dev_split, train_size, eval_size, fetch=fetch and rank == 0)
    if rank == 0 and world > 1:
        torch.distributed.barrier()
    if len(data.train) < batch_size:
        raise ValueError(f"{len(data.train)} training examples, fewer than a batch ({batch_size})")
    task = TASKS[name]
    train_enc, train_y = encode(tokenize, data.train, max_len)
    train_y = torch.tensor(train_y, dtype=torch.float if task.labels is None else torch.long)
    return (task, data, train_enc, train_y,
            {split: encode(tokenize, ex, max_len) for split, ex in data.dev.items()})


def encode(tokenize, examples, max_len):
    """([(input_ids, token_type_ids)], labels) for the examples; tokenize(a, b, max_len) gives
    [CLS] a [SEP] (b [SEP])."""
    return [tokenize(a, b, max_len) for a, b, _ in examples], [y for _, _, y in examples]


def collate(encoded, index, pad_id, device, buckets=None):
    """Pad the chosen examples to the longest one, or up to the next of `buckets` (increasing
    lengths, the last one at least the longest example: a compiled step then sees a few shapes):
    input_ids, attention_mask, token_type_ids, each (B, L), on `device` (see to_device)."""
    seqs = [encoded[i] for i in index]
    L = max(len(ids) for ids, _ in seqs)
    L = next(b for b in buckets if b >= L) if buckets else L
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    types = torch.zeros((len(seqs), L), dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for j, (a, t) in enumerate(seqs):
        ids[j, :len(a)], types[j, :len(t)], mask[j, :len(a)] = torch.tensor(a), torch.tensor(t), 1
    return {"input_ids": to_device(ids, device), "attention_mask": to_device(mask, device),
            "token_type_ids": to_device(types, device)}


def to_device(tensor, device):
    """`tensor` on `device`; to CUDA from pinned memory without blocking, so the host never waits
    for the GPU."""
    return (tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda"
            else tensor.to(device))


def length_buckets(max_len, n=4):
    """The lengths a compiled step pads its batches to: n even steps up to max_len, rounded up to
    multiples of 8."""
    return sorted({min(max_len, 8 * math.ceil(max_len * (i + 1) / n / 8)) for i in range(n)})


@functools.lru_cache(maxsize=2)
def epoch_batches(lengths, batch_size, seed, epoch, groups):
    """The global batches of one epoch, a pure function of its arguments (resumed and DDP runs see
    the same ones).

    Shuffle (seed, epoch), drop the last partial batch, sort each run of `groups` batches by length
    so a batch pads little (groups=1: plain shuffling), then shuffle the batches. `lengths` is a
    tuple of token counts.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    n = len(lengths) // batch_size * batch_size
    order = torch.randperm(len(lengths), generator=g)[:n].tolist()
    chunk = batch_size * groups
    order = [i for s in range(0, n, chunk)
             for i in sorted(order[s:s + chunk], key=lambda j: lengths[j])]
    batches = [order[s:s + batch_size] for s in range(0, n, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def batch_index(step, lengths, batch_size, seed, groups):
    """The global batch of optimiser step `step`."""
    epoch, i = divmod(step, len(lengths) // batch_size)
    return epoch_batches(lengths, batch_size, seed, epoch, groups)[i]



# --------------------------------------------------------------------------------------------------
# metrics (numpy)


def accuracy(pred, gold):
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def f1_score(pred, gold):
    """F1 of the positive class (1): 2·TP / (2·TP + FP + FN); 0 when there is no positive at all."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp, fp, fn = (np.sum((pred == 1) & (gold == 1)), np.sum((pred == 1) & (gold == 0)),
                  np.sum((pred == 0) & (gold == 1)))
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def matthews_corrcoef(pred, gold):
    """(TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0 when a factor is 0 (CoLA's
    metric)."""
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
    starts = np.r_[True, xs[1:] != xs[:-1]]         # first position of each run of equal values
    group = np.cumsum(starts) - 1                   # (n,) run index of each sorted position
    bounds = np.r_[np.flatnonzero(starts), len(x)]  # run start positions, then n
    ranks = np.empty(len(x))
    ranks[order] = ((bounds[:-1] + bounds[1:] - 1) / 2 + 1)[group]
    return ranks


def spearman(x, y):
    return pearson(average_ranks(x), average_ranks(y))


METRICS = {"accuracy": accuracy, "f1": f1_score, "mcc": matthews_corrcoef, "pearson": pearson,
           "spearman": spearman}


def task_metrics(task, pred, gold):
    return {name: METRICS[name](pred, gold) for name in task.metrics}


def task_loss(logits, labels):
    """Cross-entropy for classes, mean squared error for the regression task (STS-B: one output,
    float labels)."""
    logits = logits.float()
    return (F.mse_loss(logits.squeeze(-1), labels) if labels.is_floating_point()
            else F.cross_entropy(logits, labels))


def evaluate(logits_of, dev_data, task, pad_id, device, batch_size=128):
    """Metrics on every dev split {split: (encoded, labels)}; logits_of(batch) -> (B, num_labels).
    The first split's metric names are plain, the others get a _<split> suffix (MNLI's
    dev_mismatched)."""
    metrics = {}
    for i, (split, (encoded, gold)) in enumerate(dev_data.items()):
        # similar lengths batch together
        order = sorted(range(len(encoded)), key=lambda j: len(encoded[j][0]))
        pred = np.empty(len(encoded))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            logits = logits_of(collate(encoded, index, pad_id, device)).float()  # (B, num_labels)
            pred[index] = (logits.squeeze(-1) if task.labels is None
                           else logits.argmax(-1)).cpu().numpy()
        suffix = "" if i == 0 else f"_{split}"
        metrics.update({f"{k}{suffix}": v
                        for k, v in task_metrics(task, pred, np.asarray(gold)).items()})
    return metrics
