"""The repository is self-contained: no tracked file refers to a path outside it.

A clone must be readable on its own, so code, docs, configs and comments may not name:

* a sibling or parent folder of the development set-up: ``../shared`` and ``shared/spec``, ``shared/paper``,
  ``shared/style``, or the spec file kept there, ``affinity-contract.md`` (the project's conventions live in
  ``docs/conventions.md``);
* absolute paths of a particular machine: ``/work/...``, ``/root/...``, ``/home/<user>/...``,
  ``/Users/<user>/...``;
* in Markdown, a relative link that leaves the repository or names a file it does not hold.

Allowed, because they name no file of any particular machine: URLs; relative paths inside the repository (a
path is only matched when it starts a token, so ``runs/work/x`` is fine); generic user placeholders in example
commands such as ``/data/voc`` or ``/data/tfds`` in README (a top-level folder the reader replaces by their own),
``$SCRATCH/...`` and ``$(mktemp -d)``.

Files are those of ``git ls-files``; without git (or outside a git checkout), the tree is walked, leaving out
``.git`` and what ``.gitignore`` lists. Binary files (a NUL byte or not UTF-8) and this file are skipped.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THIS = os.path.relpath(os.path.abspath(__file__), ROOT)

_START = r"(?<![\w.~$/-])"  # a path that starts here, not the tail of a relative path or a URL
FORBIDDEN = {  # the first that matches a line is reported
    "absolute path /work": re.compile(_START + r"/work/"),
    "absolute path /root": re.compile(_START + r"/root/"),
    "home folder of a user": re.compile(_START + r"/(?:home|Users)/[A-Za-z_][\w.-]*"),
    "parent shared folder": re.compile(r"\.\./+shared\b"),
    "shared spec/paper/style folder": re.compile(r"(?<![\w-])shared/(?:spec|paper|style)\b"),
    "the development spec (not in the repository)": re.compile(r"affinity-contract\.md"),
}
_MD_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _gitignore_patterns(root: str) -> list[str]:
  path = os.path.join(root, ".gitignore")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip() and not line.startswith(("#", "!"))]


def _ignored(rel: str, is_dir: bool, patterns: list[str]) -> bool:
  """A small subset of .gitignore: ``name``, ``/anchored``, ``dir/`` and ``*`` globs (enough for this repo's)."""
  name = os.path.basename(rel)
  for p in patterns:
    if p.endswith("/") and not is_dir:
      continue
    p = p.rstrip("/")
    if p.startswith("/") or "/" in p:
      if fnmatch.fnmatch(rel, p.lstrip("/")):
        return True
    elif fnmatch.fnmatch(name, p):
      return True
  return False


def walk_files(root: str) -> list[str]:
  """Files of the tree under ``root`` (relative paths), minus ``.git`` and what ``.gitignore`` lists."""
  patterns = _gitignore_patterns(root)
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    reldir = os.path.relpath(dirpath, root)
    reldir = "" if reldir == "." else reldir
    dirnames[:] = sorted(d for d in dirnames if d != ".git" and not _ignored(os.path.join(reldir, d), True, patterns))
    out.extend(
        os.path.join(reldir, f)
        for f in sorted(filenames)  # a worktree's .git is a file
        if f != ".git" and not _ignored(os.path.join(reldir, f), False, patterns)
    )
  return out


def repository_files(root: str = ROOT) -> list[str]:
  """``git ls-files`` when git and a checkout are there, else :func:`walk_files`; only files that exist."""
  files = None
  if shutil.which("git"):
    try:
      res = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True, timeout=60)
      files = [f for f in res.stdout.decode("utf-8").split("\0") if f]
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
      files = None
  if not files:
    files = walk_files(root)
  return [f for f in files if os.path.isfile(os.path.join(root, f))]


def read_text(path: str) -> str | None:
  """The file's text, or None for a binary file."""
  with open(path, "rb") as f:
    data = f.read()
  if b"\0" in data:
    return None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return None


def outside_references(rel: str, text: str, root: str = ROOT) -> list[str]:
  """``"file:line: what (text)"`` for every reference of ``text`` (the file ``rel``) to a path outside ``root``."""
  found = []
  for n, line in enumerate(text.splitlines(), 1):
    for what, pattern in FORBIDDEN.items():
      if pattern.search(line):
        found.append(f"{rel}:{n}: {what} ({line.strip()[:100]})")
        break
    if rel.endswith(".md"):
      for target in _MD_LINK.findall(line):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
          continue  # URL, mailto:, anchor
        path = target.split("#")[0]
        full = os.path.normpath(os.path.join(root, os.path.dirname(rel), path))
        if os.path.isabs(path) or os.path.relpath(full, root).startswith(".."):
          found.append(f"{rel}:{n}: link leaves the repository ({target})")
        elif not os.path.exists(full):
          found.append(f"{rel}:{n}: link to a missing file ({target})")
  return found


def test_no_tracked_file_refers_outside_the_repository():
  files = repository_files()
  assert "README.md" in files and THIS in files, files[:20]  # the listing works
  found = []
  for rel in files:
    if rel == THIS:
      continue
    text = read_text(os.path.join(ROOT, rel))
    if text is not None:
      found.extend(outside_references(rel, text))
  assert not found, "references outside the repository:\n" + "\n".join(found)


def test_checker_flags_outside_references_and_allows_placeholders(tmp_path):
  bad = {
      "see ../shared/spec/affinity-contract.md": "parent shared folder",
      "conventions in shared/spec/affinity-contract.md": "shared spec/paper/style folder",
      "(see /work/shared/paper/x.md)": "absolute path /work",
      "R expanded (affinity-contract.md)": "the development spec",
      "cache in /root/.cache/jax": "absolute path /root",
      "python /home/alice/dilaff/train.py": "home folder of a user",
      "open('/Users/bob/x.png')": "home folder of a user",
  }
  for line, what in bad.items():
    found = outside_references("x.py", line, str(tmp_path))
    assert len(found) == 1 and what in found[0], (line, found)
  fine = [
      "--manual_dir=/data/voc --data_dir=/data/tfds",
      "WORKDIR=$SCRATCH/runs/cs",
      "runs/work/step_1",
      "https://github.com/google/flax/work/home/x",
      "the shared filesystem of all nodes",
      "~/tensorflow_datasets",
      "files in <workdir>/eval/",
      "VENV=$(mktemp -d)/torch",
  ]
  for line in fine:
    assert outside_references("x.py", line, str(tmp_path)) == [], line
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "a.md").write_text("x")
  assert outside_references("README.md", "[a](docs/a.md#top) [w](https://x.org/a) [t](#toc)", str(tmp_path)) == []
  assert "leaves the repository" in outside_references("docs/b.md", "[c](../../c.md)", str(tmp_path))[0]
  assert "missing file" in outside_references("README.md", "[c](docs/c.md)", str(tmp_path))[0]


def test_walk_without_git_skips_git_and_ignored_folders(tmp_path):
  (tmp_path / ".gitignore").write_text("# comment\n.venv/\n*.pyc\n/runs/\n")
  for rel in ("a.py", "b.pyc", ".venv/lib/x.py", "runs/r/y.md", "pkg/runs/z.py", ".git/config", "pkg/c.py"):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text("x")
  assert sorted(walk_files(str(tmp_path))) == [".gitignore", "a.py", "pkg/c.py", "pkg/runs/z.py"]
  # Not a git checkout: the walk is used.
  assert sorted(repository_files(str(tmp_path))) == [".gitignore", "a.py", "pkg/c.py", "pkg/runs/z.py"]
