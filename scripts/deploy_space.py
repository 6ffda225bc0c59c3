#!/usr/bin/env python
"""Deploy the demo to a Hugging Face Space, as it is committed here:

  python scripts/deploy_space.py --dry-run                       # every file that would go up, and the total
  python scripts/deploy_space.py --repo USER/NAME                # create the Space if needed, upload, one commit
  python scripts/deploy_space.py --repo USER/NAME --prune        # also delete files the Space has and we don't

What goes up is an allow-list over the files git tracks (SPACE_FILES): the entry point, the README (its front
matter configures the Space), the runtime requirements, the `cifar_core` and `demo` packages, the demo's
assets, examples and style, the shipped checkpoints and int8 edge models. Never data, runs, caches, results,
tests or benchmarks (DENIED is checked on top of the allow-list). huggingface_hub's upload API sends large
and binary files through LFS, which Spaces require for files over 10 MB (the ViT weights are 10.7 MB).

The token comes from --token, $HF_TOKEN or `huggingface-cli login`. tests/test_deploy.py copies exactly the
dry run's set to an empty folder and starts the app there, so a Space gets what was tested.
"""
from __future__ import annotations

import argparse
import fnmatch
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SPACE_FILES = (
    "app.py", "README.md", "requirements.txt",
    "cifar_core/*.py", "cifar_core/*.json", "cifar_core/models/*.py",
    "demo/*.py", "demo/style.css", "demo/head.html",
    "demo/assets/*", "demo/examples/*",
    "checkpoints/ensemble.json", "checkpoints/*/model.safetensors", "checkpoints/*/meta.json",
    "checkpoints/*/history.jsonl", "checkpoints/*/curves.png", "checkpoints/*/confusion.png",
    "exports/*/int8.onnx",
)
DENIED = ("data/", "runs/", "results/", "tests/", "benchmarks/", "scripts/", ".cache/", "test-artifacts/", ".git/")
SPACE_TYPE = "space"


def tracked_files(root: Path = ROOT) -> list[str]:
    """What git tracks under `root` (posix paths), so that local leftovers never travel."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"{root} is not a git checkout (git ls-files failed: {e}); deploy from a clone") from None
    return sorted(p for p in out.decode().split("\0") if p)


def space_files(root: Path = ROOT) -> list[str]:
    """The tracked files a Space needs, by SPACE_FILES; fnmatch's * crosses folders only where a pattern says so."""
    chosen = [f for f in tracked_files(root)
              if any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/") for pat in SPACE_FILES)]
    leaked = [f for f in chosen if f.startswith(DENIED)]
    if leaked:  # a pattern above grew too wide: refuse rather than publish
        raise SystemExit(f"refusing to upload denied paths: {leaked}")
    missing = [f for f in chosen if not (root / f).is_file()]
    if missing:
        raise SystemExit(f"tracked but missing on disk (commit or restore them first): {missing}")
    return chosen


def size_text(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def listing(root: Path, files: list[str]) -> str:
    sizes = {f: (root / f).stat().st_size for f in files}
    width = max(len(f) for f in files)
    lines = [f"{f:<{width}}  {size_text(s):>9}" for f, s in sizes.items()]
    lines.append(f"{len(files)} files, {size_text(sum(sizes.values()))} in all")
    return "\n".join(lines)


def copy_set(files: list[str], dest: Path, root: Path = ROOT) -> Path:
    """Exactly the upload set, in an empty folder (what the Space's checkout will hold)."""
    for f in files:
        target = Path(dest) / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, target)
    return Path(dest)


def upload(repo: str, files: list[str], token: str | None, private: bool, prune: bool, root: Path = ROOT) -> str:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    api = HfApi(token=token)
    api.create_repo(repo, repo_type=SPACE_TYPE, space_sdk="gradio", exist_ok=True, private=private)
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(root / f)) for f in files]
    if prune:
        keep = set(files) | {".gitattributes"}
        operations += [CommitOperationDelete(path_in_repo=f)
                       for f in api.list_repo_files(repo, repo_type=SPACE_TYPE) if f not in keep]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    info = api.create_commit(repo_id=repo, repo_type=SPACE_TYPE, operations=operations,
                             commit_message=f"Deploy {commit.stdout.strip() or 'working tree'} "
                                            "(scripts/deploy_space.py)")
    return info.commit_url


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", help="the Space, USER/NAME (created as a Gradio Space when it does not exist)")
    p.add_argument("--dry-run", action="store_true", help="print every file that would go up and the total; "
                   "upload nothing (no network, no token)")
    p.add_argument("--token", help="Hugging Face token (default $HF_TOKEN or the cached login)")
    p.add_argument("--private", action="store_true", help="create the Space private")
    p.add_argument("--prune", action="store_true", help="delete files on the Space that are not in the set")
    args = p.parse_args(argv)
    if not args.dry_run and not args.repo:
        p.error("--repo USER/NAME is required (or --dry-run)")
    if args.repo and args.repo.count("/") != 1:
        p.error(f"--repo must be USER/NAME, got {args.repo!r}")
    files = space_files()
    print(listing(ROOT, files))
    if args.dry_run:
        print(f"dry run: nothing uploaded{f' to {args.repo}' if args.repo else ''}")
        return 0
    print(f"uploading to https://huggingface.co/spaces/{args.repo} ...", flush=True)
    print(f"done: {upload(args.repo, files, args.token, args.private, args.prune)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
