#!/usr/bin/env python
"""Does a checkpoint earn a place in the ensemble? Refit the ensemble on val with it and see.

  python benchmarks/ensemble_candidates.py runs/ablation/abl192_no_smoothing runs/level1 --data ../shared/data/cifar10

The rule is fixed before looking (issue 25): a candidate joins the shipped zoo only if refitting the ensemble
on val with it raises the fitted ensemble's **val** accuracy by >= --min-gain points (default 0.2, about one
standard error on 6,000 images) over the zoo as it is. Test accuracy is printed, never used to choose: a
candidate picked on test would make the shipped test number a selected maximum.

Members: every checkpoint under --checkpoints (the shipped zoo); candidates: the checkpoint folders named. All
must share the zoo's split (cifar_core.ensemble.shared_split). Each model is run once per (weights, TTA level,
temperature, split, data) on val and test, at its own recorded TTA level, and its calibrated log-probabilities
are cached under ~/.cache/cifar_core/member_log_probs/ (safetensors): a rerun with another candidate costs only
the new model's two forward passes over 12,000 images (a few CPU minutes for an EfficientNet-Lite).
Rows: the zoo as fitted now, the zoo with each candidate, and the zoo with every candidate; each is refitted
with cifar_core.ensemble.fit_weights (the fit `python train.py ensemble` writes), so a member below
MIN_WEIGHT drops out exactly as it would in the shipped ensemble.

  python benchmarks/ensemble_candidates.py --zoo-tta 2 --data ../shared/data/cifar10

adds one more row, the zoo refitted with every member at TTA level N instead of its own (level 2: flip and
1-pixel shifts, 6 views; it triples a flip-TTA member's cost per image), under the same rule.

  python benchmarks/ensemble_candidates.py --zoo-tta 2 --val-only --data ../shared/data/cifar10

scores val only, which is all the rule reads: half the forward passes, so a slow level fits in one session. The
rows then have no test columns; a later run without --val-only reuses the cached val half and adds test.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cifar_core.checkpoint import CheckpointError
from cifar_core.data import cache_dir, load_cifar10_for
from cifar_core.ensemble import (EnsembleError, Member, fit_weights, load_member, load_zoo, log_prob_metrics,
                                 member_log_probs, members_split, mixture_log_probs, shared_split)
from cifar_core.evaluate import format_table
from cifar_core.frozen import content_digest, weights_digest

SUBSETS = ("val", "test")


def log_probs_key(member: Member, split_fingerprint: str, data_fingerprint) -> str:
    """Everything the cached log-probabilities depend on: the weights themselves (not the folder's name or
    date), the TTA level, the temperature, and which images."""
    return content_digest(weights_digest(member.predictor.model), member.predictor.tta, member.predictor.temperature,
                          split_fingerprint, data_fingerprint)[:20]


def cached_log_probs(member: Member, images: dict[str, torch.Tensor], key: str, root: Path) -> dict[str, torch.Tensor]:
    """{subset: N x C calibrated log-probabilities} for each subset in `images`, from the cache or computed and
    cached (atomically). An entry may hold only some subsets (a --val-only run): the missing ones are computed
    and the entry is rewritten with all of them."""
    from safetensors.torch import load_file, save_file
    path = root / f"{key}.safetensors"
    out = load_file(path) if path.exists() else {}
    missing = {s: x for s, x in images.items() if s not in out}
    if missing:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out.update({s: member_log_probs([member], x)[0].float().contiguous() for s, x in missing.items()})
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(out, str(tmp), metadata={"member": member.name, "tta": str(member.predictor.tta)})
        tmp.replace(path)
        print(f"  {member.name}: {sum(len(x) for x in missing.values())} {'+'.join(missing)} images in "
              f"{time.perf_counter() - t0:.0f} s (cached as {path.name})", file=sys.stderr)
    return {s: out[s] for s in images}


def accuracy(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    return 100 * log_prob_metrics(log_probs, labels)["accuracy"]


def fitted_log_probs(row: dict, lp: dict[str, dict[str, torch.Tensor]], subset: str) -> torch.Tensor:
    """N x C log-probabilities of a fitted ensemble (a refit() row) on one subset."""
    stacked = torch.stack([lp[n][subset] for n in row["weights"]]).double()
    return mixture_log_probs(stacked, list(row["weights"].values()), row["temperature"])


def refit(names: list[str], lp: dict[str, dict[str, torch.Tensor]], labels: dict[str, torch.Tensor],
          subsets=SUBSETS) -> dict:
    """Fit the weights on val over `names`; score the fitted ensemble and its best member on each subset."""
    fit = fit_weights(torch.stack([lp[n]["val"] for n in names]).double(), labels["val"])
    row = {"weights": dict(zip(names, fit.weights)), "temperature": fit.temperature}
    for s in subsets:
        m = log_prob_metrics(fitted_log_probs(row, lp, s), labels[s])
        row[s] = {"acc": 100 * m["accuracy"], "nll": m["nll"]}
        row[f"best member {s}"] = max(accuracy(lp[n][s], labels[s]) for n in names)
    return row


def overlap(zoo_right: torch.Tensor, cand_right: torch.Tensor) -> dict[str, int]:
    """Does a candidate err differently? A member can only help where it is right and the ensemble is not:
    `fixes` bounds what it can add, `breaks` what it can cost."""
    return {"zoo errors": int((~zoo_right).sum()), "fixes": int((~zoo_right & cand_right).sum()),
            "breaks": int((zoo_right & ~cand_right).sum())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("candidates", nargs="*", help="checkpoint folders that might join the zoo")
    p.add_argument("--checkpoints", default=None, help="the zoo (default $CIFAR_CHECKPOINTS or checkpoints/)")
    p.add_argument("--data", help="CIFAR-10 folder (default $CIFAR10_DIR, else the members' own)")
    p.add_argument("--min-gain", type=float, default=0.2, help="val accuracy points a candidate must add (0.2)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads")
    p.add_argument("--zoo-tta", type=int, choices=(0, 1, 2),
                   help="also refit the zoo with every member at this TTA level (one more row, same rule)")
    p.add_argument("--val-only", action="store_true",
                   help="score val only (all the rule reads): half the forward passes; no test columns")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    if not args.candidates and args.zoo_tta is None:
        p.error("name at least one candidate checkpoint folder, or --zoo-tta")

    torch.set_num_threads(args.threads)
    zoo = load_zoo(args.checkpoints)
    zoo_names = [m.name for m in zoo]
    try:
        candidates = [load_member(c) for c in args.candidates]
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for c, path in zip(candidates, args.candidates):
        c.name = f"+{Path(path).parent.name}/{c.name}" if c.name in zoo_names else f"+{c.name}"
    # the zoo again at another TTA level: other names, so the rows can mix them; a member already at that level
    # has the same cache key, so it is read from the cache, not run twice
    retta = load_zoo(args.checkpoints, tta=args.zoo_tta) if args.zoo_tta is not None else []
    for m in retta:
        m.name = f"{m.name}@tta{args.zoo_tta}"
    members = zoo + candidates + retta
    if len({m.name for m in members}) != len(members):
        print("error: two candidates have the same folder name; give distinct folders", file=sys.stderr)
        return 2
    try:
        shared_split(members)  # before loading any data: the cheap refusal first
        data = load_cifar10_for(args.data, [m.meta for m in members])
        split = members_split(members, data)
    except EnsembleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    subsets = ("val",) if args.val_only else SUBSETS
    idx = {s: getattr(split, s) for s in subsets}
    images = {s: data.images[i] for s, i in idx.items()}
    labels = {s: data.labels[i] for s, i in idx.items()}
    root = cache_dir() / "member_log_probs"
    fingerprint = getattr(data, "fingerprint", None)
    lp = {m.name: cached_log_probs(m, images, log_probs_key(m, split.fingerprint, fingerprint), root)
          for m in members}

    sets = {"zoo": zoo_names}
    sets.update({f"zoo {c.name}": zoo_names + [c.name] for c in candidates})
    if len(candidates) > 1:
        sets["zoo + every candidate"] = zoo_names + [c.name for c in candidates]
    if retta:
        sets[f"zoo at TTA {args.zoo_tta}"] = [m.name for m in retta]
    results = {name: refit(names, lp, labels, subsets) for name, names in sets.items()}
    base = results["zoo"]["val"]["acc"]

    rows = []
    for name, r in results.items():
        gain = r["val"]["acc"] - base
        weights = ", ".join(f"{n.lstrip('+')} {w:.2f}" for n, w in r["weights"].items() if w > 0)
        passes = gain >= args.min_gain - 1e-9
        if name == "zoo":
            verdict = "-"
        elif name.startswith("zoo at TTA"):
            verdict = f"switch to TTA {args.zoo_tta}" if passes else "keep each member's own TTA"
        else:
            verdict = "joins" if passes else "stays out"
        row = {"ensemble": name, "members (weight)": weights, "T": round(r["temperature"], 3),
               "val acc %": round(r["val"]["acc"], 2), "val gain": round(gain, 2), "val NLL": round(r["val"]["nll"], 4)}
        if "test" in r:
            row.update({"test acc %": round(r["test"]["acc"], 2),
                        "over best member (test)": round(r["test"]["acc"] - r["best member test"], 2)})
        rows.append({**row, "rule": verdict})
    scored = f"scored on {len(idx['test'])} test images" if "test" in idx else "test not scored (--val-only)"
    print(f"\nSplit {split.name} (seed {split.seed}): weights fitted on {len(idx['val'])} val images, {scored}; "
          f"each member at its own TTA level"
          + (f" (in 'zoo at TTA {args.zoo_tta}': every member at level {args.zoo_tta})" if retta else "")
          + f". Rule: a candidate joins (a TTA level is adopted) if the val gain is >= {args.min_gain} points.\n")
    print(format_table(rows, list(rows[0])))
    zoo_right = fitted_log_probs(results["zoo"], lp, "val").argmax(1) == labels["val"]
    for c in candidates:
        o = overlap(zoo_right, lp[c.name]["val"].argmax(1) == labels["val"])
        results[f"zoo {c.name}"]["overlap on val"] = o
        test = f"test {accuracy(lp[c.name]['test'], labels['test']):.2f}% " if "test" in idx else ""
        print(f"{c.name.lstrip('+')}: alone val {accuracy(lp[c.name]['val'], labels['val']):.2f}%, "
              f"{test}(TTA {c.predictor.tta}); right on "
              f"{o['fixes']} of the zoo's {o['zoo errors']} val errors, wrong on {o['breaks']} it gets right")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "fits": results, "argv": sys.argv[1:],
                                               "split": split.fingerprint}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
