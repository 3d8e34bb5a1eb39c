"""The docs hold: README.md's shape (its length, the code ↔ paper table near the top, one first
block for every tool that runs it), links that resolve, SPEC §2's measured figure, and CI's reading
of the README's block (.ci/readme_block.py, .ci/run) on small fake blocks, installing nothing."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora2

ROOT = Path(__file__).parent
README = ROOT / "README.md"
BLOCK = [sys.executable, str(ROOT / ".ci" / "readme_block.py")]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_readme_is_short_with_the_code_paper_table_in_its_first_80_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150, len(lines)
    start = lines.index("## Code ↔ paper")
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("| paper"))
    end = next(i for i in range(header, len(lines)) if not lines[i].startswith("|"))
    assert end - header >= 10 and end <= 80, (header, end)


def test_every_tool_runs_the_same_first_block():
    """.ci/run takes the first ```bash block; a fresh-clone check may take the first bash, sh,
    shell or console block: they must be the same block, and it holds the two commands."""
    text = README.read_text()
    first = re.search(r"```(bash|sh|shell|console)\n(.*?)```", text, re.S)
    assert first.group(1) == "bash"
    block = subprocess.run(BLOCK + ["block", str(README)], capture_output=True, text=True,
                           check=True).stdout
    assert block == first.group(2)
    assert "pip install -r requirements.txt && python train_glue.py" in block
    assert block.rstrip().endswith("python -m pytest -q")


@pytest.mark.parametrize("page", ["README.md", "SPEC.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_point_to_files_that_exist(page):
    path = ROOT / page
    targets = [t for t in LINK.findall(path.read_text()) if not re.match(r"[a-z]+:", t)]
    missing = [t for t in targets if not t.startswith("#")
               and not (path.parent / t.split("#")[0]).exists()]
    assert not missing, missing


def test_spec_quotes_the_measured_gradient_ratio_of_the_squared_regulariser():
    """SPEC §2: at N(0, 0.02²) factors of a 768 × 768 layer (r = k = 8, seed 0), the squared form
    of (L3) has this many times the gradient norm of the un-squared one, over the four factors."""
    torch.manual_seed(0)
    m = lora2.LoRA2Linear(torch.nn.Linear(768, 768), r=8, k=8, init="paper")
    factors = [m.P_outer, m.P_inner, m.Q_inner, m.Q_outer]
    norms = [torch.cat([g.flatten() for g in torch.autograd.grad(
        lora2.orthogonal_regularizer(m, squared=sq), factors)]).norm() for sq in (True, False)]
    assert f"gives {norms[0] / norms[1]:.1f}× the" in (ROOT / "SPEC.md").read_text()


# ----------------------------------------------------------------------------------- .ci's logic


def run_block(tmp_path, block, env=None):
    """The script .ci/readme_block.py makes of a README whose first bash block is `block`, run in
    tmp_path: (exit status, stderr)."""
    (tmp_path / "README.md").write_text(f"# x\n\n```python\nraise SystemExit(3)\n```\n\n"
                                        f"```bash\n{block}```\n")
    script = subprocess.run(BLOCK + ["script", str(tmp_path / "README.md")], capture_output=True,
                            text=True, check=True).stdout
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env=env)
    return done.returncode, done.stderr


@pytest.mark.parametrize("failing", ["false && echo two", "true && false && true",
                                     "false \\\n  && echo two"])
def test_a_failure_inside_an_and_chain_fails_the_block_and_stops_it(tmp_path, failing):
    """bash -e goes on after `false && b`; the script stops there and names the line."""
    status, err = run_block(tmp_path, f"echo one > first\n{failing}\necho three > after\n")
    assert status == 1 and (tmp_path / "first").exists() and not (tmp_path / "after").exists()
    line = failing.splitlines()[0]
    assert err == f"CI: exit 1 from the README line: {line}\n"


@pytest.mark.parametrize("failing", ["true && false", "false || false", "false | cat", "exit 4",
                                     "(exit 5)"])
def test_any_other_failing_command_fails_the_block_and_stops_it(tmp_path, failing):
    status, _ = run_block(tmp_path, f"echo one > first\n{failing}\necho three > after\n")
    assert status != 0 and (tmp_path / "first").exists() and not (tmp_path / "after").exists()


def test_a_passing_block_runs_as_written_with_state_across_lines(tmp_path):
    block = ("x=1 && mkdir sub\ncd sub\n# a comment\nif [ $x = 1 ]; then\n  echo in > if\nfi\n"
             "echo a \\\n  b > cont\n")
    assert run_block(tmp_path, block) == (0, "")
    assert (tmp_path / "sub" / "if").read_text() == "in\n"
    assert (tmp_path / "sub" / "cont").read_text() == "a b\n"


def skips(tmp_path, log):
    (tmp_path / "log").write_text(log)
    done = subprocess.run(BLOCK + ["skips", str(tmp_path / "log")], capture_output=True, text=True)
    return done.returncode, done.stderr


def test_a_skip_for_any_reason_but_a_missing_gpu_fails(tmp_path):
    gpu = "SKIPPED [2] test_x.py:9: CUDA is not available\n"
    peft = "SKIPPED [3] test_y.py:4: could not import 'peft': No module named 'peft'\n"
    assert skips(tmp_path, "....\n200 passed in 99.10s (0:01:39)\n") == (0, "")
    assert skips(tmp_path, f"...s\n{gpu}= 198 passed, 2 skipped in 9.81s =\n") == (0, "")
    status, err = skips(tmp_path, f"...s\n{gpu}{peft}195 passed, 5 skipped in 9.81s\n")
    assert status == 1 and err == ("CI: 3 skipped at test_y.py:4: could not import 'peft': "
                                   "No module named 'peft'\n")
    status, err = skips(tmp_path, "...s\n199 passed, 1 skipped in 9.81s\n")  # no -rs reasons
    assert status == 1 and "1 skipped without a reason listed" in err
    status, err = skips(tmp_path, "SKIPPED [1] test_z.py:2: needs a file\n1 skipped in 0.1s\n")
    assert status == 1 and "test_z.py:2: needs a file" in err


def fake_clone(tmp_path, block):
    """A folder with .ci/ and a README whose first bash block is `block`."""
    shutil.copytree(ROOT / ".ci", tmp_path / ".ci")
    (tmp_path / "README.md").write_text(f"# x\n\n```bash\n{block}```\n")
    return tmp_path / ".ci" / "run"


@pytest.mark.parametrize("block, ok", [
    ('test -z "${GLUE_DIR-}${VIRTUAL_ENV-}" && test "$PYTEST_ADDOPTS" = -rs\n'
     "echo 'SKIPPED [1] test_x.py:3: needs a GPU'\necho '9 passed, 1 skipped in 0.5s'\n", True),
    ("echo 'SKIPPED [1] test_x.py:3: no peft'\necho '9 passed, 1 skipped in 0.5s'\n", False),
    ("false && echo two\necho '10 passed in 0.5s'\n", False)])
def test_ci_run_on_a_fake_clone(tmp_path, block, ok):
    """.ci/run end to end: the block runs with GLUE_DIR and VIRTUAL_ENV unset and -rs in
    PYTEST_ADDOPTS; a skip for a GPU passes, another skip or a failure in an && chain fails."""
    env = {**os.environ, "GLUE_DIR": "/nowhere", "VIRTUAL_ENV": "/nowhere"}
    done = subprocess.run(["bash", str(fake_clone(tmp_path, block))], capture_output=True,
                          text=True, env=env)
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
