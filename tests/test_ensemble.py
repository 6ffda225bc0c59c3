"""Level 4: ensemble weights fitted on val, the ensemble temperature, ensemble.json and its checks.

Synthetic logits and tiny random checkpoints only: no real data, no training."""
import json
import warnings
from types import SimpleNamespace

import pytest
import torch

from cifar_core.checkpoint import save_checkpoint
from cifar_core.data import Split
from cifar_core.ensemble import (FIT_FILE, Ensemble, EnsembleError, Member, fit_record, fit_weights, fit_zoo,
                                 load_zoo, member_log_probs, mixture_log_probs, read_fit, shared_split, write_fit)
from cifar_core.models import create_model
from cifar_core.predictor import Predictor

N, C = 3000, 10


def synthetic(seed=0):
    """Labels, an informative member's log-probs and a pure-noise member's. The informative member
    sees x = z + 2 * onehot(label), z ~ N(0, 1), and outputs the exact posterior softmax(2x): it is
    calibrated by construction (right about 2/3 of the time)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    informative = 2.0 * (torch.randn(N, C, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, C))
    noise = 2.0 * torch.randn(N, C, generator=g)
    return labels, torch.stack([informative.log_softmax(1), noise.log_softmax(1)])


def nll(log_probs, labels):
    return float(-log_probs.gather(1, labels[:, None]).mean())


def test_weight_concentrates_on_the_informative_member():
    labels, lp = synthetic()
    fit = fit_weights(lp, labels, with_temperature=False)
    assert fit.weights[0] > 0.95 and abs(sum(fit.weights) - 1) < 1e-9
    assert fit.nll_weights < fit.nll_equal - 0.1  # far better than averaging in the noise
    assert fit.nll == pytest.approx(nll(mixture_log_probs(lp.double(), fit.weights), labels), abs=1e-9)
    # member order does not matter
    swapped = fit_weights(lp.flip(0), labels, with_temperature=False)
    assert swapped.weights[1] == pytest.approx(fit.weights[0], abs=1e-4)
    # deterministic
    assert fit_weights(lp, labels, with_temperature=False).weights == fit.weights
    # and it generalizes: fresh data from the same members
    labels2, lp2 = synthetic(seed=1)
    assert nll(mixture_log_probs(lp2, fit.weights), labels2) < nll(mixture_log_probs(lp2, [0.5, 0.5]), labels2)


def test_identical_members_keep_equal_weights_and_fit_is_never_worse_than_equal():
    labels, lp = synthetic()
    twins = torch.stack([lp[0], lp[0]])
    fit = fit_weights(twins, labels)
    assert fit.weights == pytest.approx([0.5, 0.5], abs=1e-6)
    assert fit.nll <= fit.nll_weights <= fit.nll_equal + 1e-12


def test_ensemble_temperature_fixes_an_overconfident_average_and_is_skipped_when_useless():
    labels, lp = synthetic()
    overconfident = (4.0 * lp[0]).log_softmax(1)[None]  # logits x4: far too sure
    fit = fit_weights(overconfident, labels)
    assert fit.weights == [1.0]
    assert fit.temperature == pytest.approx(4.0, rel=0.1)
    assert fit.nll < fit.nll_weights - 0.1
    calibrated = fit_weights(lp[:1], labels)  # the exact posterior: nothing to fix
    assert fit_weights(lp[:1], labels, with_temperature=False).temperature == 1.0
    assert calibrated.temperature == pytest.approx(1.0, abs=0.05)


def complementary(strengths, seed=0):
    """Labels and calibrated members that each see the label through their own noise: member i outputs the
    exact posterior of x_i = z_i + s_i * onehot(label), so averaging members helps and a weaker one helps less."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (N,), generator=g)
    onehot = torch.nn.functional.one_hot(labels, C)
    return labels, torch.stack([(s * (torch.randn(N, C, generator=g) + s * onehot)).log_softmax(1) for s in strengths])


