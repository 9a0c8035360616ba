#!/usr/bin/env python
"""Does a change keep training bitwise the same? Runs every shipped oracle config (shortened) and
every tiny-family config through ``train/distill.py`` in two source trees, and compares the loss
history and every tensor the run folders hold (students, EMAs, checkpoints' trainables).

    python eval/equivalence.py check --before HEAD~3            # a git worktree of HEAD~3 against this tree
    python eval/equivalence.py record runs/equiv/after.json     # this tree only
    python eval/equivalence.py compare before.json after.json [--ignore dmd_regression_pairs]

Only the command line and the run folder's files are used, so the two trees may organise their code
as they like. The tiny pipelines are built once, by the first tree, and shared. Runs use one thread
(``OMP_NUM_THREADS=1``), so their arithmetic does not depend on what else the machine is doing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORACLE_STEPS = 120  # enough for every method's stages and rounds to turn over at least once
# settings the shortened oracle runs need beyond the step count (each stage must fit in ORACLE_STEPS)
ORACLE_EXTRA = {"guided_1step": ["method_args.stage1_steps=40"], "disback_1step": ["method_args.degradation_steps=40"]}
TINY_SUITES = ("tiny-sd", "tiny-sd3", "tiny-dit")
IGNORED_LOGS = {"it_per_s", "step"}


def runs(suites: list[str], only: str | None = None) -> list[tuple[str, str, list[str]]]:
    """(name, config path relative to a tree, overrides) of every run (whose name contains ``only``)."""
    out = []
    if "oracle" in suites:
        for cfg in sorted((ROOT / "configs" / "oracle").glob("*.yaml")):
            out.append((f"oracle/{cfg.stem}", f"configs/oracle/{cfg.name}",
                        [f"train.max_steps={ORACLE_STEPS}", f"train.checkpoint_every={ORACLE_STEPS // 2}",
                         f"train.validate_every={ORACLE_STEPS}", "train.log_every=1", "train.num_validation=64",
                         "teacher.oracle.network_steps=200", *ORACLE_EXTRA.get(cfg.stem, [])]))
    for suite in TINY_SUITES:
        if suite in suites or "tiny" in suites:
            for cfg in sorted((ROOT / "configs" / suite).glob("*.yaml")):
                out.append((f"{suite}/{cfg.stem}", f"configs/{suite}/{cfg.name}", []))
    return [r for r in out if only is None or only in r[0]]


def _tensor_digests(folder: Path) -> dict:
    """{relative file :: tensor name: sha256 of dtype, shape and bytes} for every safetensors file."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for name, t in sorted(load_file(str(f)).items()):
            t = t.contiguous()
            raw = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
            h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(raw.numpy().tobytes())
            out[f"{f.relative_to(folder)}::{name}"] = h.hexdigest()
    return out


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    return [{k: v for k, v in row.items() if k not in IGNORED_LOGS} | {"step": row["step"]} for row in rows]


def record(tree: Path, out_json: Path, work: Path, suites: list[str], pipelines: Path, only: str | None = None) -> dict:
    """Run every config with ``tree``'s code and write what it produced to ``out_json``."""
    tree = tree.resolve()
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    found = subprocess.run([sys.executable, "-c", "import stepdistill; print(stepdistill.__file__)"], env=env,
                           cwd=tree, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree):
        raise SystemExit(f"the package imported from {found}, not from {tree}")
    results = {}
    for name, config, overrides in runs(suites, only):
        run_dir = work / name
        if run_dir.exists():
            raise SystemExit(f"{run_dir} exists; give a fresh --work folder")
        cfg_text = (tree / config).read_text().replace("runs/tiny-pipelines", str(pipelines))
        cfg_file = work / "configs" / f"{name}.yaml"
        cfg_file.parent.mkdir(parents=True, exist_ok=True)
        cfg_file.write_text(cfg_text)
        cmd = [sys.executable, "train/distill.py", "--config", str(cfg_file), f"train.output_dir={run_dir}",
               "train.report_to=none", "train.progress=false", *overrides]
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        entry = {"status": proc.returncode}
        if proc.returncode == 0:
            entry["history"] = _history(run_dir)
            entry["tensors"] = _tensor_digests(run_dir)
        else:
            entry["error"] = (proc.stderr.strip().splitlines() or [""])[-1]
        results[name] = entry
        print(f"{name}: status {proc.returncode}, {len(entry.get('tensors', {}))} tensors", flush=True)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=1))
    return results


