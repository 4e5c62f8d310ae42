"""Offset Learning alone against the published module's reference output and parameter formula."""

import torch

from conftest import assert_close_to_reference, load_vector, published_offset_learning_forward
from models import Offset_Learning, OffsetLearning


def test_parameter_count_is_kc_plus_2c2_plus_2k():
    for k, c in [(150, 256), (150, 128), (19, 256), (171, 256), (59, 256), (150, 512)]:
        params = sum(p.numel() for p in OffsetLearning(k, c).parameters())
        assert params == k * c + 2 * c * c + 2 * k
    assert sum(p.numel() for p in OffsetLearning(150, 256).parameters()) == 169_772


def test_matches_the_published_module():
    d = load_vector('ol_module')
    module = Offset_Learning(num_classes=19, embed_dims=64).eval()
    module.load_state_dict(d['state_dict'])
    with torch.no_grad():
        assert_close_to_reference(module(d['input']), d['logits'], 'Offset Learning logits')


def test_logits_are_layer_normalised_over_classes():
    module = OffsetLearning(5, 8)
    logits = module(torch.rand(2, 8, 4, 6))
    assert logits.shape == (2, 5, 4, 6)
    assert torch.allclose(logits.mean(1), torch.zeros(2, 4, 6), atol=1e-5)


def test_the_reassociated_products_equal_the_published_order():
    """Float64, unit-scale class embeddings (at the init's 0.02 the final LayerNorm magnifies rounding)."""
    torch.manual_seed(0)
    module = OffsetLearning(19, 64).double()
    with torch.no_grad():
        module.cls_repr.normal_()
        module.mask_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 64, 12, 20, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 19, 12, 20, dtype=torch.float64)
    outputs, gradients = [], []
    for forward in (module, lambda x: published_offset_learning_forward(module, x)):
        output = forward(x)
        outputs.append(output)
        gradients.append(torch.autograd.grad((output * target).sum(), [x, *module.parameters()]))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-9, atol=1e-9)  # training sees the same function