def test_a_member_below_min_weight_is_dropped_and_the_rest_refitted():
    labels, lp = complementary([1.5, 1.5, 1.1])
    free = fit_weights(lp, labels, with_temperature=False, min_weight=0.0)
    assert 0.01 < free.weights[2] < 0.05  # it helps a little: a small positive weight when nothing is dropped
    fit = fit_weights(lp, labels, with_temperature=False)  # MIN_WEIGHT = 0.05
    assert fit.weights[2] == 0.0  # exactly 0: the ensemble path never computes it
    pair = fit_weights(lp[:2], labels, with_temperature=False)
    assert fit.weights[:2] == pytest.approx(pair.weights, abs=1e-6)  # the others refitted without it
    assert fit.nll_weights == pytest.approx(free.nll_weights, abs=0.005)  # dropping it costs next to nothing
    # a member that earns its weight stays
    labels, lp = complementary([1.5, 1.5, 1.3])
    assert min(fit_weights(lp, labels, with_temperature=False).weights) > 0.1


class Refuses(Predictor):
    def probs(self, images_u8, tta=None):
        raise AssertionError("an unweighted member was computed on the ensemble path")

    logits_and_features = probs


def test_the_ensemble_path_skips_members_of_weight_zero():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    used = Member("used", None, {}, Predictor(tiny_model(0), tta=0))
    idle = Member("idle", None, {}, Refuses(tiny_model(1), tta=0))
    ensemble = Ensemble([used, idle], [1.0, 0.0])
    assert [m.name for m in ensemble.weighted] == ["used"] and not ensemble.is_weighted("idle")
    member = ensemble.member_probs(images)
    assert set(member) == {"used"}
    torch.testing.assert_close(ensemble.combine(member), used.predictor.probs(images))
    assert set(ensemble.member_probs(images, features=True)) == {"used"}
    with pytest.raises(AssertionError, match="unweighted"):  # asked for explicitly, it is computed
        ensemble.member_probs(images, members=[idle])


def test_bad_shapes_are_refused():
    labels, lp = synthetic()
    with pytest.raises(ValueError, match="K x N x C"):
        fit_weights(lp[0], labels)
    with pytest.raises(ValueError, match="K x N x C"):
        fit_weights(lp[:, :10], labels)


# -- members: tiny random checkpoints -------------------------------------------------------

SPLIT = Split("seed", 0, torch.arange(0, 40), torch.arange(40, 100), torch.arange(100, 160))


def tiny_model(seed):
    torch.manual_seed(seed)
    model = create_model("cifar_cnn_small")
    model.init_from_data(torch.randn(64, 3, 32, 32))
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 32, 32))
    return model.eval()


def member_meta(model, fingerprint=SPLIT.fingerprint, temperature=1.0):
    return {"model": model.spec.name, "model_kwargs": model.model_kwargs,
            "classes": [str(i) for i in range(10)], "spec": model.spec.to_dict(), "temperature": temperature,
            "metrics": {"tta": 0}, "train_config": {"data": None},
            "split": {"name": "seed", "seed": 0, "fingerprint": fingerprint, "sizes": {}}}


@pytest.fixture
def zoo_root(tmp_path):
    root = tmp_path / "checkpoints"
    for i, name in enumerate(("alpha", "beta")):
        model = tiny_model(i)
        save_checkpoint(root / name, model, member_meta(model, temperature=0.5 + i))
    return root


@pytest.fixture
def fake_data():
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(images=torch.randint(0, 256, (160, 3, 32, 32), dtype=torch.uint8, generator=g),
                           labels=torch.randint(0, 10, (160,), generator=g), source="fake", fingerprint="f00d")


def fake_member(name, fingerprint, saved_at="t0"):
    model = tiny_model(0)
    return Member(name, None, {"saved_at": saved_at, "split": {"name": "seed", "seed": 0, "fingerprint": fingerprint}},
                  Predictor(model, tta=0))


