"""Every ```python and ```bash / ```shell example in README.md and docs/*.md runs, so no example can rot.

The blocks of one file run in order, in one fresh folder (with ``recipes/`` linked in), so a later block may use a
folder an earlier one saved; python blocks share one namespace per file. Bash blocks run line by line with ``casify``
and ``python`` on the PATH; a ``casify`` command runs in this process through the console script's own entry point
(``casify_cli.main``, what the installed ``casify`` calls), which spares each command a fresh interpreter importing
torch and timm (seconds apiece); anything else runs as a subprocess. A comment on the line just above a fence changes
how its block runs:

    <!-- docs-test: skip (reason) -->       not run: it needs real data, the network, a GPU, or hours; say which
    <!-- docs-test: append ARGS -->         run each command with ARGS appended (a smaller budget, e.g. --max_steps 2)
    <!-- docs-test: replace OLD with NEW --> run a python block with the text OLD replaced by NEW (a smaller budget:
                                            the page shows what learns, the test runs what is fast)

Examples use the embedded digits and small models, so the whole file runs in about a minute. Relative links of the
pages must point at files that exist.
"""
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- docs-test: (?P<marker>[^\n]*?) -->\n)?```(?P<lang>[a-z]*)\n(?P<body>.*?)```", re.S)
RUN = ("python", "bash", "shell", "sh")
PNG = b"\x89PNG\r\n\x1a\n"
# figures a page's examples promise to write (relative to the page's folder): checked once its examples have run
FIGURES = {"results.md": ["results/a-vs-b/robustness_curves.png", "results/a/attacks.png"]}


def blocks(page: Path):
    """(language, body, marker or None) for every fenced block of ``page``."""
    return [(m.group("lang"), m.group("body"), m.group("marker")) for m in FENCE.finditer(page.read_text())]


def test_every_marker_is_known_and_skips_say_why():
    for page in PAGES:
        for lang, body, marker in blocks(page):
            if marker is None:
                continue
            assert lang in RUN, f"{page.name}: a docs-test marker above a ```{lang} block"
            assert re.fullmatch(r"skip \(.{10,}\)|append .+|replace \S+ with \S+", marker), \
                f"{page.name}: bad marker {marker!r}"
            if marker.startswith("replace "):
                old = marker.split()[1]
                assert lang == "python" and old in body, f"{page.name}: {marker!r} replaces nothing in its block"
    skipped = sum(1 for page in PAGES for _, _, marker in blocks(page) if marker and marker.startswith("skip"))
    run = sum(1 for page in PAGES for lang, _, marker in blocks(page) if lang in RUN and not
              (marker and marker.startswith("skip")))
    assert run >= 2 * skipped, f"{skipped} skipped examples against {run} that run: keep the skips few"


def test_relative_links_point_at_files():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to a missing {target}"


def _bin(tmp: Path) -> Path:
    """``casify`` and ``python`` for the bash examples: this interpreter and this checkout."""
    bin_dir = tmp / ".bin"
    bin_dir.mkdir()
    (bin_dir / "casify").write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "import sys, casify_cli; '
                                    f'sys.exit(casify_cli.main())" "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # a symlink would leave the venv
    for name in ("casify", "python"):
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _casify_in_process(args, monkeypatch, env):
    """``casify ARGS`` as the console script runs it (``sys.exit(casify_cli.main())``), in this process and the test's
    folder, with the bash examples' environment: (exit status, stdout, stderr)."""
    import casify_cli
    with monkeypatch.context() as m:
        for key in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE"):
            m.setenv(key, env[key])
        m.setattr(sys, "argv", ["casify", *args])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = casify_cli.main(args) or 0
            except SystemExit as e:  # argparse errors and --help, as the console script would exit
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def _commands(body: str):
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = body.replace("\\\n", " ")
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if line:
            yield line


def test_the_quickstart_trains_long_enough_to_learn():
    """The README quickstart's run must beat chance (5 steps left a model at 8 % on 10 classes, which its card then
    published): its TrainConfig asks for 300 steps or more, and its epochs allow them (test runs replace the step
    count, see the marker above the block)."""
    import ast
    import math

    from casify.data import build_dataset
    from casify.train import TrainConfig
    lang, body, marker = next(b for b in blocks(ROOT / "README.md") if b[0] == "python" and "TrainConfig(" in b[1])
    call = next(node for node in ast.walk(ast.parse(body))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "TrainConfig")
    config = TrainConfig(**{k.arg: ast.literal_eval(k.value) for k in call.keywords})
    steps_per_epoch = len(build_dataset("digits", "train")) // config.batch_size
    steps = min(math.ceil(config.epochs * steps_per_epoch), config.max_steps or math.inf)
    assert steps >= 300, f"the quickstart trains {steps} steps"
    assert marker and marker.startswith("replace max_steps="), "the docs test must shorten the quickstart's run"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_the_examples_of_a_page_run(page, tmp_path, monkeypatch, one_thread):
    runnable = [(lang, body, marker) for lang, body, marker in blocks(page)
                if lang in RUN and not (marker and marker.startswith("skip"))]
    if not runnable:
        pytest.skip(f"{page.name} has no runnable example")
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": f"{_bin(tmp_path)}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    namespace = {"__name__": f"docs:{page.name}"}
    for lang, body, marker in runnable:
        if lang == "python":
            if marker and marker.startswith("replace "):
                _, old, _, new = marker.split()
                body = body.replace(old, new)
            exec(compile(body, f"{page.name} example", "exec"), namespace)
            continue
        extra = shlex.split(marker[len("append "):]) if marker and marker.startswith("append ") else []
        for command in _commands(body):
            argv = shlex.split(command) + extra
            if argv[0] == "casify":
                code, out, err = _casify_in_process(argv[1:], monkeypatch, env)
            else:
                done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
                code, out, err = done.returncode, done.stdout, done.stderr
            assert code == 0, f"{page.name}: `{command}` failed:\n{out[-2000:]}\n{err[-3000:]}"
    for figure in FIGURES.get(page.name, []):
        assert (tmp_path / figure).read_bytes()[:8] == PNG, f"{page.name}: its examples wrote no {figure}"
