"""CI's reading of README.md's first ```bash block and of what it printed (.ci/run uses both).

    python3 .ci/readme_block.py block README.md    # the block, as written
    python3 .ci/readme_block.py script README.md   # the block as a script that stops at a failure
    python3 .ci/readme_block.py skips LOG          # fails unless every skip in LOG is for a GPU

bash -e does not stop at a failed command inside an && chain (`a && b` with a failing `a` goes
on), so the script checks the exit status after each of the block's commands itself; a command
that spans lines (a trailing backslash, an open `if`) is checked once, after its last line.
pytest -rs (PYTEST_ADDOPTS=-rs, set by .ci/run) lists each skip with its reason; a skip counts as
allowed only when its reason is a missing GPU. Standard library only: CI runs it before any venv.
"""
import re
import shlex
import subprocess
import sys

SKIPPED = re.compile(r"^SKIPPED \[(\d+)\] (\S+?): (.*)$", re.M)  # pytest -rs: count, where, why
SUMMARY = re.compile(r"^=*\s*\d+ \w+.* in [\d.]+s", re.M)  # "200 passed, 1 skipped in 9.81s"
GPU = re.compile(r"\b(cuda|gpus?)\b", re.I)


def block(text):
    """The first ```bash block of a Markdown text."""
    found = re.search(r"```bash\n(.*?)```", text, re.S)
    if not found:
        sys.exit("readme_block.py: README.md has no ```bash block")
    return found.group(1)


def commands(text):
    """The commands of a block, each one or more of its lines: a line is added to the next until
    `bash -n` reads them as complete (a trailing backslash, &&, an open `if`, a quote continue)."""
    out, pending = [], ""
    for line in text.splitlines():
        pending += line + "\n"
        syntax = subprocess.run(["bash", "-n", "-c", pending], capture_output=True)
        if syntax.returncode == 0 and not line.endswith("\\"):
            out.append(pending)
            pending = ""
    return out + ([pending] if pending.strip() else [])


def script(text):
    """A bash script that runs the block's commands as written (bash -e, pipefail) and checks the
    status of each itself, since -e lets a failure inside an && chain pass: it exits with the
    status of the first command that fails, naming its line."""
    lines = ["set -eo pipefail"]
    for command in commands(text):
        if not command.strip() or command.lstrip().startswith("#"):
            continue
        first = shlex.quote(command.strip().splitlines()[0])
        lines += [command.rstrip("\n"),
                  f"ci_status=$?; if [ $ci_status -ne 0 ]; then printf 'CI: exit %s from the "
                  f"README line: %s\\n' $ci_status {first} >&2; exit $ci_status; fi"]
    return "\n".join(lines) + "\n"


def bad_skips(log):
    """The problems with the tests a pytest -rs output skipped: each reason that is not a missing
    GPU, and skips that its summary lines count but no reason accounts for."""
    reasons = [(int(n), where, why) for n, where, why in SKIPPED.findall(log)]
    bad = [f"{n} skipped at {where}: {why}" for n, where, why in reasons
           if not GPU.search(why) or why.startswith("could not import")]
    counted = sum(int(n) for line in SUMMARY.findall(log)
                  for n in re.findall(r"(\d+) skipped", line))
    listed = sum(n for n, _, _ in reasons)
    if counted > listed:
        bad.append(f"{counted - listed} skipped without a reason listed (run pytest with -rs)")
    return bad


def main(argv):
    if len(argv) != 3 or argv[1] not in ("block", "script", "skips"):
        sys.exit("usage: readme_block.py {block,script} README.md | skips LOG")
    text = open(argv[2], encoding="utf-8").read()
    if argv[1] == "block":
        print(block(text), end="")
    elif argv[1] == "script":
        print(script(block(text)), end="")
    else:
        bad = bad_skips(text)
        for line in bad:
            print(f"CI: {line}", file=sys.stderr)
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main(sys.argv)
