"""Muon (cifar_core.optim): the orthogonalization, the SGD fallback, the parameter split, and a real run."""
import torch

from cifar_core.engine import TrainConfig, make_optimizer, train
from cifar_core.models import create_model
from cifar_core.optim import MuonSGD, orthogonalize


def test_orthogonalize_flattens_the_spectrum_of_wide_and_tall_matrices():
    torch.manual_seed(0)
    for rows, cols in ((64, 576), (576, 64), (256, 256)):
        k = min(rows, cols)
        u, _ = torch.linalg.qr(torch.randn(rows, k))
        v, _ = torch.linalg.qr(torch.randn(cols, k))
        m = u @ torch.diag(torch.logspace(-2, 1, k)) @ v.T  # singular values spread over 3 decades
        out = orthogonalize(m)
        s = torch.linalg.svdvals(out)
        # 3 decades in, less than one out (5 steps do not converge fully: the smallest lag, by design)
        assert out.shape == m.shape and s.max() < 1.3 and s.median() > 0.7 and s.max() / s.min() < 12, s
        assert (out - u @ v.T).norm() < 0.4 * (u @ v.T).norm()  # near U V^T (a random guess: 1.4)


def test_groups_without_muon_take_exactly_torch_sgd_nesterov_steps():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    ours = MuonSGD([{"params": a.parameters(), "weight_decay": 1e-2}], lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    for _ in range(4):
        x = torch.randn(16, 8)
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_step_calls_the_closure_with_gradients_and_returns_its_loss():
    model = torch.nn.Linear(4, 1)
    opt = MuonSGD([{"params": model.parameters()}], lr=0.1, momentum=0.0)
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()  # fails if step() ran the closure under no_grad
        return loss
    first = opt.step(closure)
    second = opt.step(closure)
    assert first is not None and second.item() < first.item()  # the closure's gradients were used


def test_muon_takes_the_conv_filters_and_keeps_their_norm():
    model = create_model("cifar_cnn_small")
    opt = make_optimizer(model, TrainConfig(optimizer="muon", muon_lr=0.2, lr=1.0))
    muon = [g for g in opt.param_groups if g["muon"]]
    filters = {id(m.weight) for m in model.layers.modules() if isinstance(m, torch.nn.Conv2d)}
    assert len(muon) == 1 and {id(p) for p in muon[0]["params"]} == filters  # not the frozen stem, not the head
    assert muon[0]["lr_scale"] == 0.2 and muon[0]["weight_decay"] == 0
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    before = [p.clone() for p in muon[0]["params"]]
    opt.step()
    for p, old in zip(muon[0]["params"], before):
        step = p - old * len(p) ** 0.5 / old.norm()  # the update after the norm reset
        assert 0.1 < step.norm() / (0.2 * min(p.shape[0], p[0].numel()) ** 0.5) < 1.5  # about lr x sqrt(rank)


def test_a_short_muon_run_learns(cifar, data_dir, tmp_path):
    cfg = TrainConfig(model="cifar_cnn_small", epochs=3, batch_size=200, train_subset=2000, data=data_dir,
                      progress=False, tta=0, lr=1.0, optimizer="muon")
    result = train(cfg, out_dir=tmp_path / "run", data=cifar)
    assert result.history[-1]["val_acc"] > 0.3, result.history  # chance is 0.1