def test_members_of_different_splits_are_refused(fake_data, monkeypatch):
    same = [fake_member("a", "abc"), fake_member("b", "abc")]
    assert shared_split(same)["fingerprint"] == "abc"
    mixed = [fake_member("a", "abc"), fake_member("b", "xyz")]
    with pytest.raises(EnsembleError, match="different splits"):
        shared_split(mixed)
    with pytest.raises(EnsembleError, match="different splits"):
        fit_zoo(mixed, fake_data)
    with pytest.raises(EnsembleError, match="no split fingerprint"):
        shared_split([Member("old", None, {}, same[0].predictor)])
    # data that does not reproduce the members' split is refused too
    monkeypatch.setattr("cifar_core.data.make_split", lambda data, name, seed: SPLIT)
    with pytest.raises(EnsembleError, match="refusing to fit on other images"):
        fit_zoo(same, fake_data)


def test_fit_json_round_trip_and_mismatch_fallback(zoo_root, fake_data, tmp_path):
    members = load_zoo(zoo_root)
    assert [m.name for m in members] == ["alpha", "beta"]  # ensemble.json beside them is not a member
    record = fit_record(members, (fake_data.images[:60], fake_data.labels[:60]),
                        (fake_data.images[60:], fake_data.labels[60:]), command="pytest")
    assert set(record["metrics"]["fitted"]) == {"val", "test"}
    assert record["metrics"]["fitted"]["val"]["nll"] <= record["metrics"]["equal"]["val"]["nll"] + 1e-6
    # a known, lopsided fit, so that equal weights are distinguishable
    record["members"][0]["weight"], record["members"][1]["weight"], record["temperature"] = 0.8, 0.2, 1.5
    path = write_fit(record, zoo_root / FIT_FILE)
    assert read_fit(path) == json.loads(json.dumps(record))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matching fit loads silently
        ens = Ensemble.from_fit(load_zoo(zoo_root))  # default path: beside the members
    assert ens.weights == pytest.approx([0.8, 0.2]) and ens.temperature == 1.5 and "fitted" in ens.source
    images = fake_data.images[:8]
    expected = mixture_log_probs(member_log_probs(members, images).double(), [0.8, 0.2], 1.5).exp()
    assert torch.allclose(ens.probs(images).double(), expected, atol=1e-5)
    assert torch.allclose(ens.probs(images).sum(1), torch.ones(8), atol=1e-5)

    # a retrained member (new saved_at), a missing member, no file, a broken file: equal weights + warning
    stale = json.loads(path.read_text())
    stale["members"][1]["saved_at"] = "1999-01-01T00:00:00+00:00"
    write_fit(stale, tmp_path / "stale.json")
    with pytest.warns(UserWarning, match="beta retrained"):
        assert Ensemble.from_fit(members, tmp_path / "stale.json").weights == [0.5, 0.5]
    with pytest.warns(UserWarning, match="does not belong"):
        ens = Ensemble.from_fit(members[:1], path)
    assert ens.weights == [1.0] and ens.temperature == 1.0
    with pytest.warns(UserWarning, match="missing"):
        assert Ensemble.from_fit(members, tmp_path / "none.json").weights == [0.5, 0.5]
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.warns(UserWarning, match="not a readable ensemble fit"):
        assert Ensemble.from_fit(members, tmp_path / "broken.json").weights == [0.5, 0.5]
    # fitted at another TTA level than the members run at: used, with a warning
    with pytest.warns(UserWarning, match="other TTA levels"):
        assert Ensemble.from_fit(load_zoo(zoo_root, tta=1), path).weights == pytest.approx([0.8, 0.2])


