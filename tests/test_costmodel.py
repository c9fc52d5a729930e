"""Model states per rank from the shapes (dtlab/costmodel/shapes.py) against real models: the
pipeline cut equals the model's, and the weights, gradients and AdamW state are the bytes the
tensors hold (the 3D lab test checks every rank of a TP x PP x DP run the same way)."""
import pytest
import torch

from dtlab.costmodel.shapes import Shape, model_states, stage_layers, total_params
from dtlab.train.model import ModelConfig, build_model, stage_bounds


def test_stage_cut_is_the_models():
    for layers in range(1, 9):
        for stages in range(1, layers + 1):
            assert [stage_layers(layers, stages, s) for s in range(stages)] == \
                stage_bounds(layers, stages)


@pytest.mark.parametrize("shape", [(2, 32, 2, 128, 13, 32), (4, 128, 4, 512, 65, 64),
                                   (3, 48, 4, 100, 7, 17)])
def test_model_states_are_the_tensors_bytes(shape):
    m = Shape(*shape)
    cfg = ModelConfig(vocab_size=m.vocab, seq_len=m.seq, n_layer=m.n_layer, n_head=m.n_head,
                      d_model=m.d_model, d_ff=m.d_ff)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, m.seq, dtype=torch.long)).sum().backward()
    opt.step()
    states = [v for s in opt.state.values() for v in s.values()]
    want = {"params": sum(p.numel() * 4 for p in model.parameters()),
            "grads": sum(p.grad.numel() * 4 for p in model.parameters()),
            "optimizer": sum(v.numel() * v.element_size() for v in states)}
    got = model_states(m)
    assert {k: got[k] for k in want} == want
    assert total_params(m) == sum(p.numel() for p in model.parameters())