def compare(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Every difference between two records, as lines (tensors of files under an ``ignore`` prefix of
    the run folder are left out: a cache whose format changed, say)."""
    problems = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            problems.append(f"{name}: only in {'the first' if name in a else 'the second'} record")
            continue
        x, y = a[name], b[name]
        if x["status"] != y["status"]:
            problems.append(f"{name}: exit status {x['status']} -> {y['status']} ({y.get('error') or x.get('error')})")
            continue
        if x.get("history") != y.get("history"):
            for row_x, row_y in zip(x.get("history", []), y.get("history", [])):
                if row_x != row_y:
                    problems.append(f"{name}: history differs at step {row_x.get('step')}: {row_x} -> {row_y}")
                    break
            else:
                problems.append(f"{name}: history has {len(x.get('history', []))} -> {len(y.get('history', []))} rows")
        tx, ty = ({k: v for k, v in t.get("tensors", {}).items() if not k.startswith(ignore)} for t in (x, y))
        for key in sorted(set(tx) | set(ty)):
            if tx.get(key) != ty.get(key):
                what = "missing after" if key not in ty else "new" if key not in tx else "differs"
                problems.append(f"{name}: {key} {what}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run this tree (or --tree) and write a record")
    rec.add_argument("out", type=Path)
    chk = sub.add_parser("check", help="record --before REV in a git worktree and this tree, then compare")
    chk.add_argument("--before", required=True, help="a git revision of this repository")
    for p in (rec, chk):
        p.add_argument("--tree", type=Path, default=ROOT, help="the source tree to run (default: this one)")
        p.add_argument("--work", type=Path, default=ROOT / "runs" / "equivalence")
        p.add_argument("--suites", default="oracle,tiny", help="comma-separated: oracle, tiny, tiny-sd, tiny-sd3, tiny-dit")
        p.add_argument("--only", default=None, help="only the runs whose name contains this, e.g. oracle/dmd")
    cmp_ = sub.add_parser("compare", help="compare two records")
    cmp_.add_argument("a", type=Path)
    cmp_.add_argument("b", type=Path)
    for p in (chk, cmp_):
        p.add_argument("--ignore", action="append", default=[], metavar="PREFIX",
                       help="leave out the tensors of files under this run-folder path (repeatable)")
    args = parser.parse_args(argv)

    if args.command == "compare":
        problems = compare(json.loads(args.a.read_text()), json.loads(args.b.read_text()), tuple(args.ignore))
    else:
        suites = args.suites.split(",")
        work = args.work.resolve()
        pipelines = work / "tiny-pipelines"
        trees = {"after": args.tree}
        if args.command == "check":
            before = work / "before-tree"
            if not before.exists():
                subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True)
            trees = {"before": before, "after": args.tree}
        if not pipelines.exists() and any(s.startswith("tiny") for s in suites):
            first = next(iter(trees.values())).resolve()
            subprocess.run([sys.executable, "-m", "stepdistill.testing.tiny_pipelines", str(pipelines)], cwd=first,
                           env={**os.environ, "PYTHONPATH": str(first), "OMP_NUM_THREADS": "1"}, check=True,
                           stdout=subprocess.DEVNULL)
        if args.command == "record":
            record(args.tree, args.out, work / "after", suites, pipelines, args.only)
            return 0
        recs = {label: record(tree, work / f"{label}.json", work / label, suites, pipelines, args.only)
                for label, tree in trees.items()}
        problems = compare(recs["before"], recs["after"], tuple(args.ignore))
        failed = [n for n, e in recs["after"].items() if e["status"] != 0]
        if failed:
            problems.append(f"runs that failed in both trees alike: {failed}")
    for line in problems:
        print(line)
    n = len(runs(args.suites.split(","), args.only)) if args.command != "compare" else None
    print("identical" if not problems else f"{len(problems)} differences", f"({n} runs)" if n else "")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
