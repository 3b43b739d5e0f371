"""The agent bundle pushed to SSH devices: a versioned ``.tar.gz`` of ``node_agent`` and exactly the
``testbed`` modules it (and the device helper ``testbed.backends.ssh.device``) imports — found by
following ``import`` statements statically from those roots, never a git checkout.

The version is the SHA-256 of the member paths and contents (first 12 hex digits): the same code
gives the same bundle, and the run manifest records which one each device ran.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
ROOTS = ("node_agent", "testbed.backends.ssh.device")
OURS = ("node_agent", "testbed")


@dataclass(frozen=True)
class Bundle:
    version: str
    data: bytes  # the .tar.gz
    members: tuple[str, ...]

    @property
    def filename(self) -> str:
        return f"headroom-agent-{self.version}.tar.gz"


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for cand in (base / "__init__.py", base.with_suffix(".py")):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names of our modules imported anywhere in ``path`` (also inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # ``from pkg import module``
    return {n for n in found if n.split(".")[0] in OURS}


def module_closure(roots=ROOTS) -> dict[str, Path]:
    """Module name -> file for the roots (a package root brings all its modules), their imports and
    every enclosing package's ``__init__``."""
    todo = []
    for r in roots:
        f = _module_file(r)
        if f is not None and f.name == "__init__.py":
            todo += [".".join(p.relative_to(REPO).with_suffix("").parts) for p in f.parent.rglob("*.py")]
        todo.append(r)
    out: dict[str, Path] = {}
    while todo:
        name = todo.pop().removesuffix(".__init__")
        if name in out:
            continue
        f = _module_file(name)
        if f is None:
            continue  # a name imported from a module, not a module
        out[name] = f
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(_imports(f, name))
    return out


def build_bundle(roots=ROOTS) -> Bundle:
    """The bundle for ``roots`` (deterministic: sorted members, fixed mtimes and owners)."""
    files = sorted({f.relative_to(REPO).as_posix(): f for f in module_closure(roots).values()}.items())
    h = hashlib.sha256()
    for rel, f in files:
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=6, mtime=0) as gz:  # no timestamp in the header
        with tarfile.open(fileobj=gz, mode="w") as tar:
            for rel, f in files:
                data = f.read_bytes()
                info = tarfile.TarInfo(rel)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return Bundle(h.hexdigest()[:12], buf.getvalue(), tuple(rel for rel, _ in files))