def test_train_py_ensemble_writes_the_fit(zoo_root, fake_data, monkeypatch, capsys):
    import train
    monkeypatch.setattr("cifar_core.data.load_cifar10", lambda data_dir=None, **kw: fake_data)
    monkeypatch.setattr("cifar_core.data.make_split", lambda data, name, seed: SPLIT)
    assert train.main(["ensemble", "--checkpoints", str(zoo_root), "--data", "X", "--tta", "1", "--device", "cpu"]) == 0
    record = read_fit(zoo_root / FIT_FILE)
    assert [m["name"] for m in record["members"]] == ["alpha", "beta"]
    assert record["tta"] == 1 and all(m["tta"] == 1 for m in record["members"])
    assert record["split"]["fingerprint"] == SPLIT.fingerprint and record["split"]["sizes"]["val"] == 60
    assert record["command"].startswith("python train.py") and record["metrics"]["equal"]["test"]["n"] == 60
    out = capsys.readouterr().out
    assert "ensemble (equal weights)" in out and "ensemble (fitted" in out and str(zoo_root / FIT_FILE) in out

    model = tiny_model(5)  # a member of another split joins: refused, clear error, exit 2, file kept
    save_checkpoint(zoo_root / "gamma", model, member_meta(model, fingerprint="0123456789abcdef"))
    assert train.main(["ensemble", "--checkpoints", str(zoo_root), "--data", "X", "--device", "cpu"]) == 2
    assert "different splits" in capsys.readouterr().err
    assert read_fit(zoo_root / FIT_FILE) == record


@pytest.mark.parametrize("level,fits", [(4, True), (3, False)])
def test_level4_fits_the_ensemble_after_training(level, fits, monkeypatch, tmp_path):
    import train
    calls = []
    monkeypatch.setattr("cifar_core.engine.train", lambda cfg, out_dir, **kw: calls.append(("train", cfg.model))
                        or SimpleNamespace(metrics={}))
    monkeypatch.setattr(train, "run_ensemble_fit", lambda **kw: calls.append(("fit", kw["root"], kw["data_dir"])) or 0)
    assert train.main(["--level", str(level), "--data", "DATA", "--out", str(tmp_path / "zoo" / "x")]) == 0
    # the zoo the new checkpoint joined (checkpoints/ for the level's own --out) is fitted
    assert calls[0][0] == "train" and (calls[1:] == [("fit", tmp_path / "zoo", "DATA")]) == fits
    assert len(calls) == 1 + fits


