import torch

import garden
from conftest import ROOT, run_script
from mlp import MLP


def test_garden_tpe_lands_within_half_a_percent_of_the_optimum():
    study = garden.run(n_trials=garden.N_TRIALS, sampler="tpe", seed=0)
    assert study.direction.name == "MAXIMIZE"
    assert study.best_value <= garden.BEST_AREA  # nothing beats calculus
    assert (garden.BEST_AREA - study.best_value) / garden.BEST_AREA < 0.005
    assert abs(study.best_params["x"] - 125) < 15


def test_garden_script_prints_best_optimum_and_gap():
    result = run_script("garden.py", "--sampler", "random", "--n-trials", "50", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "x = 125.00 m, area = 31,250.0 m^2" in result.stdout
    assert "gap:" in result.stdout


def expected_parameters(in_size, hidden_size, out_size, layer_size):
    first = in_size * hidden_size + hidden_size
    middle = (layer_size - 1) * (hidden_size * hidden_size + hidden_size)
    return first + middle + hidden_size * out_size + out_size


def test_mlp_shapes_and_parameter_count():
    for in_size, hidden_size, out_size, layer_size in [(784, 128, 10, 5), (20, 7, 3, 1), (784, 512, 10, 2)]:
        model = MLP(in_size, hidden_size, out_size, layer_size, dropout=0.1)
        assert model(torch.zeros(4, in_size)).shape == (4, out_size)
        assert sum(p.numel() for p in model.parameters()) == expected_parameters(in_size, hidden_size, out_size, layer_size)
        assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == layer_size


def test_mlp_default_is_the_documented_one():
    model = MLP()
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(784, 128, 10, 5)
    model.eval()  # dropout off: the same input gives the same logits
    x = torch.randn(3, 784)
    assert torch.equal(model(x), model(x))
