"""The repository's text points only at files it holds: no '../shared/...' paths, and every
file named in backticks, in a Markdown link, or as a bare *.md name exists in the repository."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = (".py", ".c", ".h", ".md", ".toml", ".txt", ".cfg", ".sh", ".ipynb")
OUTSIDE = "../" + "shared"   # split, so that this file does not name it
EXT = r"(?:md|py|c|h|txt|toml|json|cfg|sh)"
# `path.ext`, ](path.ext), and bare name.md
REF = re.compile(rf"`([\w./-]+\.{EXT})`|\]\(([\w./-]+\.{EXT})(?:#[\w-]*)?\)|(?<![\w./-])([\w-]+(?:/[\w.-]+)*\.md)\b")


# Files kdcore's tools write (python -m kdcore run/report, benchmarks): named in the docs as
# outputs, not as files of the repository.
GENERATED = {"report.md", "history.json", "history.csv", "metrics.json", "env.txt", "done.json", "config.yaml",
             "runs.jsonl"}
CODE = (".py", ".c", ".h")


def _files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = out.split()
    except (OSError, subprocess.CalledProcessError):
        files = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) for f in fs
                 if ".git" not in d.split(os.sep)]
    return [f for f in files if f.endswith(TEXT) or os.path.basename(f) == "Makefile"]


def _exists(ref, src, names):
    if ref.startswith("/"):      # absolute: scratch paths in examples (/tmp/...), not repo files
        return True
    ref = ref[2:] if ref.startswith("./") else ref
    here = os.path.dirname(os.path.join(ROOT, src))
    if os.path.exists(os.path.join(ROOT, ref)) or os.path.exists(os.path.join(here, ref)):
        return True
    return "/" not in ref and ref in names    # a bare file name: any file of the repository


def test_no_references_outside_or_to_missing_files():
    files = _files()
    assert files, "no text files found"
    names = {os.path.basename(f) for f in files}
    bad = []
    for f in files:
        if os.path.abspath(os.path.join(ROOT, f)) == os.path.abspath(__file__):
            continue
        try:
            with open(os.path.join(ROOT, f), encoding="utf-8") as fh:
                text = fh.read()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE in line:
                bad.append(f"{f}:{n}: points outside the repository: {line.strip()}")
            for m in REF.finditer(line):
                if f.endswith(CODE) and m.group(3):   # a bare x.md in code is an attribute (args.md)
                    continue
                ref = next(g for g in m.groups() if g)
                if os.path.basename(ref) in GENERATED:
                    continue
                if not _exists(ref, f, names):
                    bad.append(f"{f}:{n}: names a missing file {ref!r}")
    assert not bad, "\n".join(bad)