def test_demo_lab_uses_the_fitted_weights(zoo_root, tmp_path):
    from cifar_core.serving import Lab
    members = load_zoo(zoo_root)
    write_fit({"format": 1, "temperature": 1.0, "members": [
        {"name": m.name, "saved_at": m.meta["saved_at"], "weight": w, "tta": 0}
        for m, w in zip(members, (0.3, 0.7))]}, zoo_root / FIT_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no demo assets in tmp_path
        lab = Lab(zoo_root, assets_dir=tmp_path)
    assert lab.ensemble.weights == pytest.approx([0.3, 0.7])


def test_cli_calibrate_refits_the_temperature_and_refuses_other_images(cifar, data_dir, tmp_path):
    """`train.py calibrate` (cifar_core.ensemble.recalibrate_checkpoint): a new temperature fitted on
    the checkpoint's own val split, written to meta.json; a checkpoint of another split is refused."""
    import train
    from cifar_core.data import CLASSES, make_split
    torch.manual_seed(0)
    model = create_model("cifar_cnn_small")
    split = make_split(cifar, "seed", 0)
    meta = {"model": "cifar_cnn_small", "model_kwargs": {}, "classes": list(CLASSES), "spec": model.spec.to_dict(),
            "metrics": {"tta": 0}, "history": [], "temperature": 1.0,
            "split": {"name": "seed", "seed": 0, "fingerprint": split.fingerprint}}
    save_checkpoint(tmp_path / "ok", model, meta, half=False)
    assert train.main(["calibrate", str(tmp_path / "ok"), "--data", data_dir]) == 0
    written = json.loads((tmp_path / "ok" / "meta.json").read_text())
    assert written["temperature"] == written["metrics"]["calibration"]["temperature"] != 1.0
    assert written["metrics"]["val"]["n"] == 6000 and written["commands"][-1].startswith("python train.py")
    assert (tmp_path / "ok" / "confusion.png").exists()

    save_checkpoint(tmp_path / "other", model, {**meta, "split": {**meta["split"], "fingerprint": "0" * 16}}, half=False)
    with pytest.raises(SystemExit) as e:
        train.main(["calibrate", str(tmp_path / "other"), "--data", data_dir])
    assert e.value.code == 2


# -- benchmarks/ensemble_candidates.py: the rule that decides whether a checkpoint joins the zoo ----------------

def test_candidate_joins_only_when_it_raises_val_accuracy(zoo_root, fake_data, tmp_path, monkeypatch, capsys):
    from conftest import load_benchmark
    bench = load_benchmark("ensemble_candidates")
    # the candidate is right by construction: the labels are its own predictions at its TTA level (0)
    good = tiny_model(7)
    save_checkpoint(tmp_path / "cands" / "good", good, member_meta(good))
    with torch.no_grad():
        labels = Predictor(good, tta=0).logits(fake_data.images).argmax(1)
    data = SimpleNamespace(**{**vars(fake_data), "labels": labels})
    twin = tiny_model(0)  # alpha's weights again: adds nothing the zoo lacks
    save_checkpoint(tmp_path / "cands" / "alpha", twin, member_meta(twin, temperature=0.5))
    monkeypatch.setattr(bench, "load_cifar10_for", lambda data_dir, metas: data)
    monkeypatch.setattr("cifar_core.data.make_split", lambda data, name, seed: SPLIT)
    monkeypatch.setattr(bench, "cache_dir", lambda: tmp_path / "cache")
    argv = [str(tmp_path / "cands" / "good"), str(tmp_path / "cands" / "alpha"), "--checkpoints", str(zoo_root),
            "--json", str(tmp_path / "rows.json")]
    assert bench.main(argv) == 0
    rows = {r["ensemble"]: r for r in json.loads((tmp_path / "rows.json").read_text())["rows"]}
    assert list(rows) == ["zoo", "zoo +good", "zoo +cands/alpha", "zoo + every candidate"]
    assert [r["rule"] for r in rows.values()][:3] == ["-", "joins", "stays out"], rows
    joined = rows["zoo +good"]
    assert joined["val acc %"] == 100.0 and joined["val gain"] >= 50 and "good" in joined["members (weight)"]
    assert "cands/alpha: alone" in capsys.readouterr().out  # the twin is renamed, not confused with the zoo's alpha
    fits = json.loads((tmp_path / "rows.json").read_text())["fits"]
    assert "zoo +cands/alpha" in fits and "zoo + every candidate" in fits
    # right on every image: it fixes each of the zoo's val errors and breaks nothing
    o = fits["zoo +good"]["overlap on val"]
    assert o["zoo errors"] > 0 and o["fixes"] == o["zoo errors"] and o["breaks"] == 0, o
    assert bench.overlap(torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False])) == {
        "zoo errors": 2, "fixes": 1, "breaks": 1}
    # the cache is keyed by content: the twin has alpha's weights and temperature, so it shares alpha's entry;
    # the second run reads every model's log-probabilities from the cache: no forward pass at all
    assert len(list((tmp_path / "cache" / "member_log_probs").glob("*.safetensors"))) == 3
    monkeypatch.setattr(bench, "member_log_probs", lambda *a, **k: pytest.fail("recomputed a cached model"))
    assert bench.main(argv) == 0
    # the key follows what changes the numbers: another temperature is another entry
    member = bench.load_member(tmp_path / "cands" / "good")
    key = bench.log_probs_key(member, "split", "data")
    member.predictor.temperature = 2.0
    assert bench.log_probs_key(member, "split", "data") != key
    # a folder that is not a checkpoint: a clear error, exit 2
    assert bench.main([str(tmp_path / "nothing"), "--checkpoints", str(zoo_root)]) == 2
    assert "nothing" in capsys.readouterr().err


