"""Emulated vs SSH backend on the same experiment and the same network: the sshd-in-namespaces rig
of the SSH tests (3 devices on a switch, links 50/20/10 Mbit/s shaped by Mininet as the "real"
network) runs one experiment over ``backend: ssh``, and the emulated backend runs it on its own
Mininet copy of that topology. Prints per-algorithm median decode-token latency (and its
compute/transfer/wait parts) side by side, checks the tokens are identical, and draws
docs/figures/ssh_vs_emulated.png.

    sudo .venv/bin/python bench/bench_ssh.py [--model smollm2-135m] [--tokens 24] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import pandas as pd  # noqa: E402

from tests.ssh.rig import SshdRig  # noqa: E402
from tests.ssh.test_ssh_e2e import write_experiment  # noqa: E402

ALGOS = ("resource_aware", "edgeshard", "galaxy")
PARTS = ("compute_s", "transfer_s", "wait_s")


def run(exp: Path, out: Path, backend: str) -> Path:
    p = subprocess.run([sys.executable, "-m", "testbed", "run", str(exp), "-o", str(out), "--backend", backend,
                        "--print-run-dir"], capture_output=True, text=True, cwd=REPO, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"{backend} run failed: {p.stderr[-2000:]}")
    return Path(p.stdout.strip().splitlines()[-1])


def table(run_dir: Path) -> pd.DataFrame:
    t = pd.read_csv(run_dir / "tokens.csv")
    t = t[t["phase"] == "decode"]
    return t.groupby("algorithm")[["latency_s", *PARTS]].median() * 1e3


def figure(tables: dict[str, pd.DataFrame], path: Path) -> None:
    from analysis.style import PART_COLORS, plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    width, x = 0.38, range(len(ALGOS))
    for k, (backend, t) in enumerate(tables.items()):
        bottom = [0.0] * len(ALGOS)
        for part in PARTS:
            vals = [t.loc[a, part] if a in t.index else 0.0 for a in ALGOS]
            ax.bar([i + (k - 0.5) * width for i in x], vals, width * 0.95, bottom=bottom, color=PART_COLORS[part],
                   edgecolor="black" if backend == "ssh" else "white", hatch="//" if backend == "ssh" else None,
                   label=f"{part[:-2]}" if k == 0 else None)
            bottom = [b + v for b, v in zip(bottom, vals)]
        for i, top in enumerate(bottom):
            ax.text(i + (k - 0.5) * width, top, backend, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), ALGOS)
    ax.set_ylabel("median decode token latency (ms)")
    ax.set_title("Same experiment and network: SSH backend (hatched) vs emulated", fontsize=10)
    ax.legend(title="median critical-path part", fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    fig.savefig(path.with_suffix(".pdf"))


def redraw(out: Path) -> None:
    """The figure again from a previous run's directories (``--redraw OUT``)."""
    dirs = {k: Path(v) for k, v in json.loads((out / "ssh_vs_emulated.json").read_text())["run_dirs"].items()}
    figure({b: table(d) for b, d in dirs.items()}, REPO / "docs/figures/ssh_vs_emulated.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--redraw", type=Path, default=None, help="only redraw from a previous --out DIR")
    args = ap.parse_args()
    if args.redraw:
        return redraw(args.redraw)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ssh-"))
    out = args.out or tmp
    rig = SshdRig(tmp).start()
    try:
        exp = write_experiment(rig, tmp, "ssh-vs-emulated", new_tokens=args.tokens, model=args.model, shape=False)
        dirs = {"ssh": run(exp, out / "ssh", "ssh"), "emulated": run(exp, out / "emulated", "emulated")}
    finally:
        rig.stop()
    tables = {b: table(d) for b, d in dirs.items()}
    toks = {b: pd.read_csv(d / "tokens.csv").groupby("algorithm")["token_id"].apply(list).to_dict()
            for b, d in dirs.items()}
    same = toks["ssh"] == toks["emulated"]
    rows = []
    for a in ALGOS:
        e, s = tables["emulated"].loc[a], tables["ssh"].loc[a]
        rows.append({"algorithm": a, "emulated_ms": round(e["latency_s"], 2), "ssh_ms": round(s["latency_s"], 2),
                     "ssh/emulated": round(s["latency_s"] / e["latency_s"], 3),
                     **{f"{p[:-2]}_ms emu/ssh": f"{e[p]:.2f}/{s[p]:.2f}" for p in PARTS}})
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"tokens identical across backends: {same}")
    fig = REPO / "docs/figures/ssh_vs_emulated.png"
    figure(tables, fig)
    (out / "ssh_vs_emulated.json").write_text(json.dumps({"rows": rows, "tokens_identical": same,
                                                            "run_dirs": {k: str(v) for k, v in dirs.items()}}, indent=1))
    print(f"figure: {fig}\nruns: {out}")


if __name__ == "__main__":
    main()