def test_zoo_at_another_tta_level_is_one_more_row_under_the_same_rule(zoo_root, fake_data, tmp_path, monkeypatch):
    from conftest import load_benchmark
    bench = load_benchmark("ensemble_candidates")
    # the labels are alpha's own predictions at TTA level 2: the zoo re-run at level 2 can reach 100% val
    alpha = bench.load_member(zoo_root / "alpha", tta=2)
    with torch.no_grad():
        labels = alpha.predictor.logits(fake_data.images).argmax(1)
    data = SimpleNamespace(**{**vars(fake_data), "labels": labels})
    monkeypatch.setattr(bench, "load_cifar10_for", lambda data_dir, metas: data)
    monkeypatch.setattr("cifar_core.data.make_split", lambda data, name, seed: SPLIT)
    monkeypatch.setattr(bench, "cache_dir", lambda: tmp_path / "cache")
    out = tmp_path / "rows.json"
    assert bench.main(["--zoo-tta", "2", "--checkpoints", str(zoo_root), "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = {r["ensemble"]: r for r in record["rows"]}
    assert list(rows) == ["zoo", "zoo at TTA 2"]
    assert set(record["fits"]["zoo at TTA 2"]["weights"]) == {"alpha@tta2", "beta@tta2"}
    assert rows["zoo"]["val acc %"] < 100.0 and rows["zoo at TTA 2"]["val acc %"] == 100.0, rows
    assert rows["zoo at TTA 2"]["rule"] == "switch to TTA 2"
    # the zoo's own level again: the same cache keys, so nothing new is computed or stored, and no gain
    cache = tmp_path / "cache" / "member_log_probs"
    assert len(list(cache.glob("*.safetensors"))) == 4
    monkeypatch.setattr(bench, "member_log_probs", lambda *a, **k: pytest.fail("recomputed a cached model"))
    assert bench.main(["--zoo-tta", "0", "--checkpoints", str(zoo_root), "--json", str(out)]) == 0
    same = {r["ensemble"]: r for r in json.loads(out.read_text())["rows"]}["zoo at TTA 0"]
    assert same["val gain"] == 0 and same["rule"] == "keep each member's own TTA"
    # neither a candidate nor a TTA level: a usage error
    with pytest.raises(SystemExit) as e:
        bench.main(["--checkpoints", str(zoo_root)])
    assert e.value.code == 2


def test_val_only_scores_val_and_a_later_full_run_adds_only_test(zoo_root, fake_data, tmp_path, monkeypatch):
    from conftest import load_benchmark
    bench = load_benchmark("ensemble_candidates")
    monkeypatch.setattr(bench, "load_cifar10_for", lambda data_dir, metas: fake_data)
    monkeypatch.setattr("cifar_core.data.make_split", lambda data, name, seed: SPLIT)
    monkeypatch.setattr(bench, "cache_dir", lambda: tmp_path / "cache")
    calls = []
    real = bench.member_log_probs
    subsets = {"val": fake_data.images[SPLIT.val], "test": fake_data.images[SPLIT.test]}

    def which(x):  # which subset a forward pass ran on
        return next(s for s, images in subsets.items() if images.shape == x.shape and torch.equal(images, x))

    monkeypatch.setattr(bench, "member_log_probs", lambda members, x: calls.append(which(x)) or real(members, x))
    out = tmp_path / "rows.json"
    argv = ["--zoo-tta", "2", "--checkpoints", str(zoo_root), "--json", str(out)]
    assert bench.main(argv + ["--val-only"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["ensemble"] for r in rows] == ["zoo", "zoo at TTA 2"]
    assert all("val acc %" in r and "test acc %" not in r for r in rows), rows
    assert calls and set(calls) == {"val"}, calls  # the test images were never run
    # the full run reads the val half from the cache and runs each model on the test images only
    calls.clear()
    assert bench.main(argv) == 0
    assert calls and set(calls) == {"test"}, calls
    full = {r["ensemble"]: r for r in json.loads(out.read_text())["rows"]}
    assert "test acc %" in full["zoo at TTA 2"] and full["zoo"]["val acc %"] == rows[0]["val acc %"]
    # and the entries now hold both halves: a third run computes nothing
    calls.clear()
    assert bench.main(argv) == 0 and calls == []
